//! The embedded RocksDB backend: column families, a single writer thread that group-commits
//! every write (one WriteBatch and one fsync for all writes that arrive together), and recovery
//! of per-queue high-water offsets on open and after an I/O error (the database is reopened
//! behind its readers, so running out of descriptors or disk for a moment costs 503s, not a
//! restart).

#[cfg(test)]
mod tests;
mod writer;

use writer::{Slot, WriteOp, Writer};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, Commit, Committed, Expect, MessageId, NewMessage, QueueExtent, QueueLimits, Record,
    RecordCheck, RecordWrite, Storage, StorageError, StoredMessage, Watchers, keys,
};
use crate::config::FlushMode;

/// RocksDB's errors reach callers as the backend-neutral [`StorageError::Backend`].
impl From<rocksdb::Error> for StorageError {
    fn from(e: rocksdb::Error) -> Self {
        StorageError::Backend(e.to_string())
    }
}

const CF_MESSAGES: &str = "messages";
const CF_IDS: &str = "ids";
const CF_KEYS: &str = "keys";
const CF_RECORDS: &str = "records";
/// Large values (plugin code, compiled artifacts), kept in RocksDB's blob files.
const CF_BLOBS: &str = "blobs";
/// The most messages a read tries on an async worker (see [`RocksStorage::read_fast`]): a
/// runner's batch (256 × 256 B from the memtable is some tens of µs).
const INLINE_READ_MAX: usize = 256;
/// The most message bytes a read copies on an async worker: past them (large messages) it goes
/// to a blocking thread.
const INLINE_READ_BYTES: usize = 256 * 1024;
/// The WAL size past which the column families it holds are flushed: bounds crash recovery.
const MAX_WAL_BYTES: u64 = 64 << 20;
/// How many of RocksDB's info log files (`LOG`, `LOG.old.*`) the data dir keeps.
const INFO_LOG_FILES: usize = 4;
/// The size past which RocksDB's info log starts a new file.
const INFO_LOG_BYTES: usize = 4 << 20;
/// The age at which a record table file no compaction met is compacted anyway.
const RECORDS_PERIODIC_COMPACTION: Duration = Duration::from_secs(24 * 3600);
/// How long a clean close waits for the compactions its last flushes call for (then it closes
/// anyway, and the next open resumes them).
const CLOSE_COMPACTION_WAIT: Duration = Duration::from_secs(10);
const COLUMN_FAMILIES: [&str; 5] = [CF_MESSAGES, CF_IDS, CF_KEYS, CF_RECORDS, CF_BLOBS];
/// Default-CF key of the last record revision handed out; revisions are global and never reused.
const LAST_REVISION: &[u8] = b"last_record_revision";

/// Bounds on one group commit, so a flood of writers cannot build an unbounded batch.
const MAX_GROUP_OPS: usize = 4096;
const MAX_GROUP_BYTES: usize = 64 * 1024 * 1024;
/// Writes waiting for the writer thread; senders wait (backpressure) beyond this.
const QUEUE_DEPTH: usize = 8192;
/// After a failed reopen, writes are refused (503) for this long before the next attempt.
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);
/// Default-CF key the writer writes after a failed group commit, to learn whether RocksDB still
/// takes writes or has stopped on a background error (then only a reopen helps).
const PROBE: &[u8] = b"write_probe";

/// Counters of the writer thread, for metrics and benchmarks.
#[derive(Debug)]
pub struct WriterStats {
    /// Write batches committed (one fsync each in `sync` mode).
    pub commits: AtomicU64,
    /// Operations (appends, record writes) those batches carried.
    pub ops: AtomicU64,
    /// Messages appended.
    pub messages: AtomicU64,
    /// Operations per group commit.
    pub group_ops: Histogram,
    /// Time of one group commit's write (and fsync, in `sync` mode).
    pub commit_seconds: Histogram,
    /// Queues [`Storage::retention_cut`] read (a search by store time or a sum of sizes); a
    /// queue whose oldest message is known to be younger than its age limit takes none.
    pub retention_scans: AtomicU64,
}

impl Default for WriterStats {
    fn default() -> Self {
        Self {
            commits: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            group_ops: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            commit_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 22)),
            retention_scans: AtomicU64::new(0),
        }
    }
}

type HighWater = HashMap<String, Vec<u64>>;

/// A per-queue marker of the default CF: (topic, queue) and its value.
type QueueMarker = ((String, u32), u64);

pub struct RocksStorage {
    db: Arc<Slot>,
    tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    high_water: Arc<RwLock<HighWater>>,
    /// Per queue, the first offset kept (absent: 0).
    low_water: Arc<RwLock<HighWater>>,
    /// Per queue, the bytes its stored messages take (absent: 0).
    bytes: Arc<RwLock<HighWater>>,
    watchers: Arc<Watchers>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<WriterStats>,
    /// Per topic, message bytes deleted since its key range was last compacted.
    deleted_since_compaction: Arc<Mutex<HashMap<String, u64>>>,
    /// The compaction [`RocksStorage::reclaim`] started last (one at a time); joined on close,
    /// so the database is never held past it.
    compaction: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when [`Storage::close`] begins: no compaction starts after it, a second close
    /// returns at once.
    closing: AtomicBool,
    /// Per topic and queue, an offset and its message's store time, as the last retention
    /// search found them. While the offset is the queue's low water its message is the oldest
    /// (store times never decrease along offsets, offsets are never reused, a stored message
    /// never changes), so no age cut is due before that time plus the age limit.
    oldest: Mutex<OldestKept>,
    /// Reads [`Self::read_fast`] could not serve from memory and sent to a blocking thread.
    disk_reads: AtomicU64,
}

