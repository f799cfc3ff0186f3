//! The host side of a plugin instance: its store data (WASI context with nothing granted,
//! memory limiter, CPU budget) and the capability imports of the WIT contract.

use std::collections::BTreeSet;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use super::limits::{DeadlineExceeded, MAX_RESOURCES, MemoryLimitExceeded, MemoryLimiter};
pub use super::staged::{CommitError, KvKey, Staged};
use crate::bindings::GuestError;
use crate::bindings::wasmq::plugin::{context, email, http, kv, log, publish, sms, types};
use crate::capabilities::{Capabilities, Grants};
use crate::storage::{MessageId, Storage};

/// Longest kv key and largest kv value.
pub const MAX_KV_KEY: usize = 1024;
pub const MAX_KV_VALUE: usize = 1024 * 1024;
/// Longest log line kept; the rest is cut.
const MAX_LOG_LINE: usize = 4096;

/// Per-plugin (or per-subscription) limits; `None` takes the runtime's default.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct PluginLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_MS))]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_MEMORY_MB))]
    pub memory_mb: Option<u64>,
}

/// The longest call deadline a subscription or upload may ask for (`limits.timeout_ms`, 10 min).
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// The most memory a subscription or upload may ask for (`limits.memory_mb`; the server's
/// `[plugins] memory_mb` caps it further).
pub const MAX_MEMORY_MB: u64 = 65_536;

impl PluginLimits {
    /// Bounds what a client may ask of a plugin call: `timeout_ms` 1 to [`MAX_TIMEOUT_MS`],
    /// `memory_mb` 1 to [`MAX_MEMORY_MB`] (subscription `limits` and plugin uploads); the
    /// error names the field and its bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self
            .timeout_ms
            .is_some_and(|t| t == 0 || t > MAX_TIMEOUT_MS)
        {
            return Err(format!("limits.timeout_ms must be 1 to {MAX_TIMEOUT_MS}"));
        }
        if self.memory_mb.is_some_and(|m| m == 0 || m > MAX_MEMORY_MB) {
            return Err(format!("limits.memory_mb must be 1 to {MAX_MEMORY_MB}"));
        }
        Ok(())
    }
}

/// Who an instance is, what it may do, and the broker services behind its capabilities.
#[derive(Clone)]
pub struct InstanceContext {
    pub plugin: String,
    pub version: u32,
    pub group: String,
    /// The dispatch member it serves: `all` for a clustering subscription, `iNNNN` for a
    /// broadcast instance (each has its own offsets). Per-member plugin state (the SDKs'
    /// `once()` markers) is kept under the group and this name, so one member's marker never
    /// stands for another's.
    pub member: String,
    pub instance_index: u32,
    pub instance_count: u32,
    pub config_json: String,
    pub grants: Grants,
    pub limits: PluginLimits,
    /// The storage space its kv calls read and write (see [`kv_space`]).
    pub kv_space: String,
    /// Exactly-once processing (issue 24): kv writes and publishes of a call are staged and
    /// handed back with its outcome (see [`Staged`]), to be committed with the delivery's
    /// completion. Off: they take effect when called (at-least-once).
    pub stage_effects: bool,
    pub services: Arc<dyn Services>,
}

