//! The broker: topics and publishing. Validates what producers send, picks queues (sharding key
//! hash or round-robin), stamps ids and times, and hands durable writes to storage.

pub mod envelope;
mod publish;
pub mod retention;
mod services;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::base::{TxnTimings, check_name, now_ms};
use crate::config::LimitsConfig;
use crate::storage::{
    Appended, Expect, MessageId, NewMessage, RecordWrite, Storage, StorageError, StoredMessage,
};
pub use envelope::{Envelope, EnvelopeError};
pub use retention::{Retention, RetentionSpec};

/// Record space holding topic metadata.
const TOPIC_SPACE: &str = "topic";
/// Queues of a topic created without saying how many.
pub const DEFAULT_QUEUES: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    BadTopicName(String),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("{0}")]
    BadTopicSpec(String),
    #[error("Idempotency-Key must have 1 to 256 bytes")]
    BadIdempotencyKey,
    #[error(
        "Idempotency-Key {0:?} was used for a different message on this topic within the idempotency window; use a new key for a new message"
    )]
    IdempotencyKeyReused(String),
    #[error("a topic has between 1 and {max} queues, not {asked}")]
    TooManyQueues { asked: u32, max: u32 },
    #[error("topic {0:?} is being deleted; create it again once that is done")]
    BeingDeleted(String),
    #[error(
        "Idempotency-Key {key:?} was used for message {id}, which retention has deleted since; the publish is not repeated"
    )]
    IdempotentMessageDeleted { key: String, id: MessageId },
    #[error("topic {topic:?} has {current} queues; queues can be added but not removed")]
    QueuesShrink { topic: String, current: u32 },
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("a batch needs at least one message")]
    EmptyBatch,
    #[error("a batch holds at most {max} messages, not {len}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("message {index} of the batch: {source}")]
    InBatch { index: usize, source: EnvelopeError },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    DiskFull(#[from] crate::disk::DiskFull),
}

/// What is kept about a topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TopicMeta {
    pub name: String,
    pub queues: u32,
    /// Milliseconds since the Unix epoch.
    pub created_at: u64,
    /// The plugin asked about undecided half messages of this topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_checker: Option<String>,
    /// Check-back timings for this topic; unset ones take `[transactions]` defaults.
    #[serde(default)]
    pub transactions: TxnTimings,
    /// The checker's config (JSON object) and grants, as a subscription's are for a consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_checker_config: Option<serde_json::Value>,
    #[serde(default)]
    pub transaction_checker_grants: crate::capabilities::GrantSpec,
    /// What the topic keeps (topics stored before retention existed read the default).
    #[serde(default)]
    pub retention: Retention,
}

/// The body of `PUT /v1/topics/{topic}`: fields left out keep their value.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// 1 to `[limits] max_queues` (256 by default); never fewer than the topic has.
    #[schemars(range(min = 1, max = 256))]
    pub queues: Option<u32>,
    /// A plugin name; `""` removes the checker.
    #[schemars(regex(pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127})?$"))]
    pub transaction_checker: Option<String>,
    pub transactions: Option<TxnTimings>,
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub transaction_checker_config: Option<serde_json::Value>,
    pub transaction_checker_grants: Option<crate::capabilities::GrantSpec>,
    /// Age and size limits and early deletion of consumed messages; see [`Retention`].
    pub retention: Option<RetentionSpec>,
}

/// A topic cached in memory, with its round-robin cursor.
struct CachedTopic {
    meta: TopicMeta,
    cursor: AtomicU32,
}

pub struct Broker {
    storage: Arc<dyn Storage>,
    limits: LimitsConfig,
    topics: std::sync::RwLock<HashMap<String, Arc<CachedTopic>>>,
    /// Producers are held while the disk is (nearly) full; delivery goes on.
    disk: Option<Arc<crate::disk::DiskGuard>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// What `{"$secret": …}` references in plugin config resolve to.
    secrets: crate::secrets::Secrets,
    /// Bytes (keys and values) each kv namespace holds, counted from storage at first use.
    kv_usage: std::sync::Mutex<HashMap<String, u64>>,
    /// Publishes hold it shared from their topic lookup to their append; deleting a topic
    /// holds it alone while the topic disappears, so no publish that found the topic appends
    /// after its messages were deleted.
    deletion: tokio::sync::RwLock<()>,
    /// Topics deleted so far (changed under the cache's lock): a topic read from storage
    /// before a deletion is not cached after it.
    deletions: std::sync::atomic::AtomicU64,
    /// Topics whose deletion is under way: they cannot be created again (or deleted twice)
    /// until their messages are gone.
    deleting: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Per topic, when the retention pass next has idempotency keys to expire.
    idempotency_due: crate::base::NextDue,
}

