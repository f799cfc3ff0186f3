//! The command line as clap parses it: verbs, their flags and what each one means.

use super::*;

#[derive(Parser)]
#[command(
    name = "wasmq",
    version,
    about = "A message broker whose consumers are sandboxed WebAssembly plugins",
    after_help = "Examples:
  wasmq serve --data-dir /var/lib/wasmq
  wasmq topic create orders --queues 4
  wasmq publish orders '{\"id\":1}' --key order-1
  wasmq plugin new notifier && wasmq plugin build notifier
  wasmq sub create notify --topic orders --plugin notifier
  wasmq status"
)]
pub(super) struct Cli {
    /// The server the client verbs talk to (`http://` is assumed without a scheme).
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "WASMQ_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    pub(super) server: String,
    /// A bearer token for servers with [auth] tokens.
    #[arg(
        long,
        global = true,
        env = "WASMQ_TOKEN",
        hide_env_values = true,
        help_heading = "Client options"
    )]
    pub(super) token: Option<String>,
    /// `table` for people; `json` or `yaml` (the server's answer as it is) for scripts.
    #[arg(
        long,
        short,
        global = true,
        help_heading = "Client options",
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
    /// A summary of the server: version, node, backend, uptime, topics (messages, bytes) and
    /// subscriptions (state, lag, in flight, dead letters). `--metrics`: its Prometheus
    /// metrics as they are.
    #[command(
        after_help = "Examples:\n  wasmq status\n  wasmq status -o json | jq '.subscriptions[] | select(.dlq > 0)'\n  wasmq status --metrics | grep wasmq_deliveries_total"
    )]
    Status {
        /// Print the raw Prometheus metrics instead.
        #[arg(long)]
        metrics: bool,
    },
    /// The nodes sharing the server's storage and who holds each lease (which node runs each
    /// subscription queue).
    Cluster,
    /// The server's OpenAPI document (JSON).
    Openapi,
    /// Show a plugin's recent log lines; `--follow` keeps printing new ones.
    #[command(after_help = "Examples:\n  wasmq logs notifier --limit 20\n  wasmq logs notifier -f")]
    Logs {
        /// The plugin's name.
        name: String,
        /// Keep printing new lines as they come (Ctrl-C stops).
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
    #[command(after_help = "Examples:
  wasmq publish orders '{\"id\":1}' --key order-1 --tag new
  echo hello | wasmq publish orders -
  wasmq publish orders --file events.ndjson --batch 500
  wasmq publish reminders '\"soon\"' --delay 60000")]
    Publish {
        /// The topic to publish to.
        topic: String,
        /// The message body: JSON if it parses as JSON, else the text as bytes; `-` reads stdin.
        #[arg(required_unless_present = "file")]
        body: Option<String>,
        /// One message per line: an envelope (`{"body":…,"key":…}`) or, without a `body` or
        /// `body_base64` field, the body itself.
        #[arg(long, conflicts_with = "body")]
        file: Option<PathBuf>,
        /// Messages per request with `--file` (the server allows up to [limits] max_batch).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// The business key: `wasmq message find TOPIC --key KEY` looks messages up by it.
        #[arg(long)]
        key: Option<String>,
        /// A tag subscriptions can filter on (`--filter 'a || b'`).
        #[arg(long)]
        tag: Option<String>,
        /// Messages with one sharding key go to one queue, in order (ordered subscriptions
        /// deliver them one after another); without it, queues are picked round robin.
        #[arg(long)]
        sharding_key: Option<String>,
        /// Deliver no earlier than this many milliseconds from now.
        #[arg(long)]
        delay: Option<u64>,
        /// A property `NAME=VALUE` (repeatable).
        #[arg(long = "property", value_name = "NAME=VALUE")]
        properties: Vec<String>,
    },
    /// Print a completion script for SHELL to stdout.
    #[command(after_help = "Examples:
  wasmq completions bash > /etc/bash_completion.d/wasmq
  wasmq completions zsh > \"${fpath[1]}/_wasmq\"
  wasmq completions fish > ~/.config/fish/completions/wasmq.fish")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, or write one page per command into --dir.
    #[command(
        after_help = "Examples:\n  wasmq man | man -l -\n  wasmq man --dir /usr/local/share/man/man1"
    )]
    Man {
        /// Write wasmq.1, wasmq-topic.1, wasmq-topic-create.1, … here instead.
        #[arg(long)]
        dir: Option<PathBuf>,
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
    /// Where RocksDB keeps messages and state ([server] data_dir; default ./wasmq-data).
    #[arg(long)]
    pub(super) data_dir: Option<PathBuf>,
    /// The address the HTTP API listens on ([server] listen; default 127.0.0.1:7700).
    #[arg(long)]
    pub(super) listen: Option<SocketAddr>,
    /// `sync`: a publish is answered after fsync; `async`: after the write, fsync in the
    /// background ([server] flush).
    #[arg(long, value_enum)]
    pub(super) flush: Option<FlushMode>,
}

