//! The single writer thread: group commit (one WriteBatch and one fsync for every write that
//! arrives together), offset and revision assignment, and the reopen after an I/O error.

use super::*;

pub(super) enum WriteOp {
    Append {
        topic: String,
        messages: Vec<Encoded>,
        /// A record write that must succeed for the append to happen (and happens with it).
        guard: Option<RecordWrite>,
        reply: oneshot::Sender<Result<AppendResult, StorageError>>,
    },
    /// A [`crate::storage::Commit`]: checks and record conditions first, then the appends
    /// and record writes, all in this group's batch or none.
    Commit {
        checks: Vec<RecordCheck>,
        records: Vec<RecordWrite>,
        appends: Vec<(String, Vec<Encoded>)>,
        reply: oneshot::Sender<Result<Committed, StorageError>>,
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
    /// Deletes every record of `space` with a key before `before` (one range).
    DeleteRecords {
        space: String,
        before: String,
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
    /// Deletes a queue's messages from `from` (which must be its low water, else a conflict)
    /// up to `before`; `range_bytes` is what they take. Replies with the new low water.
    Truncate {
        topic: String,
        queue: u32,
        from: u64,
        before: u64,
        range_bytes: u64,
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
}

impl WriteOp {
    /// Answers the op with `e` without writing it.
    fn refuse(self, e: StorageError) {
        let _ = match self {
            WriteOp::Append { reply, .. } => reply.send(Err(e)).map_err(drop),
            WriteOp::Commit { reply, .. } => reply.send(Err(e)).map_err(drop),
            WriteOp::PutBlob { reply, .. }
            | WriteOp::PutRecord { reply, .. }
            | WriteOp::DeleteRecords { reply, .. }
            | WriteOp::Truncate { reply, .. } => reply.send(Err(e)).map_err(drop),
        };
    }

    fn size(&self) -> usize {
        match self {
            WriteOp::Append { messages, .. } => messages.iter().map(|m| m.value.len() + 64).sum(),
            WriteOp::Commit {
                records, appends, ..
            } => {
                let records: usize = records
                    .iter()
                    .map(|r| r.value.as_ref().map_or(0, Vec::len) + 64)
                    .sum();
                let messages: usize = appends
                    .iter()
                    .flat_map(|(_, m)| m)
                    .map(|m| m.value.len() + 64)
                    .sum();
                records + messages
            }
            WriteOp::PutRecord { value, .. } | WriteOp::PutBlob { value, .. } => {
                value.as_ref().map_or(0, Vec::len) + 64
            }
            WriteOp::Truncate { .. } | WriteOp::DeleteRecords { .. } => 64,
        }
    }
}

/// The single writer: owns offset assignment and record revisions, so neither needs a lock.
pub(super) struct Writer {
    pub(super) slot: Arc<Slot>,
    /// The writer's handle on the open database; `None` after an I/O error until a reopen
    /// succeeds (tried again no sooner than `next_reopen`).
    pub(super) db: Option<Arc<DB>>,
    pub(super) next_reopen: Instant,
    pub(super) sync: bool,
    pub(super) committed: HighWater,
    pub(super) shared: Arc<RwLock<HighWater>>,
    /// Per queue, the first offset kept, as readers see it.
    pub(super) low_water: Arc<RwLock<HighWater>>,
    /// Per queue, the bytes its stored messages take, as readers see it.
    pub(super) bytes: Arc<RwLock<HighWater>>,
    pub(super) watchers: Arc<Watchers>,
    pub(super) last_revision: u64,
    /// The store time given to the last group commit's messages: never decreasing, so every
    /// queue's store times are in offset order (what a reset to a time searches by).
    pub(super) last_stored_at: u64,
    pub(super) stats: Arc<WriterStats>,
}

/// What a group commit changes about queues, published to readers once it is durable.
#[derive(Default)]
struct QueueChanges {
    /// New high water of the queues appended to, by topic.
    high: HighWater,
    /// New stored bytes of queues appended to or truncated.
    bytes: HashMap<(String, u32), u64>,
}

/// What an append replies: where the messages went, and the guard record's new revision.
pub(super) type AppendResult = (Vec<Appended>, Option<u64>);

pub(super) enum Reply {
    Append(
        oneshot::Sender<Result<AppendResult, StorageError>>,
        AppendResult,
    ),
    Record(oneshot::Sender<Result<u64, StorageError>>, u64),
    Commit(oneshot::Sender<Result<Committed, StorageError>>, Committed),
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
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
        self.slot.close(None);
        let opened = open_db(&self.slot.dir, &self.low_water).and_then(|db| {
            let low = recover_low_water(&db)?;
            let (committed, stored_at) = recover_high_water(&db, &low)?;
            let bytes = recover_queue_bytes(&db, &committed, &low)?;
            let revision = read_last_revision(&db)?;
            Ok((db, committed, low, bytes, stored_at, revision))
        });
        match opened {
            Ok((db, committed, low, bytes, stored_at, revision)) => {
                *self
                    .low_water
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = low;
                *self
                    .bytes
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = bytes;
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
        let mut staged = QueueChanges::default();
        // New low water of queues truncated in this group.
        let mut staged_low: HashMap<(String, u32), u64> = HashMap::new();
        // Revision (None = deleted) of records written earlier in this same group.
        let mut staged_records: HashMap<Vec<u8>, Option<u64>> = HashMap::new();
        let mut revision = self.last_revision;
        let stored_at = crate::base::now_ms().max(self.last_stored_at);
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
                WriteOp::Commit {
                    checks,
                    records,
                    appends,
                    reply,
                } => {
                    // Every condition first, seeing what this group staged: a failed one
                    // stages nothing of the commit.
                    let conditions = checks
                        .iter()
                        .map(|c| RecordWrite {
                            space: c.space.clone(),
                            key: c.key.clone(),
                            value: None,
                            expect: c.expect,
                        })
                        .collect::<Vec<_>>();
                    // The commit point's first: a delivery already completed is told so,
                    // whatever else changed since.
                    let checked = records
                        .iter()
                        .take(1)
                        .chain(&conditions)
                        .chain(records.iter().skip(1))
                        .try_for_each(|w| self.check_record(db, &staged_records, w));
                    if let Err(e) = checked {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                    let mut out = Committed::default();
                    let mut failed = None;
                    for (topic, messages) in &appends {
                        match self.stage_append(
                            db,
                            &mut batch,
                            &mut staged,
                            topic,
                            messages,
                            stored_at,
                        ) {
                            Ok(done) => {
                                appended += done.len() as u64;
                                out.appended.extend(done);
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    for w in &records {
                        if failed.is_some() {
                            break;
                        }
                        match self.write_record(
                            db,
                            &mut batch,
                            &mut staged_records,
                            &mut revision,
                            w,
                        ) {
                            Ok(r) => out.revisions.push(if w.value.is_some() { r } else { 0 }),
                            Err(e) => failed = Some(e),
                        }
                    }
                    match failed {
                        // Only a missing column family fails here, which fails every op.
                        Some(e) => {
                            let _ = reply.send(Err(e));
                        }
                        None => replies.push(Reply::Commit(reply, out)),
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
                WriteOp::DeleteRecords {
                    space,
                    before,
                    reply,
                } => {
                    let Ok(records) = cf(db, CF_RECORDS) else {
                        let _ = reply.send(Err(StorageError::Corrupt("no records CF".into())));
                        continue;
                    };
                    let (from, to) = (keys::record(&space, ""), keys::record(&space, &before));
                    // Records this batch wrote earlier in the range are deleted with it.
                    for (key, revision) in staged_records.iter_mut() {
                        if *key >= from && *key < to {
                            *revision = None;
                        }
                    }
                    batch.delete_range_cf(records, from, to);
                    replies.push(Reply::Record(reply, 0));
                }
                WriteOp::Truncate {
                    topic,
                    queue,
                    from,
                    before,
                    range_bytes,
                    reply,
                } => {
                    let low = match staged_low.get(&(topic.clone(), queue)) {
                        Some(l) => *l,
                        None => queue_value(&self.low_water_now(), &topic, queue),
                    };
                    let before = before.min(queue_value(&self.committed, &topic, queue));
                    if before <= low {
                        replies.push(Reply::Record(reply, low));
                        continue;
                    }
                    if low != from {
                        // Another truncation moved the low water since `range_bytes` was summed.
                        let _ = reply.send(Err(StorageError::Conflict {
                            space: "low_water".into(),
                            key: format!("{topic}/{queue}"),
                        }));
                        continue;
                    }
                    let Ok(messages) = cf(db, CF_MESSAGES) else {
                        let _ = reply.send(Err(StorageError::Corrupt("no messages CF".into())));
                        continue;
                    };
                    batch.delete_range_cf(
                        messages,
                        keys::message(&topic, queue, low),
                        keys::message(&topic, queue, before),
                    );
                    batch.put(keys::low_water(&topic, queue), before.to_be_bytes());
                    let bytes = self.staged_bytes(&staged.bytes, &topic, queue);
                    staged
                        .bytes
                        .insert((topic.clone(), queue), bytes.saturating_sub(range_bytes));
                    staged_low.insert((topic, queue), before);
                    replies.push(Reply::Record(reply, before));
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
        for ((topic, queue), b) in &staged.bytes {
            batch.put(keys::queue_bytes(topic, *queue), b.to_be_bytes());
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
                self.publish_high_water(staged.high);
                if !staged.bytes.is_empty() {
                    let mut bytes = self
                        .bytes
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    for ((topic, queue), b) in staged.bytes {
                        set_queue(&mut bytes, &topic, queue, b);
                    }
                }
                if !staged_low.is_empty() {
                    let mut low = self
                        .low_water
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    for ((topic, queue), l) in staged_low {
                        set_queue(&mut low, &topic, queue, l);
                    }
                }
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .ops
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                self.stats.messages.fetch_add(appended, Ordering::Relaxed);
                for r in replies {
                    let _ = match r {
                        Reply::Append(tx, v) => tx.send(Ok(v)).map_err(drop),
                        Reply::Record(tx, v) => tx.send(Ok(v)).map_err(drop),
                        Reply::Commit(tx, v) => tx.send(Ok(v)).map_err(drop),
                    };
                }
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                for r in replies {
                    let err = StorageError::from(e.clone());
                    let _ = match r {
                        Reply::Append(tx, _) => tx.send(Err(err)).map_err(drop),
                        Reply::Record(tx, _) => tx.send(Err(err)).map_err(drop),
                        Reply::Commit(tx, _) => tx.send(Err(err)).map_err(drop),
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
        // An unconditional write needs no read: a point lookup per record (memtable, then
        // every level's index and filter) was 15% of the CPU of a fan-out run, whose trace and
        // offset records are written with `Expect::Any`.
        if w.expect == Expect::Any {
            return Ok(());
        }
        let k = keys::record(&w.space, &w.key);
        let current = match staged.get(&k) {
            Some(rev) => *rev,
            None => current_revision(db, &k)?,
        };
        let ok = match w.expect {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Revision(r) => current == Some(r),
            Expect::Present => current.is_some(),
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
        staged: &mut QueueChanges,
        topic: &str,
        messages: &[Encoded],
        stored_at: u64,
    ) -> Result<Vec<Appended>, StorageError> {
        let (cf_messages, cf_ids, cf_keys) =
            (cf(db, CF_MESSAGES)?, cf(db, CF_IDS)?, cf(db, CF_KEYS)?);
        let next = staged
            .high
            .entry(topic.to_string())
            .or_insert_with(|| self.committed.get(topic).cloned().unwrap_or_default());
        let mut out = Vec::with_capacity(messages.len());
        // Bytes added per queue, folded into `staged.bytes` once per append.
        let mut added: Vec<u64> = Vec::new();
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
            if added.len() <= q {
                added.resize(q + 1, 0);
            }
            added[q] = added[q].saturating_add(value.len() as u64);
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
        for (queue, n) in (0u32..).zip(added) {
            if n > 0 {
                let bytes = self.staged_bytes(&staged.bytes, topic, queue);
                staged
                    .bytes
                    .insert((topic.to_string(), queue), bytes.saturating_add(n));
            }
        }
        Ok(out)
    }

    /// A queue's stored bytes as of what this group staged so far.
    fn staged_bytes(&self, staged: &HashMap<(String, u32), u64>, topic: &str, queue: u32) -> u64 {
        match staged.get(&(topic.to_string(), queue)) {
            Some(b) => *b,
            None => queue_value(
                &self
                    .bytes
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                topic,
                queue,
            ),
        }
    }

    /// The low water readers see (the writer is the only one that changes it).
    fn low_water_now(&self) -> std::sync::RwLockReadGuard<'_, HighWater> {
        self.low_water
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish_high_water(&mut self, staged: HighWater) {
        if staged.is_empty() {
            return;
        }
        let mut shared = self
            .shared
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (topic, queues) in staged {
            self.watchers.bump(&topic);
            shared.insert(topic.clone(), queues.clone());
            self.committed.insert(topic, queues);
        }
    }
}

/// How long a close waits for reads still holding the database (a scan of a long queue, say).
const CLOSE_READS_WAIT: Duration = Duration::from_secs(30);

/// The open database, shared by the writer and readers. Empty while the writer reopens it: after
/// a failed WAL or table-file creation RocksDB stops taking writes (a background error) until the
/// database is closed and opened again, and it can only be opened once it is closed.
pub(super) struct Slot {
    pub(super) dir: PathBuf,
    pub(super) db: RwLock<Option<Arc<DB>>>,
    /// Set by [`Slot::close_for_good`]: the storage was closed, not reopening.
    pub(super) closed: AtomicBool,
}

impl Slot {
    /// The database; [`StorageError::Unavailable`] while it is being reopened,
    /// [`StorageError::Closed`] once the storage was closed.
    pub(super) fn get(&self) -> Result<Arc<DB>, StorageError> {
        let guard = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.clone().ok_or_else(|| {
            if self.closed.load(Ordering::Acquire) {
                StorageError::Closed
            } else {
                StorageError::Unavailable("reopening the database after an I/O error".into())
            }
        })
    }

    /// Closes the database for good once the reads holding it have finished (blocks, at most
    /// [`CLOSE_READS_WAIT`]): its lock file is released whoever still holds the storage, so the
    /// data dir can be opened again in this process (RocksDB refuses a second open of a dir
    /// while the first is open). Past the wait, it closes when the last read lets go.
    pub(super) fn close_for_good(&self) {
        self.closed.store(true, Ordering::Release);
        self.close(Some(CLOSE_READS_WAIT));
    }

    /// Takes the database out (readers now get `Unavailable`, or `Closed` once closed for good)
    /// and closes it once the reads holding it have finished; with `give_up`, waits at most
    /// that long (then the last read to finish closes it).
    fn close(&self, give_up: Option<Duration>) {
        let taken = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
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
                    if give_up.is_some_and(|limit| started.elapsed() > limit) {
                        tracing::warn!(
                            "reads still hold the database after {:?}; it closes when they end",
                            started.elapsed()
                        );
                        return;
                    }
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
        *self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(db);
    }
}
