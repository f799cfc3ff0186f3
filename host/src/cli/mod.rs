//! The `wasmq` command line: `serve` runs the broker; every other verb talks to its HTTP API.

mod args;
mod client;
mod output;
mod plugin_test;
pub mod scaffold;
mod verbs;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::{Config, FlushMode};
use args::*;
use client::{Client, seg};
use output::print;
use verbs::*;

/// Parses arguments, runs the verb, and turns any error into a message and exit code 1.
pub fn main() -> ExitCode {
    crate::capabilities::install_tls_provider();
    let cli = Cli::parse();
    if let Command::CompileWorker {
        cpu_seconds,
        memory_bytes,
        instance_memory_bytes,
        pool_instances,
    } = cli.command
    {
        let code = crate::runtime::compile_worker(
            cpu_seconds,
            memory_bytes,
            instance_memory_bytes,
            pool_instances,
        );
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // Documentation verbs need no server and no async runtime.
    let documented = match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "wasmq", &mut std::io::stdout());
            Some(Ok(()))
        }
        Command::Man { dir } => Some(man_pages(dir.as_deref())),
        _ => None,
    };
    if let Some(done) = documented {
        return exit_code(done);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    exit_code(runtime.block_on(dispatch(cli)))
}

/// A verb's outcome as the process's: an error is printed with its causes and exits 1.
fn exit_code(outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// For people (tables), each message of a listing gets a `body` they can read: JSON as compact
/// text, bytes that are UTF-8 as text, other bytes as `<N bytes>`; `--output json` keeps the
/// server's answer as it is (`body` or `body_base64`).
/// A message trace as two tables: where it is for each subscription, and every attempt.
fn trace_for_people(mut trace: Value) -> Value {
    let subscriptions = match trace.get_mut("subscriptions").map(Value::take) {
        Some(Value::Array(s)) => s,
        _ => Vec::new(),
    };
    let mut now = Vec::new();
    let mut attempts = Vec::new();
    for mut s in subscriptions {
        if let Some(Value::Array(list)) = s.get_mut("attempts").map(Value::take) {
            attempts.extend(list.into_iter().map(|a| {
                json!({
                    "group": a["group"], "member": a["member"], "attempt": a["attempt"],
                    "started_at": a["started_at"], "node": a["node"], "instance": a["instance"],
                    "outcome": a["outcome"], "fate": a["fate"], "duration_ms": a["duration_ms"],
                    "reason": a["reason"],
                })
            }));
        }
        now.push(json!({
            "group": s["group"], "member": s["member"], "state": s["state"],
            "next_attempt_at": s["next_attempt_at"],
        }));
    }
    if let Some(map) = trace.as_object_mut() {
        map.insert("now".into(), Value::Array(now));
        map.insert("attempts".into(), Value::Array(attempts));
    }
    trace
}

fn readable(mut answer: Value) -> Value {
    if output::for_scripts() {
        return answer;
    }
    fn body_text(m: &mut serde_json::Map<String, Value>) {
        let text = match (m.remove("body"), m.remove("body_base64")) {
            (Some(body), _) if !body.is_null() => body.to_string(),
            (_, Some(Value::String(b64))) => {
                match base64::engine::general_purpose::STANDARD.decode(&b64) {
                    Ok(bytes) => String::from_utf8(bytes)
                        .unwrap_or_else(|e| format!("<{} bytes>", e.into_bytes().len())),
                    Err(_) => b64,
                }
            }
            _ => String::new(),
        };
        m.insert("body".into(), Value::String(text));
    }
    match answer["messages"].as_array_mut() {
        Some(messages) => messages
            .iter_mut()
            .filter_map(Value::as_object_mut)
            .for_each(body_text),
        // One message (`message get`).
        None => {
            if let Some(m) = answer.as_object_mut().filter(|m| m.contains_key("offset")) {
                body_text(m);
            }
        }
    }
    answer
}

/// `wasmq status`: what an operator looks at first, from the server's health, cluster view,
/// topics and subscriptions. Shape: `{status, version, client_version, node, backend,
/// started_at, uptime, topics: [{name, queues, messages, stored_bytes}], subscriptions:
/// [{group, state, topic, plugin, lag, in_flight, dlq}]}` (`messages`: stored now; `lag`,
/// `dlq`: messages).
fn status_summary(
    health: &Value,
    cluster: &Value,
    topics: &Value,
    subscriptions: &Value,
    now_ms: u64,
) -> Value {
    let this_node = cluster["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["self"] == true));
    let started_at = this_node.and_then(|n| n["started_at"].as_u64());
    let list = |v: &Value, field: &str| v[field].as_array().cloned().unwrap_or_default();
    let sum = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).sum::<u64>())
            .unwrap_or(0)
    };
    json!({
        "status": health["status"],
        "version": health["version"],
        "client_version": env!("CARGO_PKG_VERSION"),
        "node": cluster["node"],
        "backend": cluster["backend"],
        "started_at": started_at,
        "uptime": started_at.map(|at| uptime(now_ms.saturating_sub(at))),
        "topics": list(topics, "topics").iter().map(|t| json!({
            "name": t["name"],
            "queues": t["queues"],
            "messages": t["stored_messages"],
            "stored_bytes": sum(&t["stored_bytes"]),
        })).collect::<Vec<_>>(),
        "subscriptions": list(subscriptions, "subscriptions").iter().map(|s| json!({
            "group": s["group"],
            "state": s["state"],
            "topic": s["spec"]["topic"],
            "plugin": s["spec"]["plugin"],
            "lag": s["lag"],
            "in_flight": s["in_flight"],
            "dlq": s["dlq"],
        })).collect::<Vec<_>>(),
    })
}

