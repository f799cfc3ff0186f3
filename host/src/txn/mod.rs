//! Transactional (half) messages: stored invisible, made visible by commit (atomically with the
//! decision), dropped by rollback, and checked back through the topic's checker plugin while the
//! producer says neither; after `max_checks` unknowns a transaction is parked as unresolved for
//! an operator. A decided transaction is never checked again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, Envelope, now_ms};
use crate::config::TransactionsConfig;
use crate::plugins::{PluginError, Plugins};
use crate::runtime::bindings::{CheckResult, Message};
use crate::runtime::{InstanceContext, PluginInstance};
use crate::storage::{Expect, MessageId, NewMessage, RecordWrite, StorageError};

const TXN_SPACE: &str = "txn";
/// Checks run at once, across all topics.
const PARALLEL_CHECKS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error("transaction {0:?} does not exist")]
    Unknown(String),
    #[error("transaction {id} is already {state}; it cannot be {wanted}")]
    Decided {
        id: String,
        state: TxnState,
        wanted: &'static str,
    },
    #[error("transaction {0} is not unresolved; only unresolved transactions can be rechecked")]
    NotUnresolved(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    Pending,
    Committed,
    RolledBack,
    Unresolved,
}

impl std::fmt::Display for TxnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TxnState::Pending => "pending",
            TxnState::Committed => "committed",
            TxnState::RolledBack => "rolled back",
            TxnState::Unresolved => "unresolved",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: u64,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A transaction as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TxnRecord {
    pub txn_id: String,
    pub topic: String,
    pub message_id: MessageId,
    pub state: TxnState,
    pub checks: u32,
    pub created_at: u64,
    /// When the checker is asked next (0 once decided or unresolved).
    pub next_check_at: u64,
    pub check_interval_ms: u64,
    pub max_checks: u32,
    /// The half message; dropped once decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<NewMessage>,
    pub history: Vec<Event>,
}

impl TxnRecord {
    fn log(&mut self, event: &str, detail: Option<String>) {
        self.history.push(Event {
            at: now_ms(),
            event: event.into(),
            detail,
        });
    }

    /// The API's view (no body).
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "txn_id": self.txn_id, "topic": self.topic, "message_id": self.message_id,
            "state": self.state, "checks": self.checks, "max_checks": self.max_checks,
            "created_at": self.created_at,
            "next_check_at": (self.next_check_at > 0).then_some(self.next_check_at),
            "history": self.history,
        })
    }
}

fn encode(r: &TxnRecord) -> Result<Vec<u8>, StorageError> {
    rmp_serde::to_vec_named(r).map_err(|e| StorageError::Encode(e.to_string()))
}

fn decode(id: &str, bytes: &[u8]) -> Result<TxnRecord, StorageError> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| StorageError::Corrupt(format!("transaction {id}: {e}")))
}

pub struct Transactions {
    broker: Arc<Broker>,
    plugins: Arc<Plugins>,
    defaults: TransactionsConfig,
    /// (next check time, txn id) of pending transactions.
    schedule: std::sync::Mutex<BTreeSet<(u64, String)>>,
    wake: Notify,
    /// Idle checker instances by plugin name and version.
    idle: tokio::sync::Mutex<HashMap<(String, u32), Vec<PluginInstance>>>,
    /// Transaction ids by state, kept as this node writes them, so counts (`/metrics`, the
    /// dashboard) and listings by state cost what they return, not every transaction ever
    /// stored. `None` when nodes share the storage: other nodes decide transactions too, so
    /// answers come from storage.
    index: Option<std::sync::Mutex<StateIndex>>,
}

/// Transaction ids by state (ids are UUIDv7: in each set, oldest first).
#[derive(Debug, Default)]
struct StateIndex {
    state_of: HashMap<String, TxnState>,
    by_state: HashMap<TxnState, BTreeSet<String>>,
}

impl StateIndex {
    fn set(&mut self, id: &str, state: TxnState) {
        if let Some(old) = self.state_of.insert(id.to_string(), state)
            && let Some(ids) = self.by_state.get_mut(&old)
        {
            ids.remove(id);
        }
        self.by_state
            .entry(state)
            .or_default()
            .insert(id.to_string());
    }
}

