//! Message trace (issue 26, as RocketMQ's message trace): a record of every delivery attempt,
//! written in batches off the delivery path, and where a message is now for each subscription
//! of its topic (`GET /v1/messages/{id}/trace`, `wasmq message trace ID`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::spec::Mode;
use super::state::{self, Cursor, SubscriptionRecord};
use super::{DispatchError, Dispatcher};
use crate::base::now_ms;
use crate::storage::{Expect, MessageId, RecordWrite, Storage};

/// The record space of attempt records, keyed `{message id}/{group}/{started_at:016x}-{seq:08x}`:
/// a message's records sort together by subscription and time, and every key sorts by the
/// message's creation time (ids are UUIDv7), so retention deletes from the front.
pub const TRACE_SPACE: &str = "trace";

/// Attempt records waiting to be written; past this, new ones are dropped and counted.
const QUEUE: usize = 65_536;
/// Attempt records written in one storage step.
const BATCH: usize = 1024;
/// The most attempt records one trace shows (a message retried forever keeps its last ones).
const MAX_SHOWN: usize = 1000;

/// One delivery attempt of a message to a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Attempt {
    pub topic: String,
    pub group: String,
    /// `all` for a clustering subscription, `iNNNN` for a broadcast instance (its own offsets).
    pub member: String,
    /// The plugin instance that ran the call (0-based).
    pub instance: u32,
    /// The node that ran it (`local` alone on RocksDB).
    pub node: String,
    /// 1 for the first delivery; a rerun (a kv key changed during the call) keeps its number.
    pub attempt: u32,
    /// When the call started (ms since the epoch).
    pub started_at: u64,
    /// How long the call ran (ms).
    pub duration_ms: f64,
    /// What the call answered: `ack`, `retry`, `reject`, `timeout`, `oom`, `trap` or `error`.
    pub outcome: String,
    /// The plugin's reject reason or the failure, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What became of the message: `done`, `retry` (at `next_attempt_at`), `dead_lettered`, or
    /// `rerun` (a kv key it read changed before its effects were stored: delivered again).
    pub fate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<u64>,
}

/// Writes attempt records in batches: one storage step per batch, never on the delivery's
/// path. Best effort, as RocketMQ's asynchronous trace: records still queued when the process
/// dies are lost, and a full queue drops new ones (counted in `dropped`); a clean stop writes
/// what is queued ([`TraceWriter::close`]) before storage closes.
pub struct TraceWriter {
    tx: Option<mpsc::Sender<RecordWrite>>,
    /// The writing task and what tells it to finish; taken by [`TraceWriter::close`].
    writing: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
    seq: AtomicU64,
    /// Records dropped because the queue was full, or sent after [`TraceWriter::close`].
    pub dropped: AtomicU64,
}

impl TraceWriter {
    /// A writer into `storage`; `enabled: false` records nothing (`[retention]
    /// trace_max_age_ms = 0`). Needs a tokio runtime when enabled.
    pub fn new(storage: Arc<dyn Storage>, enabled: bool) -> Self {
        let (tx, writing) = if enabled {
            let (tx, rx) = mpsc::channel(QUEUE);
            let stop = CancellationToken::new();
            let task = tokio::spawn(write_batches(storage, rx, stop.clone()));
            (Some(tx), Some((stop, task)))
        } else {
            (None, None)
        };
        Self {
            tx,
            writing: Mutex::new(writing),
            seq: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Stops taking records (later ones are dropped and counted) and returns once every record
    /// queued before is written: the writing task holds the storage, so it must be done before
    /// storage closes (a RocksDB handle it still held kept the data dir locked, and a restart
    /// in the same process then failed to open it). Later calls return at once.
    pub async fn close(&self) {
        let writing = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((stop, task)) = writing {
            stop.cancel();
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "the trace writer ended abnormally");
            }
        }
    }