/// Whose kv state an instance sees (issue 22): kv is a namespace per subscription unless the
/// subscription asks for its plugin's shared one.
#[derive(Debug, Clone, Copy)]
pub enum KvOwner<'a> {
    /// A subscription's own state; removed with the subscription.
    Subscription(&'a str),
    /// A plugin's state shared by its subscriptions that ask for it (`kv_scope: "plugin"`) and
    /// by topic transaction checkers; removed with the plugin. Older versions kept all kv here.
    Plugin(&'a str),
    /// The invoke API's scratch state of a plugin; removed with the plugin.
    Invoke(&'a str),
}

/// The storage space of a kv namespace. Names cannot hold `/`, so the three never overlap.
pub fn kv_space(owner: KvOwner<'_>) -> String {
    match owner {
        KvOwner::Subscription(group) => format!("kvsub/{group}"),
        KvOwner::Plugin(plugin) => format!("kv/{plugin}"),
        KvOwner::Invoke(plugin) => format!("kvinvoke/{plugin}"),
    }
}

/// What the kv and publish capabilities need of the broker. The broker implements it; the
/// runtime sits below the broker and knows only this.
#[async_trait::async_trait]
pub trait Services: Send + Sync + 'static {
    /// Where kv records are kept.
    fn storage(&self) -> &Arc<dyn Storage>;
    /// Accounts a kv write in `space` that replaces `old` bytes (key and value; 0 if new) by
    /// `new` (0 for a delete): refused with [`GuestError::Unavailable`] past the namespace's
    /// cap (`[limits] max_kv_bytes`) or the disk quota.
    async fn reserve_kv(&self, space: &str, old: u64, new: u64) -> Result<(), GuestError>;
    /// Publishes a plugin's message (the caller has checked the grant): its id, or
    /// [`GuestError::Unavailable`] for what a retry may fix (storage, a full disk) and
    /// [`GuestError::Invalid`] for a message the broker refuses.
    async fn publish(&self, message: publish::Outgoing) -> Result<MessageId, GuestError>;
    /// Checks and stamps a plugin's message as [`Services::publish`] does (id, queue, disk
    /// reservation) without storing it: its topic and the message, for a later
    /// [`Services::commit`]. Errors as [`Services::publish`]'s.
    async fn prepare_publish(
        &self,
        message: publish::Outgoing,
    ) -> Result<(String, crate::storage::NewMessage), GuestError>;
    /// Writes a call's staged effects and its delivery's completion in one atomic step
    /// ([`crate::storage::Storage::commit`]), once the topics it publishes to still exist.
    async fn commit(
        &self,
        commit: crate::storage::Commit,
    ) -> Result<crate::storage::Committed, crate::storage::StorageError>;
}

/// What the scheduler and the epoch callback know of an instance's calls.
pub struct Turns {
    pub sched: Arc<super::Scheduler>,
    pub tenant: Arc<super::Tenant>,
    pub clock: Arc<super::CallClock>,
    /// CPU budget of one call (ns).
    pub budget_ns: u64,
    /// When the running call last yielded its thread.
    pub last_yield: std::time::Instant,
}

pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: MemoryLimiter,
    pub turns: Turns,
    pub ctx: Arc<InstanceContext>,
    caps: Arc<Capabilities>,
    /// Denied calls so far; logged at 1, 2, 4, 8, … so a flood cannot flood the log.
    denials: u64,
    /// The message the current call is about (log lines carry it).
    pub message_id: Option<String>,
    /// Lines the current call has logged, against [`crate::logs::LINES_PER_CALL`].
    pub lines_this_call: u32,
    /// The current call's staged kv writes and publishes, when its context stages effects.
    pub staged: Option<Staged>,
}

impl HostState {
    pub fn new(
        ctx: Arc<InstanceContext>,
        max_memory: usize,
        caps: Arc<Capabilities>,
        turns: Turns,
    ) -> Self {
        // No preopened dirs, no env, no args, no network, no stdio: only clocks and randomness.
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Self {
            wasi,
            table,
            limiter: MemoryLimiter::new(max_memory),
            turns,
            caps,
            denials: 0,
            message_id: None,
            lines_this_call: 0,
            staged: ctx.stage_effects.then(Staged::default),
            ctx,
        }
    }

    /// Takes the staged effects of the call that just ended (empty when nothing is staged),
    /// leaving a fresh set for the next call.
    pub fn take_staged(&mut self) -> Staged {
        match &mut self.staged {
            Some(s) => std::mem::take(s),
            None => Staged::default(),
        }
    }

    fn denied(&mut self, what: &str) -> GuestError {
        GuestError::Denied(format!("the subscription does not grant {what}"))
    }

    /// Counts a capability call and logs denials (sparingly).
    fn report<T>(
        &mut self,
        capability: &'static str,
        result: Result<T, GuestError>,
    ) -> Result<T, GuestError> {
        self.caps.count(capability, &result);
        if let Err(GuestError::Denied(why)) = &result {
            self.denials += 1;
            if self.denials.is_power_of_two() {
                let why = crate::text::from_plugin(why, crate::text::MAX_REASON_BYTES);
                tracing::warn!(plugin = %self.ctx.plugin, group = %self.ctx.group, capability, denials = self.denials, "capability call denied: {why}");
            }
        }
        result
    }

    fn kv_space(&self) -> &str {
        &self.ctx.kv_space
    }

