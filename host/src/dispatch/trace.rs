//! Message trace (issue 26, as RocketMQ's message trace): a record of every delivery attempt,
//! written in pages off the delivery path, and where a message is now for each subscription
//! of its topic (`GET /v1/messages/{id}/trace`, `wasmq message trace ID`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::spec::Mode;
use super::state::{self, Cursor, SubscriptionRecord};
use super::{DispatchError, Dispatcher};
use crate::base::now_ms;
use crate::storage::{Expect, MessageId, RecordWrite, Storage};

/// The record space of attempt records. Attempts are written in pages: the attempts of the
/// messages created in the same [`PAGE_MS`] that one write batch holds are one record, keyed
/// `{page end}/~{page id}` ([`page_prefix`]), whose value is a JSON array of `[message id,
/// attempt]` pairs. Every key sorts by its messages' creation time (the page end is the
/// smallest UUIDv7 of the millisecond after the page, message ids are UUIDv7), so retention
/// deletes from the front. Records written before pages, one per attempt and keyed `{message
/// id}/{group}/{started_at:016x}-{seq:08x}`, are read too, and sort the same way.
pub const TRACE_SPACE: &str = "trace";

/// Attempts waiting to be written; past this, new ones are dropped and counted.
const QUEUE: usize = 65_536;
/// Attempts written in one storage step.
const BATCH: usize = 1024;
/// How long the writer waits for a batch to fill before writing what it has: a page then
/// holds many attempts, and a JetStream node makes a few record writes a batch instead of
/// one per attempt (each a stored message and a subject nats-server tracks). An attempt is
/// written this long plus the write before it after it happened (more while a backlog of
/// attempts drains); a clean stop writes at once.
const LINGER: Duration = Duration::from_millis(50);
/// The span of message creation times one page covers (ms): a lookup decodes the pages of
/// its message's span, so at 100 000 messages/s about 1 000 attempts per subscription. Part
/// of the stored layout ([`page_prefix`]): another span would need lookups of both.
const PAGE_MS: u64 = 10;
/// The most bytes of one page record: an attempt is about 300 B of JSON (up to about 2.5 KiB
/// with a plugin's longest reason), and JetStream's default largest message is 1 MiB.
const PAGE_BYTES: usize = 256 * 1024;
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

/// Writes attempt records in pages: one storage step per batch, never on the delivery's path.
/// Best effort, as RocketMQ's asynchronous trace: records still queued when the process dies
/// are lost, and a full queue drops new ones (counted in `dropped`); a clean stop writes what
/// is queued ([`TraceWriter::close`]) before storage closes.
pub struct TraceWriter {
    tx: Option<mpsc::Sender<(MessageId, Attempt)>>,
    /// The writing task and what tells it to finish; taken by [`TraceWriter::close`].
    writing: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
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
    pub fn record(&self, id: MessageId, attempt: Attempt) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send((id, attempt)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The key prefix of the trace pages that hold attempts of message `id`: the smallest UUIDv7
/// of the first millisecond after its [`PAGE_MS`] span, then `/~`. Retention's cut at
/// millisecond `c` (the smallest UUIDv7 of `c`) then takes a page only once every message of
/// its span is older than `c`. An id that is not a UUIDv7 (none are made so) has a page of
/// its own, keyed by the id.
fn page_prefix(id: &MessageId) -> String {
    let end = id
        .get_timestamp()
        .filter(|_| id.get_version_num() == 7)
        .and_then(|t| {
            let (secs, nanos) = t.to_unix();
            let ms = secs
                .checked_mul(1000)?
                .checked_add(u64::from(nanos / 1_000_000))?;
            (ms / PAGE_MS).checked_add(1)?.checked_mul(PAGE_MS)
        });
    match end {
        Some(end) => format!("{}/~", first_id_of(end)),
        None => format!("{id}/~"),
    }
}

/// The smallest UUIDv7 of millisecond `ms` (since the epoch), as text: every id made in `ms`
/// or later sorts at or after it, every id made before sorts before.
fn first_id_of(ms: u64) -> String {
    uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10])
        .into_uuid()
        .to_string()
}

