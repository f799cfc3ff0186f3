//! Client verbs that take more than one request or some shaping: plugin upload and invoke,
//! subscription specs, publishing a file, following logs.

use super::*;

pub(super) async fn plugin(client: &Client, cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::New { name, dir, lang } => {
            let root = scaffold::new_plugin(&name, &dir, &lang)?;
            println!("created {} ({lang})", root.display());
            println!(
                "next: wasmq plugin test {0} (runs it here on a sample message), then wasmq plugin deploy {name} \"$(wasmq plugin build {0})\"",
                root.display()
            );
            Ok(())
        }
        PluginCommand::Build { dir, target_dir } => {
            let path = tokio::task::spawn_blocking(move || {
                scaffold::build_plugin_in(&dir, target_dir.as_deref())
            })
            .await??;
            println!("{}", path.display());
            Ok(())
        }
        PluginCommand::Test {
            dir,
            messages,
            bodies,
            config,
            grants,
            topic,
            timeout_ms,
            target_dir,
        } => {
            let grants = match grants {
                Some(g) => serde_json::from_value(json_arg("grants", &g)?)
                    .context("--grants is not a subscription's grants")?,
                None => Default::default(),
            };
            let report = super::plugin_test::run(super::plugin_test::TestRun {
                dir,
                target_dir,
                messages: super::plugin_test::messages(&messages, &bodies)?,
                config: config.map_or(Ok(json!({})), |c| json_arg("config", &c))?,
                grants,
                topic,
                timeout_ms,
            })
            .await?;
            if super::output::for_scripts() {
                print(&serde_json::to_value(&report)?)?;
            } else {
                print!("{}", super::plugin_test::human(&report));
            }
            match report.failed() {
                0 => Ok(()),
                n => anyhow::bail!("{n} of {} calls failed", report.calls.len()),
            }
        }
        PluginCommand::Deploy { name, file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            print(
                &client
                    .put_wasm(&format!("/v1/plugins/{}", seg(&name)), bytes)
                    .await?,
            )
        }
        PluginCommand::List => print(&client.get("/v1/plugins").await?),
        PluginCommand::Invoke {
            name,
            body,
            config,
            version,
        } => {
            let mut req = json!({ "message": Value::Object(body_field(&body)?) });
            if let Some(c) = config {
                req["config"] = json_arg("config", &c)?;
            }
            if let Some(v) = version {
                req["version"] = v.into();
            }
            print(
                &client
                    .post_json(&format!("/v1/plugins/{}/invoke", seg(&name)), &req)
                    .await?,
            )
        }
        PluginCommand::Show { name } => {
            print(&client.get(&format!("/v1/plugins/{}", seg(&name))).await?)
        }
        PluginCommand::Delete { name } => print(
            &client
                .delete(&format!("/v1/plugins/{}", seg(&name)))
                .await?,
        ),
    }
}

/// `earliest`, `latest` or a number of ms, as the API spells a start position.
pub(super) fn start_value(s: &str) -> anyhow::Result<Value> {
    match s {
        "earliest" | "latest" => Ok(Value::from(s)),
        n => n
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| anyhow::anyhow!("{s:?} is not earliest, latest or a time in ms")),
    }
}

pub(super) fn json_arg(name: &str, text: &str) -> anyhow::Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
        }
        None => text.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("--{name} is not valid JSON"))
}

pub(super) fn sub_spec(a: SubArgs) -> anyhow::Result<(String, Value)> {
    let mut spec = match &a.spec {
        Some(text) => json_arg("spec", text)?,
        None => json!({}),
    };
    let Some(obj) = spec.as_object_mut() else {
        anyhow::bail!("--spec must be a JSON object")
    };
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            obj.insert(k.to_string(), v);
        }
    };
    set("topic", a.topic.map(Value::from));
    set("plugin", a.plugin.map(Value::from));
    set("plugin_version", a.plugin_version.map(Value::from));
    set("mode", a.mode.map(Value::from));
    set("ordered", a.ordered.then_some(Value::Bool(true)));
    set("instances", a.instances.map(Value::from));
    set("filter", a.filter.map(Value::from));
    set("max_in_flight", a.max_in_flight.map(Value::from));
    set("max_rate", a.max_rate.map(Value::from));
    set("start", a.start.as_deref().map(start_value).transpose()?);
    set(
        "config",
        a.config
            .as_deref()
            .map(|c| json_arg("config", c))
            .transpose()?,
    );
    set(
        "grants",
        a.grants
            .as_deref()
            .map(|g| json_arg("grants", g))
            .transpose()?,
    );
    if a.max_attempts.is_some() || a.backoff.is_some() {
        let mut retry = obj.get("retry").cloned().unwrap_or_else(|| json!({}));
        if let Some(m) = a.max_attempts {
            retry["max_attempts"] = m.into();
        }
        if let Some(b) = a.backoff {
            retry["backoff_ms"] = b.into();
        }
        obj.insert("retry".into(), retry);
    }
    // The server would say "missing field topic" of JSON nobody typed: name the flags.
    for (field, flag) in [("topic", "--topic"), ("plugin", "--plugin")] {
        if spec.get(field).is_none_or(Value::is_null) {
            anyhow::bail!("{flag} is required (or give \"{field}\" in --spec)");
        }
    }
    Ok((a.group, spec))
}