/// `ms` as days, hours, minutes and seconds: `3d 4h 5m 6s`, `7m 0s`, `12s`.
fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let parts = [
        (s / 86_400, "d"),
        (s / 3600 % 24, "h"),
        (s / 60 % 60, "m"),
        (s % 60, "s"),
    ];
    let first = parts
        .iter()
        .position(|(n, _)| *n > 0)
        .unwrap_or(parts.len() - 1);
    parts[first..]
        .iter()
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `wasmq man`: the page of `wasmq` to stdout, or with `dir` one page per command and
/// subcommand (`wasmq-topic-create.1`) written there.
fn man_pages(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let command = <Cli as clap::CommandFactory>::command();
    let Some(dir) = dir else {
        return clap_mangen::Man::new(command)
            .render(&mut std::io::stdout())
            .context("cannot write the man page");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("--dir {}", dir.display()))?;
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("cannot write man pages into --dir {}", dir.display()))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    output::set_format(cli.output);
    // `serve` is no client: a bad WASMQ_SERVER must not stop a server from starting.
    if let Command::Serve(args) = cli.command {
        return serve(args).await;
    }
    let client = Client::new(&cli.server, cli.token.as_deref())?;
    match cli.command {
        // Handled above or in `main`, without a client or an async runtime.
        Command::Serve(_) | Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::CompileWorker { .. } => anyhow::bail!("compile-worker is run by the server"),
        Command::Topic(TopicCommand::Create {
            name,
            queues,
            retention_max_age_ms,
            retention_max_bytes,
            retention_after_consumed,
        }) => {
            let mut body = serde_json::Map::new();
            if let Some(q) = queues {
                body.insert("queues".into(), json!(q));
            }
            let mut retention = serde_json::Map::new();
            if let Some(a) = retention_max_age_ms {
                retention.insert("max_age_ms".into(), json!(a.0));
            }
            if let Some(b) = retention_max_bytes {
                retention.insert("max_bytes".into(), json!(b.0));
            }
            if let Some(c) = retention_after_consumed {
                retention.insert("after_consumed".into(), json!(c));
            }
            if !retention.is_empty() {
                body.insert("retention".into(), retention.into());
            }
            let body = serde_json::Value::Object(body);
            print(
                &client
                    .put_json(&format!("/v1/topics/{}", seg(&name)), &body)
                    .await?,
            )
        }
        Command::Plugin(cmd) => plugin(&client, cmd).await,
        Command::Message(cmd) => print(&match cmd {
            MessageCommand::Get { id } => {
                readable(client.get(&format!("/v1/messages/{}", seg(&id))).await?)
            }
            MessageCommand::Trace { id } => {
                let trace = client
                    .get(&format!("/v1/messages/{}/trace", seg(&id)))
                    .await?;
                if output::for_scripts() {
                    trace
                } else {
                    trace_for_people(trace)
                }
            }
            MessageCommand::Find { topic, key } => readable(
                client
                    .get(&format!(
                        "/v1/topics/{}/messages?key={}",
                        seg(&topic),
                        seg(&key)
                    ))
                    .await?,
            ),
            MessageCommand::Read {
                topic,
                queue,
                from,
                limit,
            } => {
                if queue.is_none() {
                    // Say which queue this is when there are others.
                    let t = client.get(&format!("/v1/topics/{}", seg(&topic))).await?;
                    if let Some(n) = t["queues"].as_u64().filter(|n| *n > 1) {
                        eprintln!("queue 0 of {n} (--queue 1..{} for the others)", n - 1);
                    }
                }
                readable(
                    client
                        .get(&format!(
                            "/v1/topics/{}/messages?queue={}&from={from}&limit={limit}",
                            seg(&topic),
                            queue.unwrap_or(0)
                        ))
                        .await?,
                )
            }
        }),
        Command::Openapi => {
            // A document, not a listing: always JSON.
            let doc = client.get("/v1/openapi.json").await?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(())
        }
        Command::Status { metrics: true } => {
            let metrics = client.get("/metrics").await?;
            println!("{}", metrics.as_str().unwrap_or_default().trim_end());
            Ok(())
        }
        Command::Status { metrics: false } => {
            let (health, cluster, topics, subscriptions) = tokio::try_join!(
                client.get("/healthz"),
                client.get("/v1/cluster"),
                client.get("/v1/topics"),
                client.get("/v1/subscriptions"),
            )?;
            let mut summary = status_summary(
                &health,
                &cluster,
                &topics,
                &subscriptions,
                crate::base::now_ms(),
            );
            if output::for_scripts() {
                return print(&summary);
            }
            // For people: the server's lines, then each listing under its name.
            let listings = ["topics", "subscriptions"].map(|name| {
                let rows = summary
                    .as_object_mut()
                    .and_then(|m| m.remove(name))
                    .unwrap_or_default();
                (name, rows)
            });
            print(&summary)?;
            for (name, rows) in listings {
                println!("{name}:");
                for line in output::human(&rows).lines() {
                    println!("  {line}");
                }
            }
            Ok(())
        }
        Command::Cluster => {
            let view = client.get("/v1/cluster").await?;
            if output::for_scripts() {
                return print(&view);
            }
            println!(
                "node {} ({}), backend {}",
                view["node"].as_str().unwrap_or("?"),
                view["backend"].as_str().unwrap_or("?"),
                if view["backend_healthy"] == true {
                    "healthy"
                } else {
                    "NOT answering"
                }
            );
            for part in ["nodes", "leases"] {
                println!("\n{part}:");
                print!("{}", output::human(&view[part]));
            }
            Ok(())
        }
        Command::Logs {
            name,
            follow,
            limit,
            json,
        } => logs(&client, &name, follow, limit, json).await,
        Command::Sub(cmd) => sub(&client, cmd).await,
        Command::Txn(cmd) => match cmd {
            TxnCommand::Begin {
                topic,
                body,
                check_after,
            } => {
                let mut envelope = body_field(&body)?;
                if let Some(ms) = check_after {
                    envelope.insert("check_after_ms".into(), ms.into());
                }
                print(
                    &client
                        .post_json(
                            &format!("/v1/topics/{}/transactions", seg(&topic)),
                            &Value::Object(envelope),
                        )
                        .await?,
                )
            }
            TxnCommand::Show { id } => print(
                &client
                    .get(&format!("/v1/transactions/{}", seg(&id)))
                    .await?,
            ),
            TxnCommand::List { state } => {
                let q = state
                    .map(|s| format!("?state={}", seg(&s)))
                    .unwrap_or_default();
                print(&client.get(&format!("/v1/transactions{q}")).await?)
            }
            TxnCommand::Commit { id } => print(
                &client
                    .post_json(&format!("/v1/transactions/{}/commit", seg(&id)), &json!({}))
                    .await?,
            ),
            TxnCommand::Rollback { id } => print(
                &client
                    .post_json(
                        &format!("/v1/transactions/{}/rollback", seg(&id)),
                        &json!({}),
                    )
                    .await?,
            ),
            TxnCommand::Recheck { id } => print(
                &client
                    .post_json(
                        &format!("/v1/transactions/{}/recheck", seg(&id)),
                        &json!({}),
                    )
                    .await?,
            ),
        },
        Command::Dlq(DlqCommand::List {
            group,
            limit,
            after,
        }) => {
            let mut path = format!("/v1/subscriptions/{}/dlq?limit={limit}", seg(&group));
            if let Some(a) = after {
                path.push_str(&format!("&after={}", seg(&a)));
            }
            print(&client.get(&path).await?)
        }
        Command::Dlq(DlqCommand::Redrive { group, ids }) => {
            let body = if ids.is_empty() {
                json!({})
            } else {
                json!({ "ids": ids })
            };
            print(
                &client
                    .post_json(
                        &format!("/v1/subscriptions/{}/dlq/redrive", seg(&group)),
                        &body,
                    )
                    .await?,
            )
        }
        Command::Topic(TopicCommand::List) => print(&client.get("/v1/topics").await?),
        Command::Topic(TopicCommand::Show { name }) => {
            print(&client.get(&format!("/v1/topics/{}", seg(&name))).await?)
        }
        Command::Topic(TopicCommand::Delete { name, force }) => {
            let query = if force { "?force=true" } else { "" };
            print(
                &client
                    .delete(&format!("/v1/topics/{}{query}", seg(&name)))
                    .await?,
            )
        }
        Command::Publish {
            topic,
            file: Some(file),
            batch,
            ..
        } => publish_file(&client, &topic, &file, batch).await,
        Command::Publish {
            topic,
            body,
            key,
            tag,
            sharding_key,
            delay,
            properties,
            ..
        } => {
            let mut envelope = body_field(body.as_deref().unwrap_or("-"))?;
            let props = properties
                .iter()
                .map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                        .ok_or_else(|| anyhow::anyhow!("--property {p:?} must be NAME=VALUE"))
                })
                .collect::<anyhow::Result<serde_json::Map<_, _>>>()?;
            let fields = [
                ("key", key.map(Value::from)),
                ("tag", tag.map(Value::from)),
                ("sharding_key", sharding_key.map(Value::from)),
                ("delay_ms", delay.map(Value::from)),
            ];
            for (name, value) in fields {
                if let Some(v) = value {
                    envelope.insert(name.into(), v);
                }
            }
            if !props.is_empty() {
                envelope.insert("properties".into(), Value::Object(props));
            }
            print(
                &client
                    .post_json(
                        &format!("/v1/topics/{}/messages", seg(&topic)),
                        &Value::Object(envelope),
                    )
                    .await?,
            )
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WASMQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: not in a file or a journal (issue 26).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(d) = args.data_dir {
        config.server.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(f) = args.flush {
        config.server.flush = f;
    }
    // Uploads compile in a child process of this binary, under [plugins] compile limits.
    config.plugins.compile_worker = std::env::current_exe().ok();
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let (data_dir, flush) = (config.server.data_dir.clone(), config.server.flush);
    crate::run_announced(listener, config, shutdown_signal(), |addr| {
        // The log line first: stderr is written synchronously, so whoever reads "listening"
        // (and may stop the server at once) finds "serving" already in the log.
        tracing::info!(%addr, data_dir = %data_dir.display(), ?flush, "serving");
        // Scripts and tests read this line to find the port (`--listen 127.0.0.1:0`); it comes
        // once storage is open, so it means the server is up.
        println!("wasmq listening on http://{addr}");
    })
    .await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested; finishing in-flight work");
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptime_reads_in_days_hours_minutes_seconds() {
        assert_eq!(super::uptime(0), "0s");
        assert_eq!(super::uptime(12_999), "12s");
        assert_eq!(super::uptime(420_000), "7m 0s");
        assert_eq!(
            super::uptime(((3 * 24 + 4) * 3600 + 5 * 60 + 6) * 1000),
            "3d 4h 5m 6s"
        );
        assert_eq!(super::uptime(u64::MAX).split(' ').count(), 4);
    }
}
