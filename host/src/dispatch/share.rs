//! Dividing dispatch among the nodes that share one storage: every (subscription, queue) pair
//! of a clustering subscription, and every instance of a broadcast one, is a unit owned by one
//! node at a time through a lease. Each node wants the units that rendezvous hashing over the
//! live nodes gives it, takes those that are free or expired, and gives up (after draining)
//! those that a newly arrived node should have.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;

use super::spec::Mode;
use super::state::SubscriptionRecord;
use crate::base::now_ms;
use crate::cluster::{self, HeldLease};
use crate::storage::{Storage, StorageError};

/// How long a unit's lease lasts unless renewed: a dead node's queues move after it.
pub const UNIT_LEASE: Duration = Duration::from_secs(3);

/// What one lease of a subscription covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKey {
    /// Queue `n` of a clustering subscription.
    Queue(u32),
    /// Every queue of broadcast instance `n`.
    Instance(u32),
}

pub fn lease_key(group: &str, unit: UnitKey) -> String {
    match unit {
        UnitKey::Queue(q) => format!("sub/{group}/q{q}"),
        UnitKey::Instance(i) => format!("sub/{group}/i{i}"),
    }
}

/// The subscription and unit of a lease key made by [`lease_key`].
pub fn parse_key(key: &str) -> Option<(&str, UnitKey)> {
    let rest = key.strip_prefix("sub/")?;
    let (group, unit) = rest.rsplit_once('/')?;
    let n = unit.get(1..)?.parse().ok()?;
    match unit.as_bytes().first()? {
        b'q' => Some((group, UnitKey::Queue(n))),
        b'i' => Some((group, UnitKey::Instance(n))),
        _ => None,
    }
}

/// A subscription's units with the (member, queue) pairs each covers.
pub fn units(record: &SubscriptionRecord, queues: u32) -> Vec<(UnitKey, BTreeSet<(u32, u32)>)> {
    if record.spec.mode == Mode::Broadcast {
        (0..record.spec.instances)
            .map(|i| (UnitKey::Instance(i), (0..queues).map(|q| (i, q)).collect()))
            .collect()
    } else {
        (0..queues)
            .map(|q| (UnitKey::Queue(q), BTreeSet::from([(0, q)])))
            .collect()
    }
}

/// The node that should own `key` among `nodes` (highest random weight): stable while the
/// set of nodes is, and when a node leaves only its keys move.
pub fn preferred<'a>(key: &str, nodes: &'a [String]) -> Option<&'a String> {
    nodes.iter().max_by_key(|n| {
        let mut h = sha2::Sha256::new();
        h.update(n.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        let d = h.finalize();
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    })
}

/// The leases this node holds and the decisions about them.
pub struct Share {
    pub node: String,
    storage: Arc<dyn Storage>,
    held: tokio::sync::Mutex<HashMap<String, HeldLease>>,
}

/// The outcome of one [`Share::assign`] pass.
pub struct Assignment {
    /// The (member, queue) pairs this node should run, per subscription (none: not listed).
    pub run: HashMap<String, BTreeSet<(u32, u32)>>,
    /// Leases to give up once the runners using them stopped.
    pub release: Vec<String>,
}

impl Share {
    pub fn new(node: String, storage: Arc<dyn Storage>) -> Self {
        Self {
            node,
            storage,
            held: Default::default(),
        }
    }