pub(super) async fn sub(client: &Client, cmd: SubCommand) -> anyhow::Result<()> {
    match cmd {
        SubCommand::Create(args) => {
            let (group, spec) = sub_spec(*args)?;
            print(
                &client
                    .put_json(&format!("/v1/subscriptions/{}", seg(&group)), &spec)
                    .await?,
            )
        }
        SubCommand::Show { group } => print(
            &client
                .get(&format!("/v1/subscriptions/{}", seg(&group)))
                .await?,
        ),
        SubCommand::List => print(&client.get("/v1/subscriptions").await?),
        SubCommand::Pause { group } => print(
            &client
                .post_json(
                    &format!("/v1/subscriptions/{}/pause", seg(&group)),
                    &json!({}),
                )
                .await?,
        ),
        SubCommand::Resume { group } => print(
            &client
                .post_json(
                    &format!("/v1/subscriptions/{}/resume", seg(&group)),
                    &json!({}),
                )
                .await?,
        ),
        SubCommand::Reset { group, to } => {
            let body = json!({ "to": start_value(&to)? });
            print(
                &client
                    .post_json(&format!("/v1/subscriptions/{}/reset", seg(&group)), &body)
                    .await?,
            )
        }
        SubCommand::Delete { group } => print(
            &client
                .delete(&format!("/v1/subscriptions/{}", seg(&group)))
                .await?,
        ),
    }
}

/// JSON text becomes `body`; anything else is sent as bytes in `body_base64`.
pub(super) fn body_field(arg: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
    let bytes = if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read the body from stdin")?;
        buf
    } else {
        arg.as_bytes().to_vec()
    };
    let mut map = serde_json::Map::new();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) => map.insert("body".into(), v),
        Err(_) => map.insert(
            "body_base64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(&bytes)
                .into(),
        ),
    };
    Ok(map)
}

/// Publishes every line of `path` (`-` = stdin) in batches of `batch`, showing progress with
/// rate and ETA on a terminal; stops at the first bad line or refused batch, saying how far
/// it got.
pub(super) async fn publish_file(
    client: &Client,
    topic: &str,
    path: &std::path::Path,
    batch: usize,
) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    if batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let stdin = path.as_os_str() == "-";
    let open = || -> anyhow::Result<Box<dyn std::io::BufRead>> {
        Ok(if stdin {
            Box::new(std::io::BufReader::new(std::io::stdin()))
        } else {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Box::new(std::io::BufReader::new(f))
        })
    };
    // A first pass counts the lines of a file, for the ETA; stdin is read once.
    let total = if stdin {
        None
    } else {
        Some(
            open()?
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.trim().is_empty())
                .count() as u64,
        )
    };
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} messages  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let url = format!("/v1/topics/{}/messages/batch", seg(topic));
    let (mut published, mut pending, mut line_no) = (0u64, Vec::new(), 0u64);
    let mut lines = open()?.lines();
    loop {
        let line = lines.next().transpose().context("cannot read the input")?;
        if let Some(l) = &line {
            line_no += 1;
            if l.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(l).with_context(|| {
                format!("line {line_no} is not JSON ({published} messages published before it)")
            })?;
            let envelope = match &v {
                Value::Object(m) if m.contains_key("body") || m.contains_key("body_base64") => v,
                _ => json!({ "body": v }),
            };
            pending.push(envelope);
        }
        if pending.len() >= batch || (line.is_none() && !pending.is_empty()) {
            let n = pending.len() as u64;
            let body = json!({ "messages": std::mem::take(&mut pending) });
            client.post_json(&url, &body).await.with_context(|| {
                format!("a batch ending at line {line_no} was refused; {published} messages were published before it")
            })?;
            published += n;
            bar.inc(n);
        }
        if line.is_none() {
            break;
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    output::print(&json!({
        "topic": topic,
        "published": published,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "messages_per_second": (published as f64 / secs.max(1e-9)).round(),
    }))
}

pub(super) async fn logs(
    client: &Client,
    name: &str,
    follow: bool,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let json = json || output::format() == output::Format::Json;
    let show = |line: &Value| {
        if json {
            println!("{line}");
        } else if line.get("seq").is_some() {
            println!("{}", log_line(line));
        } else if let Some(n) = line["skipped"].as_u64() {
            println!("… {n} lines skipped (this client fell behind)");
        }
    };
    if !follow {
        let page = client
            .get(&format!("/v1/plugins/{}/logs?limit={limit}", seg(name)))
            .await?;
        for line in page["lines"].as_array().into_iter().flatten() {
            show(line);
        }
        if let Some(n) = page["dropped"].as_u64().filter(|n| *n > 0) {
            eprintln!("({n} lines were dropped by the per-call log limit)");
        }
        return Ok(());
    }
    let mut resp = client
        .get_stream(&format!(
            "/v1/plugins/{}/logs?limit={limit}&follow=true",
            seg(name)
        ))
        .await?;
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.context("the log stream broke off")? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                show(&v);
            }
        }
    }
    Ok(())
}

/// `seq time level group/instance [message id] text`, one line per log line.
pub(super) fn log_line(v: &Value) -> String {
    let at = v["at"].as_u64().unwrap_or(0);
    let secs = at / 1000;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        at % 1000
    );
    let message_id = v["message_id"]
        .as_str()
        .map(|m| format!(" [{m}]"))
        .unwrap_or_default();
    format!(
        "{:>6} {time} {:<5} {}/{}{message_id} {}",
        v["seq"],
        v["level"].as_str().unwrap_or("?").to_uppercase(),
        v["group"].as_str().unwrap_or(""),
        v["instance"],
        v["message"].as_str().unwrap_or("")
    )
}