    /// The stored key of a plugin's kv key: the SDKs' `once()` markers (`__once/<message id>`)
    /// are scoped to the subscription and member that ran the side effect.
    fn kv_key(&self, key: &str) -> String {
        match key.strip_prefix(ONCE_PREFIX) {
            Some(id) => format!("{ONCE_PREFIX}{}/{}/{id}", self.ctx.group, self.ctx.member),
            None => key.to_string(),
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Bytes `stored_key` holds now in `space` (key and value; 0 if absent).
async fn kv_size(
    services: &Arc<dyn Services>,
    space: &str,
    stored_key: &str,
) -> Result<u64, GuestError> {
    let old = services
        .storage()
        .get_record(space, stored_key)
        .await
        .map_err(unavailable)?;
    Ok(old.map_or(0, |r| (stored_key.len() + r.value.len()) as u64))
}

fn check_key(key: &str) -> Result<(), GuestError> {
    if key.is_empty() || key.len() > MAX_KV_KEY {
        return Err(GuestError::Invalid(format!(
            "kv keys have 1 to {MAX_KV_KEY} bytes"
        )));
    }
    Ok(())
}

/// The prefix of the keys the SDKs' `once()` writes (guest-sdk `capabilities::once`).
const ONCE_PREFIX: &str = "__once/";

fn unavailable(e: impl std::fmt::Display) -> GuestError {
    GuestError::Unavailable(e.to_string())
}

/// What a guest's log line is kept as: `note` (if any) and the line, inert in a terminal (a
/// `\n` cannot forge a server line; see [`crate::text::printable`]) and cut at
/// [`MAX_LOG_LINE`] bytes, with `…` where it was cut. Only the first `MAX_LOG_LINE` + 4 bytes
/// are escaped: the rest would be cut anyway, and escaping grows a control character up to 8
/// bytes (a 60 MiB line of them made ~300 MiB a call).
fn log_text(line: &str, note: Option<&str>) -> String {
    let keep = line.floor_char_boundary(MAX_LOG_LINE + 4);
    let mut text = note.unwrap_or("").to_string();
    text.push_str(&crate::text::printable(&line[..keep]));
    if text.len() > MAX_LOG_LINE {
        text.truncate(text.floor_char_boundary(MAX_LOG_LINE));
        text.push('…');
    }
    text
}

impl types::Host for HostState {}

impl log::Host for HostState {
    async fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        self.log_line(level, &message);
        Ok(())
    }

    async fn log_utf8(&mut self, level: log::Level, message: Vec<u8>) -> wasmtime::Result<()> {
        // Past MAX_LOG_LINE bytes the line is cut anyway: decode no more than that (the 4 bytes
        // more keep a cut inside the line's last character visible as the cut it is).
        let shown = &message[..message.len().min(MAX_LOG_LINE + 4)];
        self.log_line(level, &String::from_utf8_lossy(shown));
        Ok(())
    }
}

impl HostState {
    /// One line of the plugin's log (`log` and `log-utf8`): counted against the call's line
    /// limit, made printable, cut at [`MAX_LOG_LINE`] bytes, then kept in the log ring and
    /// emitted through tracing.
    fn log_line(&mut self, level: log::Level, message: &str) {
        use crate::logs::{LINES_PER_CALL, NewLine};
        self.lines_this_call = self.lines_this_call.saturating_add(1);
        let logs = &self.caps.logs;
        let c = &self.ctx;
        if self.lines_this_call > LINES_PER_CALL {
            logs.dropped(&c.plugin, 1);
            return;
        }
        let limit_note = (self.lines_this_call == LINES_PER_CALL).then(|| {
            format!(
                "(log limit of {LINES_PER_CALL} lines per call reached; later lines of this call are dropped) "
            )
        });
        let message = log_text(message, limit_note.as_deref());
        let level_name = match level {
            log::Level::Trace => "trace",
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        let trace = logs.push(NewLine {
            level: level_name,
            plugin: &c.plugin,
            version: c.version,
            group: &c.group,
            instance: c.instance_index,
            message_id: self.message_id.as_deref(),
            message: message.clone(),
        });
        if !trace {
            return;
        }
        let (plugin, group) = (&c.plugin, &c.group);
        let message_id = self.message_id.as_deref().unwrap_or("");
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "wasmq::plugin", %plugin, %group, %message_id, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "wasmq::plugin", %plugin, %group, %message_id, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "wasmq::plugin", %plugin, %group, %message_id, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "wasmq::plugin", %plugin, %group, %message_id, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "wasmq::plugin", %plugin, %group, %message_id, "{message}")
            }
        }
    }

