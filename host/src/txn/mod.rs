//! Transactional (half) messages: stored invisible, made visible by commit (atomically with the
//! decision), dropped by rollback, and checked back through the topic's checker plugin while the
//! producer says neither; after `max_checks` unknowns a transaction is parked as unresolved for
//! an operator. A decided transaction is never checked again.

mod check;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::base::now_ms;
use crate::bindings::{CheckResult, Message};
use crate::broker::{Broker, BrokerError, Envelope};
use crate::config::TransactionsConfig;
use crate::plugins::{PluginError, Plugins};
use crate::runtime::{InstanceContext, InvokeError, PoolKey};
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
    pub fn view(&self) -> TxnView {
        TxnView {
            txn_id: self.txn_id.clone(),
            topic: self.topic.clone(),
            message_id: self.message_id,
            state: self.state,
            checks: self.checks,
            max_checks: self.max_checks,
            created_at: self.created_at,
            next_check_at: (self.next_check_at > 0).then_some(self.next_check_at),
            history: self.history.clone(),
        }
    }
}

/// A transaction as the API shows it: its state and history, not its half message's body.
/// Times in ms since the epoch; `next_check_at` is null once decided or unresolved.
#[derive(Debug, Clone, Serialize)]
pub struct TxnView {
    pub txn_id: String,
    pub topic: String,
    pub message_id: MessageId,
    pub state: TxnState,
    pub checks: u32,
    pub max_checks: u32,
    pub created_at: u64,
    pub next_check_at: Option<u64>,
    pub history: Vec<Event>,
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
            index: (!shared).then(|| std::sync::Mutex::new(index)),
        }))
    }

    /// Notes a state this node stored.
    fn indexed(&self, t: &TxnRecord) {
        if let Some(index) = &self.index {
            let mut index = index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            index.set(&t.txn_id, t.state);
        }
    }

    /// Ids in `state`, oldest first, at most `limit`; `None` without an index.
    fn ids_in(&self, state: TxnState, limit: usize) -> Option<Vec<String>> {
        let index = self.index.as_ref()?;
        let index = index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
            let index = index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        if check_after_override.is_some_and(|ms| ms > crate::base::MAX_CHECK_MS) {
            return Err(
                BrokerError::Envelope(crate::broker::EnvelopeError::TooLong {
                    field: "check_after_ms",
                    max: crate::base::MAX_CHECK_MS,
                })
                .into(),
            );
        }
        // A topic deletion waits until this half message is recorded, then rolls it back.
        let _topic_stays = self.broker.topic_stays().await;
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

    /// Rolls back every undecided (pending or unresolved) transaction of `topic`, as deleting
    /// the topic does: their half messages have nowhere to go. A commit racing this either
    /// lands first (and the topic's messages are deleted after) or fails as decided. Returns
    /// how many were rolled back.
    pub async fn rollback_topic(&self, topic: &str) -> Result<usize, TxnError> {
        let mut n = 0;
        for state in [TxnState::Pending, TxnState::Unresolved] {
            for t in self.list(Some(state), usize::MAX).await? {
                if t.topic != topic {
                    continue;
                }
                match self.rollback(&t.txn_id, "topic deletion").await {
                    Ok(_) => n += 1,
                    Err(TxnError::Decided { .. } | TxnError::Unknown(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(n)
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
}