/// Per topic, per queue: (offset, the store time of its message in ms since the epoch).
type OldestKept = HashMap<String, HashMap<u32, (u64, u64)>>;

/// A topic's key range is compacted (so deleted messages leave the disk) once this many bytes
/// were deleted from it, and at least as many as it still stores: each compaction rewrites the
/// kept messages at most about once per their own size deleted (write amplification ≤ ~2).
const COMPACT_AFTER_BYTES: u64 = 16 << 20;

/// Labels of `wasmq_storage_bytes`: a column family and a part of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StoredLabel {
    family: &'static str,
    part: &'static str,
}

/// A message encoded by the caller, so the single writer thread only stages bytes.
struct Encoded {
    id: MessageId,
    queue: u32,
    key: Option<String>,
    value: Vec<u8>,
}

fn encode_all(messages: &[NewMessage]) -> Result<Vec<Encoded>, StorageError> {
    messages
        .iter()
        .map(|m| {
            Ok(Encoded {
                id: m.id,
                queue: m.queue,
                key: m.key.clone(),
                value: rmp_serde::to_vec(m).map_err(|e| StorageError::Encode(e.to_string()))?,
            })
        })
        .collect()
}

impl RocksStorage {
    /// Opens (or creates) the database under `dir` and starts its writer thread.
    pub fn open(dir: &Path, flush: FlushMode) -> Result<Self, StorageError> {
        let started = Instant::now();
        let low_water = Arc::new(RwLock::new(HighWater::new()));
        let db = Arc::new(open_db(dir, &low_water)?);
        let opened = started.elapsed();
        let low = recover_low_water(&db)?;
        let (committed, last_stored_at) = recover_high_water(&db, &low)?;
        let bytes = Arc::new(RwLock::new(recover_queue_bytes(&db, &committed, &low)?));
        let last_revision = read_last_revision(&db)?;
        tracing::info!(
            dir = %dir.display(),
            open_us = opened.as_micros() as u64,
            recover_us = (started.elapsed() - opened).as_micros() as u64,
            "RocksDB opened (open: the WAL replayed; recover: high and low water, stored bytes)"
        );
        let slot = Arc::new(Slot {
            dir: dir.to_path_buf(),
            db: RwLock::new(Some(db.clone())),
            closed: Default::default(),
        });
        let high_water = Arc::new(RwLock::new(committed.clone()));
        *low_water.write().map_err(|_| StorageError::Closed)? = low;
        let stats = Arc::new(WriterStats::default());
        let watchers = Arc::new(Watchers::default());
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            slot: slot.clone(),
            db: Some(db),
            next_reopen: Instant::now(),
            sync: flush == FlushMode::Sync,
            committed,
            shared: high_water.clone(),
            low_water: low_water.clone(),
            bytes: bytes.clone(),
            watchers: watchers.clone(),
            last_revision,
            last_stored_at,
            stats: stats.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("wasmq-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StorageError::Corrupt(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            db: slot,
            tx: Mutex::new(Some(tx)),
            high_water,
            low_water,
            bytes,
            watchers,
            writer: Mutex::new(Some(handle)),
            stats,
            deleted_since_compaction: Arc::default(),
            compaction: Mutex::new(None),
            closing: AtomicBool::new(false),
            oldest: Mutex::default(),
            disk_reads: AtomicU64::default(),
        })
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    fn sender(&self) -> Result<mpsc::Sender<WriteOp>, StorageError> {
        self.tx
            .lock()
            .map_err(|_| StorageError::Closed)?
            .clone()
            .ok_or(StorageError::Closed)
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StorageError>>) -> WriteOp,
    ) -> Result<T, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(op(reply))
            .await
            .map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DB) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let db = self.db.get()?;
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StorageError::Corrupt(format!("reader task failed: {e}")))?
    }

    /// A read that `f` first tries on this thread from memory only (the memtables and the block
    /// cache: [`rocksdb::ReadTier::BlockCache`], where a read that would touch a file fails as
    /// `Incomplete`), and only if that fails again on a blocking thread with every tier. What a
    /// runner or a status call reads was mostly written moments ago: the hand-off to a
    /// blocking thread and back cost more than the read (a status sweep over 1 000
    /// subscriptions made two per subscription). It runs on an async worker, so only a
    /// `small` read (a point read, at most [`INLINE_READ_MAX`] messages and
    /// [`INLINE_READ_BYTES`]) is tried there.
    async fn read_fast<T: Send + 'static>(
        &self,
        small: bool,
        f: impl Fn(&DB, rocksdb::ReadTier) -> Result<T, ReadFail> + Send + 'static,
    ) -> Result<T, StorageError> {
        let db = self.db.get()?;
        if small {
            match f(&db, rocksdb::ReadTier::BlockCache) {
                Ok(v) => return Ok(v),
                Err(ReadFail::Storage(e)) => return Err(e),
                Err(ReadFail::NotInMemory) => {}
            }
        }
        drop(db);
        self.disk_reads.fetch_add(1, Ordering::Relaxed);
        self.blocking(move |db| {
            f(db, rocksdb::ReadTier::All).map_err(|e| match e {
                ReadFail::Storage(e) => e,
                ReadFail::NotInMemory => {
                    StorageError::Backend("a read of every tier came back incomplete".into())
                }
            })
        })
        .await
    }
}

/// Why a [`RocksStorage::read_fast`] attempt failed: the data is not in memory (read again
/// from disk), or an error to report.
enum ReadFail {
    NotInMemory,
    Storage(StorageError),
}

impl From<rocksdb::Error> for ReadFail {
    fn from(e: rocksdb::Error) -> Self {
        match e.kind() {
            rocksdb::ErrorKind::Incomplete => ReadFail::NotInMemory,
            _ => ReadFail::Storage(e.into()),
        }
    }
}

