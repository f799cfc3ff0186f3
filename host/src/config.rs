//! Server configuration: `wasmq.toml`, `WASMQ_<SECTION>_<KEY>` environment overrides, defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub storage: StorageConfig,
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub plugins: PluginsConfig,
    pub transactions: TransactionsConfig,
    pub retention: RetentionConfig,
    pub smtp: SmtpConfig,
    pub sms: SmsConfig,
    pub auth: AuthConfig,
    /// `[secrets]`: values that plugin config refers to as `{"$secret": "NAME"}`.
    pub secrets: crate::secrets::Secrets,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Rocksdb,
    Jetstream,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    pub urls: Vec<String>,
    pub replicas: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Rocksdb,
            urls: vec!["nats://127.0.0.1:4222".into()],
            replicas: 3,
        }
    }
}

/// When a publish is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// After an fsync shared by every write of the same group commit.
    Sync,
    /// After the write-ahead-log write (survives a process crash, not a power cut).
    Async,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub flush: FlushMode,
    /// Open connections at once; more are answered 503 and closed. 0 (the default) derives it
    /// from the open-files limit, after the descriptors storage needs (see `wasmq::fds`); a
    /// value that would leave storage short is refused at start.
    pub max_connections: usize,
    /// Request line plus headers, in bytes; more is a 431.
    pub max_header_bytes: usize,
    /// Header fields per request; more is a 431.
    pub max_headers: usize,
    /// Time to send a request's headers (and the idle time allowed between keep-alive requests).
    pub header_timeout_ms: u64,
    /// Time from a request's headers to its response, body upload included; past it, a 408.
    pub request_timeout_ms: u64,
    /// This node's name among nodes sharing a JetStream backend (leases, `/v1/cluster`,
    /// metrics); empty: a fresh id per start. A node restarted under its old name takes its
    /// leases back at once. Two running nodes must never share one.
    pub node_id: String,
    /// Names clients use for this server besides its listen address and loopback (as sent in
    /// `Host`; port ignored): others are refused (421), which stops DNS-rebinding pages. When
    /// listening on every address (`0.0.0.0`) and empty, any name is accepted.
    pub allowed_hosts: Vec<String>,
    /// Web origins (`https://console.example.com`) whose pages may call the API; a browser's
    /// request from any other site is refused (403 `cross_site_request`).
    pub allowed_origins: Vec<String>,
    /// Log-follow streams open at once (0: a quarter of `max_connections`); more are answered
    /// 503 `too_many_streams`. Streams hold connections, so this keeps room for requests.
    pub max_streams: usize,
    /// Log-follow streams one token may hold open at once.
    pub max_streams_per_token: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir: PathBuf::from("./data"),
            flush: FlushMode::Sync,
            max_connections: 0,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_timeout_ms: 10_000,
            // Uploading and compiling a large (Python) component takes tens of seconds.
            request_timeout_ms: 120_000,
            node_id: String::new(),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_streams: 0,
            max_streams_per_token: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message body, in bytes.
    pub max_message_bytes: usize,
    /// Most messages in one batch publish.
    pub max_batch: usize,
    /// Largest plugin upload, in bytes.
    pub max_plugin_bytes: usize,
    /// Versions of a plugin kept after an upload (1 to 10000): older ones go, with their bytes
    /// and compiled code, unless a subscription pins them (`plugin_version`).
    pub max_plugin_versions: u32,
    /// Largest request body on the publish routes (a batch, or a base64 body), in bytes.
    pub max_request_bytes: usize,
    /// Most queues one topic may have.
    pub max_queues: u32,
    /// How long a publish's `Idempotency-Key` is remembered.
    pub idempotency_window_ms: u64,
    /// Publishing to a topic answers 429 while its slowest running subscription is this many
    /// messages behind (0 = no bound).
    pub max_backlog: u64,
    /// Publishing answers 503 while the data directory holds this many bytes (0 = no quota).
    pub max_disk_bytes: u64,
    /// Publishing answers 503 while its filesystem has less than this free (0 = no floor).
    pub min_free_disk_bytes: u64,
    /// Bytes (keys and values) one kv namespace may hold: a subscription's own, or a plugin's
    /// shared one. A `kv.set` past it fails with `unavailable`.
    pub max_kv_bytes: u64,
    /// Timers (delayed messages, retries) each member of an unordered subscription holds in
    /// memory, the earliest due (100 to 10 000 000): the rest stay in storage and are read a
    /// page at a time as the earlier ones fire. Ordered subscriptions hold all of theirs.
    pub max_timers_in_memory: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_batch: 1000,
            // Python and JavaScript components start at 12-19 MB (the interpreter is inside).
            max_plugin_bytes: 64 * 1024 * 1024,
            max_plugin_versions: 10,
            max_timers_in_memory: 10_000,
            max_request_bytes: 16 * 1024 * 1024,
            max_queues: 256,
            idempotency_window_ms: 24 * 3600 * 1000,
            max_backlog: 0,
            max_disk_bytes: 0,
            // Room for compactions, offsets and decisions to go on once producers are held.
            min_free_disk_bytes: 256 * 1024 * 1024,
            max_kv_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// CPU deadline of one plugin call.
    pub timeout_ms: u64,
    /// Linear memory of one plugin instance.
    pub memory_mb: u64,
    /// Instances the pooling allocator keeps room for (0: allocate on demand); also the most
    /// instances that exist at once (1024 when 0).
    pub pool_instances: u32,
    /// Threads that run plugin calls, apart from the API's (0: one per core). Also how many
    /// calls run wasm at once, shared fairly between subscriptions.
    pub threads: u32,
    /// CPU time one compile of an uploaded component may use (ms, whole seconds count).
    pub compile_timeout_ms: u64,
    /// Memory one compile may use (MiB).
    pub compile_memory_mb: u64,
    /// Compiles that run at once; more uploads wait their turn.
    pub max_compiles: u32,
    /// How long stopping a subscription (pause, update, delete, shutdown) waits for its running
    /// calls before cutting them off (ms).
    pub stop_grace_ms: u64,
    /// The binary that compiles in a child process (`wasmq serve` sets itself); not a config key.
    #[serde(skip)]
    pub compile_worker: Option<std::path::PathBuf>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 5000,
            memory_mb: 64,
            pool_instances: 256,
            threads: 0,
            compile_timeout_ms: 60_000,
            compile_memory_mb: 2048,
            max_compiles: 2,
            stop_grace_ms: 10_000,
            compile_worker: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransactionsConfig {
    pub check_after_ms: u64,
    pub check_interval_ms: u64,
    pub max_checks: u32,
}

