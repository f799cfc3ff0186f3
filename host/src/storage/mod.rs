//! Durable state behind one small object-safe trait: message logs per (topic, queue), lookups
//! by id and by business key, and versioned records with compare-and-set.
//!
//! Two backends: RocksDB (embedded, the default, in [`rocks`]) and NATS JetStream (scale-out,
//! in [`jetstream`]), both held to the `conformance` suite (feature `test-util`). The trait therefore speaks in terms both can honour: an append is acknowledged
//! once durable; offsets are dense per queue; records carry a revision for compare-and-set
//! (topics, subscription offsets, leases and transaction state are all records).

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod jetstream;
pub mod keys;
pub mod rocks;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use jetstream::JetStreamStorage;
pub use rocks::RocksStorage;

/// A message id: a UUIDv7, so ids sort by creation time and never repeat.
pub type MessageId = uuid::Uuid;

/// A 16-bit tag of a topic name (FNV-1a, folded), which [`message_id_for`] puts in ids.
pub fn topic_tag(topic: &str) -> u16 {
    let hash = topic.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    ((hash >> 16) ^ (hash & 0xffff)) as u16
}

/// A new id for a message bound for `queue` of `topic`: a UUIDv7 whose last 32 bits say where
/// it goes, `topic_tag(topic)` then the queue (for queues below 65 536). The 48-bit time and
/// uuid's 42-bit counter stay (the counter is reseeded at random each millisecond and counts
/// up within it), so ids still sort by time and do not repeat. A backend can then find a
/// message from its id alone without an index over every id (RocketMQ's message ids carry the
/// broker and commit-log offset for the same reason); see [`id_locator`].
pub fn message_id_for(topic: &str, queue: u32) -> MessageId {
    let mut bytes = *uuid::Uuid::now_v7().as_bytes();
    bytes[12..14].copy_from_slice(&topic_tag(topic).to_be_bytes());
    bytes[14..16].copy_from_slice(&(queue as u16).to_be_bytes());
    uuid::Uuid::from_bytes(bytes)
}

/// The topic tag and queue an id made by [`message_id_for`] carries; `None` for an id of any
/// other version. An id made otherwise yields a random pair, so a lookup by it checks what it
/// finds and falls back to whatever else the backend keeps.
pub fn id_locator(id: &MessageId) -> Option<(u16, u32)> {
    if id.get_version_num() != 7 {
        return None;
    }
    let b = id.as_bytes();
    Some((
        u16::from_be_bytes([b[12], b[13]]),
        u32::from(u16::from_be_bytes([b[14], b[15]])),
    ))
}

/// Whether `id` carries the locator of `queue` of `topic` (see [`message_id_for`]).
pub fn id_locates(id: &MessageId, topic: &str, queue: u32) -> bool {
    queue <= u32::from(u16::MAX) && id_locator(id) == Some((topic_tag(topic), queue))
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The backend failed to read or write (RocksDB: an I/O error or corruption).
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("jetstream: {0}")]
    JetStream(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("record {space}/{key} changed concurrently")]
    Conflict { space: String, key: String },
    #[error("storage is closed")]
    Closed,
    /// Refused for now, nothing written: the store is reopening after an I/O error (RocksDB)
    /// or its cluster is unreachable. A retry may succeed.
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
    #[error("encoding: {0}")]
    Encode(String),
}

/// How a message body was given, so it can be handed back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyKind {
    /// UTF-8 JSON, stored byte for byte as the producer sent it.
    Json,
    /// Opaque bytes.
    Binary,
}

/// A message as the broker hands it to storage: everything but the offset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMessage {
    pub id: MessageId,
    pub queue: u32,
    pub key: Option<String>,
    pub tag: Option<String>,
    pub sharding_key: Option<String>,
    pub properties: BTreeMap<String, String>,
    pub body_kind: BodyKind,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Milliseconds since the Unix epoch.
    pub born_at: u64,
    /// Not to be delivered before this time (ms since the epoch); equals `born_at` if not delayed.
    pub deliver_at: u64,
}

