//! A storage wrapper that behaves as a shared backend may: reads that come back short of the
//! high water (a JetStream replica that has not applied the newest appends), append news
//! that never arrives (a lost `wqn` notification) and commits whose answer is lost after their
//! commit point (the server that took them died), so tests can show readers never wait on the
//! first two and nothing a commit promised is lost to the third. Everything else goes to the wrapped storage unchanged; record reads are counted, so
//! tests can bound what a background pass reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use wasmq::storage::{
    Appended, Commit, Committed, Expect, MessageId, NewMessage, QueueExtent, QueueLimits, Record,
    RecordWrite, Storage, StorageError, StoredMessage,
};

/// Writes a commit as far as its commit point, as a writer that dies there (e.g.
/// `JetStreamStorage::commit_dying_halfway`).
pub type DyingCommit = Arc<
    dyn Fn(Commit) -> futures::future::BoxFuture<'static, Result<(), StorageError>> + Send + Sync,
>;

/// Commits still to be cut at their commit point and answered with an error, which commits
/// qualify, and what cuts them.
struct LostAnswers {
    left: AtomicU32,
    which: fn(&Commit) -> bool,
    die: DyingCommit,
}

/// See the module docs.
pub struct Unreliable {
    inner: Arc<dyn Storage>,
    /// Reads of a queue from below its high water still to come back empty.
    short_reads: AtomicU32,
    /// `Some`: [`Storage::watch`] never changes, and idle readers are told to look again this
    /// often ([`Storage::recheck_idle`]).
    deaf: Option<Duration>,
    /// Kept so receivers of a deaf watch wait (their sender is never dropped).
    silent: tokio::sync::watch::Sender<u64>,
    /// Record reads so far (`get_record`, `list_records`, `list_records_after`).
    record_reads: AtomicU64,
    /// The same, by the first segment of the space read (`cursor` for `cursor/{group}`).
    reads_by_kind: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// See [`Unreliable::with_lost_commit_answers`].
    lost_answers: Option<LostAnswers>,
}

impl Unreliable {
    /// `inner`, whose next `short_reads` reads from below a queue's high water come back
    /// empty, and whose append news is lost when `deaf` (readers look again that often).
    pub fn new(inner: Arc<dyn Storage>, short_reads: u32, deaf: Option<Duration>) -> Self {
        Unreliable {
            inner,
            short_reads: AtomicU32::new(short_reads),
            deaf,
            silent: tokio::sync::watch::channel(0).0,
            record_reads: AtomicU64::new(0),
            reads_by_kind: Default::default(),
            lost_answers: None,
        }
    }

    /// The next `n` commits for which `which` holds are written only as far as their commit
    /// point (by `die`) and then answered with an error: the server that took them died
    /// before answering, so their writer cannot tell whether they happened.
    pub fn with_lost_commit_answers(
        mut self,
        n: u32,
        which: fn(&Commit) -> bool,
        die: DyingCommit,
    ) -> Self {
        self.lost_answers = Some(LostAnswers {
            left: AtomicU32::new(n),
            which,
            die,
        });
        self
    }

    /// How many of the lost commit answers asked for are still to come.
    pub fn lost_commit_answers_left(&self) -> u32 {
        self.lost_answers
            .as_ref()
            .map_or(0, |l| l.left.load(Ordering::Relaxed))
    }

    /// Record reads made through it so far.
    pub fn record_reads(&self) -> u64 {
        self.record_reads.load(Ordering::Relaxed)
    }

    /// Record reads so far of spaces whose first segment is `kind` (`cursor`, `dlq`, ...).
    pub fn record_reads_of(&self, kind: &str) -> u64 {
        self.reads_by_kind
            .lock()
            .map_or(0, |m| m.get(kind).copied().unwrap_or(0))
    }

    fn count_read(&self, space: &str) {
        self.record_reads.fetch_add(1, Ordering::Relaxed);
        let kind = space.split('/').next().unwrap_or(space);
        if let Ok(mut m) = self.reads_by_kind.lock() {
            *m.entry(kind.to_string()).or_default() += 1;
        }
    }