#[derive(Subcommand)]
pub(super) enum PluginCommand {
    /// Create a plugin NAME (in --dir, default .) in Rust, Python or JavaScript that builds on
    /// the first try, with the guest SDK and the WIT contract beside it.
    #[command(
        after_help = "Examples:\n  wasmq plugin new notifier\n  wasmq plugin new notifier --lang python --dir plugins"
    )]
    New {
        /// The plugin's name (also its directory's).
        name: String,
        /// The directory the plugin's directory is created in.
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
        /// The plugin's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Build output here instead of DIR/target.
        #[arg(long)]
        target_dir: Option<PathBuf>,
    },
    /// Build the plugin in DIR (or take a built .wasm) and run it here on sample messages, no
    /// server needed: email, SMS, HTTP and publish are checked against --grants as a
    /// subscription's are, then recorded instead of made (HTTP is answered 200, empty); kv
    /// lives in a scratch store for the run. Prints each call's outcome, log lines and
    /// effects, then the kv state; exits 1 when a call fails (trap, deadline, memory).
    #[command(
        after_help = "Examples:\n  wasmq plugin test notifier --body '{\"email\":\"a@b.c\"}' --grants '{\"email\":true}'\n  wasmq plugin test . --message samples/order.json --message samples/refund.json -o json\n  wasmq plugin test target/wasm32-wasip2/release/notifier.wasm --body hello"
    )]
    Test {
        /// The plugin's directory, or a built component (.wasm).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// A JSON file holding one message as publish takes it ({"body": ..., "key": ...,
        /// "properties": ...}); repeat for more, run in order.
        #[arg(long = "message", value_name = "FILE")]
        messages: Vec<PathBuf>,
        /// A message body, as for publish (JSON, else the bytes); repeat for more, run after
        /// the --message files. Without either: one message with body {}.
        #[arg(long = "body", value_name = "BODY")]
        bodies: Vec<String>,
        /// The config the plugin sees, as JSON (or @FILE).
        #[arg(long)]
        config: Option<String>,
        /// What the plugin may do, as a subscription's grants (JSON or @FILE), e.g.
        /// {"email":true,"publish":["audit"],"http":["api.example.com"]}; none by default.
        #[arg(long)]
        grants: Option<String>,
        /// The topic the messages seem to come from.
        #[arg(long, default_value = "test")]
        topic: String,
        /// CPU time of one call, in ms (default 5000, as the server's [plugins] timeout_ms).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
        timeout_ms: Option<u64>,
        /// Build output here instead of DIR/target.
        #[arg(long)]
        target_dir: Option<PathBuf>,
    },
    /// Upload a component as the next version of plugin NAME.
    #[command(
        after_help = "Example:\n  wasmq plugin deploy notifier \"$(wasmq plugin build notifier)\""
    )]
    Deploy {
        /// The plugin's name.
        name: String,
        /// The component (`.wasm`) that `wasmq plugin build` printed.
        file: PathBuf,
    },
    /// List plugins with their versions.
    List,
    /// One plugin and its versions.
    Show {
        /// The plugin's name.
        name: String,
    },
    /// Delete a plugin and every version of it (refused while a subscription uses it).
    Delete {
        /// The plugin's name.
        name: String,
    },
    /// Run the plugin's `handle` once on a message with BODY (as for publish), outside any
    /// subscription: for trying a plugin.
    #[command(
        after_help = "Example:\n  wasmq plugin invoke notifier '{\"email\":\"a@b.c\"}' --config '{\"from\":\"x@y.z\"}'"
    )]
    Invoke {
        /// The plugin's name.
        name: String,
        /// The message body, as for publish.
        body: String,
        /// The config the plugin sees, as JSON (or @FILE).
        #[arg(long)]
        config: Option<String>,
        /// The plugin version to run (default: the latest).
        #[arg(long)]
        version: Option<u32>,
    },
}