    /// Queues `attempt` of message `id` for writing.
    pub fn record(&self, id: MessageId, attempt: &Attempt) {
        let Some(tx) = &self.tx else { return };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) as u32;
        let key = format!(
            "{id}/{}/{:016x}-{seq:08x}",
            attempt.group, attempt.started_at
        );
        let Ok(value) = serde_json::to_vec(attempt) else {
            return;
        };
        let write = RecordWrite {
            space: TRACE_SPACE.into(),
            key,
            value: Some(value),
            expect: Expect::Any,
        };
        if tx.try_send(write).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Writes what queued up, a batch at a time ([`Storage::put_records`]: one write on RocksDB),
/// until every sender is gone, or `stop` and what was queued before it is written.
async fn write_batches(
    storage: Arc<dyn Storage>,
    mut rx: mpsc::Receiver<RecordWrite>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            () = stop.cancelled(), if !rx.is_closed() => {
                // No new records; those buffered are still received, then 0.
                rx.close();
                continue;
            }
        };
        if received == 0 {
            return;
        }
        if let Err(e) = storage.put_records(std::mem::take(&mut batch)).await {
            tracing::warn!(error = %e, "cannot store message trace records; dropped");
        }
    }
}

/// Where a message is for one subscription member.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct MemberTrace {
    pub group: String,
    pub member: String,
    /// The broadcast instance whose offsets these are (absent for a clustering subscription).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    /// `pending` (not delivered yet), `delayed` (due later), `delivering`, `in_retry` (next
    /// attempt at `next_attempt_at`), `acked`, `dead_lettered`, `filtered` (its tag does not
    /// match), `expired` (retention deleted it first) or `passed` (the offset passed it with no
    /// attempt on record: handled before its trace was kept, or its record was lost in a crash).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<u64>,
    /// Every attempt on record, oldest first.
    pub attempts: Vec<Attempt>,
}

/// `GET /v1/messages/{id}/trace`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct MessageTrace {
    pub id: MessageId,
    pub topic: String,
    /// Where it is stored; absent when retention deleted it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_at: Option<u64>,
    /// Whether the message is still stored.
    pub stored: bool,
    /// One entry per member of each subscription of its topic, in group order.
    pub subscriptions: Vec<MemberTrace>,
}

impl Dispatcher {
    /// A message's trace: every attempt on record and where it is now for each subscription
    /// of its topic. `Ok(None)`: no such message and no record of one.
    pub async fn trace(&self, id: MessageId) -> Result<Option<MessageTrace>, DispatchError> {
        let storage = &self.env.storage;
        let message = storage.message_by_id(id).await?;
        let mut attempts: Vec<Attempt> = Vec::new();
        for (_, r) in storage
            .list_records(TRACE_SPACE, &format!("{id}/"), usize::MAX)
            .await?
        {
            if let Ok(a) = serde_json::from_slice::<Attempt>(&r.value) {
                attempts.push(a);
            }
        }
        let topic = match (&message, attempts.first()) {
            (Some(m), _) => m.topic.clone(),
            (None, Some(a)) => a.topic.clone(),
            (None, None) => return Ok(None),
        };
        let now = now_ms();
        let mut subscriptions = Vec::new();
        for (group, record) in self.subscriptions().await? {
            if record.spec.topic != topic {
                continue;
            }
            for (member, instance) in members(&record) {
                let mut mine: Vec<Attempt> = attempts
                    .iter()
                    .filter(|a| a.group == group && a.member == member)
                    .cloned()
                    .collect();
                if mine.len() > MAX_SHOWN {
                    mine.drain(..mine.len() - MAX_SHOWN);
                }
                let (state, next_attempt_at) = match (&message, mine.last()) {
                    (_, Some(last)) => match last.fate.as_str() {
                        "done" => ("acked", None),
                        "dead_lettered" => ("dead_lettered", None),
                        "retry" if message.is_none() => ("expired", None),
                        "retry" => ("in_retry", last.next_attempt_at),
                        _ => ("delivering", None),
                    },
                    (None, None) => ("expired", None),
                    (Some(m), None) => {
                        let cursor = storage
                            .get_record(
                                &state::cursor_space(&group),
                                &state::cursor_key(&member, m.message.queue),
                            )
                            .await?
                            .map(|r| state::decode::<Cursor>("cursor", &r))
                            .transpose()?;
                        let filter = record.spec.validate().ok();
                        if cursor.is_none_or(|c| m.offset >= c.committed) {
                            ("pending", None)
                        } else if filter.is_some_and(|f| !f.matches(m.message.tag.as_deref())) {
                            ("filtered", None)
                        } else if m.message.deliver_at > now {
                            ("delayed", Some(m.message.deliver_at))
                        } else {
                            ("passed", None)
                        }
                    }
                };
                subscriptions.push(MemberTrace {
                    group: group.clone(),
                    member,
                    instance,
                    state: state.to_string(),
                    next_attempt_at,
                    attempts: mine,
                });
            }
        }
        Ok(Some(MessageTrace {
            id,
            topic,
            queue: message.as_ref().map(|m| m.message.queue),
            offset: message.as_ref().map(|m| m.offset),
            stored_at: message.as_ref().map(|m| m.stored_at),
            stored: message.is_some(),
            subscriptions,
        }))
    }

