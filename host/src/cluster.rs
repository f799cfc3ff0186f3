//! Nodes and leases over the storage trait, for several wasmq nodes on one shared backend: each
//! node heartbeats a record; work (each subscription queue, each broadcast instance, the
//! transaction check-backs) is owned through a lease record taken by compare-and-set, renewed
//! before it expires and given up locally *before* it can expire (fencing), so two nodes never
//! act on one lease at once. Leases are plain records, so both backends carry them.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::base::now_ms;
use crate::storage::{Expect, Storage, StorageError};

pub const NODE_SPACE: &str = "cluster/node";
pub const LEASE_SPACE: &str = "cluster/lease";

/// What a lease record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub owner: String,
    /// Milliseconds since the epoch; after it, anyone may take the lease.
    pub expires_at: u64,
}

/// What a node's heartbeat record holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub api: String,
    pub started_at: u64,
    pub heartbeat_at: u64,
}

/// A duration in whole ms, saturating (a lease time is never near the bound).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(|e| StorageError::Encode(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

/// Takes `key` for `owner` for `ttl` if it is free, expired, or already `owner`'s. Returns the
/// record's revision (what renewals must name), or `None` if another owner holds it.
pub async fn try_acquire(
    storage: &dyn Storage,
    key: &str,
    owner: &str,
    ttl: Duration,
) -> Result<Option<u64>, StorageError> {
    let now = now_ms();
    let expect = match storage.get_record(LEASE_SPACE, key).await? {
        None => Expect::Absent,
        Some(r) => {
            let held: LeaseRecord = decode("lease", &r.value)?;
            if held.owner != owner && held.expires_at > now {
                return Ok(None);
            }
            Expect::Revision(r.revision)
        }
    };
    let record = LeaseRecord {
        owner: owner.to_string(),
        expires_at: now.saturating_add(ms(ttl)),
    };
    match storage
        .put_record(LEASE_SPACE, key, Some(encode(&record)?), expect)
        .await
    {
        Ok(revision) => Ok(Some(revision)),
        // Someone else got there first.
        Err(StorageError::Conflict { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Extends a lease held at `revision`; `None` if it is no longer ours (taken over).
pub async fn renew(
    storage: &dyn Storage,
    key: &str,
    owner: &str,
    revision: u64,
    ttl: Duration,
) -> Result<Option<u64>, StorageError> {
    let record = LeaseRecord {
        owner: owner.to_string(),
        expires_at: now_ms().saturating_add(ms(ttl)),
    };
    match storage
        .put_record(
            LEASE_SPACE,
            key,
            Some(encode(&record)?),
            Expect::Revision(revision),
        )
        .await
    {
        Ok(r) => Ok(Some(r)),
        Err(StorageError::Conflict { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Gives a lease up (only if still held at `revision`), so another node need not wait out the TTL.
pub async fn release(storage: &dyn Storage, key: &str, revision: u64) {
    let _ = storage
        .put_record(LEASE_SPACE, key, None, Expect::Revision(revision))
        .await;
}

/// A lease this node holds: renewed in the background every `ttl / 3`. `held()` turns false
/// as soon as a renewal is refused, or when the last successful renewal is `ttl / 3` from
/// expiring (storage unreachable): the holder stops acting while the lease is still its own,
/// before anyone else can take it.
pub struct HeldLease {
    pub key: String,
    held: watch::Receiver<bool>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HeldLease {
    /// Acquires `key` (waiting while another node holds it, until `give_up`) and starts renewing.
    pub async fn acquire(
        storage: Arc<dyn Storage>,
        key: &str,
        owner: &str,
        ttl: Duration,
        give_up: Duration,
    ) -> Result<Option<HeldLease>, StorageError> {
        let deadline = tokio::time::Instant::now() + give_up;
        let revision = loop {
            if let Some(r) = try_acquire(storage.as_ref(), key, owner, ttl).await? {
                break r;
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(ttl / 4).await;
        };
        Ok(Some(HeldLease::adopt(storage, key, owner, revision, ttl)))
    }

    /// Starts renewing a lease just taken with [`try_acquire`] at `revision`.
    pub fn adopt(
        storage: Arc<dyn Storage>,
        key: &str,
        owner: &str,
        revision: u64,
        ttl: Duration,
    ) -> HeldLease {
        let (tx, held) = watch::channel(true);
        let stop = CancellationToken::new();
        let task = tokio::spawn(renew_loop(
            storage,
            key.to_string(),
            owner.to_string(),
            revision,
            ttl,
            tx,
            stop.clone(),
        ));
        HeldLease {
            key: key.to_string(),
            held,
            stop,
            task,
        }
    }

    pub fn held(&self) -> bool {
        *self.held.borrow()
    }

    /// Resolves when the lease is lost, without borrowing the lease (for a task that stops
    /// work when it is).
    pub fn on_lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static + use<> {
        let mut held = self.held.clone();
        async move {
            let _ = held.wait_for(|h| !*h).await;
        }
    }

    /// Stops renewing and releases the lease.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn renew_loop(
    storage: Arc<dyn Storage>,
    key: String,
    owner: String,
    mut revision: u64,
    ttl: Duration,
    held: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut valid_until = tokio::time::Instant::now() + ttl;
    loop {
        // Stop acting a third of the TTL before expiry if renewals keep failing.
        let fence = valid_until - ttl / 3;
        tokio::select! {
            _ = stop.cancelled() => {
                release(storage.as_ref(), &key, revision).await;
                return;
            }
            _ = tokio::time::sleep_until(fence) => {
                let _ = held.send(false);
                tracing::warn!(lease = %key, "lease not renewed in time; stopped acting on it");
                return;
            }
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let asked = tokio::time::Instant::now();
        match renew(storage.as_ref(), &key, &owner, revision, ttl).await {
            Ok(Some(r)) => {
                revision = r;
                valid_until = asked + ttl;
            }
            Ok(None) => {
                let _ = held.send(false);
                tracing::warn!(lease = %key, "lease taken over; stopped acting on it");
                return;
            }
            Err(e) => tracing::warn!(lease = %key, error = %e, "lease renewal failed; retrying"),
        }
    }
}

/// Fencing: cancels `work` as soon as one of the leases it runs under is lost (`lost`, from
/// [`HeldLease::on_lost`]). Returns whether that happened, rather than `work` ending otherwise.
pub async fn fence<F>(lost: Vec<F>, work: CancellationToken) -> bool
where
    F: std::future::Future<Output = ()> + Send,
{
    if lost.is_empty() {
        return false;
    }
    let any = futures::future::select_all(lost.into_iter().map(Box::pin));
    tokio::select! {
        _ = any => {
            work.cancel();
            true
        }
        _ = work.cancelled() => false,
    }
}

/// Every lease record: key, holder and revision.
pub async fn leases(
    storage: &dyn Storage,
) -> Result<Vec<(String, LeaseRecord, u64)>, StorageError> {
    storage
        .list_records(LEASE_SPACE, "", usize::MAX)
        .await?
        .into_iter()
        .map(|(k, r)| Ok((k, decode("lease", &r.value)?, r.revision)))
        .collect()
}

/// Every node record.
pub async fn nodes(storage: &dyn Storage) -> Result<Vec<NodeRecord>, StorageError> {
    storage
        .list_records(NODE_SPACE, "", usize::MAX)
        .await?
        .iter()
        .map(|(_, r)| decode("node", &r.value))
        .collect()
}

impl NodeRecord {
    /// Heartbeat seen within three beats.
    pub fn is_up(&self, now: u64) -> bool {
        now.saturating_sub(self.heartbeat_at) <= 3 * HEARTBEAT.as_millis() as u64
    }
}

/// This node: its id and heartbeat, renewed while it runs.
pub struct Node {
    pub id: String,
    pub backend: &'static str,
    storage: Arc<dyn Storage>,
    stop: CancellationToken,
    /// The heartbeat task; [`Node::stop`] waits for it (a beat in flight would otherwise write
    /// the record back after the stop removed it, or hold the storage past its close).
    heartbeat: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How often nodes heartbeat; a node silent for 3 beats is shown as down.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

impl Node {
    /// Registers this node under `id` (a fresh one if empty) and starts its heartbeat.
    pub async fn start(
        storage: Arc<dyn Storage>,
        backend: &'static str,
        api: String,
        id: &str,
    ) -> Result<Arc<Node>, StorageError> {
        let id = if id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            id.to_string()
        };
        let started_at = now_ms();
        let beat = {
            let (storage, id, api) = (storage.clone(), id.clone(), api.clone());
            move || {
                let (storage, id, api) = (storage.clone(), id.clone(), api.clone());
                async move {
                    let record = NodeRecord {
                        node: id.clone(),
                        api,
                        started_at,
                        heartbeat_at: now_ms(),
                    };
                    storage
                        .put_record(NODE_SPACE, &id, Some(encode(&record)?), Expect::Any)
                        .await
                        .map(drop)
                }
            }
        };
        beat().await?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                }
                if let Err(e) = beat().await {
                    tracing::warn!(error = %e, "node heartbeat failed");
                }
            }
        });
        Ok(Arc::new(Node {
            id,
            backend,
            storage,
            stop,
            heartbeat: std::sync::Mutex::new(Some(heartbeat)),
        }))
    }

    /// Every node that ever registered (silent ones are kept for a while, marked down), and
    /// every lease with its owner: what `GET /v1/cluster` shows (the HTTP layer names the
    /// subscription unit each lease is for, which dispatch defines).
    pub async fn view(&self) -> Result<ClusterView, StorageError> {
        let now = now_ms();
        let nodes = nodes(self.storage.as_ref())
            .await?
            .into_iter()
            .map(|n| NodeView {
                heartbeat_age_ms: now.saturating_sub(n.heartbeat_at),
                up: n.is_up(now),
                is_self: n.node == self.id,
                node: n.node,
                api: n.api,
                started_at: n.started_at,
                heartbeat_at: n.heartbeat_at,
            })
            .collect();
        let leases = leases(self.storage.as_ref())
            .await?
            .into_iter()
            .map(|(lease, l, _)| LeaseView {
                lease,
                owner: l.owner,
                expires_at: l.expires_at,
                expired: l.expires_at <= now,
                subscription: None,
                queue: None,
                instance: None,
            })
            .collect();
        Ok(ClusterView {
            node: self.id.clone(),
            backend: self.backend,
            nodes,
            leases,
        })
    }

    /// `wasmq_node_info{node, backend}` (always 1), `wasmq_node_dispatching` (1 while this
    /// node runs any subscription queue) and `wasmq_node_leases` (leases it holds), so scrapes
    /// of several nodes tell them apart.
    pub fn register_metrics(
        &self,
        registry: &mut prometheus_client::registry::Registry,
        dispatching: bool,
        leases: usize,
    ) {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        let info: Family<Vec<(String, String)>, Gauge> = Family::default();
        info.get_or_create(&vec![
            ("node".to_string(), self.id.clone()),
            ("backend".to_string(), self.backend.to_string()),
        ])
        .set(1);
        registry.register(
            "wasmq_node_info",
            "This node's id and storage backend",
            info,
        );
        let active: Gauge = Gauge::default();
        active.set(i64::from(dispatching));
        registry.register(
            "wasmq_node_dispatching",
            "1 while this node runs any subscription queue",
            active,
        );
        let held: Gauge = Gauge::default();
        held.set(leases as i64);
        registry.register(
            "wasmq_node_leases",
            "Leases this node holds (subscription queues, broadcast instances, check-backs)",
            held,
        );
    }

    /// Stops the heartbeat and waits for it, then removes this node's record (a clean stop is
    /// not a failure).
    pub async fn stop(&self) {
        self.stop.cancel();
        let heartbeat = self
            .heartbeat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = heartbeat
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "the node heartbeat ended abnormally");
        }
        let _ = self
            .storage
            .put_record(NODE_SPACE, &self.id, None, Expect::Any)
            .await;
    }
}

impl Drop for Node {
    /// A node dropped without [`Node::stop`] (serving ended with an error) stops beating too:
    /// the heartbeat task does not hold the node, and would otherwise run on for good.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `GET /v1/cluster`: this node, the backend, every node and every lease.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterView {
    pub node: String,
    pub backend: &'static str,
    pub nodes: Vec<NodeView>,
    pub leases: Vec<LeaseView>,
}

/// A node as heartbeats show it (times in ms since the epoch).
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct NodeView {
    pub node: String,
    pub api: String,
    pub started_at: u64,
    pub heartbeat_at: u64,
    pub heartbeat_age_ms: u64,
    pub up: bool,
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// A lease, its holder, and the subscription unit it is for (when its key names one).
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct LeaseView {
    pub lease: String,
    pub owner: String,
    pub expires_at: u64,
    pub expired: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FlushMode;
    use crate::storage::RocksStorage;

    fn storage(dir: &std::path::Path) -> Arc<dyn Storage> {
        Arc::new(RocksStorage::open(dir, FlushMode::Async).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_owner_at_a_time_and_expiry_hands_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let ttl = Duration::from_millis(300);
        let r = try_acquire(s.as_ref(), "q/0", "a", ttl)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            try_acquire(s.as_ref(), "q/0", "b", ttl).await.unwrap(),
            None
        );
        // The owner may take it again (a restart), and renew it.
        let r = renew(s.as_ref(), "q/0", "a", r, ttl)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        let rb = try_acquire(s.as_ref(), "q/0", "b", ttl)
            .await
            .unwrap()
            .unwrap();
        // The old owner's renewal names a stale revision: it is fenced out.
        assert_eq!(renew(s.as_ref(), "q/0", "a", r, ttl).await.unwrap(), None);
        release(s.as_ref(), "q/0", rb).await;
        assert!(
            try_acquire(s.as_ref(), "q/0", "c", ttl)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_lease_renews_and_is_given_up_when_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let ttl = Duration::from_millis(300);
        let lease = HeldLease::acquire(s.clone(), "dispatch", "a", ttl, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        // Renewed past several TTLs.
        tokio::time::sleep(ttl * 3).await;
        assert!(lease.held());
        assert!(
            HeldLease::acquire(s.clone(), "dispatch", "b", ttl, Duration::from_millis(100))
                .await
                .unwrap()
                .is_none()
        );
        // An operator (or a bug) overwrites the lease: the holder notices and stops.
        let taken = LeaseRecord {
            owner: "b".into(),
            expires_at: now_ms() + 60_000,
        };
        s.put_record(
            LEASE_SPACE,
            "dispatch",
            Some(encode(&taken).unwrap()),
            Expect::Any,
        )
        .await
        .unwrap();
        tokio::time::timeout(ttl * 2, lease.on_lost())
            .await
            .unwrap();
        assert!(!lease.held());
        lease.release().await;
        // Released cleanly, another node takes it at once.
        let b = HeldLease::acquire(s.clone(), "dispatch2", "a", ttl, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        b.release().await;
        assert!(
            try_acquire(s.as_ref(), "dispatch2", "c", ttl)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_heartbeat_and_show_in_the_view() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let node = Node::start(s.clone(), "rocksdb", "http://127.0.0.1:1".into(), "")
            .await
            .unwrap();
        let v = node.view().await.unwrap();
        assert_eq!(v.nodes[0].node, node.id);
        assert!(v.nodes[0].up);
        node.stop().await;
        assert!(node.view().await.unwrap().nodes.is_empty());
    }
}