#[derive(Subcommand)]
pub(super) enum SubCommand {
    /// Create or update subscription GROUP. `--spec` takes a whole JSON spec (or @FILE); the
    /// other flags set single fields on top of it.
    #[command(after_help = "Examples:
  wasmq sub create notify --topic orders --plugin notifier --instances 2
  wasmq sub create audit --topic orders --plugin recorder --ordered --max-attempts 5 --backoff 1000,5000
  wasmq sub create notify --spec @notify.json")]
    Create(Box<SubArgs>),
    /// A subscription's spec and status: lag, offsets and low water per queue, counts.
    Show {
        /// The subscription's consumer group.
        group: String,
    },
    /// List subscriptions with their status (lag, delivery counts).
    List,
    /// Stop delivering (offsets and timers stay) until `resume`.
    Pause {
        /// The subscription's consumer group.
        group: String,
    },
    /// Deliver again after `pause`, from where it stopped.
    Resume {
        /// The subscription's consumer group.
        group: String,
    },
    /// Move the offsets: `--to earliest` (replay), `latest` (skip), or a time in ms.
    #[command(
        after_help = "Examples:\n  wasmq sub reset notify --to earliest\n  wasmq sub reset notify --to 1764547200000"
    )]
    Reset {
        /// The subscription's consumer group.
        group: String,
        /// `earliest`, `latest`, or a time (ms since the Unix epoch).
        #[arg(long, default_value = "earliest")]
        to: String,
    },
    /// Delete a subscription with its offsets, timers, dead letters and kv.
    Delete {
        /// The subscription's consumer group.
        group: String,
    },
}

#[derive(Args)]
pub(super) struct SubArgs {
    /// The consumer group: the subscription's name.
    pub(super) group: String,
    /// A whole subscription spec as JSON (or @FILE); the other flags override its fields.
    #[arg(long)]
    pub(super) spec: Option<String>,
    /// The topic to consume (required, here or in --spec).
    #[arg(long)]
    pub(super) topic: Option<String>,
    /// The plugin that handles each message (required, here or in --spec).
    #[arg(long)]
    pub(super) plugin: Option<String>,
    /// Pin a plugin version (default: follow the latest).
    #[arg(long)]
    pub(super) plugin_version: Option<u32>,
    /// clustering | broadcast
    #[arg(long)]
    pub(super) mode: Option<String>,
    /// Deliver each queue's messages one after another, in offset order.
    #[arg(long)]
    pub(super) ordered: bool,
    /// Plugin instances running at once for this subscription.
    #[arg(long)]
    pub(super) instances: Option<u32>,
    /// `*` or `a || b`
    #[arg(long)]
    pub(super) filter: Option<String>,
    /// Attempts per message before it becomes a dead letter.
    #[arg(long)]
    pub(super) max_attempts: Option<u32>,
    /// Retry delays in ms, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub(super) backoff: Option<Vec<u64>>,
    /// Messages handed out and not yet done, at most, across the subscription's instances.
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
    #[command(
        after_help = "Example:\n  id=$(wasmq -o json txn begin orders '{\"id\":7}' | jq -r .id) && wasmq txn commit \"$id\""
    )]
    Begin {
        /// The topic the message goes to once committed.
        topic: String,
        /// The message body, as for publish.
        body: String,
        /// Ask the topic's checker after this many ms (default: the topic's setting).
        #[arg(long)]
        check_after: Option<u64>,
    },
    /// One transaction: its state, half message and history of checks.
    Show {
        /// The transaction id (`txn begin` printed it).
        id: String,
    },
    /// All transactions, or those in one state (pending, committed, rolled_back, unresolved).
    List {
        /// pending, committed, rolled_back or unresolved.
        #[arg(long)]
        state: Option<String>,
    },
    /// Commit: the half message becomes visible to subscriptions.
    Commit {
        /// The transaction id.
        id: String,
    },
    /// Roll back: the half message is never delivered.
    Rollback {
        /// The transaction id.
        id: String,
    },
    /// Give an unresolved transaction a fresh round of checks.
    Recheck {
        /// The transaction id.
        id: String,
    },
}

