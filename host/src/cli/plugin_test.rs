//! `wasmq plugin test`: builds a plugin and runs it here on sample messages, with a host that
//! records email, SMS, HTTP and publish instead of making them and keeps kv in a scratch
//! store, so a plugin author sees outcomes, log lines and effects without a server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};

use crate::bindings::{CheckResult, GuestError, wasmq::plugin::publish::Outgoing};
use crate::broker::{Broker, Envelope, TopicSpec};
use crate::capabilities::{Capabilities, Effect, Effects, GrantSpec};
use crate::config::{Config, FlushMode};
use crate::runtime::host::{KvOwner, kv_space};
use crate::runtime::{
    FailureView, InstanceContext, OutcomeView, PluginLimits, Runtime, RuntimeConfig, Services,
};
use crate::storage::{MessageId, RocksStorage, Storage};

/// The subscription a test run plays (its kv namespace and log lines carry this name).
const GROUP: &str = "plugin-test";

/// What `wasmq plugin test` was asked.
pub struct TestRun {
    /// A plugin directory to build, or a built `.wasm` component.
    pub dir: PathBuf,
    pub target_dir: Option<PathBuf>,
    /// Message envelopes as JSON (`{"body": ...}` as publish takes them), each with where it
    /// came from (a file name, `--body N`).
    pub messages: Vec<(String, Value)>,
    pub config: Value,
    pub grants: GrantSpec,
    pub topic: String,
    pub timeout_ms: Option<u64>,
}

/// One call's report: which message, what the plugin answered (or why it did not), how long
/// it took (ms), what it logged and which effects it had.
#[derive(Serialize)]
pub struct CallReport {
    pub source: String,
    pub message_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeView>,
    /// A transaction checker's answer: `commit`, `rollback` or `unknown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureView>,
    pub duration_ms: f64,
    pub logs: Vec<Value>,
    pub effects: Vec<Effect>,
}

/// The whole run: the plugin, every call, and the kv state at the end (values as text when
/// UTF-8, else base64 under `{"base64": ...}`).
#[derive(Serialize)]
pub struct TestReport {
    pub plugin: String,
    pub component: String,
    pub calls: Vec<CallReport>,
    pub kv: serde_json::Map<String, Value>,
}

impl TestReport {
    /// Calls that ended in a trap, a deadline or a memory overrun.
    pub fn failed(&self) -> usize {
        self.calls.iter().filter(|c| c.failure.is_some()).count()
    }
}

/// The broker's stand-in for the runtime: kv in a scratch RocksDB through a real [`Broker`]
/// (its caps apply), publishes checked and stored by it too, then recorded as effects.
struct Recorder {
    broker: Arc<Broker>,
    effects: Arc<Effects>,
}

#[async_trait::async_trait]
impl Services for Recorder {
    fn storage(&self) -> &Arc<dyn Storage> {
        self.broker.storage()
    }

    async fn reserve_kv(&self, space: &str, old: u64, new: u64) -> Result<(), GuestError> {
        Services::reserve_kv(self.broker.as_ref(), space, old, new).await
    }

    async fn publish(&self, message: Outgoing) -> Result<MessageId, GuestError> {
        let (topic, key, body) = (
            message.topic.clone(),
            message.key.clone(),
            readable(&message.body),
        );
        let id = Services::publish(self.broker.as_ref(), message).await?;
        self.effects.record(Effect::Publish {
            topic,
            id: id.to_string(),
            key,
            body,
        });
        Ok(id)
    }

    async fn prepare_publish(
        &self,
        message: Outgoing,
    ) -> Result<(String, crate::storage::NewMessage), GuestError> {
        Services::prepare_publish(self.broker.as_ref(), message).await
    }

    async fn commit(
        &self,
        commit: crate::storage::Commit,
    ) -> Result<crate::storage::Committed, crate::storage::StorageError> {
        Services::commit(self.broker.as_ref(), commit).await
    }
}

/// Bytes for people: JSON as JSON, else as [`text_or_base64`].
fn readable(bytes: &[u8]) -> Value {
    serde_json::from_slice::<Value>(bytes).unwrap_or_else(|_| text_or_base64(bytes))
}

/// UTF-8 bytes as text, others as `{"base64": ...}`.
fn text_or_base64(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_string()),
        Err(_) => json!({"base64": base64::engine::general_purpose::STANDARD.encode(bytes)}),
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a run keeps its scratch store: `<tmp>/wasmq-plugin-test-<pid>-<uuid>`.
const SCRATCH_PREFIX: &str = "wasmq-plugin-test-";

