//! Transactional (half) messages: stored invisible, made visible by commit (atomically with the
//! decision), dropped by rollback, and checked back through the topic's checker plugin while the
//! producer says neither; after `max_checks` unknowns a transaction is parked as unresolved for
//! an operator. A decided transaction is never checked again.

mod check;
mod decided;
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
use crate::runtime::{InstanceContext, InvokeError, PoolKey, Staged};
use crate::storage::{Expect, MessageId, NewMessage, RecordWrite, Storage, StorageError};

/// Undecided transactions (pending, unresolved), and decided ones until they move to the space
/// of their outcome: start-up reads this space only, so it costs what is undecided.
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

impl TxnState {
    /// Every state, in the order of the enum.
    pub const ALL: [TxnState; 4] = [
        TxnState::Pending,
        TxnState::Committed,
        TxnState::RolledBack,
        TxnState::Unresolved,
    ];

    /// The state as the API and `wasmq_transactions{state}` spell it (`rolled_back`).
    pub fn wire_name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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

/// Decides `t` (an undecided transaction stored at revision `rev`) as committed by `by`: takes
/// its half message out and returns it with the record write that stores the decision, which
/// a commit writes in one atomic step with the message's append (the commit point on JetStream).
fn committing(
    t: &mut TxnRecord,
    rev: u64,
    by: &str,
) -> Result<(NewMessage, RecordWrite), TxnError> {
    let Some(message) = t.message.take() else {
        return Err(StorageError::Corrupt(format!(
            "transaction {} lost its half message",
            t.txn_id
        ))
        .into());
    };
    t.state = TxnState::Committed;
    t.next_check_at = 0;
    t.log("committed", Some(format!("by {by}")));
    let guard = RecordWrite {
        space: TXN_SPACE.into(),
        key: t.txn_id.clone(),
        value: Some(encode(t)?),
        expect: Expect::Revision(rev),
    };
    Ok((message, guard))
}

/// What a commit by `by` of the undecided transaction `id` writes, read from `storage` now:
/// its topic, its half message and the decision's record write (see `committing`). For crash
/// tests that cut a commit short between these writes; `None` when `id` is not undecided.
#[doc(hidden)]
pub async fn commit_writes(
    storage: &dyn Storage,
    id: &str,
    by: &str,
) -> Result<Option<(String, NewMessage, RecordWrite)>, TxnError> {
    let Some(r) = storage.get_record(TXN_SPACE, id).await? else {
        return Ok(None);
    };
    let mut t = decode(id, &r.value)?;
    if !matches!(t.state, TxnState::Pending | TxnState::Unresolved) {
        return Ok(None);
    }
    let (message, guard) = committing(&mut t, r.revision, by)?;
    Ok(Some((t.topic, message, guard)))
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
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
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
    /// How long and how many decided transactions are kept.
    retention: DecidedRetention,
    /// (next check time, txn id) of pending transactions.
    schedule: std::sync::Mutex<BTreeSet<(u64, String)>>,
    wake: Notify,
    /// What [`TXN_SPACE`] holds by state, and how many decided transactions moved on, kept as
    /// this node writes them, so counts (`/metrics`, the dashboard) and listings by state cost
    /// what they return, not every transaction ever stored. `None` when nodes share the
    /// storage: other nodes decide transactions too, so answers come from storage (the
    /// undecided space and the tally record, still not the history).
    index: Option<std::sync::Mutex<StateIndex>>,
    /// Decided transactions waiting to move out of [`TXN_SPACE`].
    to_move: std::sync::Mutex<BTreeSet<String>>,
    moved: Notify,
}

/// How long and how many decided transactions are kept (`[retention] transactions_*`).
#[derive(Debug, Clone, Copy)]
pub struct DecidedRetention {
    /// Deleted this long after their decision (ms).
    pub max_age_ms: u64,
    /// At most this many kept per outcome, oldest deleted first.
    pub max_count: u64,
}

impl From<&crate::config::RetentionConfig> for DecidedRetention {
    fn from(c: &crate::config::RetentionConfig) -> Self {
        Self {
            max_age_ms: c.transactions_max_age_ms,
            max_count: c.transactions_max_count,
        }
    }
}

/// Ids in [`TXN_SPACE`] by state (ids are UUIDv7: in each set, oldest first), and the tally of
/// those that moved on.
#[derive(Debug, Default)]
struct StateIndex {
    state_of: HashMap<String, TxnState>,
    by_state: HashMap<TxnState, BTreeSet<String>>,
    decided: decided::Tally,
}

impl StateIndex {
    fn set(&mut self, id: &str, state: TxnState) {
        self.remove(id);
        self.state_of.insert(id.to_string(), state);
        self.by_state
            .entry(state)
            .or_default()
            .insert(id.to_string());
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.state_of.remove(id)
            && let Some(ids) = self.by_state.get_mut(&old)
        {
            ids.remove(id);
        }
    }
}

/// What [`TXN_SPACE`] holds: the pending transactions with when they are due for a check, the
/// decided ones (to move on), and each one's state.
async fn scan(broker: &Broker) -> Result<(Vec<(u64, String)>, Vec<String>, StateIndex), TxnError> {
    let mut pending = Vec::new();
    let mut decided = Vec::new();
    let mut index = StateIndex::default();
    for (id, r) in broker
        .storage()
        .list_records(TXN_SPACE, "", usize::MAX)
        .await?
    {
        let t = decode(&id, &r.value)?;
        match t.state {
            TxnState::Pending => pending.push((t.next_check_at, id.clone())),
            TxnState::Committed | TxnState::RolledBack => decided.push(id.clone()),
            TxnState::Unresolved => {}
        }
        index.set(&id, t.state);
    }
    Ok((pending, decided, index))
}

impl Transactions {
    /// Loads the undecided transactions (not the decided history) so their checks resume where
    /// they were. `shared`: other nodes write transactions to the same storage.
    pub async fn new(
        broker: Arc<Broker>,
        plugins: Arc<Plugins>,
        defaults: TransactionsConfig,
        retention: DecidedRetention,
        shared: bool,
    ) -> Result<Arc<Self>, TxnError> {
        let (pending, decided, mut index) = scan(&broker).await?;
        let tally = decided::Tally::load(broker.storage().as_ref()).await?.0;
        let counted = tally.moved.clone();
        index.decided = tally;
        let me = Arc::new(Self {
            broker,
            plugins,
            defaults,
            retention,
            schedule: std::sync::Mutex::new(pending.into_iter().collect()),
            wake: Notify::new(),
            index: (!shared).then(|| std::sync::Mutex::new(index)),
            to_move: std::sync::Mutex::new(decided.into_iter().collect()),
            moved: Notify::new(),
        });
        // A move the last mover stopped after counting is finished now, so no count shows a
        // transaction twice (on shared storage the check-back holder does it).
        if !shared && !counted.is_empty() {
            me.move_batch(counted, decided::StopAfter::Nothing).await?;
        }
        Ok(me)
    }