    /// How many of the short reads asked for are still to come.
    pub fn short_reads_left(&self) -> u32 {
        self.short_reads.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Storage for Unreliable {
    async fn append(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StorageError> {
        self.inner.append(topic, messages).await
    }
    async fn append_guarded(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        guard: RecordWrite,
    ) -> Result<(Vec<Appended>, u64), StorageError> {
        self.inner.append_guarded(topic, messages, guard).await
    }
    async fn commit(&self, commit: Commit) -> Result<Committed, StorageError> {
        if let Some(lost) = &self.lost_answers
            && (lost.which)(&commit)
            && lost
                .left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        {
            (lost.die)(commit).await?;
            return Err(StorageError::Unavailable(
                "the commit's answer was lost (test)".into(),
            ));
        }
        self.inner.commit(commit).await
    }
    async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let below = from < self.inner.high_water(topic, queue).await?;
        let short = below
            && self
                .short_reads
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        if short {
            return Ok(Vec::new());
        }
        self.inner.read(topic, queue, from, limit).await
    }
    async fn message_by_id(&self, id: MessageId) -> Result<Option<StoredMessage>, StorageError> {
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
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    fn watch(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        match self.deaf {
            Some(_) => self.silent.subscribe(),
            None => self.inner.watch(topic),
        }
    }
    fn recheck_idle(&self) -> Option<Duration> {
        self.deaf.or(self.inner.recheck_idle())
    }
    async fn high_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        self.inner.high_water(topic, queue).await
    }
    async fn low_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        self.inner.low_water(topic, queue).await
    }
    async fn extent(&self, topic: &str, queue: u32) -> Result<QueueExtent, StorageError> {
        self.inner.extent(topic, queue).await
    }
    async fn retention_cut(
        &self,
        topic: &str,
        queue: u32,
        limits: QueueLimits,
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        self.inner.retention_cut(topic, queue, limits, now_ms).await
    }
    async fn truncate(&self, topic: &str, queue: u32, before: u64) -> Result<u64, StorageError> {
        self.inner.truncate(topic, queue, before).await
    }
    async fn get_record(&self, space: &str, key: &str) -> Result<Option<Record>, StorageError> {
        self.count_read(space);
        self.inner.get_record(space, key).await
    }
    async fn list_records(
        &self,
        space: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        self.count_read(space);
        self.inner.list_records(space, prefix, limit).await
    }
    async fn list_records_after(
        &self,
        space: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        self.count_read(space);
        self.inner
            .list_records_after(space, prefix, after, limit)
            .await
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
    async fn put_records_in_order(&self, records: Vec<RecordWrite>) -> Result<(), StorageError> {
        self.inner.put_records_in_order(records).await
    }
    async fn put_records(&self, records: Vec<RecordWrite>) -> Result<(), StorageError> {
        self.inner.put_records(records).await
    }
    async fn put_blob(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), StorageError> {
        self.inner.put_blob(key, value).await
    }
    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get_blob(key).await
    }
    async fn prepare_topic(
        &self,
        topic: &str,
        queues: u32,
        limits: QueueLimits,
    ) -> Result<(), StorageError> {
        self.inner.prepare_topic(topic, queues, limits).await
    }
    async fn delete_records_before(&self, space: &str, before: &str) -> Result<(), StorageError> {
        self.inner.delete_records_before(space, before).await
    }
    async fn limit_index_age(&self, max_age_ms: Option<u64>) -> Result<(), StorageError> {
        self.inner.limit_index_age(max_age_ms).await
    }
    async fn recover(&self, age: Duration) -> Result<usize, StorageError> {
        self.inner.recover(age).await
    }
    async fn finish_commits_of(&self, space: &str, prefix: &str) -> Result<usize, StorageError> {
        self.inner.finish_commits_of(space, prefix).await
    }
    async fn unfinished_commits(
        &self,
        space: &str,
    ) -> Result<std::collections::HashSet<String>, StorageError> {
        self.inner.unfinished_commits(space).await
    }
    fn recovery_age(&self) -> Duration {
        self.inner.recovery_age()
    }
    async fn announce(&self, channel: &str, payload: Vec<u8>) {
        self.inner.announce(channel, payload).await;
    }
    async fn listen(&self, channel: &str) -> Option<futures::stream::BoxStream<'static, Vec<u8>>> {
        self.inner.listen(channel).await
    }
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.register_metrics(registry);
    }
    async fn close(&self) {
        self.inner.close().await;
    }
}