impl From<StorageError> for ReadFail {
    fn from(e: StorageError) -> Self {
        ReadFail::Storage(e)
    }
}

/// Read options for `tier`, iterating below `prefix`'s end when given.
fn read_options(tier: rocksdb::ReadTier, prefix: Option<&[u8]>) -> rocksdb::ReadOptions {
    let mut opts = match prefix {
        Some(p) => bounded_by(p),
        None => rocksdb::ReadOptions::default(),
    };
    opts.set_read_tier(tier);
    opts
}

impl RocksStorage {
    /// The store time of the message at `low`, if a retention search found it (see the
    /// `oldest` field).
    fn oldest_stored_at(&self, topic: &str, queue: u32, low: u64) -> Option<u64> {
        let oldest = self.oldest.lock().ok()?;
        let (offset, stored_at) = *oldest.get(topic)?.get(&queue)?;
        (offset == low).then_some(stored_at)
    }

    /// Counts `deleted` bytes against `topic` and, past [`COMPACT_AFTER_BYTES`] and the bytes
    /// the topic still stores, compacts the topic's message keys on a background thread: range
    /// deletions free disk only when compaction meets them, and with writes that stopped none
    /// would.
    fn reclaim(&self, topic: &str, deleted: u64) {
        let stored: u64 = self
            .bytes
            .read()
            .map(|b| b.get(topic).map_or(0, |q| q.iter().sum()))
            .unwrap_or(0);
        let Ok(mut running) = self.compaction.lock() else {
            return;
        };
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut pending) = self.deleted_since_compaction.lock() else {
            return;
        };
        let d = pending.entry(topic.to_string()).or_default();
        *d = d.saturating_add(deleted);
        // One at a time: the next truncation starts the next one.
        if *d < COMPACT_AFTER_BYTES.max(stored)
            || running.as_ref().is_some_and(|h| !h.is_finished())
        {
            return;
        }
        let Ok(db) = self.db.get() else {
            return;
        };
        *d = 0;
        let (from, to) = (
            keys::queue_prefix(topic, 0),
            keys::queue_prefix(topic, u32::MAX),
        );
        *running = std::thread::Builder::new()
            .name("wasmq-compact".into())
            .spawn(move || {
                if let Ok(messages) = cf(&db, CF_MESSAGES) {
                    db.compact_range_cf(messages, Some(from), Some(to));
                }
            })
            .ok();
    }
}

impl Drop for RocksStorage {
    /// Stops the writer before the database handle goes: a writer thread still holding the DB
    /// while the process exits would race RocksDB's own teardown.
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.writer.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
        if let Some(handle) = self.compaction.lock().ok().and_then(|mut c| c.take()) {
            let _ = handle.join();
        }
    }
}

/// Read options of an iterator over the keys that start with `prefix`: it stops at the
/// prefix's end, where without a bound it would step over every deleted key up to the next
/// live one (100 000 moved transactions made listing an empty space 20 times slower).
fn bounded_by(prefix: &[u8]) -> rocksdb::ReadOptions {
    let mut opts = rocksdb::ReadOptions::default();
    if let Some(end) = keys::prefix_end(prefix) {
        opts.set_iterate_upper_bound(end);
    }
    opts
}

/// Opens (or creates) the database under `dir` with its column families. Compactions of the
/// id and key indexes drop entries that point below their queue's low water (`low_water`, as
/// readers see it): retention deletes a range of messages with one `DeleteRange`, and their
/// index entries go with the next compaction that meets them, without a delete per message.
fn open_db(dir: &Path, low_water: &Arc<RwLock<HighWater>>) -> Result<DB, StorageError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    // After a crash the WAL is replayed at open: cap it, so the memtables it holds are written
    // out once it passes 64 MiB and no restart replays more (the default, four times all write
    // buffers, replayed for seconds).
    opts.set_max_total_wal_size(MAX_WAL_BYTES);
    // Open without reading every table file's statistics (compaction's size estimates start
    // from what later reads see): an open then costs the same with 1 or 1 000 files.
    opts.set_skip_stats_update_on_db_open(true);
    // An open loads the handles of up to 16 table files per column family, by default on 16
    // threads it starts and joins for each family: ~90 thread starts per open. Two threads
    // halve the open (endurance bench, 1 M messages stored: 10-13 ms -> 5-7 ms; empty too).
    opts.set_max_file_opening_threads(2);
    // A bounded share of the process's file descriptors (see `crate::fds`): with the default
    // (-1) table files alone could take every descriptor.
    opts.set_max_open_files(crate::fds::STORAGE_OPEN_FILES as i32);
    // Write SST and WAL data out in 1 MiB steps: a memtable flush then never dumps tens of
    // MiB of dirty pages at once, which would stall the WAL fsync acknowledged publishes wait on.
    opts.set_bytes_per_sync(1 << 20);
    opts.set_wal_bytes_per_sync(1 << 20);
    // RocksDB's own info log: a new file per open, and by default 1 000 old ones kept
    // (~110 KB each), so the data dir grew with every restart. Bounded: at most
    // INFO_LOG_FILES files of at most INFO_LOG_BYTES each.
    opts.set_keep_log_file_num(INFO_LOG_FILES);
    opts.set_max_log_file_size(INFO_LOG_BYTES);
    let cfs = COLUMN_FAMILIES.iter().map(|name| {
        let mut cf = Options::default();
        if *name == CF_MESSAGES {
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
        }
        if *name == CF_RECORDS {
            // Records are deleted all the time (timers when they fire, transactions when they
            // move, expired dead letters): a table file where half of any 128 entries are
            // deletions is compacted, so listing a space does not step over their tombstones
            // until compaction happens to meet them. By that window only, not by a file's
            // share of deletions (ratio 0): the few records every stop writes and deletes
            // (this node's registration) made each stop's small flushed file "half
            // deletions", and its compaction rewrote the overlapping table files, megabytes
            // after 100 000 transactions, in the first 100 ms of every start.
            cf.add_compact_on_deletion_collector_factory(128, 64, 0.0);
            // What no compaction meets is rewritten after a day, alone if it is at the bottom:
            // a stop's small file of records written and deleted (a node registered under a
            // new id each start sorts after every other) is then dropped instead of kept as
            // one more table file per restart.
            cf.set_periodic_compaction_seconds(RECORDS_PERIODIC_COMPACTION.as_secs());
        }
        if *name == CF_BLOBS {
            cf.set_enable_blob_files(true);
            cf.set_min_blob_size(4096);
        }
        if *name == CF_IDS || *name == CF_KEYS {
            let low = low_water.clone();
            let ids = *name == CF_IDS;
            cf.set_compaction_filter(
                "wasmq-below-low-water",
                move |_, key: &[u8], value: &[u8]| {
                    // An id entry's value is its message's key; a key entry names it itself.
                    let target = if ids {
                        keys::parse_message(value).ok()
                    } else {
                        keys::parse_business_key(key).ok()
                    };
                    let below = target.is_some_and(|(topic, queue, offset)| {
                        low.read()
                            .is_ok_and(|l| offset < queue_value(&l, &topic, queue))
                    });
                    if below {
                        rocksdb::compaction_filter::Decision::Remove
                    } else {
                        rocksdb::compaction_filter::Decision::Keep
                    }
                },
            );
        }
        ColumnFamilyDescriptor::new(*name, cf)
    });
    Ok(DB::open_cf_descriptors(&opts, dir, cfs)?)
}