impl Default for TransactionsConfig {
    fn default() -> Self {
        Self {
            check_after_ms: 6000,
            check_interval_ms: 30000,
            max_checks: 15,
        }
    }
}

/// `[retention]`: how retention is enforced, and what the broker's own bookkeeping keeps.
/// What each topic keeps is its own `retention` (`PUT /v1/topics/{topic}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How often every topic's queues are checked and trimmed (ms, 100 to 3 600 000). Age
    /// limits hold to within this.
    pub check_interval_ms: u64,
    /// Decided (committed or rolled back) transactions are deleted this long after their
    /// decision (ms, 1 000 to 100 years; default 72 h, as RocketMQ keeps the operation log
    /// of half messages with its commit log). Undecided ones are never deleted.
    pub transactions_max_age_ms: u64,
    /// At most this many committed and this many rolled-back transactions are kept, the
    /// oldest deleted first (1 to 10^9; default 1 000 000).
    pub transactions_max_count: u64,
    /// Dead letters are deleted this long after they died (ms, 1 000 to 100 years; default
    /// 72 h: RocketMQ's dead-letter queues are topics kept as long as its commit log).
    pub dead_letters_max_age_ms: u64,
    /// At most this many dead letters are kept per subscription, the oldest deleted first
    /// (1 to 10^9; default 1 000 000, as for transactions). Status and `/metrics` read a
    /// running count, so the number kept costs disk, not time.
    pub dead_letters_max_count: u64,
    /// Delivery attempts' trace records (`GET /v1/messages/{id}/trace`) are deleted this long
    /// after their message was created (ms, 1 000 to 100 years; default 72 h, as messages);
    /// 0 records no trace.
    pub trace_max_age_ms: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            check_interval_ms: 1000,
            transactions_max_age_ms: 72 * 3600 * 1000,
            transactions_max_count: 1_000_000,
            dead_letters_max_age_ms: 72 * 3600 * 1000,
            dead_letters_max_count: 1_000_000,
            trace_max_age_ms: 72 * 3600 * 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartTls {
    Off,
    Opportunistic,
    Required,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub starttls: StartTls,
    pub from: String,
    /// SMTP connections kept open at once (plugin instances sending in parallel share them).
    pub max_connections: u32,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 25,
            username: String::new(),
            password: String::new(),
            starttls: StartTls::Off,
            from: "wasmq@localhost".into(),
            max_connections: 32,
        }
    }
}