/// The writes of one batch: its attempts grouped by page ([`page_prefix`]), as JSON arrays of
/// at most [`PAGE_BYTES`] (or one attempt), each record under a new key.
fn pages(batch: Vec<(MessageId, Attempt)>) -> Vec<RecordWrite> {
    let mut by_page: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut writes = Vec::new();
    let mut write = |prefix: &str, mut page: Vec<u8>| {
        page.push(b']');
        writes.push(RecordWrite {
            space: TRACE_SPACE.into(),
            key: format!("{prefix}{}", uuid::Uuid::now_v7().simple()),
            value: Some(page),
            expect: Expect::Any,
        });
    };
    for (id, attempt) in batch {
        let Ok(item) = serde_json::to_vec(&(id, attempt)) else {
            continue;
        };
        let prefix = page_prefix(&id);
        let page = by_page.entry(prefix.clone()).or_default();
        if page.len() > 1 && page.len() + 1 + item.len() + 1 > PAGE_BYTES {
            write(&prefix, std::mem::take(page));
        }
        page.push(if page.is_empty() { b'[' } else { b',' });
        page.extend_from_slice(&item);
    }
    for (prefix, page) in by_page {
        write(&prefix, page);
    }
    writes
}

/// Every attempt of message `id` on record, oldest first (pages, and records from before
/// pages).
pub async fn attempts_of(
    storage: &dyn Storage,
    id: MessageId,
) -> Result<Vec<Attempt>, DispatchError> {
    let mut attempts: Vec<Attempt> = Vec::new();
    for (_, r) in storage
        .list_records(TRACE_SPACE, &page_prefix(&id), usize::MAX)
        .await?
    {
        if let Ok(page) = serde_json::from_slice::<Vec<(MessageId, Attempt)>>(&r.value) {
            attempts.extend(page.into_iter().filter(|(of, _)| *of == id).map(|(_, a)| a));
        }
    }
    for (_, r) in storage
        .list_records(TRACE_SPACE, &format!("{id}/"), usize::MAX)
        .await?
    {
        if let Ok(a) = serde_json::from_slice::<Attempt>(&r.value) {
            attempts.push(a);
        }
    }
    // Stable: attempts started in the same millisecond keep their number's order, then the
    // order they were queued in.
    attempts.sort_by_key(|a| (a.started_at, a.attempt));
    Ok(attempts)
}