/// The last record revision handed out (0 in a new database).
fn read_last_revision(db: &DB) -> Result<u64, StorageError> {
    match db.get(LAST_REVISION)? {
        Some(v) => {
            Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(
                |_| StorageError::Corrupt("bad revision counter".into()),
            )?))
        }
        None => Ok(0),
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(name)
        .ok_or_else(|| StorageError::Corrupt(format!("column family {name} missing")))
}

/// A stored value is the message (MessagePack) followed by the time it was stored (8 bytes, big
/// endian, ms since the epoch); values written before store times existed end with the
/// message, and read their birth time as store time.
fn decode_message(key: &[u8], value: &[u8]) -> Result<StoredMessage, StorageError> {
    let (topic, queue, offset) = keys::parse_message(key)?;
    let corrupt = |e: &dyn std::fmt::Display| {
        StorageError::Corrupt(format!("message {topic}/{queue}/{offset}: {e}"))
    };
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(value));
    let mut message: NewMessage =
        serde::Deserialize::deserialize(&mut de).map_err(|e| corrupt(&e))?;
    let end = usize::try_from(de.position()).map_err(|e| corrupt(&e))?;
    let stored_at = match value.get(end..) {
        Some([]) | None => message.born_at,
        Some(trailer) => {
            u64::from_be_bytes(trailer.try_into().map_err(|_| corrupt(&"bad store time"))?)
        }
    };
    message.queue = queue;
    Ok(StoredMessage {
        topic,
        offset,
        stored_at,
        message,
    })
}

fn get_message_at(db: &DB, location: &[u8]) -> Result<Option<StoredMessage>, StorageError> {
    match db.get_cf(cf(db, CF_MESSAGES)?, location)? {
        Some(v) => decode_message(location, &v).map(Some),
        None => Ok(None),
    }
}

fn current_revision(db: &DB, key: &[u8]) -> Result<Option<u64>, StorageError> {
    match db.get_cf(cf(db, CF_RECORDS)?, key)? {
        Some(v) => Ok(Some(keys::parse_record_value(&v)?.0)),
        None => Ok(None),
    }
}

/// Whether RocksDB takes a write after a group commit failed: a background error (a WAL or
/// table file that could not be created, a full disk) refuses every write until a reopen.
fn still_writable(db: &DB) -> bool {
    db.put(PROBE, []).is_ok()
}

/// Every truncated queue's low water, from its marker.
fn recover_low_water(db: &DB) -> Result<HighWater, StorageError> {
    Ok(marker_table(&read_queue_markers(
        db,
        keys::LOW_WATER_PREFIX,
        "low-water",
    )?))
}

/// The per-queue markers (big-endian u64 values) under `prefix` of the default CF.
fn read_queue_markers(
    db: &DB,
    prefix: &[u8],
    what: &str,
) -> Result<Vec<QueueMarker>, StorageError> {
    let mut out = Vec::new();
    for item in db.iterator_opt(
        IteratorMode::From(prefix, Direction::Forward),
        bounded_by(prefix),
    ) {
        let (k, v) = item?;
        if !k.starts_with(prefix) {
            break;
        }
        out.push((keys::parse_queue_marker(prefix, &k)?, be_u64(&v, what)?));
    }
    Ok(out)
}

/// Markers as a per-topic table (absent queues read 0).
fn marker_table(markers: &[QueueMarker]) -> HighWater {
    let mut out = HighWater::new();
    for ((topic, queue), v) in markers {
        set_queue(&mut out, topic, *queue, *v);
    }
    out
}