/// A topic deletion under way: the name is free again when this is dropped.
pub struct Deleting {
    name: String,
    set: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Drop for Deleting {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.name);
    }
}

/// Topic names follow [`check_name`].
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    check_name(name).map_err(|e| BrokerError::BadTopicName(format!("topic name {e}")))
}

/// The queue a sharding key maps to: stable across restarts and versions (xxh3, seed 0).
pub fn queue_for_key(sharding_key: &str, queues: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(sharding_key.as_bytes()) % u64::from(queues.max(1))) as u32
}

impl Broker {
    /// Loads topic metadata into memory.
    pub async fn new(storage: Arc<dyn Storage>, limits: LimitsConfig) -> Result<Self, BrokerError> {
        let mut topics = HashMap::new();
        for (name, record) in storage.list_records(TOPIC_SPACE, "", usize::MAX).await? {
            let meta: TopicMeta = serde_json::from_slice(&record.value)
                .map_err(|e| StorageError::Corrupt(format!("topic {name}: {e}")))?;
            topics.insert(
                name,
                Arc::new(CachedTopic {
                    meta,
                    cursor: AtomicU32::new(0),
                }),
            );
        }
        Ok(Self {
            idempotency_due: crate::base::NextDue::for_storage(storage.shared()),
            storage,
            limits,
            topics: std::sync::RwLock::new(topics),
            disk: None,
            secrets: Default::default(),
            kv_usage: Default::default(),
            metrics: Arc::default(),
            deletion: Default::default(),
            deletions: Default::default(),
            deleting: Default::default(),
        })
    }

    /// Counters and histograms of publishing and delivery, shared with dispatch.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Counts what a publish stored and how long its acknowledgement took.
    fn observe(
        &self,
        topic: &str,
        kind: crate::metrics::PublishKind,
        (count, bytes): (usize, usize),
        started: std::time::Instant,
    ) {
        self.metrics.published(topic, count as u64, bytes as u64);
        self.metrics
            .publish_seconds
            .get_or_create(&crate::metrics::PublishLabels { kind })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Refuses publishes (not deliveries or transaction decisions) while `guard` says full.
    pub fn with_disk_guard(mut self, guard: Arc<crate::disk::DiskGuard>) -> Self {
        self.disk = Some(guard);
        self
    }

    pub fn with_secrets(mut self, secrets: crate::secrets::Secrets) -> Self {
        self.secrets = secrets;
        self
    }

    /// The server's secrets, for resolving plugin config inside the host.
    pub fn secrets(&self) -> &crate::secrets::Secrets {
        &self.secrets
    }

    pub fn disk(&self) -> Option<&Arc<crate::disk::DiskGuard>> {
        self.disk.as_ref()
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    fn cached(&self, name: &str) -> Option<Arc<CachedTopic>> {
        self.topics.read().ok()?.get(name).cloned()
    }

    pub fn topic(&self, name: &str) -> Result<TopicMeta, BrokerError> {
        validate_topic_name(name)?;
        self.cached(name)
            .map(|t| t.meta.clone())
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))
    }