    /// Whether a kv key's calls are staged: with staging on, every key but the SDKs' `once()`
    /// markers, which guard external side effects already made and must outlive a retry.
    fn stages(&self, key: &str) -> bool {
        self.staged.is_some() && !key.starts_with(ONCE_PREFIX)
    }

    /// The value of a stored key as the call sees it: its own staged write, else storage's
    /// (whose revision is noted, for the commit's check when `read`).
    async fn kv_current(
        &mut self,
        stored: &KvKey,
        read: bool,
    ) -> Result<Option<Vec<u8>>, GuestError> {
        // Read after its own write: what it reads is its own, nothing to check.
        if let Some(staged) = &self.staged
            && let Some(v) = staged.staged_value(stored)
        {
            return Ok(v.map(<[u8]>::to_vec));
        }
        let record = self
            .ctx
            .services
            .storage()
            .get_record(&stored.0, &stored.1)
            .await
            .map_err(unavailable)?;
        if let Some(s) = &mut self.staged {
            s.saw(stored, record.as_ref().map_or(0, |r| r.revision), read);
        }
        Ok(record.map(|r| r.value))
    }

    /// Stages (or, unstaged, writes) `value` (`None`: a delete) under a plugin's kv `key`,
    /// within the namespace's cap.
    async fn kv_write(&mut self, key: &str, value: Option<Vec<u8>>) -> Result<(), GuestError> {
        let stored: KvKey = (self.kv_space().to_string(), self.kv_key(key));
        let size =
            |v: &Option<Vec<u8>>| v.as_ref().map_or(0, |v| (stored.1.len() + v.len()) as u64);
        let services = self.ctx.services.clone();
        if self.stages(key) {
            let old = size(&self.kv_current(&stored, false).await?);
            let new = size(&value);
            services.reserve_kv(&stored.0, old, new).await?;
            if let Some(s) = &mut self.staged {
                s.reserved.push((stored.0.clone(), old, new));
                s.writes.insert(stored, value);
            }
            return Ok(());
        }
        let old = kv_size(&services, &stored.0, &stored.1).await?;
        let new = size(&value);
        services.reserve_kv(&stored.0, old, new).await?;
        let written = services
            .storage()
            .put_record(&stored.0, &stored.1, value, crate::storage::Expect::Any)
            .await;
        if let Err(e) = written {
            // Not written: give the reservation back.
            let _ = services.reserve_kv(&stored.0, new, old).await;
            return Err(unavailable(e));
        }
        Ok(())
    }
}

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, GuestError>> {
        if let Err(e) = check_key(&key) {
            return Ok(Err(e));
        }
        let stored: KvKey = (self.kv_space().to_string(), self.kv_key(&key));
        if !self.stages(&key) {
            let storage = self.ctx.services.storage();
            return Ok(storage
                .get_record(&stored.0, &stored.1)
                .await
                .map(|r| r.map(|r| r.value))
                .map_err(unavailable));
        }
        Ok(self.kv_current(&stored, true).await)
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), GuestError>> {
        if let Err(e) = check_key(&key) {
            return Ok(Err(e));
        }
        if value.len() > MAX_KV_VALUE {
            return Ok(Err(GuestError::Invalid(format!(
                "kv values have at most {MAX_KV_VALUE} bytes"
            ))));
        }
        Ok(self.kv_write(&key, Some(value)).await)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), GuestError>> {
        if let Err(e) = check_key(&key) {
            return Ok(Err(e));
        }
        Ok(self.kv_write(&key, None).await)
    }

    async fn list_keys(
        &mut self,
        prefix: String,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<String>, GuestError>> {
        let storage = self.ctx.services.storage();
        let limit = (limit as usize).min(10_000);
        let space = self.kv_space().to_string();
        let stored = match storage.list_records(&space, &prefix, limit).await {
            Ok(v) => v,
            Err(e) => return Ok(Err(unavailable(e))),
        };
        let mut keys: BTreeSet<String> = stored.into_iter().map(|(k, _)| k).collect();
        // The call's own staged writes show: new keys appear, deleted ones go.
        if let Some(s) = &self.staged {
            for ((sp, k), v) in &s.writes {
                if *sp == space && k.starts_with(&prefix) {
                    if v.is_some() {
                        keys.insert(k.clone());
                    } else {
                        keys.remove(k);
                    }
                }
            }
        }
        Ok(Ok(keys.into_iter().take(limit).collect()))
    }
}