/// Every queue's stored bytes, from its marker. A queue with messages but no marker (written
/// before markers existed) is summed once here; its marker is written with its next change.
fn recover_queue_bytes(
    db: &DB,
    high: &HighWater,
    low: &HighWater,
) -> Result<HighWater, StorageError> {
    let markers = read_queue_markers(db, keys::QUEUE_BYTES_PREFIX, "stored-bytes")?;
    let mut out = marker_table(&markers);
    let marked: std::collections::HashSet<&(String, u32)> =
        markers.iter().map(|(q, _)| q).collect();
    for (topic, queues) in high {
        for (queue, hw) in (0u32..).zip(queues) {
            let lw = queue_value(low, topic, queue);
            if !marked.contains(&(topic.clone(), queue)) && *hw > lw {
                let sum = range_bytes(db, topic, queue, lw, *hw)?;
                set_queue(&mut out, topic, queue, sum);
            }
        }
    }
    Ok(out)
}

/// The bytes messages `from..to` of a queue take: one forward scan of their keys and values.
fn range_bytes(db: &DB, topic: &str, queue: u32, from: u64, to: u64) -> Result<u64, StorageError> {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(keys::message(topic, queue, to));
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_MESSAGES)?, opts);
    it.seek(keys::message(topic, queue, from));
    let mut sum = 0u64;
    while let Some(v) = it.value() {
        sum = sum.saturating_add(v.len() as u64);
        it.next();
    }
    it.status()?;
    Ok(sum)
}

fn be_u64(v: &[u8], what: &str) -> Result<u64, StorageError> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| {
        StorageError::Corrupt(format!("bad {what} value"))
    })?))
}

fn set_queue(map: &mut HighWater, topic: &str, queue: u32, value: u64) {
    let queues = map.entry(topic.to_string()).or_default();
    if queues.len() <= queue as usize {
        queues.resize(queue as usize + 1, 0);
    }
    queues[queue as usize] = value;
}

fn queue_value(map: &HighWater, topic: &str, queue: u32) -> u64 {
    map.get(topic)
        .and_then(|q| q.get(queue as usize))
        .copied()
        .unwrap_or(0)
}

/// Finds the last offset of every (topic, queue) with two seeks per queue, and the latest store
/// time among those last messages (store times never go back, even if the clock does). A queue
/// retention emptied keeps its high water through its low-water marker: offsets are not reused.
///
/// Below a queue's low water every message was deleted by a range deletion (retention, topic
/// deletion), whose keys stay in table files until compaction meets them; an iterator that
/// lands in such a range steps over every deleted key (a reseek per range deletion). So the
/// scan runs over the gaps between those ranges only, each bounded by them, and never enters
/// one: after 100 000 transactions whose messages retention then deleted, the step over them
/// was a third of an open.
/// `low` is the low water of every queue ([`recover_low_water`]).
fn recover_high_water(db: &DB, low: &HighWater) -> Result<(HighWater, u64), StorageError> {
    let mut out = low.clone();
    let mut deleted: Vec<(Vec<u8>, Vec<u8>)> = low
        .iter()
        .flat_map(|(topic, queues)| {
            (0u32..)
                .zip(queues)
                .filter(|(_, l)| **l > 0)
                .map(|(queue, l)| {
                    (
                        keys::message(topic, queue, 0),
                        keys::message(topic, queue, *l),
                    )
                })
        })
        .collect();
    deleted.sort();
    let mut latest = 0u64;
    let mut from = None;
    for (start, end) in deleted {
        scan_last_offsets(db, from.replace(end), Some(start), &mut out, &mut latest)?;
    }
    scan_last_offsets(db, from, None, &mut out, &mut latest)?;
    Ok((out, latest))
}

/// [`recover_high_water`]'s scan of the message keys in `[lower, upper)`.
fn scan_last_offsets(
    db: &DB,
    lower: Option<Vec<u8>>,
    upper: Option<Vec<u8>>,
    out: &mut HighWater,
    latest: &mut u64,
) -> Result<(), StorageError> {
    let mut opts = rocksdb::ReadOptions::default();
    if let Some(lower) = lower {
        opts.set_iterate_lower_bound(lower);
    }
    if let Some(upper) = upper {
        opts.set_iterate_upper_bound(upper);
    }
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_MESSAGES)?, opts);
    it.seek_to_first();
    while let Some(key) = it.key() {
        let (topic, queue, _) = keys::parse_message(key)?;
        // A target past the upper bound seeks for the last key below it.
        it.seek_for_prev(keys::message(&topic, queue, u64::MAX));
        let last = match (it.key(), it.value()) {
            (Some(k), Some(v)) => {
                *latest = (*latest).max(decode_message(k, v)?.stored_at);
                keys::parse_message(k)?.2
            }
            _ => {
                // An unreadable table file ends the iterator too: say so, not that it vanished.
                it.status()?;
                return Err(StorageError::Corrupt(
                    "queue vanished during recovery".into(),
                ));
            }
        };
        set_queue(out, &topic, queue, last + 1);
        match queue.checked_add(1) {
            Some(next) => it.seek(keys::queue_prefix(&topic, next)),
            None => it.seek(keys::message(&topic, u32::MAX, u64::MAX)),
        }
        if queue == u32::MAX {
            it.next();
        }
    }
    it.status()?;
    Ok(())
}

#[async_trait]
impl Storage for RocksStorage {
    async fn append(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StorageError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let topic = topic.to_string();
        let messages = encode_all(&messages)?;
        self.submit(|reply| WriteOp::Append {
            topic,
            messages,
            guard: None,
            reply,
        })
        .await
        .map(|(a, _)| a)
    }

    async fn append_guarded(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        guard: RecordWrite,
    ) -> Result<(Vec<Appended>, u64), StorageError> {
        let topic = topic.to_string();
        let messages = encode_all(&messages)?;
        let (appended, rev) = self
            .submit(|reply| WriteOp::Append {
                topic,
                messages,
                guard: Some(guard),
                reply,
            })
            .await?;
        Ok((appended, rev.unwrap_or(0)))
    }

