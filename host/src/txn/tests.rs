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

async fn transactions(storage: Arc<Counting>, shared: bool) -> Arc<Transactions> {
    let config = Config::default();
    let broker = Arc::new(
        Broker::new(storage.clone(), config.limits.clone())
            .await
            .unwrap(),
    );
    let capabilities = Arc::new(crate::capabilities::Capabilities::new(&config).unwrap());
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
    Transactions::new(broker, plugins, config.transactions.clone(), shared)
        .await
        .unwrap()
}

/// Stores `decided` committed transactions and 2 pending ones (checks due in 30 days).
async fn history(t: &Transactions, decided: usize) {
    t.broker
        .put_topic("orders", Default::default())
        .await
        .unwrap();
    let envelope = |check_after_ms: u64| -> Envelope {
        serde_json::from_value(serde_json::json!({
            "body": {"order": 1},
            "check_after_ms": check_after_ms,
        }))
        .unwrap()
    };
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
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Counting {
            inner: RocksStorage::open(dir.path(), FlushMode::Async).unwrap(),
            txn_records_read: AtomicUsize::new(0),
        });
        let t = transactions(storage.clone(), false).await;
        history(&t, decided).await;
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
            decided + 2,
            "the counter sees a scan"
        );
    }
    assert_eq!(read, vec![2, 2], "only the two pending records were read");
}
