//! The command line as clap parses it: verbs, their flags and what each one means.

use super::*;

#[derive(Parser)]
#[command(
    name = "wasmq",
    version,
    about = "A message broker whose consumers are sandboxed WebAssembly plugins"
)]
pub(super) struct Cli {
    /// The server the client verbs talk to.
    #[arg(
        long,
        global = true,
        env = "WASMQ_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    pub(super) server: String,
    /// A bearer token for servers with [auth] tokens.
    #[arg(long, global = true, env = "WASMQ_TOKEN", hide_env_values = true)]
    pub(super) token: Option<String>,
    /// `table` for people, `json` (the server's answer as is) for scripts.
    #[arg(
        long,
        short,
        global = true,
        env = "WASMQ_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    pub(super) output: output::Format,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand)]
pub(super) enum Command {
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
    /// Internal: compiles the component on stdin to an artifact on stdout under CPU and memory
    /// limits (the server runs it as a child process for each upload).
    #[command(hide = true)]
    CompileWorker {
        #[arg(long)]
        cpu_seconds: u64,
        #[arg(long)]
        memory_bytes: u64,
        #[arg(long)]
        instance_memory_bytes: usize,
        #[arg(long)]
        pool_instances: u32,
    },
}

#[derive(Args)]
pub(super) struct ServeArgs {
    /// A wasmq.toml; `WASMQ_<SECTION>_<KEY>` variables override it, flags override both.
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    #[arg(long)]
    pub(super) data_dir: Option<PathBuf>,
    #[arg(long)]
    pub(super) listen: Option<SocketAddr>,
    #[arg(long, value_enum)]
    pub(super) flush: Option<FlushMode>,
}

#[derive(Subcommand)]
pub(super) enum PluginCommand {
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
pub(super) enum SubCommand {
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
pub(super) struct SubArgs {
    pub(super) group: String,
    #[arg(long)]
    pub(super) spec: Option<String>,
    #[arg(long)]
    pub(super) topic: Option<String>,
    #[arg(long)]
    pub(super) plugin: Option<String>,
    #[arg(long)]
    pub(super) plugin_version: Option<u32>,
    /// clustering | broadcast
    #[arg(long)]
    pub(super) mode: Option<String>,
    #[arg(long)]
    pub(super) ordered: bool,
    #[arg(long)]
    pub(super) instances: Option<u32>,
    /// `*` or `a || b`
    #[arg(long)]
    pub(super) filter: Option<String>,
    #[arg(long)]
    pub(super) max_attempts: Option<u32>,
    /// Retry delays in ms, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub(super) backoff: Option<Vec<u64>>,
    #[arg(long)]
    pub(super) max_in_flight: Option<u32>,
    /// Messages per second.
    #[arg(long)]
    pub(super) max_rate: Option<f64>,
    /// earliest | latest | a time in ms
    #[arg(long)]
    pub(super) start: Option<String>,
    /// The plugin's config, as JSON.
    #[arg(long)]
    pub(super) config: Option<String>,
    /// Grants, as JSON: {"email":true,"publish":["audit"],...}
    #[arg(long)]
    pub(super) grants: Option<String>,
}

#[derive(Subcommand)]
pub(super) enum TxnCommand {
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
pub(super) enum DlqCommand {
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
pub(super) enum MessageCommand {
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

/// A retention limit on the command line: a number, or `none` for no limit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limit(pub Option<u64>);

fn limit_or_none(s: &str) -> Result<Limit, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    s.parse()
        .map(|n| Limit(Some(n)))
        .map_err(|_| format!("expected a whole number or `none`, not {s:?}"))
}

#[derive(Subcommand)]
pub(super) enum TopicCommand {
    /// Create a topic, or change its queues and retention (what is not given stays).
    Create {
        name: String,
        /// Number of queues (1 to the server's limits.max_queues); can grow, never shrink.
        #[arg(long)]
        queues: Option<u32>,
        /// Delete messages stored longer ago than this many ms; `none` for no age limit
        /// (new topics: 259200000, 72 h).
        #[arg(long, value_name = "MS|none", value_parser = limit_or_none)]
        retention_max_age_ms: Option<Limit>,
        /// Delete a queue's oldest messages while it holds more bytes than this; `none` for
        /// no size limit.
        #[arg(long, value_name = "BYTES|none", value_parser = limit_or_none)]
        retention_max_bytes: Option<Limit>,
        /// Also delete what every subscription of the topic is done with.
        #[arg(long, value_name = "BOOL")]
        retention_after_consumed: Option<bool>,
    },
    List,
    Show {
        name: String,
    },
    /// Delete a topic and its messages; undecided transactions of it are rolled back.
    Delete {
        name: String,
        /// Also delete its subscriptions (refused while it has any, without this).
        #[arg(long)]
        force: bool,
    },
}
