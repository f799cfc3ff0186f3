//! The `wasmq` command line: `serve` runs the broker; every other verb talks to its HTTP API.

mod client;
mod output;
pub mod scaffold;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::{Config, FlushMode};
use client::Client;
use output::print;

#[derive(Parser)]
#[command(
    name = "wasmq",
    version,
    about = "A message broker whose consumers are sandboxed WebAssembly plugins"
)]
struct Cli {
    /// The server the client verbs talk to.
    #[arg(
        long,
        global = true,
        env = "WASMQ_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    server: String,
    /// A bearer token for servers with [auth] tokens.
    #[arg(long, global = true, env = "WASMQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// `table` for people, `json` (the server's answer as is) for scripts.
    #[arg(
        long,
        short,
        global = true,
        env = "WASMQ_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    output: output::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Create, list and show topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Scaffold, build, deploy and list plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Create, show, pause, resume, reset and delete subscriptions (consumer groups).
    #[command(subcommand)]
    Sub(SubCommand),
    /// Browse and redrive a subscription's dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show, list and decide transactions.
    #[command(subcommand)]
    Txn(TxnCommand),
    /// Look messages up by id or key, or read a queue.
    #[command(subcommand)]
    Message(MessageCommand),
    /// The server's health and its Prometheus metrics (`--output json`: just the health).
    Status,
    /// The nodes sharing the server's storage and who holds each lease (which node runs each
    /// subscription queue).
    Cluster,
    /// The server's OpenAPI document (JSON).
    Openapi,
    /// Show a plugin's recent log lines; `--follow` keeps printing new ones.
    Logs {
        name: String,
        #[arg(long, short)]
        follow: bool,
        /// How many recent lines to show first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print each line as the server's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish one message. BODY is JSON if it parses as JSON, else raw bytes; `-` reads stdin.
    /// `--file F` publishes every line of F (NDJSON, `-` = stdin) in batches, with progress.
    Publish {
        topic: String,
        #[arg(required_unless_present = "file")]
        body: Option<String>,
        /// One message per line: an envelope (`{"body":…,"key":…}`) or, without a `body` or
        /// `body_base64` field, the body itself.
        #[arg(long, conflicts_with = "body")]
        file: Option<PathBuf>,
        /// Messages per request with `--file` (the server allows up to [limits] max_batch).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        sharding_key: Option<String>,
        /// Deliver no earlier than this many milliseconds from now.
        #[arg(long)]
        delay: Option<u64>,
        /// A property `NAME=VALUE` (repeatable).
        #[arg(long = "property", value_name = "NAME=VALUE")]
        properties: Vec<String>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// A wasmq.toml; `WASMQ_<SECTION>_<KEY>` variables override it, flags override both.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long, value_enum)]
    flush: Option<FlushMode>,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Create a plugin NAME (in --dir, default .) in Rust, Python or JavaScript that builds on
    /// the first try, with the guest SDK and the WIT contract beside it.
    New {
        name: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// rust, python or js
        #[arg(long, default_value = "rust")]
        lang: String,
    },
    /// Build the plugin in DIR (default .) into a component; prints its path. The language comes
    /// from DIR's Cargo.toml, pyproject.toml or package.json; a missing toolchain (the
    /// wasm32-wasip2 target, componentize-py, componentize-js) is installed first.
    Build {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Build output here instead of DIR/target.
        #[arg(long)]
        target_dir: Option<PathBuf>,
    },
    /// Upload a component as the next version of plugin NAME.
    Deploy {
        name: String,
        file: PathBuf,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Run the plugin's `handle` once on a message with BODY (as for publish), outside any
    /// subscription: for trying a plugin.
    Invoke {
        name: String,
        body: String,
        /// The config the plugin sees, as JSON (or @FILE).
        #[arg(long)]
        config: Option<String>,
        #[arg(long)]
        version: Option<u32>,
    },
}

#[derive(Subcommand)]
enum SubCommand {
    /// Create or update subscription GROUP. `--spec` takes a whole JSON spec (or @FILE); the
    /// other flags set single fields on top of it.
    Create(Box<SubArgs>),
    Show {
        group: String,
    },
    List,
    Pause {
        group: String,
    },
    Resume {
        group: String,
    },
    /// Move the offsets: `--to earliest` (replay), `latest` (skip), or a time in ms.
    Reset {
        group: String,
        #[arg(long, default_value = "earliest")]
        to: String,
    },
    Delete {
        group: String,
    },
}

#[derive(Args)]
struct SubArgs {
    group: String,
    #[arg(long)]
    spec: Option<String>,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    plugin: Option<String>,
    #[arg(long)]
    plugin_version: Option<u32>,
    /// clustering | broadcast
    #[arg(long)]
    mode: Option<String>,
    #[arg(long)]
    ordered: bool,
    #[arg(long)]
    instances: Option<u32>,
    /// `*` or `a || b`
    #[arg(long)]
    filter: Option<String>,
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Retry delays in ms, comma-separated.
    #[arg(long, value_delimiter = ',')]
    backoff: Option<Vec<u64>>,
    #[arg(long)]
    max_in_flight: Option<u32>,
    /// Messages per second.
    #[arg(long)]
    max_rate: Option<f64>,
    /// earliest | latest | a time in ms
    #[arg(long)]
    start: Option<String>,
    /// The plugin's config, as JSON.
    #[arg(long)]
    config: Option<String>,
    /// Grants, as JSON: {"email":true,"publish":["audit"],...}
    #[arg(long)]
    grants: Option<String>,
}

#[derive(Subcommand)]
enum TxnCommand {
    /// Store a half message on TOPIC (BODY as for publish); it stays invisible until commit.
    Begin {
        topic: String,
        body: String,
        /// Ask the topic's checker after this many ms (default: the topic's setting).
        #[arg(long)]
        check_after: Option<u64>,
    },
    Show {
        id: String,
    },
    /// All transactions, or those in one state (pending, committed, rolled_back, unresolved).
    List {
        #[arg(long)]
        state: Option<String>,
    },
    Commit {
        id: String,
    },
    Rollback {
        id: String,
    },
    /// Give an unresolved transaction a fresh round of checks.
    Recheck {
        id: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    List {
        group: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The `next` key of the previous page.
        #[arg(long)]
        after: Option<String>,
    },
    /// Deliver dead letters again: those with `--id` (repeatable), or all.
    Redrive {
        group: String,
        #[arg(long = "id")]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum MessageCommand {
    /// One message by id.
    Get { id: String },
    /// Messages with business key KEY on TOPIC.
    Find {
        topic: String,
        #[arg(long)]
        key: String,
    },
    /// Read a queue of TOPIC from an offset.
    Read {
        topic: String,
        #[arg(long, default_value_t = 0)]
        queue: u32,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic (or add queues to it).
    Create {
        name: String,
        #[arg(long)]
        queues: Option<u32>,
    },
    List,
    Show {
        name: String,
    },
}

/// Parses arguments, runs the verb, and turns any error into a message and exit code 1.
pub fn main() -> ExitCode {
    crate::capabilities::install_tls_provider();
    let cli = Cli::parse();
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
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    output::set_format(cli.output);
    let client = Client::new(&cli.server, cli.token.as_deref())?;
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Topic(TopicCommand::Create { name, queues }) => {
            let body = match queues {
                Some(q) => json!({ "queues": q }),
                None => json!({}),
            };
            print(
                &client
                    .put_json(&format!("/v1/topics/{name}"), &body)
                    .await?,
            )
        }
        Command::Plugin(cmd) => plugin(&client, cmd).await,
        Command::Message(cmd) => print(&match cmd {
            MessageCommand::Get { id } => client.get(&format!("/v1/messages/{id}")).await?,
            MessageCommand::Find { topic, key } => {
                client
                    .get(&format!(
                        "/v1/topics/{topic}/messages?key={}",
                        query_value(&key)
                    ))
                    .await?
            }
            MessageCommand::Read {
                topic,
                queue,
                from,
                limit,
            } => {
                client
                    .get(&format!(
                        "/v1/topics/{topic}/messages?queue={queue}&from={from}&limit={limit}"
                    ))
                    .await?
            }
        }),
        Command::Openapi => {
            // A document, not a listing: always JSON.
            let doc = client.get("/v1/openapi.json").await?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(())
        }
        Command::Status => {
            let health = client.get("/healthz").await?;
            if output::format() == output::Format::Json {
                return print(&health);
            }
            print(&health)?;
            let metrics = client.get("/metrics").await?;
            println!("{}", metrics.as_str().unwrap_or_default().trim_end());
            Ok(())
        }
        Command::Cluster => {
            let view = client.get("/v1/cluster").await?;
            if output::format() == output::Format::Json {
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
                            &format!("/v1/topics/{topic}/transactions"),
                            &Value::Object(envelope),
                        )
                        .await?,
                )
            }
            TxnCommand::Show { id } => print(&client.get(&format!("/v1/transactions/{id}")).await?),
            TxnCommand::List { state } => {
                let q = state.map(|s| format!("?state={s}")).unwrap_or_default();
                print(&client.get(&format!("/v1/transactions{q}")).await?)
            }
            TxnCommand::Commit { id } => print(
                &client
                    .post_json(&format!("/v1/transactions/{id}/commit"), &json!({}))
                    .await?,
            ),
            TxnCommand::Rollback { id } => print(
                &client
                    .post_json(&format!("/v1/transactions/{id}/rollback"), &json!({}))
                    .await?,
            ),
            TxnCommand::Recheck { id } => print(
                &client
                    .post_json(&format!("/v1/transactions/{id}/recheck"), &json!({}))
                    .await?,
            ),
        },
        Command::Dlq(DlqCommand::List {
            group,
            limit,
            after,
        }) => {
            let mut path = format!("/v1/subscriptions/{group}/dlq?limit={limit}");
            if let Some(a) = after {
                path.push_str(&format!("&after={a}"));
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
                    .post_json(&format!("/v1/subscriptions/{group}/dlq/redrive"), &body)
                    .await?,
            )
        }
        Command::Topic(TopicCommand::List) => print(&client.get("/v1/topics").await?),
        Command::Topic(TopicCommand::Show { name }) => {
            print(&client.get(&format!("/v1/topics/{name}")).await?)
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
                        &format!("/v1/topics/{topic}/messages"),
                        &Value::Object(envelope),
                    )
                    .await?,
            )
        }
    }
}

async fn plugin(client: &Client, cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::New { name, dir, lang } => {
            let root = scaffold::new_plugin(&name, &dir, &lang)?;
            println!("created {} ({lang})", root.display());
            println!(
                "next: wasmq plugin build {} && wasmq plugin deploy {name} <the .wasm it prints>",
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
        PluginCommand::Deploy { name, file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            print(
                &client
                    .put_wasm(&format!("/v1/plugins/{name}"), bytes)
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
                    .post_json(&format!("/v1/plugins/{name}/invoke"), &req)
                    .await?,
            )
        }
        PluginCommand::Show { name } => print(&client.get(&format!("/v1/plugins/{name}")).await?),
        PluginCommand::Delete { name } => {
            print(&client.delete(&format!("/v1/plugins/{name}")).await?)
        }
    }
}

/// `earliest`, `latest` or a number of ms, as the API spells a start position.
fn start_value(s: &str) -> anyhow::Result<Value> {
    match s {
        "earliest" | "latest" => Ok(Value::from(s)),
        n => n
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| anyhow::anyhow!("{s:?} is not earliest, latest or a time in ms")),
    }
}

fn json_arg(name: &str, text: &str) -> anyhow::Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
        }
        None => text.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("--{name} is not valid JSON"))
}