    async fn commit(&self, commit: Commit) -> Result<Committed, StorageError> {
        let appends = commit
            .appends
            .iter()
            .map(|(topic, messages)| Ok((topic.clone(), encode_all(messages)?)))
            .collect::<Result<Vec<_>, StorageError>>()?;
        self.submit(|reply| WriteOp::Commit {
            checks: commit.checks,
            records: commit.records,
            appends,
            reply,
        })
        .await
    }

    async fn delete_records_before(&self, space: &str, before: &str) -> Result<(), StorageError> {
        let (space, before) = (space.to_string(), before.to_string());
        self.submit(|reply| WriteOp::DeleteRecords {
            space,
            before,
            reply,
        })
        .await
        .map(drop)
    }

    /// One write for all of them (they land together, though nothing needs them to).
    async fn put_records(&self, records: Vec<RecordWrite>) -> Result<(), StorageError> {
        self.commit(Commit {
            records,
            ..Commit::default()
        })
        .await
        .map(drop)
    }

    /// One atomic write: every reader sees all of them or none.
    async fn put_records_in_order(&self, records: Vec<RecordWrite>) -> Result<(), StorageError> {
        self.put_records(records).await
    }

    async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let end = self.high_water(topic, queue).await?;
        let from = from.max(self.low_water(topic, queue).await?);
        if from >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let (start, prefix) = (
            keys::message(topic, queue, from),
            keys::queue_prefix(topic, queue),
        );
        self.read_fast(limit <= INLINE_READ_MAX, move |db, tier| {
            let inline = tier == rocksdb::ReadTier::BlockCache;
            let (mut out, mut bytes) = (Vec::new(), 0usize);
            let mut iter = db.iterator_cf_opt(
                cf(db, CF_MESSAGES)?,
                read_options(tier, Some(&prefix)),
                IteratorMode::From(&start, Direction::Forward),
            );
            // The iterator steps to the next key as it hands one out: asked once more after
            // the last wanted message, it would report that key's block missing from memory
            // and send a whole batch read from memory to a blocking thread again.
            while out.len() < limit {
                let Some(item) = iter.next() else { break };
                let (k, v) = item?;
                if !k.starts_with(&prefix) {
                    break;
                }
                bytes = bytes.saturating_add(v.len());
                if inline && bytes > INLINE_READ_BYTES {
                    return Err(ReadFail::NotInMemory);
                }
                let m = decode_message(&k, &v)?;
                if m.offset >= end {
                    break;
                }
                let last = m.offset.saturating_add(1) >= end;
                out.push(m);
                if last {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn message_by_id(&self, id: MessageId) -> Result<Option<StoredMessage>, StorageError> {
        self.blocking(move |db| match db.get_cf(cf(db, CF_IDS)?, keys::id(&id))? {
            Some(location) => get_message_at(db, &location),
            None => Ok(None),
        })
        .await
    }

    async fn messages_by_key(
        &self,
        topic: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let (topic, prefix) = (topic.to_string(), keys::business_key_prefix(topic, key));
        self.blocking(move |db| {
            let mut out = Vec::new();
            let iter = db.iterator_cf_opt(
                cf(db, CF_KEYS)?,
                bounded_by(&prefix),
                IteratorMode::From(&prefix, Direction::Forward),
            );
            for item in iter {
                let (k, _) = item?;
                if !k.starts_with(&prefix) || out.len() >= limit {
                    break;
                }
                let (queue, offset) = keys::parse_business_key_tail(&k)?;
                if let Some(m) = get_message_at(db, &keys::message(&topic, queue, offset))? {
                    out.push(m);
                }
            }
            Ok(out)
        })
        .await
    }

    fn backend_name(&self) -> &'static str {
        "rocksdb"
    }

    fn watch(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        self.watchers.subscribe(topic)
    }

    async fn high_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        let map = self.high_water.read().map_err(|_| StorageError::Closed)?;
        Ok(queue_value(&map, topic, queue))
    }

    async fn low_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        let map = self.low_water.read().map_err(|_| StorageError::Closed)?;
        Ok(queue_value(&map, topic, queue))
    }

    /// One `DeleteRange` over the queue's message keys, the new low-water marker and stored
    /// bytes, in one write batch through the writer thread (so it is ordered with appends). The
    /// range's bytes are summed first by a reader thread (messages below the high water never
    /// change), so the writer never scans.
    async fn truncate(&self, topic: &str, queue: u32, before: u64) -> Result<u64, StorageError> {
        // Two truncations of one queue racing: the loser sums its range again.
        for _ in 0..8 {
            let low = self.low_water(topic, queue).await?;
            let before = before.min(self.high_water(topic, queue).await?);
            if before <= low {
                return Ok(low);
            }
            let t = topic.to_string();
            let range = self
                .blocking(move |db| range_bytes(db, &t, queue, low, before))
                .await?;
            let owned = topic.to_string();
            match self
                .submit(|reply| WriteOp::Truncate {
                    topic: owned,
                    queue,
                    from: low,
                    before,
                    range_bytes: range,
                    reply,
                })
                .await
            {
                Err(StorageError::Conflict { .. }) => continue,
                Ok(new_low) => {
                    // Table files wholly inside the deleted range go now, as a log segment
                    // would; what shares a file with kept messages goes at its compaction.
                    // RocksDB's range includes its end: it ends at the last deleted offset.
                    if let Some(last) = new_low.checked_sub(1).filter(|l| *l >= low) {
                        let (from, to) = (
                            keys::message(topic, queue, low),
                            keys::message(topic, queue, last),
                        );
                        self.blocking(move |db| {
                            db.delete_file_in_range_cf(cf(db, CF_MESSAGES)?, from, to)?;
                            Ok(())
                        })
                        .await?;
                    }
                    self.reclaim(topic, range);
                    // This queue's remembered offset, once the low water passed it, can never
                    // match it again (an emptied queue, as a deleted topic's, leaves none).
                    // The topic's other queues keep theirs.
                    if let Ok(mut oldest) = self.oldest.lock()
                        && let Some(queues) = oldest.get_mut(topic)
                    {
                        if queues
                            .get(&queue)
                            .is_some_and(|(offset, _)| *offset < new_low)
                        {
                            queues.remove(&queue);
                        }
                        if queues.is_empty() {
                            oldest.remove(topic);
                        }
                    }
                    return Ok(new_low);
                }
                Err(e) => return Err(e),
            }
        }
        Err(StorageError::Unavailable(format!(
            "queue {topic}/{queue} kept being truncated by someone else"
        )))
    }

    async fn extent(&self, topic: &str, queue: u32) -> Result<QueueExtent, StorageError> {
        let bytes = {
            let map = self.bytes.read().map_err(|_| StorageError::Closed)?;
            queue_value(&map, topic, queue)
        };
        Ok(QueueExtent {
            low_water: self.low_water(topic, queue).await?,
            high_water: self.high_water(topic, queue).await?,
            bytes,
        })
    }

    /// Age: a binary search over the queue's store times (they never decrease along offsets),
    /// a point read per step. Size: a forward scan from the low water, summing value sizes
    /// until what is left fits.
    async fn retention_cut(
        &self,
        topic: &str,
        queue: u32,
        limits: QueueLimits,
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        let ext = self.extent(topic, queue).await?;
        let (low, high) = (ext.low_water, ext.high_water);
        if low >= high {
            return Ok(low);
        }
        let keep_after = limits.max_age_ms.and_then(|age| now_ms.checked_sub(age));
        let over = limits
            .max_bytes
            .map_or(0, |max| ext.bytes.saturating_sub(max));
        if keep_after.is_none() && over == 0 {
            return Ok(low);
        }
        if over == 0
            && let Some(t) = keep_after
            && self
                .oldest_stored_at(topic, queue, low)
                .is_some_and(|s| s >= t)
        {
            return Ok(low);
        }
        self.stats.retention_scans.fetch_add(1, Ordering::Relaxed);
        let owned = topic.to_string();
        let (cut, first_kept) = self
            .blocking(move |db| {
                let topic = owned;
                let mut cut = low;
                if let Some(t) = keep_after {
                    // First offset stored at or after `t`; messages deleted meanwhile read as old.
                    let (mut lo, mut hi) = (low, high);
                    while lo < hi {
                        let mid = lo + (hi - lo) / 2;
                        let old = match get_message_at(db, &keys::message(&topic, queue, mid))? {
                            Some(m) => m.stored_at < t,
                            None => true,
                        };
                        if old {
                            lo = mid + 1;
                        } else {
                            hi = mid;
                        }
                    }
                    cut = lo;
                }
                if over > 0 {
                    let mut opts = rocksdb::ReadOptions::default();
                    opts.set_iterate_upper_bound(keys::message(&topic, queue, high));
                    let mut it = db.raw_iterator_cf_opt(cf(db, CF_MESSAGES)?, opts);
                    it.seek(keys::message(&topic, queue, low));
                    let mut freed = 0u64;
                    let mut next = low;
                    while freed < over {
                        let (Some(k), Some(v)) = (it.key(), it.value()) else {
                            break;
                        };
                        freed = freed.saturating_add(v.len() as u64);
                        next = keys::parse_message(k)?.2 + 1;
                        it.next();
                    }
                    it.status()?;
                    cut = cut.max(next);
                }
                // The store time of the first message kept: no age cut is due before it ages.
                let first_kept = if cut < high {
                    get_message_at(db, &keys::message(&topic, queue, cut))?
                        .map(|m| (cut, m.stored_at))
                } else {
                    None
                };
                Ok((cut, first_kept))
            })
            .await?;
        if let (Some(kept), Ok(mut oldest)) = (first_kept, self.oldest.lock()) {
            oldest
                .entry(topic.to_string())
                .or_default()
                .insert(queue, kept);
        }
        Ok(cut)
    }

    async fn get_record(&self, space: &str, key: &str) -> Result<Option<Record>, StorageError> {
        let k = keys::record(space, key);
        self.read_fast(true, move |db, tier| {
            match db.get_pinned_cf_opt(cf(db, CF_RECORDS)?, &k, &read_options(tier, None))? {
                Some(v) => {
                    let (revision, payload) = keys::parse_record_value(&v)?;
                    Ok(Some(Record {
                        revision,
                        value: payload.to_vec(),
                    }))
                }
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_records(
        &self,
        space: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        self.list_records_after(space, prefix, "", limit).await
    }

    async fn list_records_after(
        &self,
        space: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        let (space, prefix) = (space.to_string(), keys::record(space, prefix));
        // Every key sorts after "" (the empty key too).
        let after = (!after.is_empty()).then(|| keys::record(&space, after));
        self.blocking(move |db| {
            let mut out = Vec::new();
            let start = after.as_ref().filter(|a| **a > prefix).unwrap_or(&prefix);
            let iter = db.iterator_cf_opt(
                cf(db, CF_RECORDS)?,
                bounded_by(&prefix),
                IteratorMode::From(start, Direction::Forward),
            );
            for item in iter {
                let (k, v) = item?;
                if !k.starts_with(&prefix) || out.len() >= limit {
                    break;
                }
                if after.as_ref().is_some_and(|a| *k <= **a) {
                    continue;
                }
                let (revision, payload) = keys::parse_record_value(&v)?;
                out.push((
                    keys::parse_record_key(&space, &k)?.to_string(),
                    Record {
                        revision,
                        value: payload.to_vec(),
                    },
                ));
            }
            Ok(out)
        })
        .await
    }

    async fn put_record(
        &self,
        space: &str,
        key: &str,
        value: Option<Vec<u8>>,
        expect: Expect,
    ) -> Result<u64, StorageError> {
        let (space, key) = (space.to_string(), key.to_string());
        self.submit(|reply| WriteOp::PutRecord {
            space,
            key,
            value,
            expect,
            reply,
        })
        .await
    }

    async fn put_blob(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), StorageError> {
        let key = key.to_string();
        self.submit(|reply| WriteOp::PutBlob { key, value, reply })
            .await
            .map(drop)
    }

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let key = key.as_bytes().to_vec();
        self.blocking(move |db| Ok(db.get_cf(cf(db, CF_BLOBS)?, &key)?))
            .await
    }

    fn register_metrics(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "wasmq_storage_group_commit_ops",
            "Writes (appends, record updates) carried by one RocksDB group commit",
            self.stats.group_ops.clone(),
        );
        r.register(
            "wasmq_storage_commit_seconds",
            "Time of one group commit's write, fsync included in sync mode",
            self.stats.commit_seconds.clone(),
        );
        // Compaction debt, read at scrape time (in-memory properties, no I/O): what RocksDB still
        // has to rewrite after a burst of writes or deletions, and what it is rewriting now.
        let Ok(db) = self.db.get() else { return };
        let property = |name: &str| -> i64 {
            COLUMN_FAMILIES
                .iter()
                .filter_map(|family| db.cf_handle(family))
                .filter_map(|h| db.property_int_value_cf(&h, name).ok().flatten())
                .fold(0u64, u64::saturating_add)
                .try_into()
                .unwrap_or(i64::MAX)
        };
        let pending = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        pending.set(property("rocksdb.estimate-pending-compaction-bytes"));
        r.register(
            "wasmq_storage_compaction_pending_bytes",
            "Bytes RocksDB estimates its compactions must still rewrite to bring every level within its target size (compaction debt)",
            pending,
        );
        // Where the data dir's bytes are, by column family (the default family holds the
        // writer's markers): the live table files, the live blob files and the memtables, so
        // a data dir larger than its retention allows can be told apart (deleted ranges that
        // wait for compaction stay in the live table files until it drops them).
        let stored =
            Family::<StoredLabel, prometheus_client::metrics::gauge::Gauge<i64>>::default();
        for family in std::iter::once("default").chain(COLUMN_FAMILIES) {
            let Some(handle) = db.cf_handle(family) else {
                continue;
            };
            for (part, name) in [
                ("tables", "rocksdb.live-sst-files-size"),
                ("blobs", "rocksdb.live-blob-file-size"),
                ("memtables", "rocksdb.cur-size-all-mem-tables"),
            ] {
                let bytes = db.property_int_value_cf(&handle, name).ok().flatten();
                stored
                    .get_or_create(&StoredLabel { family, part })
                    .set(bytes.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
            }
        }
        r.register(
            "wasmq_storage_bytes",
            "Bytes RocksDB holds, by column family (messages, their id and key indexes, records, blobs, default: the writer's markers) and part (tables: live table files, deleted ranges included until compaction drops them; blobs: live blob files; memtables: in memory, also in the WAL)",
            stored,
        );
        let running = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        running.set(
            db.property_int_value("rocksdb.num-running-compactions")
                .ok()
                .flatten()
                .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)),
        );
        r.register(
            "wasmq_storage_compactions_running",
            "RocksDB compactions running now",
            running,
        );
    }

    async fn close(&self) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        // Dropping the last sender lets the writer drain what was accepted, then exit.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // After the writer: a truncation it answered last may have started one. None starts
        // after this (`reclaim` looks at `closing` under the same lock).
        let compaction = self.compaction.lock().ok().and_then(|mut c| c.take());
        if let Some(handle) = compaction {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // In async mode the WAL may not be on disk yet; a clean stop makes it so. The memtables
        // are written out too, so the next open has no WAL to replay: replay, not the data's
        // size, is what a restart waits on (1.4 s after 1 M messages in the endurance bench).
        match self.db.get() {
            Ok(db) => {
                if let Err(e) = db.flush_wal(true) {
                    tracing::warn!(error = %e, "flushing the WAL on close failed");
                }
                let flushed = tokio::task::spawn_blocking(move || {
                    let handles: Vec<_> = COLUMN_FAMILIES
                        .iter()
                        .filter_map(|name| db.cf_handle(name))
                        .collect();
                    db.flush_cfs_opt(&handles, &rocksdb::FlushOptions::default())?;
                    // The default family holds the writer's markers (last revision, stored
                    // bytes per queue): unflushed, it would keep the WAL alive.
                    db.flush()?;
                    // The compactions those flushes call for run now, not in the first
                    // seconds of the next start, where they would share the cores with it.
                    let mut wait = rocksdb::WaitForCompactOptions::default();
                    wait.set_timeout(CLOSE_COMPACTION_WAIT.as_micros() as u64);
                    db.wait_for_compact(&wait)
                })
                .await;
                if let Ok(Err(e)) = flushed {
                    tracing::warn!(error = %e, "writing the memtables out on close failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "closing storage that is not open"),
        }
        // Closed now, not when the last handle drops: a task that still holds the storage
        // would keep the data dir locked (every later call of it answers `Closed`).
        let slot = self.db.clone();
        if tokio::task::spawn_blocking(move || slot.close_for_good())
            .await
            .is_err()
        {
            tracing::warn!("closing the database failed");
        }
    }
}