    fn index(&self) -> Option<std::sync::MutexGuard<'_, StateIndex>> {
        self.index
            .as_ref()
            .map(|i| i.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Notes a state this node stored; a decision is queued to move on.
    fn indexed(&self, t: &TxnRecord) {
        if let Some(mut index) = self.index() {
            index.set(&t.txn_id, t.state);
            if decided::space_of(t.state).is_some() {
                if let Ok(mut q) = self.to_move.lock() {
                    q.insert(t.txn_id.clone());
                }
                self.moved.notify_one();
            }
        }
    }

    /// Ids in `state` still in [`TXN_SPACE`], oldest first, at most `limit`; `None` without an
    /// index.
    fn ids_in(&self, state: TxnState, limit: usize) -> Option<Vec<String>> {
        let index = self.index()?;
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

    /// The transaction and, while it is in [`TXN_SPACE`], its revision there. A decided one that
    /// moved on has none: it is never written again. Its record is written to its outcome's
    /// space before it leaves [`TXN_SPACE`], so looking there second cannot miss it.
    async fn load(&self, id: &str) -> Result<(TxnRecord, Option<u64>), TxnError> {
        let storage = self.broker.storage();
        if let Some(r) = storage.get_record(TXN_SPACE, id).await? {
            return Ok((decode(id, &r.value)?, Some(r.revision)));
        }
        for space in decided::SPACES {
            if let Some(r) = storage.get_record(space, id).await? {
                return Ok((decode(id, &r.value)?, None));
            }
        }
        Err(TxnError::Unknown(id.to_string()))
    }

    pub async fn get(&self, id: &str) -> Result<TxnRecord, TxnError> {
        Ok(self.load(id).await?.0)
    }

    /// Up to `limit` transactions in `state` (all states: `None`), oldest first. Reads what it
    /// returns: undecided ones through the index (on shared storage, the undecided space),
    /// decided ones from the front of their outcome's space.
    pub async fn list(
        &self,
        state: Option<TxnState>,
        limit: usize,
    ) -> Result<Vec<TxnRecord>, TxnError> {
        let wanted = |s: TxnState| state.is_none_or(|w| w == s);
        let storage = self.broker.storage();
        let mut out: Vec<TxnRecord> = Vec::new();
        // What TXN_SPACE holds in those states.
        let states = [
            TxnState::Pending,
            TxnState::Unresolved,
            TxnState::Committed,
            TxnState::RolledBack,
        ];
        if self.index.is_some() {
            for s in states.into_iter().filter(|s| wanted(*s)) {
                for id in self.ids_in(s, limit).unwrap_or_default() {
                    match self.load(&id).await {
                        Ok((t, _)) => out.push(t),
                        Err(TxnError::Unknown(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        } else {
            for (id, r) in storage.list_records(TXN_SPACE, "", usize::MAX).await? {
                let t = decode(&id, &r.value)?;
                if wanted(t.state) {
                    out.push(t);
                }
            }
        }
        for (s, space) in decided::OUTCOMES {
            if !wanted(s) {
                continue;
            }
            for (id, r) in storage.list_records(space, "", limit).await? {
                out.push(decode(&id, &r.value)?);
            }
        }
        // A transaction moving on while this ran may be read twice.
        out.sort_by(|a, b| a.txn_id.cmp(&b.txn_id));
        out.dedup_by(|a, b| a.txn_id == b.txn_id);
        out.truncate(limit);
        Ok(out)
    }

    /// How many transactions are in each state (decided ones: as many as retention keeps). On
    /// a node alone on its storage from memory; on shared storage from the undecided space and
    /// the tally record. Never from the decided history.
    pub async fn counts(&self) -> Result<Vec<(String, u64)>, TxnError> {
        let mut counts: std::collections::BTreeMap<TxnState, u64> = Default::default();
        let tally = if let Some(index) = self.index() {
            for (s, ids) in &index.by_state {
                *counts.entry(*s).or_default() += ids.len() as u64;
            }
            index.decided.clone()
        } else {
            let storage = self.broker.storage();
            for (id, r) in storage.list_records(TXN_SPACE, "", usize::MAX).await? {
                *counts.entry(decode(&id, &r.value)?.state).or_default() += 1;
            }
            decided::Tally::load(storage.as_ref()).await?.0
        };
        *counts.entry(TxnState::Committed).or_default() += tally.committed;
        *counts.entry(TxnState::RolledBack).or_default() += tally.rolled_back;
        let mut counts: Vec<(String, u64)> = counts
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s.wire_name(), n))
            .collect();
        counts.sort();
        Ok(counts)
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
        self.commit_with(id, by, &Staged::default()).await
    }

    /// [`Self::commit`], storing `staged` (a checker's kv writes and publishes) in the same
    /// atomic step as the decision (issue 24). A kv key that changed under the checker fails it
    /// with [`StorageError::Conflict`] and nothing is decided.
    pub(super) async fn commit_with(
        &self,
        id: &str,
        by: &str,
        staged: &Staged,
    ) -> Result<TxnRecord, TxnError> {
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
            let Some(rev) = rev else {
                return Err(decided::moved_undecided(id));
            };
            let (message, guard) = committing(&mut t, rev, by)?;
            let written = if staged.is_empty() {
                self.broker
                    .storage()
                    .append_guarded(&t.topic, vec![message], guard)
                    .await
                    .map(drop)
            } else {
                let mut c = staged.to_commit(vec![guard]);
                c.appends.insert(0, (t.topic.clone(), vec![message]));
                crate::runtime::Services::commit(self.broker.as_ref(), c)
                    .await
                    .map(drop)
            };
            match written {
                Ok(()) => {
                    self.indexed(&t);
                    return Ok(t);
                }
                Err(StorageError::Conflict { space, .. }) if space == TXN_SPACE => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Rolls back: the half message is dropped. Idempotent; a committed one cannot be.
    pub async fn rollback(&self, id: &str, by: &str) -> Result<TxnRecord, TxnError> {
        self.rollback_with(id, by, &Staged::default()).await
    }

    /// [`Self::rollback`], storing `staged` with the decision (see [`Self::commit_with`]).
    pub(super) async fn rollback_with(
        &self,
        id: &str,
        by: &str,
        staged: &Staged,
    ) -> Result<TxnRecord, TxnError> {
        self.update_with(id, staged, |t| match t.state {
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
        self.update_with(id, &Staged::default(), f).await
    }

    /// [`Self::update`], storing `staged` in the same atomic step when `f` changes the record.
    async fn update_with(
        &self,
        id: &str,
        staged: &Staged,
        f: impl Fn(&mut TxnRecord) -> Result<bool, TxnError>,
    ) -> Result<TxnRecord, TxnError> {
        loop {
            let (mut t, rev) = self.load(id).await?;
            if !f(&mut t)? {
                return Ok(t);
            }
            let Some(rev) = rev else {
                return Err(decided::moved_undecided(id));
            };
            let written = if staged.is_empty() {
                self.broker
                    .storage()
                    .put_record(TXN_SPACE, id, Some(encode(&t)?), Expect::Revision(rev))
                    .await
                    .map(drop)
            } else {
                let write = RecordWrite {
                    space: TXN_SPACE.into(),
                    key: id.into(),
                    value: Some(encode(&t)?),
                    expect: Expect::Revision(rev),
                };
                crate::runtime::Services::commit(
                    self.broker.as_ref(),
                    staged.to_commit(vec![write]),
                )
                .await
                .map(drop)
            };
            match written {
                Ok(()) => {
                    self.indexed(&t);
                    return Ok(t);
                }
                Err(StorageError::Conflict { space, .. }) if space == TXN_SPACE => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Schedules every pending transaction in storage, including those begun on other nodes
    /// (a node that takes over check-backs calls it, then now and then).
    pub async fn reload(&self) -> Result<(), TxnError> {
        let (found, decided, _) = scan(&self.broker).await?;
        if let Ok(mut s) = self.schedule.lock() {
            s.extend(found);
        }
        if let Ok(mut q) = self.to_move.lock() {
            q.extend(decided);
        }
        self.wake.notify_one();
        self.moved.notify_one();
        Ok(())
    }
}