/// Removes scratch stores of runs whose process is gone (interrupted before they cleaned up).
fn sweep_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The component to run: `dir` itself when it is a `.wasm` file, else what building it gives.
async fn component(dir: &Path, target_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if dir.is_file() {
        return Ok(dir.to_path_buf());
    }
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        super::scaffold::build_plugin_in(&dir, target_dir.as_deref())
    })
    .await?
}

/// Builds (unless given a component) and runs the plugin on every message in order, on one
/// instance as a subscription would (a new one after a failed call); the report has every
/// call. Errors: the build, a bad component, a message a publish would refuse.
pub async fn run(t: TestRun) -> anyhow::Result<TestReport> {
    let path = component(&t.dir, t.target_dir.clone()).await?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let plugin = plugin_name(&t.dir, &path);
    let grants = t
        .grants
        .to_grants()
        .map_err(|e| anyhow::anyhow!("--grants: {e}"))?;

    let config = Config::default();
    sweep_stale_scratch();
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "{SCRATCH_PREFIX}{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    )));
    let storage: Arc<dyn Storage> = Arc::new(
        RocksStorage::open(&scratch.0, FlushMode::Async).context("cannot open a scratch store")?,
    );
    let broker = Arc::new(Broker::new(storage.clone(), config.limits.clone()).await?);
    // The messages' topic and every topic the grants allow publishing to exist.
    for topic in std::iter::once(&t.topic).chain(&grants.publish) {
        broker
            .put_topic(topic, TopicSpec::default())
            .await
            .with_context(|| format!("topic {topic:?}"))?;
    }
    let now = crate::base::now_ms();
    let mut messages = Vec::new();
    for (i, (source, envelope)) in t.messages.into_iter().enumerate() {
        let envelope: Envelope = serde_json::from_value(envelope)
            .with_context(|| format!("{source} is not a message as publish takes it"))?;
        let message = envelope
            .check(&config.limits, now)
            .with_context(|| source.clone())?
            .into_trial_message(t.topic.clone(), i as u64, now, 1);
        messages.push((source, message));
    }

    let effects: Arc<Effects> = Arc::default();
    let caps = Arc::new(Capabilities::dry_run(&config, effects.clone())?);
    let logs = caps.logs.clone();
    let runtime = Arc::new(Runtime::new(
        RuntimeConfig {
            // One call at a time, allocated on demand: nothing to reserve for a pool.
            pool_instances: 0,
            threads: 1,
            ..RuntimeConfig::from(&config)
        },
        caps,
    )?);
    let (code, _) = runtime
        .compile(&bytes)
        .with_context(|| format!("{} is not a plugin this host runs", path.display()))?;
    let space = kv_space(KvOwner::Subscription(GROUP));
    let ctx = Arc::new(InstanceContext {
        plugin: plugin.clone(),
        version: 1,
        group: GROUP.into(),
        member: crate::dispatch::state::member_name(false, 0),
        instance_index: 0,
        instance_count: 1,
        config_json: t.config.to_string(),
        grants,
        limits: PluginLimits {
            timeout_ms: t.timeout_ms,
            memory_mb: None,
        },
        kv_space: space.clone(),
        // Effects show as they are made, whatever the outcome (the run shows it beside them).
        stage_effects: false,
        services: Arc::new(Recorder {
            broker: broker.clone(),
            effects: effects.clone(),
        }),
    });
    let rt = runtime.clone();
    let name = plugin.clone();
    let calls = runtime
        .spawn(async move {
            let mut calls = Vec::new();
            let mut instance = None;
            let mut next_line = 0;
            for (source, message) in messages {
                let started = Instant::now();
                let mut report = CallReport {
                    source,
                    message_id: message.id.clone(),
                    outcome: None,
                    check: None,
                    failure: None,
                    duration_ms: 0.0,
                    logs: Vec::new(),
                    effects: Vec::new(),
                };
                let live = match instance.take() {
                    Some(i) => Ok(i),
                    None => rt.instantiate(&code, ctx.clone()).await,
                };
                let result = match live {
                    Ok(mut i) => {
                        let r = if code.has_consumer() {
                            i.handle(&message).await.map(|o| (Some(o), None))
                        } else {
                            i.check_transaction(&message)
                                .await
                                .map(|(c, _)| (None, Some(c)))
                        };
                        if i.is_usable() {
                            instance = Some(i);
                        }
                        r
                    }
                    Err(e) => Err(e),
                };
                report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                match result {
                    Ok((outcome, check)) => {
                        report.outcome = outcome.as_ref().map(OutcomeView::from);
                        report.check = check.map(|c| match c {
                            CheckResult::Commit => "commit",
                            CheckResult::Rollback => "rollback",
                            CheckResult::Unknown => "unknown",
                        });
                    }
                    Err(e) => {
                        report.failure = Some(FailureView::from(&e));
                    }
                }
                let page = logs.page(&name, Some(next_line), crate::logs::RING_LINES);
                next_line = page.next;
                report.logs = page
                    .lines
                    .iter()
                    .map(|l| json!({"level": l.level, "message": l.message}))
                    .collect();
                report.effects = effects.take();
                calls.push(report);
            }
            calls
        })
        .await?;
    let kv = storage
        .list_records(&space, "", usize::MAX)
        .await?
        .into_iter()
        .map(|(key, record)| (key, text_or_base64(&record.value)))
        .collect();
    runtime.shutdown();
    storage.close().await;
    Ok(TestReport {
        plugin,
        component: path.display().to_string(),
        calls,
        kv,
    })
}

