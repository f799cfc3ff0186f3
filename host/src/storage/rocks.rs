//! The embedded RocksDB backend: column families, a single writer thread that group-commits
//! every write (one WriteBatch and one fsync for all writes that arrive together), and recovery
//! of per-queue high-water offsets on open and after an I/O error (the database is reopened
//! behind its readers, so running out of descriptors or disk for a moment costs 503s, not a
//! restart).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, Expect, MessageId, NewMessage, Record, RecordWrite, Storage, StorageError,
    StoredMessage, Watchers, keys,
};
use crate::config::FlushMode;

const CF_MESSAGES: &str = "messages";
const CF_IDS: &str = "ids";
const CF_KEYS: &str = "keys";
const CF_RECORDS: &str = "records";
/// Large values (plugin code, compiled artifacts), kept in RocksDB's blob files.
const CF_BLOBS: &str = "blobs";
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
}

impl Default for WriterStats {
    fn default() -> Self {
        Self {
            commits: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            group_ops: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            commit_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 22)),
        }
    }
}

type HighWater = HashMap<String, Vec<u64>>;

pub struct RocksStorage {
    db: Arc<Slot>,
    tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    high_water: Arc<RwLock<HighWater>>,
    watchers: Arc<Watchers>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<WriterStats>,
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

enum WriteOp {
    Append {
        topic: String,
        messages: Vec<Encoded>,
        /// A record write that must succeed for the append to happen (and happens with it).
        guard: Option<RecordWrite>,
        reply: oneshot::Sender<Result<AppendResult, StorageError>>,
    },
    PutBlob {
        key: String,
        value: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
    PutRecord {
        space: String,
        key: String,
        value: Option<Vec<u8>>,
        expect: Expect,
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
}

impl WriteOp {
    /// Answers the op with `e` without writing it.
    fn refuse(self, e: StorageError) {
        let _ = match self {
            WriteOp::Append { reply, .. } => reply.send(Err(e)).map_err(drop),
            WriteOp::PutBlob { reply, .. } | WriteOp::PutRecord { reply, .. } => {
                reply.send(Err(e)).map_err(drop)
            }
        };
    }

    fn size(&self) -> usize {
        match self {
            WriteOp::Append { messages, .. } => messages.iter().map(|m| m.value.len() + 64).sum(),
            WriteOp::PutRecord { value, .. } | WriteOp::PutBlob { value, .. } => {
                value.as_ref().map_or(0, Vec::len) + 64
            }
        }
    }
}

impl RocksStorage {
    /// Opens (or creates) the database under `dir` and starts its writer thread.
    pub fn open(dir: &Path, flush: FlushMode) -> Result<Self, StorageError> {
        let db = Arc::new(open_db(dir)?);
        let (committed, last_stored_at) = recover_high_water(&db)?;
        let last_revision = read_last_revision(&db)?;
        let slot = Arc::new(Slot {
            dir: dir.to_path_buf(),
            db: RwLock::new(Some(db.clone())),
        });
        let high_water = Arc::new(RwLock::new(committed.clone()));
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
            watchers,
            writer: Mutex::new(Some(handle)),
            stats,
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
    }
}

/// Opens (or creates) the database under `dir` with its column families.
fn open_db(dir: &Path) -> Result<DB, StorageError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    // A bounded share of the process's file descriptors (see `crate::fds`): with the default
    // (-1) table files alone could take every descriptor.
    opts.set_max_open_files(crate::fds::STORAGE_OPEN_FILES as i32);
    // Write SST and WAL data out in 1 MiB steps: a memtable flush then never dumps tens of
    // MiB of dirty pages at once, which would stall the WAL fsync acknowledged publishes wait on.
    opts.set_bytes_per_sync(1 << 20);
    opts.set_wal_bytes_per_sync(1 << 20);
    let cfs = COLUMN_FAMILIES.iter().map(|name| {
        let mut cf = Options::default();
        if *name == CF_MESSAGES {
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
        }
        if *name == CF_BLOBS {
            cf.set_enable_blob_files(true);
            cf.set_min_blob_size(4096);
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

/// The open database, shared by the writer and readers. Empty while the writer reopens it: after
/// a failed WAL or table-file creation RocksDB stops taking writes (a background error) until the
/// database is closed and opened again, and it can only be opened once it is closed.
struct Slot {
    dir: PathBuf,
    db: RwLock<Option<Arc<DB>>>,
}

impl Slot {
    /// The database, or [`StorageError::Unavailable`] while it is being reopened.
    fn get(&self) -> Result<Arc<DB>, StorageError> {
        let guard = match self.db.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.clone().ok_or_else(|| {
            StorageError::Unavailable("reopening the database after an I/O error".into())
        })
    }

    /// Takes the database out (readers now get `Unavailable`) and closes it once the reads
    /// holding it have finished.
    fn close(&self) {
        let taken = match self.db.write() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(mut db) = taken else { return };
        let started = Instant::now();
        let mut warned = false;
        loop {
            match Arc::try_unwrap(db) {
                Ok(db) => {
                    drop(db);
                    return;
                }
                Err(held) => {
                    db = held;
                    if !warned && started.elapsed() > Duration::from_secs(5) {
                        tracing::warn!("reads still hold the database after 5 s; waiting");
                        warned = true;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn put(&self, db: Arc<DB>) {
        match self.db.write() {
            Ok(mut g) => *g = Some(db),
            Err(poisoned) => *poisoned.into_inner() = Some(db),
        }
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

/// Finds the last offset of every (topic, queue) with two seeks per queue, and the latest store
/// time among those last messages (store times never go back, even if the clock does).
fn recover_high_water(db: &DB) -> Result<(HighWater, u64), StorageError> {
    let mut out = HighWater::new();
    let mut latest = 0u64;
    let mut it = db.raw_iterator_cf(cf(db, CF_MESSAGES)?);
    it.seek_to_first();
    while let Some(key) = it.key() {
        let (topic, queue, _) = keys::parse_message(key)?;
        it.seek_for_prev(keys::message(&topic, queue, u64::MAX));
        let last = match (it.key(), it.value()) {
            (Some(k), Some(v)) => {
                latest = latest.max(decode_message(k, v)?.stored_at);
                keys::parse_message(k)?.2
            }
            _ => {
                return Err(StorageError::Corrupt(
                    "queue vanished during recovery".into(),
                ));
            }
        };
        let queues = out.entry(topic.clone()).or_default();
        if queues.len() <= queue as usize {
            queues.resize(queue as usize + 1, 0);
        }
        queues[queue as usize] = last + 1;
        match queue.checked_add(1) {
            Some(next) => it.seek(keys::queue_prefix(&topic, next)),
            None => it.seek(keys::message(&topic, u32::MAX, u64::MAX)),
        }
        if queue == u32::MAX {
            it.next();
        }
    }
    it.status()?;
    Ok((out, latest))
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

    async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let end = self.high_water(topic, queue).await?;
        if from >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let (start, prefix) = (
            keys::message(topic, queue, from),
            keys::queue_prefix(topic, queue),
        );
        self.blocking(move |db| {
            let mut out = Vec::new();
            let iter = db.iterator_cf(
                cf(db, CF_MESSAGES)?,
                IteratorMode::From(&start, Direction::Forward),
            );
            for item in iter {
                let (k, v) = item?;
                if !k.starts_with(&prefix) || out.len() >= limit {
                    break;
                }
                let m = decode_message(&k, &v)?;
                if m.offset >= end {
                    break;
                }
                out.push(m);
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
            let iter = db.iterator_cf(
                cf(db, CF_KEYS)?,
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

    fn watch(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        self.watchers.subscribe(topic)
    }

    async fn high_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        let map = self.high_water.read().map_err(|_| StorageError::Closed)?;
        Ok(map
            .get(topic)
            .and_then(|q| q.get(queue as usize))
            .copied()
            .unwrap_or(0))
    }

    async fn get_record(&self, space: &str, key: &str) -> Result<Option<Record>, StorageError> {
        let k = keys::record(space, key);
        self.blocking(move |db| match db.get_cf(cf(db, CF_RECORDS)?, &k)? {
            Some(v) => {
                let (revision, payload) = keys::parse_record_value(&v)?;
                Ok(Some(Record {
                    revision,
                    value: payload.to_vec(),
                }))
            }
            None => Ok(None),
        })
        .await
    }

    async fn list_records(
        &self,
        space: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        let (space, start) = (space.to_string(), keys::record(space, prefix));
        self.blocking(move |db| {
            let mut out = Vec::new();
            let iter = db.iterator_cf(
                cf(db, CF_RECORDS)?,
                IteratorMode::From(&start, Direction::Forward),
            );
            for item in iter {
                let (k, v) = item?;
                if !k.starts_with(&start) || out.len() >= limit {
                    break;
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
    }

    async fn close(&self) {
        // Dropping the last sender lets the writer drain what was accepted, then exit.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // In async mode the WAL may not be on disk yet; a clean stop makes it so.
        match self.db.get() {
            Ok(db) => {
                if let Err(e) = db.flush_wal(true) {
                    tracing::warn!(error = %e, "flushing the WAL on close failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "closing storage that is not open"),
        }
    }
}

/// The single writer: owns offset assignment and record revisions, so neither needs a lock.
struct Writer {
    slot: Arc<Slot>,
    /// The writer's handle on the open database; `None` after an I/O error until a reopen
    /// succeeds (tried again no sooner than `next_reopen`).
    db: Option<Arc<DB>>,
    next_reopen: Instant,
    sync: bool,
    committed: HighWater,
    shared: Arc<RwLock<HighWater>>,
    watchers: Arc<Watchers>,
    last_revision: u64,
    /// The store time given to the last group commit's messages: never decreasing, so every
    /// queue's store times are in offset order (what a reset to a time searches by).
    last_stored_at: u64,
    stats: Arc<WriterStats>,
}

/// What an append replies: where the messages went, and the guard record's new revision.
type AppendResult = (Vec<Appended>, Option<u64>);

enum Reply {
    Append(
        oneshot::Sender<Result<AppendResult, StorageError>>,
        AppendResult,
    ),
    Record(oneshot::Sender<Result<u64, StorageError>>, u64),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync);
        while let Some(first) = rx.blocking_recv() {
            // Everything that queued up while the last batch was being fsynced joins this one.
            let mut bytes = first.size();
            let mut ops = vec![first];
            while ops.len() < MAX_GROUP_OPS && bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op.size();
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            let db = match self.open() {
                Ok(db) => db,
                Err(e) => {
                    for op in ops {
                        op.refuse(e.clone());
                    }
                    continue;
                }
            };
            if self.commit_group(&db, ops, &wo) && !still_writable(&db) {
                drop(db);
                self.reopen();
            }
        }
    }

    /// The open database, reopening it first if an I/O error closed it (at most once per
    /// [`REOPEN_BACKOFF`]; until then writes are refused as `Unavailable`).
    fn open(&mut self) -> Result<Arc<DB>, StorageError> {
        if let Some(db) = &self.db {
            return Ok(db.clone());
        }
        if Instant::now() < self.next_reopen {
            return Err(StorageError::Unavailable(
                "the database could not be reopened after an I/O error; retrying".into(),
            ));
        }
        self.reopen();
        self.db.clone().ok_or_else(|| {
            StorageError::Unavailable(
                "the database could not be reopened after an I/O error".into(),
            )
        })
    }

    /// Closes the database and opens it again, recovering high water, revisions and store time
    /// from what is on disk (a group commit answered with an error may have reached the WAL, so
    /// the database, not the writer's memory, says what exists).
    fn reopen(&mut self) {
        self.db = None;
        self.slot.close();
        let opened = open_db(&self.slot.dir).and_then(|db| {
            let (committed, stored_at) = recover_high_water(&db)?;
            let revision = read_last_revision(&db)?;
            Ok((db, committed, stored_at, revision))
        });
        match opened {
            Ok((db, committed, stored_at, revision)) => {
                let db = Arc::new(db);
                self.last_revision = revision;
                self.last_stored_at = self.last_stored_at.max(stored_at);
                let changed: HighWater = committed
                    .iter()
                    .filter(|(topic, queues)| self.committed.get(*topic) != Some(*queues))
                    .map(|(t, q)| (t.clone(), q.clone()))
                    .collect();
                self.committed = committed;
                self.publish_high_water(changed);
                self.slot.put(db.clone());
                self.db = Some(db);
                tracing::warn!("storage reopened after an I/O error; writes resume");
            }
            Err(e) => {
                self.next_reopen = Instant::now() + REOPEN_BACKOFF;
                tracing::error!(error = %e, "reopening storage failed; retrying");
            }
        }
    }

    /// Commits `ops` as one write batch; returns whether the write itself failed (every op was
    /// answered with the error).
    fn commit_group(&mut self, db: &DB, ops: Vec<WriteOp>, wo: &WriteOptions) -> bool {
        let mut batch = WriteBatch::default();
        let mut staged: HighWater = HashMap::new();
        // Revision (None = deleted) of records written earlier in this same group.
        let mut staged_records: HashMap<Vec<u8>, Option<u64>> = HashMap::new();
        let mut revision = self.last_revision;
        let stored_at = crate::broker::now_ms().max(self.last_stored_at);
        self.last_stored_at = stored_at;
        let mut replies = Vec::with_capacity(ops.len());
        let mut appended = 0u64;
        for op in ops {
            match op {
                WriteOp::Append {
                    topic,
                    messages,
                    guard,
                    reply,
                } => {
                    // The guard's condition is checked before anything is staged, and written
                    // only if the messages could be staged: both land, or neither.
                    if let Some(g) = &guard
                        && let Err(e) = self.check_record(db, &staged_records, g)
                    {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                    match self.stage_append(
                        db,
                        &mut batch,
                        &mut staged,
                        &topic,
                        &messages,
                        stored_at,
                    ) {
                        Ok(done) => {
                            let rev = match &guard {
                                Some(g) => match self.write_record(
                                    db,
                                    &mut batch,
                                    &mut staged_records,
                                    &mut revision,
                                    g,
                                ) {
                                    Ok(r) => Some(r),
                                    Err(e) => {
                                        let _ = reply.send(Err(e));
                                        continue;
                                    }
                                },
                                None => None,
                            };
                            appended += done.len() as u64;
                            replies.push(Reply::Append(reply, (done, rev)));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                WriteOp::PutBlob { key, value, reply } => {
                    let Ok(blobs) = cf(db, CF_BLOBS) else {
                        let _ = reply.send(Err(StorageError::Corrupt("no blobs CF".into())));
                        continue;
                    };
                    match value {
                        Some(v) => batch.put_cf(blobs, key.as_bytes(), v),
                        None => batch.delete_cf(blobs, key.as_bytes()),
                    }
                    replies.push(Reply::Record(reply, 0));
                }
                WriteOp::PutRecord {
                    space,
                    key,
                    value,
                    expect,
                    reply,
                } => {
                    let w = RecordWrite {
                        space,
                        key,
                        value,
                        expect,
                    };
                    let result = self.check_record(db, &staged_records, &w).and_then(|()| {
                        self.write_record(db, &mut batch, &mut staged_records, &mut revision, &w)
                    });
                    match result {
                        Ok(rev) => replies.push(Reply::Record(reply, rev)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
        }
        if replies.is_empty() {
            return false;
        }
        if revision != self.last_revision {
            batch.put(LAST_REVISION, revision.to_be_bytes());
        }
        let started = std::time::Instant::now();
        let written = db.write_opt(batch, wo);
        self.stats
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.stats.group_ops.observe(replies.len() as f64);
        match written {
            Ok(()) => {
                self.last_revision = revision;
                self.publish_high_water(staged);
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .ops
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                self.stats.messages.fetch_add(appended, Ordering::Relaxed);
                for r in replies {
                    let _ = match r {
                        Reply::Append(tx, v) => tx.send(Ok(v)).map_err(drop),
                        Reply::Record(tx, v) => tx.send(Ok(v)).map_err(drop),
                    };
                }
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                for r in replies {
                    let err = StorageError::Rocks(e.clone());
                    let _ = match r {
                        Reply::Append(tx, _) => tx.send(Err(err)).map_err(drop),
                        Reply::Record(tx, _) => tx.send(Err(err)).map_err(drop),
                    };
                }
                true
            }
        }
    }

    /// Whether `w.expect` holds, seeing writes staged earlier in this group.
    fn check_record(
        &self,
        db: &DB,
        staged: &HashMap<Vec<u8>, Option<u64>>,
        w: &RecordWrite,
    ) -> Result<(), StorageError> {
        let k = keys::record(&w.space, &w.key);
        let current = match staged.get(&k) {
            Some(rev) => *rev,
            None => current_revision(db, &k)?,
        };
        let ok = match w.expect {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Revision(r) => current == Some(r),
        };
        if ok {
            Ok(())
        } else {
            Err(StorageError::Conflict {
                space: w.space.clone(),
                key: w.key.clone(),
            })
        }
    }

    /// Stages a checked record write under the next revision; returns that revision.
    fn write_record(
        &self,
        db: &DB,
        batch: &mut WriteBatch,
        staged: &mut HashMap<Vec<u8>, Option<u64>>,
        revision: &mut u64,
        w: &RecordWrite,
    ) -> Result<u64, StorageError> {
        let records = cf(db, CF_RECORDS)?;
        let k = keys::record(&w.space, &w.key);
        *revision += 1;
        match &w.value {
            Some(v) => batch.put_cf(records, &k, keys::record_value(*revision, v)),
            None => batch.delete_cf(records, &k),
        }
        staged.insert(k, w.value.as_ref().map(|_| *revision));
        Ok(*revision)
    }

    /// Assigns offsets and adds the message, id and key entries to the batch.
    fn stage_append(
        &self,
        db: &DB,
        batch: &mut WriteBatch,
        staged: &mut HighWater,
        topic: &str,
        messages: &[Encoded],
        stored_at: u64,
    ) -> Result<Vec<Appended>, StorageError> {
        let (cf_messages, cf_ids, cf_keys) =
            (cf(db, CF_MESSAGES)?, cf(db, CF_IDS)?, cf(db, CF_KEYS)?);
        let next = staged
            .entry(topic.to_string())
            .or_insert_with(|| self.committed.get(topic).cloned().unwrap_or_default());
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let q = m.queue as usize;
            if next.len() <= q {
                next.resize(q + 1, 0);
            }
            let offset = next[q];
            next[q] += 1;
            let location = keys::message(topic, m.queue, offset);
            let mut value = Vec::with_capacity(m.value.len() + 8);
            value.extend_from_slice(&m.value);
            value.extend_from_slice(&stored_at.to_be_bytes());
            batch.put_cf(cf_messages, &location, &value);
            batch.put_cf(cf_ids, keys::id(&m.id), &location);
            if let Some(key) = &m.key {
                batch.put_cf(cf_keys, keys::business_key(topic, key, m.queue, offset), []);
            }
            out.push(Appended {
                id: m.id,
                queue: m.queue,
                offset,
            });
        }
        Ok(out)
    }

    fn publish_high_water(&mut self, staged: HighWater) {
        if staged.is_empty() {
            return;
        }
        let mut shared = match self.shared.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (topic, queues) in staged {
            self.watchers.bump(&topic);
            shared.insert(topic.clone(), queues.clone());
            self.committed.insert(topic, queues);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::msg;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let open = move || {
            let path = path.clone();
            Box::pin(async move {
                Arc::new(RocksStorage::open(&path, FlushMode::Sync).unwrap()) as Arc<dyn Storage>
            })
                as std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Storage>> + Send>>
        };
        crate::storage::conformance::run_all(&open).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_commits_and_get_dense_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(RocksStorage::open(dir.path(), FlushMode::Sync).unwrap());
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut offs = Vec::new();
                for _ in 0..50 {
                    offs.push(s.append("t", vec![msg(0, None, "x")]).await.unwrap()[0].offset);
                }
                offs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (0..800).collect::<Vec<u64>>());
        let commits = s.stats().commits.load(Ordering::Relaxed);
        assert!(
            commits < 800,
            "group commit shared no fsync: {commits} commits"
        );
    }
}