impl publish::Host for HostState {
    async fn send(
        &mut self,
        message: publish::Outgoing,
    ) -> wasmtime::Result<Result<String, GuestError>> {
        let granted = self
            .ctx
            .grants
            .publish
            .iter()
            .any(|t| t == &message.topic || t == "*");
        let result = if !granted {
            Err(self.denied(&format!("publishing to {:?}", message.topic)))
        } else if self.staged.is_some() {
            // Staged: stored with the delivery's completion, under the id given out now.
            match self.ctx.services.prepare_publish(message).await {
                Ok((topic, m)) => {
                    let id = m.id.to_string();
                    if let Some(s) = &mut self.staged {
                        s.publishes.push((topic, m));
                    }
                    Ok(id)
                }
                Err(e) => Err(e),
            }
        } else {
            self.ctx
                .services
                .publish(message)
                .await
                .map(|id| id.to_string())
        };
        // Counted (and a denial logged) like every granted capability.
        Ok(self.report("publish", result))
    }
}

impl context::Host for HostState {
    async fn identity(&mut self) -> wasmtime::Result<context::PluginInstance> {
        let c = &self.ctx;
        Ok(context::PluginInstance {
            group: c.group.clone(),
            plugin: c.plugin.clone(),
            plugin_version: c.version,
            instance_index: c.instance_index,
            instance_count: c.instance_count,
        })
    }

    async fn config(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.config_json.clone())
    }
}

impl email::Host for HostState {
    async fn send(
        &mut self,
        to: String,
        subject: String,
        text: String,
        html: Option<String>,
    ) -> wasmtime::Result<Result<(), GuestError>> {
        let result = if self.ctx.grants.email {
            self.caps
                .send_email(&to, &subject, &text, html.as_deref())
                .await
        } else {
            Err(self.denied("email"))
        };
        Ok(self.report("email", result))
    }
}

impl sms::Host for HostState {
    async fn send(&mut self, to: String, text: String) -> wasmtime::Result<Result<(), GuestError>> {
        let result = if self.ctx.grants.sms {
            self.caps.send_sms(&to, &text).await
        } else {
            Err(self.denied("sms"))
        };
        Ok(self.report("sms", result))
    }
}

impl http::Host for HostState {
    async fn send(
        &mut self,
        req: http::Request,
    ) -> wasmtime::Result<Result<http::Response, GuestError>> {
        let caps = self.caps.clone();
        let result = caps.http(&self.ctx.grants.http, req).await;
        Ok(self.report("http", result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_is_escaped_and_cut_with_a_mark() {
        assert_eq!(log_text("hi\nthere", None), "hi\\nthere");
        assert_eq!(log_text("x", Some("(note) ")), "(note) x");
        // Exactly at the limit: kept whole. One byte more: cut, and marked.
        let full = "a".repeat(MAX_LOG_LINE);
        assert_eq!(log_text(&full, None), full);
        let over = log_text(&"a".repeat(MAX_LOG_LINE + 1), None);
        assert_eq!(over, format!("{}…", "a".repeat(MAX_LOG_LINE)));
        // Control characters grow when escaped; a line of 1 MiB of them is cut all the same,
        // and so is one whose cut falls inside a multi-byte character.
        let controls = log_text(&"\u{1}".repeat(1 << 20), None);
        assert!(controls.ends_with('…') && controls.len() <= MAX_LOG_LINE + 3);
        assert!(!controls.chars().any(char::is_control));
        let wide = log_text(&"€".repeat(MAX_LOG_LINE), None);
        assert!(wide.ends_with("€…") && wide.len() <= MAX_LOG_LINE + 3);
        // A lone control character just past the kept bytes cannot hide the cut.
        let tail = log_text(&format!("{}\u{1b}", "a".repeat(MAX_LOG_LINE + 4)), None);
        assert!(tail.ends_with('…'));
    }
}