/// Every transaction in storage: the pending ones with when they are due for a check, and
/// each one's state.
async fn scan(broker: &Broker) -> Result<(Vec<(u64, String)>, StateIndex), TxnError> {
    let mut pending = Vec::new();
    let mut index = StateIndex::default();
    for (id, r) in broker
        .storage()
        .list_records(TXN_SPACE, "", usize::MAX)
        .await?
    {
        let t = decode(&id, &r.value)?;
        if t.state == TxnState::Pending {
            pending.push((t.next_check_at, id.clone()));
        }
        index.set(&id, t.state);
    }
    Ok((pending, index))
}

impl Transactions {
    /// Loads pending transactions so their checks resume where they were. `shared`: other
    /// nodes write transactions to the same storage.
    pub async fn new(
        broker: Arc<Broker>,
        plugins: Arc<Plugins>,
        defaults: TransactionsConfig,
        shared: bool,
    ) -> Result<Arc<Self>, TxnError> {
        let (pending, index) = scan(&broker).await?;
        Ok(Arc::new(Self {
            broker,
            plugins,
            defaults,
            schedule: std::sync::Mutex::new(pending.into_iter().collect()),
            wake: Notify::new(),
            idle: Default::default(),
            index: (!shared).then(|| std::sync::Mutex::new(index)),
        }))
    }

    /// Notes a state this node stored.
    fn indexed(&self, t: &TxnRecord) {
        if let Some(index) = &self.index {
            let mut index = match index.lock() {
                Ok(i) => i,
                Err(poisoned) => poisoned.into_inner(),
            };
            index.set(&t.txn_id, t.state);
        }
    }

    /// Ids in `state`, oldest first, at most `limit`; `None` without an index.
    fn ids_in(&self, state: TxnState, limit: usize) -> Option<Vec<String>> {
        let index = self.index.as_ref()?;
        let index = match index.lock() {
            Ok(i) => i,
            Err(poisoned) => poisoned.into_inner(),
        };
        Some(
            index
                .by_state
                .get(&state)
                .map(|ids| ids.iter().take(limit).cloned().collect())
                .unwrap_or_default(),
        )
    }

    fn schedule(&self, at: u64, id: &str) {
        if let Ok(mut s) = self.schedule.lock() {
            s.insert((at, id.to_string()));
        }
        self.wake.notify_one();
    }

    async fn load(&self, id: &str) -> Result<(TxnRecord, u64), TxnError> {
        match self.broker.storage().get_record(TXN_SPACE, id).await? {
            Some(r) => Ok((decode(id, &r.value)?, r.revision)),
            None => Err(TxnError::Unknown(id.to_string())),
        }
    }

    pub async fn get(&self, id: &str) -> Result<TxnRecord, TxnError> {
        Ok(self.load(id).await?.0)
    }