/// The plugin's name: its directory's, or the component file's without `.wasm`.
fn plugin_name(dir: &Path, component: &Path) -> String {
    let from = if dir.is_file() { component } else { dir };
    let named = std::path::absolute(from).unwrap_or_else(|_| from.to_path_buf());
    let stem = named
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if crate::base::check_name(&stem).is_ok() {
        stem
    } else {
        "plugin".into()
    }
}

/// The report for people: one block per call (outcome, log lines, effects), then the kv.
pub fn human(r: &TestReport) -> String {
    let mut out = format!("{} ({})\n", r.plugin, r.component);
    for (i, c) in r.calls.iter().enumerate() {
        let answer = match (&c.outcome, c.check, &c.failure) {
            (Some(OutcomeView::Ack), _, _) => "ack".to_string(),
            (Some(OutcomeView::Retry { after_ms }), _, _) => format!("retry after {after_ms} ms"),
            (Some(OutcomeView::Reject { reason }), _, _) => format!("reject: {reason}"),
            (None, Some(check), _) => format!("check: {check}"),
            (_, _, Some(f)) => format!("FAILED ({}): {}", f.kind, f.message),
            _ => "no answer".to_string(),
        };
        out.push_str(&format!(
            "message {} ({}): {answer} in {:.1} ms\n",
            i + 1,
            c.source,
            c.duration_ms
        ));
        for l in &c.logs {
            let level = l["level"].as_str().unwrap_or_default();
            let text = l["message"].as_str().unwrap_or_default();
            out.push_str(&format!("  log {level}: {text}\n"));
        }
        for e in &c.effects {
            let line = match e {
                Effect::Email { to, subject, .. } => format!("email to {to}: {subject:?}"),
                Effect::Sms { to, text } => format!("sms to {to}: {text:?}"),
                Effect::Http { method, url, .. } => format!("http {method} {url} (answered 200)"),
                Effect::Publish {
                    topic, id, body, ..
                } => {
                    format!("publish to {topic}: {body} (id {id})")
                }
            };
            out.push_str(&format!("  {line}\n"));
        }
    }
    if !r.kv.is_empty() {
        out.push_str("kv:\n");
        for (k, v) in &r.kv {
            out.push_str(&format!("  {k} = {v}\n"));
        }
    }
    out
}

/// The messages of a run: `--message` files, then `--body` values, or one `{}` body.
pub fn messages(files: &[PathBuf], bodies: &[String]) -> anyhow::Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read(f).with_context(|| format!("--message: cannot read {}", f.display()))?;
        let v: Value = serde_json::from_slice(&text)
            .with_context(|| format!("--message {} is not JSON", f.display()))?;
        if !v.is_object() {
            bail!(
                "--message {} must hold one message as publish takes it: {{\"body\": ...}}",
                f.display()
            );
        }
        out.push((f.display().to_string(), v));
    }
    for (i, b) in bodies.iter().enumerate() {
        out.push((
            format!("--body {}", i + 1),
            Value::Object(super::verbs::body_field(b)?),
        ));
    }
    if out.is_empty() {
        out.push(("empty body".into(), json!({"body": {}})));
    }
    Ok(out)
}