#[derive(Subcommand)]
pub(super) enum DlqCommand {
    /// A page of a subscription's dead letters, oldest first, with why each died.
    #[command(
        after_help = "Examples:\n  wasmq dlq list notify --limit 20\n  wasmq dlq list notify --after KEY"
    )]
    List {
        /// The subscription's consumer group.
        group: String,
        /// Dead letters per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The `next` key of the previous page.
        #[arg(long)]
        after: Option<String>,
    },
    /// Deliver dead letters again: those with `--id` (repeatable), or all.
    #[command(
        after_help = "Examples:\n  wasmq dlq redrive notify\n  wasmq dlq redrive notify --id MESSAGE_ID --id MESSAGE_ID"
    )]
    Redrive {
        /// The subscription's consumer group.
        group: String,
        /// A message id to redrive (repeatable; none: all).
        #[arg(long = "id")]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
pub(super) enum MessageCommand {
    /// One message by id.
    Get {
        /// The message id (publish printed it).
        id: String,
    },
    /// Where a message is now for each subscription of its topic, and every delivery attempt
    /// on record (time, node, instance, outcome, fate, duration, reason).
    #[command(after_help = "Example:\n  wasmq message trace 0193a5c0-7f1e-7cc2-9b1d-2f6e4f1a9c3d")]
    Trace {
        /// The message id (publish printed it).
        id: String,
    },
    /// Messages with business key KEY on TOPIC.
    Find {
        /// The topic.
        topic: String,
        /// The business key given at publish (`--key`).
        #[arg(long)]
        key: String,
    },
    /// Read a queue of TOPIC from an offset.
    #[command(after_help = "Example:\n  wasmq message read orders --queue 1 --from 500 --limit 20")]
    Read {
        /// The topic.
        topic: String,
        /// Which queue (0 to the topic's queues - 1; default 0, and it says so when there are
        /// others).
        #[arg(long)]
        queue: Option<u32>,
        /// The first offset to read.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Messages at most.
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
    #[command(after_help = "Examples:
  wasmq topic create orders --queues 4
  wasmq topic create orders --retention-max-age-ms 86400000 --retention-after-consumed true
  wasmq topic create logs --retention-max-bytes none")]
    Create {
        /// The topic's name: 1-128 characters of A-Z a-z 0-9 . _ - (not starting with '.').
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
    /// List topics.
    List,
    /// A topic's queues (low water, high water, stored bytes) and retention.
    Show {
        /// The topic's name.
        name: String,
    },
    /// Delete a topic and its messages; undecided transactions of it are rolled back.
    Delete {
        /// The topic's name.
        name: String,
        /// Also delete its subscriptions (refused while it has any, without this).
        #[arg(long)]
        force: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// Every command, subcommand and argument a user can see says what it is (issue 26: ~25 of
    /// them had empty help), recursively, so a new verb or flag without help fails here.
    #[test]
    fn every_visible_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !arg.is_hide_set() && !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cli, "wasmq", &mut missing);
        assert!(missing.is_empty(), "no help: {missing:#?}");
    }
}