    pub async fn list(
        &self,
        state: Option<TxnState>,
        limit: usize,
    ) -> Result<Vec<TxnRecord>, TxnError> {
        if let Some(ids) = state.and_then(|s| self.ids_in(s, limit)) {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                match self.load(&id).await {
                    Ok((t, _)) => out.push(t),
                    Err(TxnError::Unknown(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
        if state.is_none() {
            let mut out = Vec::new();
            for (id, r) in self
                .broker
                .storage()
                .list_records(TXN_SPACE, "", limit)
                .await?
            {
                out.push(decode(&id, &r.value)?);
            }
            return Ok(out);
        }
        let mut out = Vec::new();
        for (id, r) in self
            .broker
            .storage()
            .list_records(TXN_SPACE, "", usize::MAX)
            .await?
        {
            let t = decode(&id, &r.value)?;
            if state.is_none_or(|s| s == t.state) {
                out.push(t);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// How many transactions are in each state: from the index alone on a node alone on its
    /// storage; a scan on shared storage.
    pub async fn counts(&self) -> Result<Vec<(String, u64)>, TxnError> {
        let name = |s: TxnState| {
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        };
        if let Some(index) = &self.index {
            let index = match index.lock() {
                Ok(i) => i,
                Err(poisoned) => poisoned.into_inner(),
            };
            let mut counts: Vec<(String, u64)> = index
                .by_state
                .iter()
                .filter(|(_, ids)| !ids.is_empty())
                .map(|(s, ids)| (name(*s), ids.len() as u64))
                .collect();
            counts.sort();
            return Ok(counts);
        }
        let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
        for (id, r) in self
            .broker
            .storage()
            .list_records(TXN_SPACE, "", usize::MAX)
            .await?
        {
            let state = serde_json::to_value(decode(&id, &r.value)?.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *counts.entry(state).or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }

    /// Stores a half message durably; it stays invisible until committed.
    pub async fn begin(&self, topic: &str, mut envelope: Envelope) -> Result<TxnRecord, TxnError> {
        let check_after_override = envelope.check_after_ms.take();
        if check_after_override.is_some_and(|ms| ms > crate::broker::MAX_CHECK_MS) {
            return Err(
                BrokerError::Envelope(crate::broker::EnvelopeError::TooLong {
                    field: "check_after_ms",
                    max: crate::broker::MAX_CHECK_MS,
                })
                .into(),
            );
        }
        let message = self.broker.prepare_message(topic, envelope).await?;
        let timings = self.broker.topic_loaded(topic).await?.transactions;
        let d = &self.defaults;
        let check_after = check_after_override
            .or(timings.check_after_ms)
            .unwrap_or(d.check_after_ms);
        let now = now_ms();
        let mut t = TxnRecord {
            txn_id: uuid::Uuid::now_v7().to_string(),
            topic: topic.to_string(),
            message_id: message.id,
            state: TxnState::Pending,
            checks: 0,
            created_at: now,
            next_check_at: now.saturating_add(check_after),
            check_interval_ms: timings
                .check_interval_ms
                .unwrap_or(d.check_interval_ms)
                .max(1),
            max_checks: timings.max_checks.unwrap_or(d.max_checks),
            message: Some(message),
            history: Vec::new(),
        };
        t.log(
            "half message stored",
            Some(format!("first check in {check_after} ms")),
        );
        self.broker
            .storage()
            .put_record(TXN_SPACE, &t.txn_id, Some(encode(&t)?), Expect::Absent)
            .await?;
        self.indexed(&t);
        self.schedule(t.next_check_at, &t.txn_id);
        Ok(t)
    }

    /// Commits: the message is appended to its topic in the same atomic write that records the
    /// decision. Idempotent; a rolled-back transaction cannot be committed.
    pub async fn commit(&self, id: &str, by: &str) -> Result<TxnRecord, TxnError> {
        loop {
            let (mut t, rev) = self.load(id).await?;
            match t.state {
                TxnState::Committed => return Ok(t),
                TxnState::RolledBack => {
                    return Err(TxnError::Decided {
                        id: id.into(),
                        state: t.state,
                        wanted: "committed",
                    });
                }
                TxnState::Pending | TxnState::Unresolved => {}
            }
            let Some(message) = t.message.take() else {
                return Err(StorageError::Corrupt(format!(
                    "transaction {id} lost its half message"
                ))
                .into());
            };
            t.state = TxnState::Committed;
            t.next_check_at = 0;
            t.log("committed", Some(format!("by {by}")));
            let guard = RecordWrite {
                space: TXN_SPACE.into(),
                key: id.into(),
                value: Some(encode(&t)?),
                expect: Expect::Revision(rev),
            };
            match self
                .broker
                .storage()
                .append_guarded(&t.topic, vec![message], guard)
                .await
            {
                Ok(_) => {
                    self.indexed(&t);
                    return Ok(t);
                }
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Rolls back: the half message is dropped. Idempotent; a committed one cannot be.
    pub async fn rollback(&self, id: &str, by: &str) -> Result<TxnRecord, TxnError> {
        self.update(id, |t| match t.state {
            TxnState::RolledBack => Ok(false),
            TxnState::Committed => Err(TxnError::Decided {
                id: id.into(),
                state: t.state,
                wanted: "rolled back",
            }),
            TxnState::Pending | TxnState::Unresolved => {
                t.state = TxnState::RolledBack;
                t.next_check_at = 0;
                t.message = None;
                t.log("rolled back", Some(format!("by {by}")));
                Ok(true)
            }
        })
        .await
    }

    /// Puts an unresolved transaction back to pending with a fresh round of checks, now.
    pub async fn recheck(&self, id: &str) -> Result<TxnRecord, TxnError> {
        let t = self
            .update(id, |t| {
                if t.state != TxnState::Unresolved {
                    return Err(TxnError::NotUnresolved(id.into()));
                }
                t.state = TxnState::Pending;
                t.checks = 0;
                t.next_check_at = now_ms();
                t.log("recheck requested", None);
                Ok(true)
            })
            .await?;
        self.schedule(t.next_check_at, id);
        Ok(t)
    }

    /// Applies `f` under compare-and-set; `f` returns whether it changed anything.
    async fn update(
        &self,
        id: &str,
        f: impl Fn(&mut TxnRecord) -> Result<bool, TxnError>,
    ) -> Result<TxnRecord, TxnError> {
        loop {
            let (mut t, rev) = self.load(id).await?;
            if !f(&mut t)? {
                return Ok(t);
            }
            match self
                .broker
                .storage()
                .put_record(TXN_SPACE, id, Some(encode(&t)?), Expect::Revision(rev))
                .await
            {
                Ok(_) => {
                    self.indexed(&t);
                    return Ok(t);
                }
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Schedules every pending transaction in storage, including those begun on other nodes
    /// (a node that takes over check-backs calls it, then now and then).
    pub async fn reload(&self) -> Result<(), TxnError> {
        let (found, _) = scan(&self.broker).await?;
        if let Ok(mut s) = self.schedule.lock() {
            s.extend(found);
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Runs due checks until `cancel`; checks in progress finish first.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut running = tokio::task::JoinSet::new();
        loop {
            let now = now_ms();
            let next = self
                .schedule
                .lock()
                .ok()
                .and_then(|s| s.first().map(|(at, _)| *at));
            let due = next.is_some_and(|at| at <= now) && running.len() < PARALLEL_CHECKS;
            if due {
                let popped = self.schedule.lock().ok().and_then(|mut s| s.pop_first());
                if let Some((_, id)) = popped {
                    let me = self.clone();
                    running.spawn(async move {
                        if let Err(e) = me.check(&id).await {
                            tracing::error!(txn = %id, error = %e, "transaction check failed");
                            me.schedule(now_ms().saturating_add(1000), &id);
                        }
                    });
                }
                continue;
            }
            let sleep = match next {
                Some(at) if at > now => std::time::Duration::from_millis(at - now),
                _ => std::time::Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep), if running.len() < PARALLEL_CHECKS => {}
                Some(_) = running.join_next() => {}
                _ = self.wake.notified() => {}
                _ = cancel.cancelled() => break,
            }
        }
        while running.join_next().await.is_some() {}
    }

    /// Asks the checker about one transaction, if it is still pending and due.
    async fn check(&self, id: &str) -> Result<(), TxnError> {
        let (t, _) = self.load(id).await?;
        // Decided (or parked) transactions are never checked; a stale schedule entry is dropped.
        if t.state != TxnState::Pending {
            return Ok(());
        }
        if t.next_check_at > now_ms() {
            self.schedule(t.next_check_at, id);
            return Ok(());
        }
        let answer = self.ask_checker(&t).await;
        match answer {
            Ok(CheckResult::Commit) => match self.commit(id, "checker").await {
                Ok(_) | Err(TxnError::Decided { .. }) => Ok(()),
                Err(e) => Err(e),
            },
            Ok(CheckResult::Rollback) => match self.rollback(id, "checker").await {
                Ok(_) | Err(TxnError::Decided { .. }) => Ok(()),
                Err(e) => Err(e),
            },
            Ok(CheckResult::Unknown) | Err(_) => {
                let detail = match &answer {
                    Err(e) => e.clone(),
                    _ => "the checker does not know yet".to_string(),
                };
                let t = self
                    .update(id, |t| {
                        if t.state != TxnState::Pending {
                            return Ok(false);
                        }
                        t.checks += 1;
                        t.log("checked: unknown", Some(detail.clone()));
                        if t.checks >= t.max_checks {
                            t.state = TxnState::Unresolved;
                            t.next_check_at = 0;
                            t.log(
                                "unresolved",
                                Some(format!(
                                    "{} checks gave no answer; an operator must decide",
                                    t.checks
                                )),
                            );
                        } else {
                            t.next_check_at = now_ms().saturating_add(t.check_interval_ms);
                        }
                        Ok(true)
                    })
                    .await?;
                if t.state == TxnState::Pending {
                    self.schedule(t.next_check_at, id);
                }
                Ok(())
            }
        }
    }

    /// Calls the topic checker's `check-transaction`; any failure reads as "unknown".
    async fn ask_checker(&self, t: &TxnRecord) -> Result<CheckResult, String> {
        let topic = self
            .broker
            .topic_loaded(&t.topic)
            .await
            .map_err(|e| e.to_string())?;
        let Some(plugin) = topic.transaction_checker else {
            return Err(format!("topic {} has no transaction_checker", t.topic));
        };
        let (version, code) = self
            .plugins
            .code(&plugin, None)
            .await
            .map_err(|e: PluginError| e.to_string())?;
        if !code.has_checker() {
            return Err(format!("plugin {plugin} does not export check-transaction"));
        }
        // Instances are reused per plugin version and topic (whose config and grants they carry).
        let key = (format!("{plugin}|{}", t.topic), version.version);
        let idle = self.idle.lock().await.get_mut(&key).and_then(Vec::pop);
        let mut instance = match idle {
            Some(i) => i,
            None => {
                let ctx = InstanceContext {
                    plugin: plugin.clone(),
                    version: version.version,
                    group: format!("txn-checker:{}", t.topic),
                    member: "checker".into(),
                    instance_index: 0,
                    instance_count: 1,
                    config_json: self
                        .broker
                        .secrets()
                        .resolve(
                            &topic
                                .transaction_checker_config
                                .clone()
                                .unwrap_or_else(|| serde_json::json!({})),
                        )
                        .map_err(|e| format!("transaction_checker_config: {e}"))?
                        .to_string(),
                    grants: topic.transaction_checker_grants.to_grants()?,
                    limits: version.limits,
                    broker: self.broker.clone(),
                };
                self.plugins
                    .runtime()
                    .instantiate(&code, Arc::new(ctx))
                    .await
                    .map_err(|e| e.to_string())?
            }
        };
        let Some(m) = &t.message else {
            return Err("the half message is gone".into());
        };
        let message = Message::of(&t.topic, 0, m, t.checks + 1);
        let result = instance.check_transaction(&message).await;
        if instance.is_usable() {
            self.idle
                .lock()
                .await
                .entry(key)
                .or_default()
                .push(instance);
        }
        result.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::config::{Config, FlushMode};
    use crate::storage::{Appended, Record, RocksStorage, Storage, StoredMessage};

    /// RocksDB, counting the transaction records each read brings back.
    struct Counting {
        inner: RocksStorage,
        txn_records_read: AtomicUsize,
    }

    impl Counting {
        fn count(&self, space: &str, n: usize) {
            if space == TXN_SPACE {
                self.txn_records_read.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    #[async_trait]
    impl Storage for Counting {
        async fn append(
            &self,
            topic: &str,
            m: Vec<NewMessage>,
        ) -> Result<Vec<Appended>, StorageError> {
            self.inner.append(topic, m).await
        }
        async fn append_guarded(
            &self,
            topic: &str,
            m: Vec<NewMessage>,
            guard: RecordWrite,
        ) -> Result<(Vec<Appended>, u64), StorageError> {
            self.inner.append_guarded(topic, m, guard).await
        }
        async fn read(
            &self,
            topic: &str,
            queue: u32,
            from: u64,
            limit: usize,
        ) -> Result<Vec<StoredMessage>, StorageError> {
            self.inner.read(topic, queue, from, limit).await
        }
        async fn message_by_id(
            &self,
            id: MessageId,
        ) -> Result<Option<StoredMessage>, StorageError> {
            self.inner.message_by_id(id).await
        }
        async fn messages_by_key(
            &self,
            topic: &str,
            key: &str,
            limit: usize,
        ) -> Result<Vec<StoredMessage>, StorageError> {
            self.inner.messages_by_key(topic, key, limit).await
        }
        fn watch(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
            self.inner.watch(topic)
        }
        async fn high_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
            self.inner.high_water(topic, queue).await
        }
        async fn get_record(&self, space: &str, key: &str) -> Result<Option<Record>, StorageError> {
            let r = self.inner.get_record(space, key).await?;
            self.count(space, usize::from(r.is_some()));
            Ok(r)
        }
        async fn list_records(
            &self,
            space: &str,
            prefix: &str,
            limit: usize,
        ) -> Result<Vec<(String, Record)>, StorageError> {
            let r = self.inner.list_records(space, prefix, limit).await?;
            self.count(space, r.len());
            Ok(r)
        }
        async fn put_record(
            &self,
            space: &str,
            key: &str,
            value: Option<Vec<u8>>,
            expect: Expect,
        ) -> Result<u64, StorageError> {
            self.inner.put_record(space, key, value, expect).await
        }
        async fn put_blob(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), StorageError> {
            self.inner.put_blob(key, value).await
        }
        async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
            self.inner.get_blob(key).await
        }
        async fn close(&self) {
            self.inner.close().await;
        }
    }

    async fn transactions(storage: Arc<Counting>, shared: bool) -> Arc<Transactions> {
        let config = Config::default();
        let broker = Arc::new(
            Broker::new(storage.clone(), config.limits.clone())
                .await
                .unwrap(),
        );
        let capabilities = Arc::new(crate::capabilities::Capabilities::new(&config).unwrap());
        let runtime = Arc::new(
            crate::runtime::Runtime::new(
                crate::runtime::RuntimeConfig {
                    timeout_ms: 1000,
                    memory_bytes: 64 << 20,
                    pool_instances: 0,
                },
                capabilities,
            )
            .unwrap(),
        );
        let dir = std::env::temp_dir();
        let plugins = Arc::new(Plugins::new(runtime, storage, 1 << 20, dir));
        Transactions::new(broker, plugins, config.transactions.clone(), shared)
            .await
            .unwrap()
    }

    /// Stores `decided` committed transactions and 2 pending ones (checks due in 30 days).
    async fn history(t: &Transactions, decided: usize) {
        t.broker
            .put_topic("orders", Default::default())
            .await
            .unwrap();
        let envelope = |check_after_ms: u64| -> Envelope {
            serde_json::from_value(serde_json::json!({
                "body": {"order": 1},
                "check_after_ms": check_after_ms,
            }))
            .unwrap()
        };
        for _ in 0..decided {
            let id = t.begin("orders", envelope(1000)).await.unwrap().txn_id;
            t.commit(&id, "producer").await.unwrap();
        }
        for _ in 0..2 {
            t.begin("orders", envelope(30 * 24 * 3600 * 1000))
                .await
                .unwrap();
        }
    }

    /// Issue 20.8: counts (`/metrics`, the dashboard) and a listing by state read what they
    /// return, however many transactions were ever stored; on shared storage (no index) the
    /// same questions read every record, which is what the counter shows.
    #[tokio::test]
    async fn counts_and_listing_by_state_cost_what_they_return() {
        let mut read = Vec::new();
        for decided in [5, 200] {
            let dir = tempfile::tempdir().unwrap();
            let storage = Arc::new(Counting {
                inner: RocksStorage::open(dir.path(), FlushMode::Async).unwrap(),
                txn_records_read: AtomicUsize::new(0),
            });
            let t = transactions(storage.clone(), false).await;
            history(&t, decided).await;
            let before = storage.txn_records_read.load(Ordering::Relaxed);
            let counts = t.counts().await.unwrap();
            assert_eq!(
                counts,
                vec![("committed".into(), decided as u64), ("pending".into(), 2)]
            );
            let pending = t.list(Some(TxnState::Pending), 100).await.unwrap();
            assert_eq!(pending.len(), 2);
            read.push(storage.txn_records_read.load(Ordering::Relaxed) - before);

            let shared = transactions(storage.clone(), true).await;
            let before = storage.txn_records_read.load(Ordering::Relaxed);
            assert_eq!(shared.counts().await.unwrap(), counts);
            assert_eq!(
                storage.txn_records_read.load(Ordering::Relaxed) - before,
                decided + 2,
                "the counter sees a scan"
            );
        }
        assert_eq!(read, vec![2, 2], "only the two pending records were read");
    }
}