    pub fn topics(&self) -> Vec<TopicMeta> {
        let mut out: Vec<TopicMeta> = match self.topics.read() {
            Ok(t) => t.values().map(|t| t.meta.clone()).collect(),
            Err(_) => Vec::new(),
        };
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Creates or updates a topic; returns it and whether it was created.
    pub async fn put_topic(
        &self,
        name: &str,
        spec: TopicSpec,
    ) -> Result<(TopicMeta, bool), BrokerError> {
        validate_topic_name(name)?;
        let max = self.limits.max_queues;
        if let Some(q) = spec.queues
            && (q == 0 || q > max)
        {
            return Err(BrokerError::TooManyQueues { asked: q, max });
        }
        if self.is_deleting(name) {
            return Err(BrokerError::BeingDeleted(name.to_string()));
        }
        // Compare-and-set loop: concurrent updates never shrink queues or lose a field.
        loop {
            let current = self.storage.get_record(TOPIC_SPACE, name).await?;
            let (mut meta, expect, created) = match &current {
                Some(rec) => {
                    let meta: TopicMeta = serde_json::from_slice(&rec.value)
                        .map_err(|e| StorageError::Corrupt(format!("topic {name}: {e}")))?;
                    (meta, Expect::Revision(rec.revision), false)
                }
                None => {
                    let meta = TopicMeta {
                        name: name.to_string(),
                        queues: DEFAULT_QUEUES,
                        created_at: now_ms(),
                        transaction_checker: None,
                        transactions: TxnTimings::default(),
                        transaction_checker_config: None,
                        transaction_checker_grants: Default::default(),
                        retention: Retention::default(),
                    };
                    (meta, Expect::Absent, true)
                }
            };
            if let Some(q) = spec.queues {
                if !created && q < meta.queues {
                    return Err(BrokerError::QueuesShrink {
                        topic: name.to_string(),
                        current: meta.queues,
                    });
                }
                meta.queues = q;
            }
            if let Some(c) = &spec.transaction_checker {
                meta.transaction_checker = (!c.is_empty()).then(|| c.clone());
            }
            if let Some(t) = spec.transactions {
                t.validate().map_err(BrokerError::BadTopicSpec)?;
                meta.transactions = t;
            }
            if let Some(c) = &spec.transaction_checker_config {
                if !c.is_object() {
                    return Err(BrokerError::BadTopicSpec(
                        "transaction_checker_config must be a JSON object".into(),
                    ));
                }
                self.secrets.check(c).map_err(|e| {
                    BrokerError::BadTopicSpec(format!("transaction_checker_config: {e}"))
                })?;
                meta.transaction_checker_config = Some(c.clone());
            }
            if let Some(g) = &spec.transaction_checker_grants {
                g.to_grants().map_err(BrokerError::BadTopicSpec)?;
                meta.transaction_checker_grants = g.clone();
            }
            if let Some(r) = &spec.retention {
                meta.retention = r.apply(meta.retention).map_err(BrokerError::BadTopicSpec)?;
            }
            let bytes =
                serde_json::to_vec(&meta).map_err(|e| StorageError::Encode(e.to_string()))?;
            // Queues exist in the backend before any node can learn of the topic.
            self.storage
                .prepare_topic(name, meta.queues, meta.retention.limits())
                .await?;
            match self
                .storage
                .put_record(TOPIC_SPACE, name, Some(bytes), expect)
                .await
            {
                Ok(_) => {
                    self.cache_topic(meta.clone(), None);
                    return Ok((meta, created));
                }
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reloads topic metadata from storage: on a shared backend other nodes create, change and
    /// delete topics too. Returns how many cached topics changed or went.
    pub async fn refresh_topics(&self) -> Result<usize, BrokerError> {
        let mut changed = 0;
        let seen = self.deletions.load(Ordering::Acquire);
        let stored = self
            .storage
            .list_records(TOPIC_SPACE, "", usize::MAX)
            .await?;
        if let Ok(mut topics) = self.topics.write() {
            let before = topics.len();
            topics.retain(|name, _| stored.iter().any(|(n, _)| n == name));
            changed += before - topics.len();
        }
        for (name, record) in stored {
            let known = self
                .cached(&name)
                .and_then(|t| serde_json::to_vec(&t.meta).ok());
            if known.as_deref() == Some(record.value.as_slice()) {
                continue;
            }
            let meta: TopicMeta = serde_json::from_slice(&record.value)
                .map_err(|e| StorageError::Corrupt(format!("topic {name}: {e}")))?;
            if self.cache_topic(meta, Some(seen)) {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Caches a topic; one read from storage when [`Self::deletions`] was `seen` is not cached
    /// if a topic was deleted since (it may be that one). Returns whether it was cached.
    fn cache_topic(&self, meta: TopicMeta, seen: Option<u64>) -> bool {
        let Ok(mut topics) = self.topics.write() else {
            return false;
        };
        if seen.is_some_and(|s| s != self.deletions.load(Ordering::Acquire)) {
            return false;
        }
        let cursor = topics
            .get(&meta.name)
            .map_or(0, |t| t.cursor.load(Ordering::Relaxed));
        topics.insert(
            meta.name.clone(),
            Arc::new(CachedTopic {
                meta,
                cursor: AtomicU32::new(cursor),
            }),
        );
        true
    }

    /// A topic from the cache, else from storage (created by another node on a shared backend).
    async fn lookup(&self, name: &str) -> Result<Arc<CachedTopic>, BrokerError> {
        loop {
            if let Some(t) = self.cached(name) {
                return Ok(t);
            }
            let seen = self.deletions.load(Ordering::Acquire);
            let record = self
                .storage
                .get_record(TOPIC_SPACE, name)
                .await?
                .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))?;
            let meta: TopicMeta = serde_json::from_slice(&record.value)
                .map_err(|e| StorageError::Corrupt(format!("topic {name}: {e}")))?;
            // Not cached: a deletion came between; read again.
            self.cache_topic(meta, Some(seen));
        }
    }

    /// Like [`Broker::topic`], looking in storage too when the cache does not know it.
    pub async fn topic_loaded(&self, name: &str) -> Result<TopicMeta, BrokerError> {
        Ok(self.lookup_checked(name).await?.meta.clone())
    }

    /// Whether a topic named `name` exists, as [`Broker::topic_loaded`] finds it (bad name,
    /// unknown topic: the same errors), without copying its metadata: what admitting a
    /// publish asks when no backlog limit is set.
    pub async fn topic_exists(&self, name: &str) -> Result<(), BrokerError> {
        self.lookup_checked(name).await.map(drop)
    }

    /// [`Broker::lookup`] of a name checked first.
    async fn lookup_checked(&self, name: &str) -> Result<Arc<CachedTopic>, BrokerError> {
        validate_topic_name(name)?;
        self.lookup(name).await
    }

    pub async fn message(&self, id: MessageId) -> Result<Option<StoredMessage>, BrokerError> {
        Ok(self.storage.message_by_id(id).await?)
    }

    pub async fn messages_by_key(
        &self,
        topic: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, BrokerError> {
        self.topic(topic)?;
        Ok(self.storage.messages_by_key(topic, key, limit).await?)
    }

    pub async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, BrokerError> {
        self.topic(topic)?;
        Ok(self.storage.read(topic, queue, from, limit).await?)
    }

    /// Removes a topic's metadata: from the moment this returns, publishes and lookups answer
    /// [`BrokerError::UnknownTopic`], and no publish that found it before is still appending.
    /// Its messages stay until [`Broker::delete_messages`] (so a caller can first settle what
    /// may still append to it, such as undecided transactions). Returns what the topic was.
    pub async fn forget_topic(&self, name: &str) -> Result<(TopicMeta, Deleting), BrokerError> {
        let meta = self.topic_loaded(name).await?;
        let deleting = {
            let mut set = self
                .deleting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !set.insert(name.to_string()) {
                return Err(BrokerError::BeingDeleted(name.to_string()));
            }
            Deleting {
                name: name.to_string(),
                set: self.deleting.clone(),
            }
        };
        let _alone = self.deletion.write().await;
        // The record goes first: a lookup that read it before is refused its cache entry
        // below, one that reads after finds nothing.
        self.storage
            .put_record(TOPIC_SPACE, name, None, Expect::Any)
            .await?;
        let mut topics = self
            .topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        topics.remove(name);
        self.deletions.fetch_add(1, Ordering::AcqRel);
        self.metrics.forget_topic(name);
        Ok((meta, deleting))
    }

    fn is_deleting(&self, name: &str) -> bool {
        self.deleting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(name)
    }

    /// Held while something that appends to a topic outside the publish calls (a transaction's
    /// half message being stored) finds the topic and records what it will append: a deletion
    /// waits for it, so it sees what was recorded.
    pub async fn topic_stays(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.deletion.read().await
    }

    /// Deletes every message of a forgotten topic (each queue as one range; offsets are not
    /// reused if the name is created again) and its idempotency records, while `_deleting`
    /// keeps the name from being created again. Returns how many messages went.
    pub async fn delete_messages(
        &self,
        topic: &TopicMeta,
        _deleting: &Deleting,
    ) -> Result<u64, BrokerError> {
        let mut deleted = 0u64;
        for q in 0..topic.queues {
            let low = self.storage.low_water(&topic.name, q).await?;
            let new_low = self.storage.truncate(&topic.name, q, u64::MAX).await?;
            deleted = deleted.saturating_add(new_low.saturating_sub(low));
        }
        for space in [
            publish::idempotency_space(&topic.name),
            publish::expiry_space(&topic.name),
        ] {
            crate::storage::clear_space(self.storage.as_ref(), &space, "").await?;
        }
        Ok(deleted)
    }

    /// The high water of each queue of the topic named `name` (whose name is checked, and
    /// which is read from storage when the cache does not know it): what admitting a publish
    /// reads, without copying the topic's metadata.
    pub async fn high_water_of(&self, name: &str) -> Result<Vec<u64>, BrokerError> {
        let topic = self.lookup_checked(name).await?;
        self.high_water(&topic.meta).await
    }

    /// Next offset of every queue of a topic.
    pub async fn high_water(&self, topic: &TopicMeta) -> Result<Vec<u64>, BrokerError> {
        let mut out = Vec::with_capacity(topic.queues as usize);
        for q in 0..topic.queues {
            out.push(self.storage.high_water(&topic.name, q).await?);
        }
        Ok(out)
    }

    /// Low water (retention deleted what lies below), high water and stored bytes of each
    /// queue of a topic.
    pub async fn extents(
        &self,
        topic: &TopicMeta,
    ) -> Result<Vec<crate::storage::QueueExtent>, BrokerError> {
        let mut out = Vec::with_capacity(topic.queues as usize);
        for q in 0..topic.queues {
            out.push(self.storage.extent(&topic.name, q).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["orders", "user-registered", "a.b_c-9", &"x".repeat(128)] {
            assert!(validate_topic_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(129), "a%2Fb"] {
            assert!(validate_topic_name(bad).is_err(), "{bad}");
        }
    }

    /// Issue 23.4: an idempotency key's record goes once its window passed, oldest first,
    /// with its expiry entry; a key published again keeps its newer record, and an entry
    /// whose publish never landed goes alone.
    #[tokio::test]
    async fn idempotency_keys_expire_after_their_window() {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(
            crate::storage::RocksStorage::open(dir.path(), crate::config::FlushMode::Async)
                .unwrap(),
        );
        let limits = LimitsConfig {
            idempotency_window_ms: 60_000,
            ..Default::default()
        };
        let window = limits.idempotency_window_ms;
        let broker = Broker::new(storage.clone(), limits).await.unwrap();
        broker.put_topic("t", Default::default()).await.unwrap();
        let envelope = |n: u32| -> Envelope {
            serde_json::from_value(serde_json::json!({"body": {"n": n}})).unwrap()
        };
        let (first, _) = broker
            .publish_idempotent("t", "k1", envelope(1))
            .await
            .unwrap();
        broker
            .publish_idempotent("t", "k2", envelope(2))
            .await
            .unwrap();
        let (replayed, again) = broker
            .publish_idempotent("t", "k1", envelope(1))
            .await
            .unwrap();
        assert!(again && replayed == first);
        // An entry whose publish failed after it was written.
        storage
            .put_record(
                &publish::expiry_space("t"),
                &format!("{:016x}/never", now_ms()),
                Some(Vec::new()),
                Expect::Any,
            )
            .await
            .unwrap();
        let keys = |space: String| {
            let storage = storage.clone();
            async move {
                storage
                    .list_records(&space, "", 100)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            broker.expire_idempotency_keys("t", now_ms()).await.unwrap(),
            0,
            "within the window"
        );
        assert_eq!(keys(publish::idempotency_space("t")).await, ["k1", "k2"]);
        // k1 is published again (its record rewritten) when the first window is over.
        let record = storage
            .get_record(&publish::idempotency_space("t"), "k1")
            .await
            .unwrap()
            .unwrap();
        let mut seen: publish::IdempotentPublish = serde_json::from_slice(&record.value).unwrap();
        seen.at = seen.at.checked_add(window).unwrap();
        storage
            .put_record(
                &publish::idempotency_space("t"),
                "k1",
                Some(serde_json::to_vec(&seen).unwrap()),
                Expect::Revision(record.revision),
            )
            .await
            .unwrap();
        let later = now_ms() + window;
        assert_eq!(
            broker.expire_idempotency_keys("t", later).await.unwrap(),
            1,
            "k2 only"
        );
        assert_eq!(keys(publish::idempotency_space("t")).await, ["k1"]);
        assert!(keys(publish::expiry_space("t")).await.is_empty());
        let (fresh, again) = broker
            .publish_idempotent("t", "k2", envelope(2))
            .await
            .unwrap();
        assert!(
            !again && fresh.id != first.id,
            "k2 is a new key once expired"
        );
    }

    #[test]
    fn sharding_is_stable_and_spread() {
        // Pinned values: changing the hash would silently reorder keys across an upgrade.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b"user-1"), 8968379626967066057);
        assert_eq!(queue_for_key("user-1", 8), 1);
        assert_eq!(queue_for_key("order-42", 16), 12);
        assert_eq!(queue_for_key("anything", 1), 0);
        let mut seen = [0u32; 8];
        for i in 0..8000 {
            seen[queue_for_key(&format!("user-{i}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