/// A stored message: where it is, when the broker stored it, and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub topic: String,
    pub offset: u64,
    /// When the broker stored it (ms since the epoch; a transaction's message: at commit). Never
    /// decreases along a queue, unlike `born_at` (producers' clocks differ, a transaction keeps
    /// its begin time), so a reset to a time searches by it, as RocketMQ does by store time.
    pub stored_at: u64,
    pub message: NewMessage,
}

/// Where an append put one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Appended {
    pub id: MessageId,
    pub queue: u32,
    pub offset: u64,
}

/// A record's value together with the revision a compare-and-set must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub revision: u64,
    pub value: Vec<u8>,
}

/// The condition a record write is made under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// Only if the record does not exist.
    Absent,
    /// Only if the record is at this revision.
    Revision(u64),
    /// Only if the record exists, at any revision (a timer a delivery completes by deleting it).
    Present,
}

/// A conditional record write, for [`Storage::append_guarded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordWrite {
    pub space: String,
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub expect: Expect,
}

/// A condition a [`Commit`] checks without writing the record (a kv key a plugin read but did
/// not write: its value must not have changed under the delivery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordCheck {
    pub space: String,
    pub key: String,
    pub expect: Expect,
}

/// What one [`Storage::commit`] writes as a single atomic, durable step: a plugin delivery's
/// staged kv writes, the messages it published and its completion (issue 24: exactly-once
/// processing, as Kafka's consume-transform-produce transactions give).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Commit {
    /// Conditions checked together with the writes, not written.
    pub checks: Vec<RecordCheck>,
    /// Record writes. Every condition, of these and of `checks`, holds or nothing at all is
    /// written ([`StorageError::Conflict`] names the first that failed, the first write's
    /// checked before any other). The first write is the commit point on a backend that
    /// cannot write everything at once (JetStream): once it is written the rest is finished,
    /// if need be by [`Storage::recover`], which tells whether a dead writer got that far by
    /// comparing the record with what the writer meant to store. So the first write must be a
    /// record nothing rewrites or deletes before recovery could look (a completion marker, a
    /// new dead letter's entry), not a shared one such as a count: recovery would take a later
    /// value for "never written" and drop the rest. Whoever deletes such a record sooner (the
    /// decided-transactions mover, a committed transaction's record) leaves it while
    /// [`Storage::unfinished_commits`] names it.
    pub records: Vec<RecordWrite>,
    /// Messages to append, by topic, each topic's in order.
    pub appends: Vec<(String, Vec<NewMessage>)>,
}

impl Commit {
    /// Whether it writes nothing and checks nothing.
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty() && self.records.is_empty() && self.appends.is_empty()
    }
}

/// What a [`Commit`] wrote: where each message went (in the order of `appends`, flattened)
/// and each record write's new revision (in the order of `records`; 0 for a delete).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    pub appended: Vec<Appended>,
    pub revisions: Vec<u64>,
}

/// Wake-ups for readers waiting on a topic's appends: what [`Storage::watch`] hands out.
#[derive(Debug, Default)]
pub struct Watchers(
    std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
);