fn sub_spec(a: SubArgs) -> anyhow::Result<(String, Value)> {
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
    Ok((a.group, spec))
}

async fn sub(client: &Client, cmd: SubCommand) -> anyhow::Result<()> {
    match cmd {
        SubCommand::Create(args) => {
            let (group, spec) = sub_spec(*args)?;
            print(
                &client
                    .put_json(&format!("/v1/subscriptions/{group}"), &spec)
                    .await?,
            )
        }
        SubCommand::Show { group } => {
            print(&client.get(&format!("/v1/subscriptions/{group}")).await?)
        }
        SubCommand::List => print(&client.get("/v1/subscriptions").await?),
        SubCommand::Pause { group } => print(
            &client
                .post_json(&format!("/v1/subscriptions/{group}/pause"), &json!({}))
                .await?,
        ),
        SubCommand::Resume { group } => print(
            &client
                .post_json(&format!("/v1/subscriptions/{group}/resume"), &json!({}))
                .await?,
        ),
        SubCommand::Reset { group, to } => {
            let body = json!({ "to": start_value(&to)? });
            print(
                &client
                    .post_json(&format!("/v1/subscriptions/{group}/reset"), &body)
                    .await?,
            )
        }
        SubCommand::Delete { group } => {
            print(&client.delete(&format!("/v1/subscriptions/{group}")).await?)
        }
    }
}

/// Percent-encodes a query value (keys may hold `&`, `=`, spaces).
fn query_value(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// JSON text becomes `body`; anything else is sent as bytes in `body_base64`.
fn body_field(arg: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
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
async fn publish_file(
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
    let url = format!("/v1/topics/{topic}/messages/batch");
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

async fn logs(
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
            .get(&format!("/v1/plugins/{name}/logs?limit={limit}"))
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
            "/v1/plugins/{name}/logs?limit={limit}&follow=true"
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
fn log_line(v: &Value) -> String {
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

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WASMQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    // Scripts and tests read this line to find the port (`--listen 127.0.0.1:0`).
    println!("wasmq listening on http://{addr}");
    tracing::info!(%addr, data_dir = %config.server.data_dir.display(), flush = ?config.server.flush, "serving");
    crate::run(listener, config, shutdown_signal()).await?;
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
