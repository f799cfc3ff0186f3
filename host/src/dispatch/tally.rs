//! Delivery tallies (acked, retried, dead-lettered, failed): counted by each runner, announced
//! between nodes sharing storage, and summed for status.

use super::*;
use crate::dispatch::runner::RunnerShared;

/// A runner's delivery counters (since the subscription was created), in-flight count and
/// plugin version: this node's, or summed over the nodes running parts of a subscription.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Tally {
    #[serde(flatten)]
    pub counts: state::StoredCounts,
    pub in_flight: u64,
    pub plugin_version: u32,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        let (c, d) = (&mut self.counts, &o.counts);
        c.delivered += d.delivered;
        c.acked += d.acked;
        c.retried += d.retried;
        c.dead_lettered += d.dead_lettered;
        c.failed += d.failed;
        c.expired += d.expired;
        self.in_flight += o.in_flight;
        self.plugin_version = self.plugin_version.max(o.plugin_version);
    }
}

/// What a node tells the others about its runners, every second.
#[derive(Serialize, serde::Deserialize)]
pub(super) struct TallyReport {
    node: String,
    groups: HashMap<String, Tally>,
}

/// The channel tallies are announced on.
pub(super) const TALLY_CHANNEL: &str = "tallies";

/// A node's report older than this is ignored (the node stopped or died).
pub(super) const TALLY_FRESH: std::time::Duration = std::time::Duration::from_secs(3);

impl Dispatcher {
    /// Tells the other nodes sharing the storage what this node's runners counted.
    pub async fn announce_tallies(&self) {
        let Some(share) = &self.share else {
            return;
        };
        let groups = self
            .runners
            .lock()
            .await
            .iter()
            .map(|(g, r)| (g.clone(), r.shared.tally()))
            .collect();
        let report = TallyReport {
            node: share.node.clone(),
            groups,
        };
        if let Ok(bytes) = serde_json::to_vec(&report) {
            self.env.storage.announce(TALLY_CHANNEL, bytes).await;
        }
    }

    /// Keeps the other nodes' tallies as they announce them, until `stop`.
    pub async fn listen_tallies(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        use futures::StreamExt as _;
        let Some(share) = &self.share else {
            return;
        };
        let Some(mut reports) = self.env.storage.listen(TALLY_CHANNEL).await else {
            return;
        };
        loop {
            let bytes = tokio::select! {
                _ = stop.cancelled() => return,
                b = reports.next() => match b { Some(b) => b, None => return },
            };
            let Ok(report) = serde_json::from_slice::<TallyReport>(&bytes) else {
                continue;
            };
            if report.node == share.node {
                continue;
            }
            if let Ok(mut peers) = self.peer_tallies.lock() {
                peers.retain(|_, (at, _)| at.elapsed() < TALLY_FRESH);
                peers.insert(report.node, (std::time::Instant::now(), report.groups));
            }
        }
    }

    /// `group`'s tally on this node plus those other nodes reported lately; `None` if no node
    /// runs it. See [`Self::add_stored_counts`] for the nodes not running it now.
    pub(super) fn tally(&self, group: &str, local: Option<&RunnerShared>) -> Option<Tally> {
        let mut total = local.map(RunnerShared::tally);
        if let Ok(peers) = self.peer_tallies.lock() {
            for (at, groups) in peers.values() {
                if let Some(t) = groups.get(group).filter(|_| at.elapsed() < TALLY_FRESH) {
                    total.get_or_insert_default().add(t);
                }
            }
        }
        total
    }

    /// On shared storage, adds to a live `tally` of `group` (incarnation `created_at`) the
    /// stored counters of every node not running the group now: nodes that stopped, died or
    /// gave up its queues, and earlier runs of nodes whose id changes at each start. A node
    /// running it counts from its own record, so its live tally already holds that record.
    pub(super) async fn add_stored_counts(
        &self,
        group: &str,
        tally: Option<Tally>,
        local_runs: bool,
        created_at: u64,
    ) -> Result<Option<Tally>, DispatchError> {
        let (Some(share), Some(mut total)) = (&self.share, tally) else {
            return Ok(tally);
        };
        let mut live: std::collections::HashSet<String> = self
            .peer_tallies
            .lock()
            .map(|peers| {
                peers
                    .iter()
                    .filter(|(_, (at, groups))| {
                        at.elapsed() < TALLY_FRESH && groups.contains_key(group)
                    })
                    .map(|(node, _)| node.clone())
                    .collect()
            })
            .unwrap_or_default();
        if local_runs {
            live.insert(share.node.clone());
        }
        let stored = self
            .env
            .storage
            .list_records(&state::counts_space(group), "", usize::MAX)
            .await?;
        for (node, r) in stored {
            if live.contains(&node) {
                continue;
            }
            let counts: state::NodeCounts = state::decode(&node, &r)?;
            if let Some(counts) = counts.of(created_at) {
                total.add(&Tally {
                    counts,
                    ..Tally::default()
                });
            }
        }
        Ok(Some(total))
    }
}