// Secrets stay out of logs.
impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("starttls", &self.starttls)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmsConfig {
    pub url: String,
    pub auth_header: String,
}

impl std::fmt::Debug for SmsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsConfig")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<TokenConfig>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: String,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub topics: Vec<String>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("scopes", &self.scopes)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Loads the file (if any), then applies `WASMQ_<SECTION>_<KEY>` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text)
                    .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        let from_env = apply_env(&mut table, env)?;
        // An error about a key a variable set names the variable too (issue 26: `WASMQ_SERVER_
        // LISTEN=bad` was answered "invalid socket address syntax in `server.listen`").
        let name_variables = |e: ConfigError| match e {
            ConfigError::Invalid(text) => {
                let set_by: Vec<String> = from_env
                    .iter()
                    .filter(|(key, _)| mentions(&text, key))
                    .map(|(_, var)| var.clone())
                    .collect();
                ConfigError::Invalid(match set_by.as_slice() {
                    [] => text,
                    vars => format!("{text} (set by {})", vars.join(", ")),
                })
            }
            other => other,
        };
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| name_variables(ConfigError::Invalid(e.to_string())))?;
        config.validate().map_err(name_variables)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if self.plugins.timeout_ms == 0 || self.plugins.memory_mb == 0 {
            return Err(ConfigError::Invalid(
                "plugins.timeout_ms and plugins.memory_mb must be positive".into(),
            ));
        }
        let p = &self.plugins;
        if p.compile_timeout_ms == 0 || p.compile_timeout_ms > 3_600_000 {
            return Err(ConfigError::Invalid(
                "plugins.compile_timeout_ms must be 1 to 3600000".into(),
            ));
        }
        if p.compile_memory_mb < 64 || p.compile_memory_mb > 1 << 20 {
            return Err(ConfigError::Invalid(
                "plugins.compile_memory_mb must be 64 to 1048576".into(),
            ));
        }
        if p.stop_grace_ms > 600_000 {
            return Err(ConfigError::Invalid(
                "plugins.stop_grace_ms must be 0 to 600000".into(),
            ));
        }
        if p.max_compiles == 0 || p.max_compiles > 64 {
            return Err(ConfigError::Invalid(
                "plugins.max_compiles must be 1 to 64".into(),
            ));
        }
        if self.plugins.threads > 1024 {
            return Err(ConfigError::Invalid(
                "plugins.threads must be 0 (one per core) to 1024".into(),
            ));
        }
        let id = &self.server.node_id;
        if id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(ConfigError::Invalid(
                "server.node_id must be at most 64 characters of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        let t = &self.transactions;
        crate::base::TxnTimings {
            check_after_ms: Some(t.check_after_ms),
            check_interval_ms: Some(t.check_interval_ms),
            max_checks: Some(t.max_checks),
        }
        .validate()
        .map_err(ConfigError::Invalid)?;
        let r = &self.retention;
        if !(100..=3_600_000).contains(&r.check_interval_ms) {
            return Err(ConfigError::Invalid(
                "retention.check_interval_ms must be 100 to 3600000".into(),
            ));
        }
        use crate::base::{MAX_RETENTION_AGE_MS, MAX_RETENTION_COUNT};
        for (key, age) in [
            ("transactions_max_age_ms", r.transactions_max_age_ms),
            ("dead_letters_max_age_ms", r.dead_letters_max_age_ms),
        ] {
            if !(1000..=MAX_RETENTION_AGE_MS).contains(&age) {
                return Err(ConfigError::Invalid(format!(
                    "retention.{key} must be 1000 to {MAX_RETENTION_AGE_MS} (100 years)"
                )));
            }
        }
        if r.trace_max_age_ms != 0 && !(1000..=MAX_RETENTION_AGE_MS).contains(&r.trace_max_age_ms) {
            return Err(ConfigError::Invalid(format!(
                "retention.trace_max_age_ms must be 0 (no trace) or 1000 to {MAX_RETENTION_AGE_MS} (100 years)"
            )));
        }
        for (key, count) in [
            ("transactions_max_count", r.transactions_max_count),
            ("dead_letters_max_count", r.dead_letters_max_count),
        ] {
            if !(1..=MAX_RETENTION_COUNT).contains(&count) {
                return Err(ConfigError::Invalid(format!(
                    "retention.{key} must be 1 to {MAX_RETENTION_COUNT}"
                )));
            }
        }
        if !(100..=10_000_000).contains(&l.max_timers_in_memory) {
            return Err(ConfigError::Invalid(
                "limits.max_timers_in_memory must be 100 to 10000000".into(),
            ));
        }
        if !(1..=10_000).contains(&l.max_plugin_versions) {
            return Err(ConfigError::Invalid(
                "limits.max_plugin_versions must be 1 to 10000".into(),
            ));
        }
        if l.max_message_bytes == 0 || l.max_batch == 0 || l.max_queues == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_message_bytes, max_batch and max_queues must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Whether `text` names `key` (`server.listen`) as a whole: not `limits.max_batch` inside
/// `limits.max_batch_bytes`.
fn mentions(text: &str, key: &str) -> bool {
    text.match_indices(key).any(|(at, _)| {
        let after = text[at + key.len()..].chars().next();
        !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// Overrides keys of `table` from variables named after the keys the defaults have, typed like
/// them. Returns what it set: (`section.key`, `WASMQ_SECTION_KEY=value`).
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut set = Vec::new();
    let defaults = toml::Table::try_from(Config::default())
        .map_err(|e| ConfigError::Invalid(format!("defaults do not serialise: {e}")))?;
    let vars: std::collections::HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("WASMQ_"))
        .collect();
    for (section, keys) in &defaults {
        let Some(keys) = keys.as_table() else {
            continue;
        };
        for (key, default) in keys {
            let name = format!("WASMQ_{section}_{key}").to_uppercase();
            let Some(raw) = vars.get(&name) else { continue };
            let value = typed_like(default, raw)
                .ok_or_else(|| ConfigError::Invalid(format!("{name}={raw:?} is not valid")))?;
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(entry) = entry.as_table_mut() else {
                return Err(ConfigError::Invalid(format!("[{section}] must be a table")));
            };
            entry.insert(key.clone(), value);
            set.push((format!("{section}.{key}"), format!("{name}={raw:?}")));
        }
    }
    Ok(set)
}

fn typed_like(default: &toml::Value, raw: &str) -> Option<toml::Value> {
    match default {
        toml::Value::String(_) => Some(toml::Value::String(raw.to_string())),
        toml::Value::Integer(_) => raw.trim().parse().ok().map(toml::Value::Integer),
        toml::Value::Boolean(_) => raw.trim().parse().ok().map(toml::Value::Boolean),
        // Arrays (urls, tokens) are written as inline TOML: `["a", "b"]`.
        _ => toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmq.toml");
        std::fs::write(
            &path,
            "[server]\nflush = \"async\"\n[smtp]\nhost = \"mail\"\nport = 2525\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("WASMQ_SMTP_PORT", "587"),
                ("WASMQ_SERVER_DATA_DIR", "/tmp/x"),
                ("WASMQ_SMTP_PASSWORD", "123"),
                (
                    "WASMQ_STORAGE_URLS",
                    r#"["nats://127.0.0.1:1", "nats://127.0.0.1:2"]"#,
                ),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.flush, FlushMode::Async);
        assert_eq!(c.smtp.host, "mail");
        assert_eq!(c.smtp.port, 587);
        assert_eq!(c.smtp.password, "123");
        assert_eq!(c.server.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.storage.urls.len(), 2);
        assert_eq!(c.limits.max_message_bytes, 4 * 1024 * 1024);
    }

    /// The configs a user copies (README's full listing, the release archive's example, issue
    /// 26) load as they are: a renamed or removed key fails here, not on a user's machine.
    #[test]
    fn the_shipped_example_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let start = readme.find("## Configuration").unwrap();
        let block = &readme[start..];
        let block = &block[block.find("```toml\n").unwrap() + 8..];
        let block = &block[..block.find("```").unwrap()];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmq.toml");
        std::fs::write(&path, block).unwrap();
        let readme_config = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(readme_config.auth.tokens.len(), 3);
        let example = root.join("examples/deploy/wasmq.toml");
        let config = Config::load(Some(&example), env(&[])).unwrap();
        assert_eq!(config.server.data_dir, Path::new("/var/lib/wasmq"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmq.toml");
        std::fs::write(&path, "[server]\nlisten_on = \"x\"\n").unwrap();
        let err = Config::load(Some(&path), vec![]).unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
        std::fs::write(&path, "[nonsense]\n").unwrap();
        assert!(Config::load(Some(&path), vec![]).is_err());
    }

    #[test]
    fn bad_env_value_is_an_error() {
        let err = Config::load(None, env(&[("WASMQ_SMTP_PORT", "many")])).unwrap_err();
        assert!(err.to_string().contains("WASMQ_SMTP_PORT"), "{err}");
        let err = Config::load(None, env(&[("WASMQ_SERVER_NODE_ID", "a/b")])).unwrap_err();
        assert!(err.to_string().contains("node_id"), "{err}");
        let c = Config::load(None, env(&[("WASMQ_SERVER_NODE_ID", "node-1")])).unwrap();
        assert_eq!(c.server.node_id, "node-1");
        let err = Config::load(None, env(&[("WASMQ_SERVER_FLUSH", "sometimes")])).unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        // Errors found after parsing name the variable too.
        let err = Config::load(None, env(&[("WASMQ_SERVER_LISTEN", "bad")])).unwrap_err();
        assert!(
            err.to_string().contains("WASMQ_SERVER_LISTEN=\"bad\""),
            "{err}"
        );
        let err = Config::load(None, env(&[("WASMQ_PLUGINS_TIMEOUT_MS", "0")])).unwrap_err();
        assert!(
            err.to_string().contains("WASMQ_PLUGINS_TIMEOUT_MS"),
            "{err}"
        );
        // Not a variable that had nothing to do with it.
        let err = Config::load(
            None,
            env(&[("WASMQ_PLUGINS_TIMEOUT_MS", "0"), ("WASMQ_SMTP_PORT", "25")]),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("WASMQ_SMTP_PORT"), "{err}");
        assert!(mentions("in `limits.max_batch`", "limits.max_batch"));
        assert!(!mentions(
            "limits.max_batch_bytes must be",
            "limits.max_batch"
        ));
    }

    #[test]
    fn retention_bounds_name_the_key() {
        for (var, value, key) in [
            (
                "WASMQ_RETENTION_TRANSACTIONS_MAX_AGE_MS",
                "999",
                "transactions_max_age_ms",
            ),
            (
                "WASMQ_RETENTION_TRANSACTIONS_MAX_AGE_MS",
                "3153600000001",
                "transactions_max_age_ms",
            ),
            (
                "WASMQ_RETENTION_TRANSACTIONS_MAX_COUNT",
                "0",
                "transactions_max_count",
            ),
            (
                "WASMQ_LIMITS_MAX_TIMERS_IN_MEMORY",
                "99",
                "max_timers_in_memory",
            ),
            (
                "WASMQ_RETENTION_DEAD_LETTERS_MAX_AGE_MS",
                "0",
                "dead_letters_max_age_ms",
            ),
            (
                "WASMQ_RETENTION_DEAD_LETTERS_MAX_COUNT",
                "0",
                "dead_letters_max_count",
            ),
            (
                "WASMQ_RETENTION_DEAD_LETTERS_MAX_COUNT",
                "1000000001",
                "dead_letters_max_count",
            ),
            (
                "WASMQ_RETENTION_CHECK_INTERVAL_MS",
                "99",
                "check_interval_ms",
            ),
        ] {
            let err = Config::load(None, env(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
        let c = Config::load(
            None,
            env(&[("WASMQ_RETENTION_TRANSACTIONS_MAX_COUNT", "1000000000")]),
        )
        .unwrap();
        assert_eq!(c.retention.transactions_max_count, 1_000_000_000);
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let mut c = Config::default();
        c.smtp.password = "hunter2".into();
        c.sms.auth_header = "Bearer s3cret".into();
        let text = format!("{c:?}");
        assert!(!text.contains("hunter2") && !text.contains("s3cret"));
    }
}