impl Watchers {
    pub fn subscribe(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut watchers = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        watchers
            .entry(topic.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    /// Wakes the readers of `topic` (after its appends are durable and readable).
    pub fn bump(&self, topic: &str) {
        let watchers = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = watchers.get(topic) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// How much of each queue of a topic is kept: what a backend applies per queue, as Kafka's
/// `retention.ms` and `retention.bytes` apply per partition. `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueLimits {
    /// Messages stored longer ago than this (ms) go.
    pub max_age_ms: Option<u64>,
    /// The oldest messages go while the queue's messages take more bytes than this.
    pub max_bytes: Option<u64>,
}

/// Where a queue stands: offsets `low_water..high_water` are stored and take `bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueExtent {
    pub low_water: u64,
    pub high_water: u64,
    /// The stored size of those messages (encoded body, headers and properties, as the backend
    /// keeps them; index entries not counted).
    pub bytes: u64,
}

/// Durable storage for one broker. Object-safe so backends are chosen at start-up.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Appends messages of one topic atomically; returns once durable per the flush mode.
    /// Offsets are dense per queue and never reused.
    async fn append(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StorageError>;

    /// Appends messages and writes a record in one atomic, durable step, only if the record's
    /// condition holds (else [`StorageError::Conflict`] and nothing is written). A transaction
    /// commit uses it: the message becomes visible exactly when the decision is stored.
    async fn append_guarded(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        guard: RecordWrite,
    ) -> Result<(Vec<Appended>, u64), StorageError>;

    /// Writes a [`Commit`] as one atomic, durable step: its record writes and appends all
    /// happen, or none does (a failed condition is [`StorageError::Conflict`]). RocksDB: one
    /// `WriteBatch` of the single writer, conditions checked in it. JetStream: an intent, the
    /// commit point, the rest, as [`Storage::append_guarded`] does; see its docs for the one
    /// window this leaves between nodes. A reader that sees part of a commit sees the records
    /// it writes with a value before those it deletes (after the first record, its guard).
    async fn commit(&self, commit: Commit) -> Result<Committed, StorageError>;

    /// Up to `limit` messages of one queue with offset ≥ `from`, in offset order (from the low
    /// water on if `from` is below it: the first offset returned may be above `from`).
    async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError>;

    async fn message_by_id(&self, id: MessageId) -> Result<Option<StoredMessage>, StorageError>;

    /// Messages of a topic carrying this business key, oldest first per queue.
    async fn messages_by_key(
        &self,
        topic: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError>;

    /// Changes whenever messages were appended to `topic` (after they are durable and
    /// readable), so consumers wait for news instead of polling.
    fn watch(&self, topic: &str) -> tokio::sync::watch::Receiver<u64>;

    /// The backend's name as `/v1/cluster` and `wasmq_node_info` show it (`rocksdb`,
    /// `jetstream`).
    fn backend_name(&self) -> &'static str;

    /// Whether other wasmq nodes may share this storage: then queues are run under leases,
    /// transactions are checked back by one node at a time and plugin logs are announced.
    fn shared(&self) -> bool {
        false
    }

    /// How long a reader waiting on [`Storage::watch`] may go before it asks the storage
    /// again anyway: `None` when every append is seen by the watch (one process, RocksDB);
    /// on a shared backend, where the news of another node's append is a best-effort
    /// message that can be lost, the longest a lost one delays a reader.
    fn recheck_idle(&self) -> Option<std::time::Duration> {
        None
    }

    /// The next offset an append to this queue will get (= number of messages ever appended).
    /// It never goes back, also when retention deleted every message of the queue.
    async fn high_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError>;

    /// The first offset of this queue still stored (its low water): retention deleted the
    /// messages below it ([`Storage::truncate`]). 0 for a queue never truncated; equal to the
    /// high water when no message is left. A [`Storage::read`] from below it starts at it.
    async fn low_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError>;

    /// A queue's low water, high water and stored bytes, read together (one round trip on a
    /// backend that keeps them in one place).
    async fn extent(&self, topic: &str, queue: u32) -> Result<QueueExtent, StorageError>;

    /// The first offset of this queue that `limits` keep at `now_ms` (ms since the epoch): the
    /// low water when nothing is to go. Age counts from each message's store time. A backend
    /// that applies the limits itself (see [`Storage::prepare_topic`]) answers its low water.
    async fn retention_cut(
        &self,
        topic: &str,
        queue: u32,
        limits: QueueLimits,
        now_ms: u64,
    ) -> Result<u64, StorageError>;

    /// Deletes the messages of one queue with offset < `before` (capped at the high water) as
    /// one range, durably, and returns the new low water (unchanged if `before` is not above
    /// it). Offsets are never reused. Lookups by id or business key no longer find the deleted
    /// messages; their index entries are not visited (the cost is per range, not per message).
    async fn truncate(&self, topic: &str, queue: u32, before: u64) -> Result<u64, StorageError>;

    async fn get_record(&self, space: &str, key: &str) -> Result<Option<Record>, StorageError>;

    /// Up to `limit` records of a space whose key starts with `prefix`, in key order.
    async fn list_records(
        &self,
        space: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError>;

    /// Up to `limit` records of a space whose key starts with `prefix` and sorts after `after`,
    /// in key order: a page after the last key of the one before. A backend with ordered keys
    /// seeks to it; the default reads the prefix and skips.
    async fn list_records_after(
        &self,
        space: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        Ok(self
            .list_records(space, prefix, usize::MAX)
            .await?
            .into_iter()
            .filter(|(k, _)| k.as_str() > after)
            .take(limit)
            .collect())
    }

    /// Writes (`Some`) or deletes (`None`) a record if `expect` holds, durably; returns the new
    /// revision. A failed condition is [`StorageError::Conflict`].
    async fn put_record(
        &self,
        space: &str,
        key: &str,
        value: Option<Vec<u8>>,
        expect: Expect,
    ) -> Result<u64, StorageError>;

    /// Writes (`Some`) or deletes (`None`) records so that no reader sees one before those
    /// ahead of it (a pin before the timer it pins, see `crate::dispatch::pins`), each under
    /// its own condition: the first error, if any, and nothing after it is written. The default
    /// writes them one after another; RocksDB folds them into one atomic write.
    async fn put_records_in_order(&self, records: Vec<RecordWrite>) -> Result<(), StorageError> {
        for w in records {
            self.put_record(&w.space, &w.key, w.value, w.expect).await?;
        }
        Ok(())
    }

    /// Writes (`Some`) or deletes (`None`) records that need no atomic step together, each
    /// under its own condition (trace records, their expiry): the first error, if any; some
    /// may be written when one fails. The default sends them side by side; RocksDB folds them
    /// into one write.
    async fn put_records(&self, records: Vec<RecordWrite>) -> Result<(), StorageError> {
        let writes = records.into_iter().map(|w| async move {
            self.put_record(&w.space, &w.key, w.value, w.expect)
                .await
                .map(drop)
        });
        futures::future::join_all(writes)
            .await
            .into_iter()
            .collect()
    }

    /// Writes (`Some`) or deletes (`None`) a large immutable value (plugin code, compiled
    /// artifacts) durably.
    async fn put_blob(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), StorageError>;

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// Makes the queues of a topic ready for appends (a backend that keeps a stream per queue
    /// creates them here, before the topic is visible, so no node appends to a half-made queue)
    /// and hands it the topic's retention `limits` when it applies them itself. Called again
    /// whenever the topic changes.
    async fn prepare_topic(
        &self,
        _topic: &str,
        _queues: u32,
        _limits: QueueLimits,
    ) -> Result<(), StorageError> {
        Ok(())
    }

    /// Deletes every record of `space` whose key sorts before `before`: for spaces whose keys
    /// sort by time and go by age (message trace records), so a retention pass costs per
    /// range, not per record. Only for spaces never written under a condition (a
    /// compare-and-set racing the deletion could see a deleted record). RocksDB: one
    /// `DeleteRange` through the writer, ordered with every other write; by default, a page
    /// of 1 000 keys at a time.
    async fn delete_records_before(&self, space: &str, before: &str) -> Result<(), StorageError> {
        loop {
            let page = self.list_records(space, "", 1000).await?;
            let full = page.len() == 1000;
            let deletes: Vec<RecordWrite> = page
                .into_iter()
                .take_while(|(key, _)| key.as_str() < before)
                .map(|(key, _)| RecordWrite {
                    space: space.to_string(),
                    key,
                    value: None,
                    expect: Expect::Any,
                })
                .collect();
            let all = deletes.len() == 1000;
            if !deletes.is_empty() {
                self.put_records(deletes).await?;
            }
            if !(full && all) {
                return Ok(());
            }
        }
    }

    /// Lets the id and key index entries go once they are older than `max_age_ms`: the
    /// longest age limit among all topics (`None`: some topic keeps messages without one, so
    /// entries are kept). Called by every retention pass. A backend that deletes index
    /// entries with their message range (RocksDB: a compaction filter below each queue's low
    /// water) has nothing to do; JetStream hands the age to its index streams, which apply it
    /// themselves.
    async fn limit_index_age(&self, _max_age_ms: Option<u64>) -> Result<(), StorageError> {
        Ok(())
    }

    /// Finishes what a writer that died left half done, if older than `age` (so no live
    /// writer is raced). A shared backend needs this from one node now and then; a local one
    /// finishes its writes atomically and has nothing to do.
    async fn recover(&self, _age: std::time::Duration) -> Result<usize, StorageError> {
        Ok(0)
    }

    /// Finishes now, whatever their age, the half-done commits whose commit point was written
    /// and is a record of `space` with a key starting with `prefix`: a node taking over a
    /// queue calls it for the queue's completion markers, so what the last owner committed is
    /// complete before delivery goes past it (issue 24); a retry that finds its own commit
    /// point stored (a delivery's marker, a dead letter's entry: the first try's answer was
    /// lost) calls it for that record, so what the first try promised is complete before the
    /// caller moves on. Returns how many it finished. A local backend commits atomically and
    /// has nothing to do.
    async fn finish_commits_of(&self, _space: &str, _prefix: &str) -> Result<usize, StorageError> {
        Ok(0)
    }

    /// The keys of the records of `space` that are the commit point of a commit not finished
    /// yet (its writer is at work, or died and left it to [`Storage::recover`]). Read only.
    /// Whoever deletes such records (the decided-transactions mover) leaves these until the
    /// commit is finished: recovery compares the record with what the writer meant to store,
    /// and would drop a commit whose record is gone. A local backend commits atomically and has
    /// none.
    async fn unfinished_commits(
        &self,
        _space: &str,
    ) -> Result<std::collections::HashSet<String>, StorageError> {
        Ok(Default::default())
    }

    /// How old a half-done write must be before [`Storage::recover`] may finish it: older than
    /// any live writer takes to finish one (zero for a backend with nothing to recover).
    fn recovery_age(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Sends `payload` to every node sharing this storage that listens on `channel`, best
    /// effort (nothing is stored or retried): for what every node should see but nobody must
    /// keep, such as plugin log lines. A backend no other node shares has nobody to tell.
    async fn announce(&self, _channel: &str, _payload: Vec<u8>) {}

    /// What the nodes sharing this storage announce on `channel` (this one's too); `None` when
    /// no other node can share it.
    async fn listen(&self, _channel: &str) -> Option<futures::stream::BoxStream<'static, Vec<u8>>> {
        None
    }

    /// Adds the backend's own metrics (group commit sizes, write times) to a scrape.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}

    /// Finishes every write already accepted, then refuses new ones (`Closed`). What the backend
    /// holds is released when it returns, however many handles to the storage are left
    /// (RocksDB's lock on its data dir: the dir can be opened again at once); RocksDB waits
    /// for reads in flight at most 30 s for that, after its last flush and at most 10 s of the
    /// compactions that flush calls for. A second call returns at once, even while the first
    /// is still closing.
    async fn close(&self);
}

/// Deletes every record of a space whose key starts with `prefix` (a subscription's cursors,
/// timers, dead letters or kv), a page of 1 000 at a time.
pub async fn clear_space(
    storage: &dyn Storage,
    space: &str,
    prefix: &str,
) -> Result<(), StorageError> {
    loop {
        let batch = storage.list_records(space, prefix, 1000).await?;
        if batch.is_empty() {
            return Ok(());
        }
        for (k, _) in batch {
            storage.put_record(space, &k, None, Expect::Any).await?;
        }
    }
}