    /// Deletes the attempt records of messages created `max_age_ms` or longer before `now`
    /// (ms since the epoch) as one range: their keys start with the message id, a UUIDv7,
    /// whose text sorts by creation time, so the cut is the smallest id of the first kept
    /// millisecond ([`crate::storage::Storage::delete_records_before`]).
    pub async fn expire_trace(&self, now: u64, max_age_ms: u64) -> Result<(), DispatchError> {
        let Some(cut) = now.checked_sub(max_age_ms) else {
            return Ok(());
        };
        let first_kept = uuid::Builder::from_unix_timestamp_millis(cut, &[0; 10])
            .into_uuid()
            .to_string();
        // Only when something is below the cut: an idle server would otherwise add a range
        // deletion every pass.
        let oldest = self.env.storage.list_records(TRACE_SPACE, "", 1).await?;
        if oldest.first().is_some_and(|(key, _)| *key < first_kept) {
            self.env
                .storage
                .delete_records_before(TRACE_SPACE, &first_kept)
                .await?;
        }
        Ok(())
    }
}

/// A subscription's members: (name, broadcast instance).
fn members(record: &SubscriptionRecord) -> Vec<(String, Option<u32>)> {
    if record.spec.mode == Mode::Broadcast {
        (0..record.spec.instances)
            .map(|i| (state::member_name(true, i), Some(i)))
            .collect()
    } else {
        vec![(state::member_name(false, 0), None)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FlushMode;
    use crate::storage::rocks::RocksStorage;

    fn attempt(n: u64) -> Attempt {
        Attempt {
            topic: "t".into(),
            group: "g".into(),
            member: "all".into(),
            instance: 0,
            node: "local".into(),
            attempt: 1,
            started_at: n,
            duration_ms: 0.0,
            outcome: "ack".into(),
            reason: None,
            fate: "done".into(),
            next_attempt_at: None,
        }
    }

    /// `close` returns once every record queued before it is stored (more than a batch of them,
    /// all queued before the writer could take any), and the writer then lets go of the
    /// storage; a record after it is dropped and counted, not written into a closed storage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_writes_every_queued_record_then_lets_go_of_the_storage() {
        const QUEUED: u64 = 3 * BATCH as u64 + 7;
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(RocksStorage::open(dir.path(), FlushMode::Async).unwrap());
        let writer = TraceWriter::new(storage.clone(), true);
        let id = uuid::Uuid::now_v7();
        for n in 0..QUEUED {
            writer.record(id, &attempt(n));
        }
        writer.close().await;
        assert_eq!(
            Arc::strong_count(&storage),
            1,
            "the writing task still holds the storage"
        );
        writer.record(id, &attempt(QUEUED));
        assert_eq!(writer.dropped.load(Ordering::Relaxed), 1);
        let stored = storage
            .list_records(TRACE_SPACE, &id.to_string(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(stored.len() as u64, QUEUED);
        writer.close().await;
        storage.close().await;
    }
}
