//! Transactions against real RocksDB: what counts and listings by state cost.

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
    async fn append(&self, topic: &str, m: Vec<NewMessage>) -> Result<Vec<Appended>, StorageError> {
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
    async fn commit(
        &self,
        commit: crate::storage::Commit,
    ) -> Result<crate::storage::Committed, StorageError> {
        self.inner.commit(commit).await
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
    fn watch(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch(topic)
    }
    async fn high_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        self.inner.high_water(topic, queue).await
    }
    async fn low_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        self.inner.low_water(topic, queue).await
    }
    async fn truncate(&self, topic: &str, queue: u32, before: u64) -> Result<u64, StorageError> {
        self.inner.truncate(topic, queue, before).await
    }
    async fn extent(
        &self,
        topic: &str,
        queue: u32,
    ) -> Result<crate::storage::QueueExtent, StorageError> {
        self.inner.extent(topic, queue).await
    }
    async fn retention_cut(
        &self,
        topic: &str,
        queue: u32,
        limits: crate::storage::QueueLimits,
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        self.inner.retention_cut(topic, queue, limits, now_ms).await
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

/// RocksDB in a fresh directory (kept as long as the returned guard), counting reads.
fn counting() -> (tempfile::TempDir, Arc<Counting>) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Counting {
        inner: RocksStorage::open(dir.path(), FlushMode::Async).unwrap(),
        txn_records_read: AtomicUsize::new(0),
    });
    (dir, storage)
}

async fn transactions(storage: Arc<Counting>, shared: bool) -> Arc<Transactions> {
    transactions_with(storage, shared, &Config::default()).await
}

async fn transactions_with(
    storage: Arc<Counting>,
    shared: bool,
    config: &Config,
) -> Arc<Transactions> {
    let broker = Arc::new(
        Broker::new(storage.clone(), config.limits.clone())
            .await
            .unwrap(),
    );
    let capabilities = Arc::new(crate::capabilities::Capabilities::new(config).unwrap());
    let runtime = Arc::new(
        crate::runtime::Runtime::new(
            crate::runtime::RuntimeConfig {
                timeout_ms: 1000,
                memory_bytes: 64 << 20,
                pool_instances: 0,
                threads: 0,
                compile: Default::default(),
                stop_grace_ms: 0,
            },
            capabilities,
        )
        .unwrap(),
    );
    let dir = std::env::temp_dir();
    let plugins = Arc::new(Plugins::new(runtime, storage, 1 << 20, dir));
    Transactions::new(
        broker,
        plugins,
        config.transactions.clone(),
        (&config.retention).into(),
        shared,
    )
    .await
    .unwrap()
}

fn envelope(check_after_ms: u64) -> Envelope {
    serde_json::from_value(serde_json::json!({
        "body": {"order": 1},
        "check_after_ms": check_after_ms,
    }))
    .unwrap()
}

/// Stores `decided` committed transactions and 2 pending ones (checks due in 30 days).
async fn history(t: &Transactions, decided: usize) {
    t.broker
        .put_topic("orders", Default::default())
        .await
        .unwrap();
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
        let (_dir, storage) = counting();
        let t = transactions(storage.clone(), false).await;
        history(&t, decided).await;
        assert_eq!(
            t.move_decided(&CancellationToken::new()).await.unwrap(),
            decided
        );
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
            2,
            "shared storage reads the undecided space, not the decided history"
        );
    }
    assert_eq!(read, vec![2, 2], "only the two pending records were read");
}