    /// Takes the leases of wanted units this node should own, keeps those it holds, and marks
    /// for release those another live node should own now and those no longer wanted.
    /// `wanted`: running subscriptions with their topic's queue count.
    pub async fn assign(
        &self,
        wanted: &[(&SubscriptionRecord, u32)],
    ) -> Result<Assignment, StorageError> {
        let now = now_ms();
        let live: Vec<String> = cluster::nodes(self.storage.as_ref())
            .await?
            .into_iter()
            .filter(|n| n.is_up(now) || n.node == self.node)
            .map(|n| n.node)
            .collect();
        let records: HashMap<String, cluster::LeaseRecord> = cluster::leases(self.storage.as_ref())
            .await?
            .into_iter()
            .map(|(k, l, _)| (k, l))
            .collect();
        let mut held = self.held.lock().await;
        // Lost leases are gone already (their renewal stopped); forget them.
        held.retain(|_, l| l.held());
        let mut run: HashMap<String, BTreeSet<(u32, u32)>> = HashMap::new();
        let mut keep = BTreeSet::new();
        for (record, queues) in wanted {
            for (unit, pairs) in units(record, *queues) {
                let key = lease_key(&record.group, unit);
                // A holder that let its lease expire is not a candidate for it.
                let lapsed = records
                    .get(&key)
                    .filter(|l| l.expires_at <= now)
                    .map(|l| l.owner.as_str());
                let candidates: Vec<String> = live
                    .iter()
                    .filter(|n| Some(n.as_str()) != lapsed)
                    .cloned()
                    .collect();
                let mine = preferred(&key, &candidates).is_none_or(|n| *n == self.node);
                if held.contains_key(&key) {
                    if mine {
                        keep.insert(key);
                        run.entry(record.group.clone()).or_default().extend(pairs);
                    }
                    continue;
                }
                let free = records.get(&key).is_none_or(|l| l.expires_at <= now);
                if !(mine && free) {
                    continue;
                }
                if let Some(rev) =
                    cluster::try_acquire(self.storage.as_ref(), &key, &self.node, UNIT_LEASE)
                        .await?
                {
                    let lease =
                        HeldLease::adopt(self.storage.clone(), &key, &self.node, rev, UNIT_LEASE);
                    held.insert(key.clone(), lease);
                    keep.insert(key);
                    run.entry(record.group.clone()).or_default().extend(pairs);
                }
            }
        }
        let release = held
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        Ok(Assignment { run, release })
    }

    /// Futures that resolve when one of the leases covering `group`'s `pairs` is lost.
    pub async fn on_lost(
        &self,
        group: &str,
        record: &SubscriptionRecord,
        queues: u32,
        pairs: &BTreeSet<(u32, u32)>,
    ) -> Vec<impl std::future::Future<Output = ()> + Send + 'static + use<>> {
        let held = self.held.lock().await;
        units(record, queues)
            .into_iter()
            .filter(|(_, p)| !p.is_disjoint(pairs))
            .filter_map(|(unit, _)| held.get(&lease_key(group, unit)).map(|l| l.on_lost()))
            .collect()
    }

    /// Gives leases up (their runners stopped), so their new owners need not wait them out.
    pub async fn release(&self, keys: &[String]) {
        let leases: Vec<HeldLease> = {
            let mut held = self.held.lock().await;
            keys.iter().filter_map(|k| held.remove(k)).collect()
        };
        futures::future::join_all(leases.into_iter().map(HeldLease::release)).await;
    }

    /// Gives every lease up (a clean stop).
    pub async fn release_all(&self) {
        let keys: Vec<String> = self.held.lock().await.keys().cloned().collect();
        self.release(&keys).await;
    }

    /// How many leases this node holds.
    pub async fn count(&self) -> usize {
        self.held.lock().await.len()
    }

    /// The owner of every unit lease of `group`, by unit.
    pub async fn owners(&self, group: &str) -> Result<HashMap<String, String>, StorageError> {
        let prefix = format!("sub/{group}/");
        Ok(cluster::leases(self.storage.as_ref())
            .await?
            .into_iter()
            .filter(|(k, l, _)| k.starts_with(&prefix) && l.expires_at > now_ms())
            .map(|(k, l, _)| (k, l.owner))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for unit in [UnitKey::Queue(7), UnitKey::Instance(0)] {
            let key = lease_key("orders.v2", unit);
            assert_eq!(parse_key(&key), Some(("orders.v2", unit)));
        }
        assert_eq!(parse_key("transactions"), None);
        assert_eq!(parse_key("sub/g/x1"), None);
    }

    #[test]
    fn keys_spread_over_nodes_and_only_a_leaving_nodes_keys_move() {
        let nodes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let keys: Vec<String> = (0..300)
            .map(|q| lease_key("g", UnitKey::Queue(q)))
            .collect();
        let owner = |k: &String, n: &[String]| preferred(k, n).cloned().unwrap();
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for k in &keys {
            *per_node.entry(owner(k, &nodes)).or_default() += 1;
        }
        // Each of three nodes gets a fair share (100 expected).
        assert!(
            per_node.values().all(|n| (60..=140).contains(n)),
            "{per_node:?}"
        );
        let without_c = &nodes[..2];
        for k in &keys {
            let before = owner(k, &nodes);
            if before != "c" {
                assert_eq!(
                    owner(k, without_c),
                    before,
                    "{k} moved though its owner stayed"
                );
            }
        }
    }
}