/// Writes what queued up, a batch at a time ([`Storage::put_records`]: one write on RocksDB),
/// until every sender is gone, or `stop` and what was queued before it is written. A batch
/// short of [`BATCH`] waits up to [`LINGER`] for more first, unless `stop` came.
async fn write_batches(
    storage: Arc<dyn Storage>,
    mut rx: mpsc::Receiver<(MessageId, Attempt)>,
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
        let until = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH && !rx.is_closed() {
            let room = BATCH - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                () = tokio::time::sleep_until(until) => break,
                // Written at once; the outer loop takes the rest.
                () = stop.cancelled() => rx.close(),
            }
        }
        if let Err(e) = storage.put_records(pages(std::mem::take(&mut batch))).await {
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
    /// attempt on record: handled before its trace was kept, its record was lost in a crash,
    /// or it is not written yet: the writer waits up to [`LINGER`] to fill a page, then writes).
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
        let attempts = attempts_of(storage.as_ref(), id).await?;
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
    /// (ms since the epoch) as one range: their keys start with a UUIDv7 at or after their
    /// messages' creation (the page's end, or the message id itself for a record from before
    /// pages), whose text sorts by time, so the cut is the smallest id of the first kept
    /// millisecond ([`crate::storage::Storage::delete_records_before`]). A page goes once the
    /// newest message of its [`PAGE_MS`] span is that old.
    pub async fn expire_trace(&self, now: u64, max_age_ms: u64) -> Result<(), DispatchError> {
        let Some(cut) = now.checked_sub(max_age_ms) else {
            return Ok(());
        };
        let first_kept = first_id_of(cut);
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
            writer.record(id, attempt(n));
        }
        writer.close().await;
        assert_eq!(
            Arc::strong_count(&storage),
            1,
            "the writing task still holds the storage"
        );
        writer.record(id, attempt(QUEUED));
        assert_eq!(writer.dropped.load(Ordering::Relaxed), 1);
        let stored = attempts_of(storage.as_ref(), id).await.unwrap();
        let started: Vec<u64> = stored.iter().map(|a| a.started_at).collect();
        assert_eq!(started, (0..QUEUED).collect::<Vec<_>>());
        writer.close().await;
        storage.close().await;
    }

    /// A message id made at `ms` whose random part is `n`.
    fn id_at(ms: u64, n: u16) -> MessageId {
        let mut random = [0u8; 10];
        random[8..].copy_from_slice(&n.to_be_bytes());
        uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
    }

    /// The attempts of messages created in the same span are one record (600 attempts of 200
    /// messages: 1 record, not 600), each message's lookup finds its own attempts in order
    /// and no other's, a message of the next span is in a page of its own, a record from
    /// before pages (one per attempt) is read beside them, and attempts with long reasons
    /// fill pages of at most [`PAGE_BYTES`].
    #[tokio::test]
    async fn a_batch_of_attempts_is_written_as_pages_and_each_message_reads_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(RocksStorage::open(dir.path(), FlushMode::Async).unwrap());
        let writer = TraceWriter::new(storage.clone(), true);
        let span = 1_700_000_000_000 / PAGE_MS * PAGE_MS;
        let ids: Vec<MessageId> = (0..200)
            .map(|n| id_at(span + n % PAGE_MS, n as u16))
            .collect();
        for round in 0..3 {
            for (n, id) in ids.iter().enumerate() {
                let mut a = attempt(1000 * round + n as u64);
                a.attempt = round as u32 + 1;
                writer.record(*id, a);
            }
        }
        let next_span = id_at(span + PAGE_MS, 7);
        writer.record(next_span, attempt(5));
        // Written by this runtime's one thread only once the test awaits: one batch.
        writer.close().await;
        let records = storage
            .list_records(TRACE_SPACE, "", usize::MAX)
            .await
            .unwrap();
        assert_eq!(records.len(), 2);
        for (n, id) in ids.iter().enumerate() {
            let found = attempts_of(storage.as_ref(), *id).await.unwrap();
            let seen: Vec<(u32, u64)> = found.iter().map(|a| (a.attempt, a.started_at)).collect();
            let n = n as u64;
            assert_eq!(seen, [(1, n), (2, 1000 + n), (3, 2000 + n)]);
        }
        let found = attempts_of(storage.as_ref(), next_span).await.unwrap();
        assert_eq!(found, [attempt(5)]);
        // One record per attempt, as written before pages.
        let old = ids[3];
        let key = format!("{old}/g/{:016x}-{:08x}", 2500, 0);
        let value = serde_json::to_vec(&attempt(2500)).unwrap();
        storage
            .put_record(TRACE_SPACE, &key, Some(value), Expect::Any)
            .await
            .unwrap();
        let started: Vec<u64> = attempts_of(storage.as_ref(), old)
            .await
            .unwrap()
            .iter()
            .map(|a| a.started_at)
            .collect();
        assert_eq!(started, [3, 1003, 2003, 2500]);

        let writer = TraceWriter::new(storage.clone(), true);
        let long_span = span + 10 * PAGE_MS;
        let long: Vec<MessageId> = (0..300).map(|n| id_at(long_span, n)).collect();
        for (n, id) in long.iter().enumerate() {
            let mut a = attempt(n as u64);
            a.reason = Some("r".repeat(crate::text::MAX_REASON_BYTES * 2));
            writer.record(*id, a);
        }
        writer.close().await;
        let pages = storage
            .list_records(TRACE_SPACE, &page_prefix(&long[0]), usize::MAX)
            .await
            .unwrap();
        let bytes: usize = pages.iter().map(|(_, r)| r.value.len()).sum();
        assert!(
            (2..=4).contains(&pages.len()),
            "{} pages, {bytes} B",
            pages.len()
        );
        assert!(pages.iter().all(|(_, r)| r.value.len() <= PAGE_BYTES));
        for (n, id) in long.iter().enumerate() {
            let found = attempts_of(storage.as_ref(), *id).await.unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].started_at, n as u64);
        }
        storage.close().await;
    }

    proptest::proptest! {
        /// Retention's cut at `cut` (the first id of that millisecond) never takes the page of
        /// a message created at or after `cut`, and takes it once the message is more than
        /// [`PAGE_MS`] older than `cut`.
        #[test]
        fn a_page_goes_only_once_its_messages_are_older_than_the_cut(
            created in 1_600_000_000_000u64..1_600_000_100_000,
            // Cuts near the message (within three spans), where the page's end decides.
            after in 0..6 * PAGE_MS,
            n: u16,
        ) {
            let cut = created + after - 3 * PAGE_MS;
            let page = page_prefix(&id_at(created, n));
            let goes = page < first_id_of(cut);
            if created >= cut {
                proptest::prop_assert!(!goes, "{page} goes at cut {cut}");
            }
            if created + PAGE_MS < cut {
                proptest::prop_assert!(goes, "{page} stays at cut {cut}");
            }
        }
    }
}