/// Issue 23.4: start-up reads the undecided transactions, not the decided history; counts,
/// listings and lookups of decided transactions are the same after a restart.
#[tokio::test]
async fn a_restart_reads_only_undecided_transactions_and_keeps_the_counts() {
    let (_dir, storage) = counting();
    let t = transactions(storage.clone(), false).await;
    history(&t, 50).await;
    let rolled = t.begin("orders", envelope(1000)).await.unwrap().txn_id;
    t.rollback(&rolled, "producer").await.unwrap();
    let counts = t.counts().await.unwrap();
    let expected: Vec<(String, u64)> = vec![
        ("committed".into(), 50),
        ("pending".into(), 2),
        ("rolled_back".into(), 1),
    ];
    assert_eq!(counts, expected, "before the move");
    assert_eq!(t.move_decided(&CancellationToken::new()).await.unwrap(), 51);
    assert_eq!(t.counts().await.unwrap(), expected, "after the move");
    let oldest = t.list(Some(TxnState::Committed), 3).await.unwrap();
    assert_eq!(oldest.len(), 3);
    assert!(oldest.windows(2).all(|w| w[0].txn_id < w[1].txn_id));

    let before = storage.txn_records_read.load(Ordering::Relaxed);
    let again = transactions(storage.clone(), false).await;
    assert_eq!(
        storage.txn_records_read.load(Ordering::Relaxed) - before,
        2,
        "start-up read the two pending transactions only"
    );
    assert_eq!(again.counts().await.unwrap(), expected);
    assert_eq!(
        again.get(&rolled).await.unwrap().state,
        TxnState::RolledBack
    );
    let listed = again.list(Some(TxnState::Committed), 3).await.unwrap();
    let ids = |v: &[TxnRecord]| v.iter().map(|t| t.txn_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&listed), ids(&oldest));
    // A decided transaction stays decided wherever it lives.
    assert!(matches!(
        again.commit(&rolled, "producer").await,
        Err(TxnError::Decided { .. })
    ));
    assert_eq!(
        again
            .commit(&oldest[0].txn_id, "producer")
            .await
            .unwrap()
            .state,
        TxnState::Committed
    );
    assert_eq!(again.list(None, 1000).await.unwrap().len(), 53);
}

/// A mover that stopped between counting a transaction and taking it out of the undecided
/// space (a crash) does not count it again: the restarted node finishes the move first.
#[tokio::test]
async fn a_move_cut_short_after_counting_is_counted_once() {
    let (_dir, storage) = counting();
    let t = transactions(storage.clone(), false).await;
    history(&t, 3).await;
    let first = t.list(Some(TxnState::Committed), 1).await.unwrap()[0]
        .txn_id
        .clone();
    t.move_batch(vec![first], decided::StopAfter::Counting)
        .await
        .unwrap();
    // The crash: the queued moves die with the process.
    drop(t);
    let again = transactions(storage.clone(), false).await;
    let committed = |c: Vec<(String, u64)>| c.into_iter().find(|(s, _)| s == "committed");
    assert_eq!(
        committed(again.counts().await.unwrap()),
        Some(("committed".into(), 3)),
        "counted once while the move is unfinished"
    );
    assert_eq!(
        again.move_decided(&CancellationToken::new()).await.unwrap(),
        2
    );
    assert_eq!(
        committed(again.counts().await.unwrap()),
        Some(("committed".into(), 3))
    );
    let (tally, _) = decided::Tally::load(storage.as_ref()).await.unwrap();
    assert_eq!(tally.committed, 3);
    assert!(
        tally.moved.is_empty(),
        "a finished move names nothing: {tally:?}"
    );
    for (id, r) in storage.list_records(TXN_SPACE, "", 100).await.unwrap() {
        assert_eq!(decode(&id, &r.value).unwrap().state, TxnState::Pending);
    }
}

/// Decided transactions go by age (from their decision) and beyond the count, oldest first;
/// undecided ones stay whatever their age.
#[tokio::test]
async fn decided_transactions_expire_by_age_and_by_count() {
    let (_dir, storage) = counting();
    let mut config = Config::default();
    config.retention.transactions_max_count = 2;
    let t = transactions_with(storage.clone(), false, &config).await;
    history(&t, 5).await;
    let all = t.list(Some(TxnState::Committed), 10).await.unwrap();
    t.move_decided(&CancellationToken::new()).await.unwrap();
    assert_eq!(
        t.expire_decided(now_ms(), &CancellationToken::new())
            .await
            .unwrap(),
        3,
        "beyond the count"
    );
    let kept = t.list(Some(TxnState::Committed), 10).await.unwrap();
    let ids = |v: &[TxnRecord]| v.iter().map(|t| t.txn_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&kept), ids(&all[3..]), "the newest stay");
    assert!(matches!(
        t.get(&all[0].txn_id).await,
        Err(TxnError::Unknown(_))
    ));
    assert_eq!(
        t.expire_decided(now_ms(), &CancellationToken::new())
            .await
            .unwrap(),
        0
    );
    let later = now_ms() + config.retention.transactions_max_age_ms;
    assert_eq!(
        t.expire_decided(later, &CancellationToken::new())
            .await
            .unwrap(),
        2,
        "past the age"
    );
    assert_eq!(
        t.counts().await.unwrap(),
        vec![("pending".into(), 2)],
        "undecided transactions never expire"
    );
    let again = transactions(storage.clone(), false).await;
    assert_eq!(again.counts().await.unwrap(), vec![("pending".into(), 2)]);
}
