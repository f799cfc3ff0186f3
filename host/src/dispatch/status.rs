//! What subscriptions look like from outside: their list and status (offsets, lag, timers,
//! dead letters), dead-letter pages and redrive, and the backlog that publishes are held to.

use super::*;

/// A dead letter as the API shows it: its paging key, the broadcast instance that gave it up
/// (absent for clustering), and the stored entry.
#[derive(Serialize, schemars::JsonSchema)]
pub struct DeadLetterView {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    #[serde(flatten)]
    pub entry: DeadLetter,
}

/// `GET /v1/subscriptions/{group}`: the spec and state, offsets and lag per queue (per
/// broadcast instance for broadcast), timers, dead letters, and delivery counters while it runs.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct SubscriptionStatus {
    pub group: String,
    pub state: SubState,
    pub spec: SubscriptionSpec,
    /// ms since the epoch.
    pub created_at: u64,
    pub updated_at: u64,
    /// Messages not yet done, summed over queues (and instances).
    pub lag: u64,
    pub pending_timers: usize,
    /// Entries in the dead-letter queue.
    pub dlq: usize,
    /// Broadcast: each instance with its own offsets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<InstanceStatus>>,
    /// Clustering: the one shared offset per queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<QueueStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<DeliveryCounters>,
}

/// One broadcast instance (or the one member of a clustering subscription).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct InstanceStatus {
    pub instance: u32,
    pub lag: u64,
    pub pending_timers: usize,
    pub queues: Vec<QueueStatus>,
}

/// One queue of a member: committed offset (everything before it is done), high water, lag.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct QueueStatus {
    pub queue: u32,
    pub committed: u64,
    /// The first offset still stored (retention deleted what lies below).
    pub low_water: u64,
    pub high_water: u64,
    /// Messages stored and not yet handled: high water − max(committed, low water).
    pub lag: u64,
    /// Ordered delivery: attempts spent on the message at the head of the queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_attempts: Option<u32>,
    /// Ordered delivery: when the head's next attempt is due (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    /// Shared storage: the node running this queue (or instance).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Deliveries since the runner started (summed over nodes on shared storage).
#[derive(Debug, Clone, Copy, Serialize, schemars::JsonSchema)]
pub struct DeliveryCounters {
    pub delivered: u64,
    pub acked: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub failed: u64,
    /// Messages retention deleted before this subscription handled them (its offset was
    /// behind the queue's low water and moved up to it).
    pub expired_unconsumed: u64,
}

impl Dispatcher {
    /// Every subscription's status, by group name. Each record is read once, by the listing,
    /// and a subscription deleted meanwhile is shown as it was listed, not an error for the
    /// whole list.
    pub async fn list(&self) -> Result<Vec<SubscriptionStatus>, DispatchError> {
        let records = self
            .env
            .storage
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?;
        let mut out = Vec::with_capacity(records.len());
        for (group, r) in records {
            let record: SubscriptionRecord = state::decode(&group, &r)?;
            out.push(self.status_of(&group, record).await?);
        }
        Ok(out)
    }

    /// The spec, state, offsets and lag per queue (and per instance for broadcast), counters.
    ///
    /// The offsets are read first, then the dead-letter count and the delivery counters: a
    /// message is counted (and a dead letter stored) before its offset is passed, so a status
    /// with lag 0 counts every message behind its offsets.
    pub async fn status(&self, group: &str) -> Result<SubscriptionStatus, DispatchError> {
        let record = self.record(group).await?;
        self.status_of(group, record).await
    }

    /// [`Self::status`] of `group`, given its record.
    async fn status_of(
        &self,
        group: &str,
        record: SubscriptionRecord,
    ) -> Result<SubscriptionStatus, DispatchError> {
        let topic = self.env.broker.topic(&record.spec.topic)?;
        let extents = self.env.broker.extents(&topic).await?;
        // Shared storage: which node runs each queue (or instance).
        let owners = match &self.share {
            Some(s) => s.owners(group).await?,
            None => HashMap::new(),
        };
        // The runner's shared state, and the lock let go: storage reads below must not hold up
        // runners starting and stopping, nor other status calls. Its offsets and counters are
        // read from it in the order above.
        let shared = {
            let runners = self.runners.lock().await;
            runners.get(group).map(|r| r.shared.clone())
        };
        let broadcast = record.spec.mode == Mode::Broadcast;
        let members = if broadcast { record.spec.instances } else { 1 };
        let mut member_views = Vec::new();
        let mut total_lag = 0u64;
        let mut timers = 0usize;
        for i in 0..members {
            let name = state::member_name(broadcast, i);
            let live = shared
                .as_ref()
                .and_then(|r| r.members.iter().find(|m| m.name == name));
            // A member running every queue here has their offsets in memory, newer than the
            // stored ones: no storage read (a status sweep over 1 000 running subscriptions
            // made one per subscription).
            let all_live =
                live.is_some_and(|m| (0..extents.len()).all(|q| m.live_committed(q).is_some()));
            let stored: HashMap<String, state::Cursor> = if all_live {
                HashMap::new()
            } else {
                self.env
                    .storage
                    .list_records(&state::cursor_space(group), &format!("{name}/"), usize::MAX)
                    .await?
                    .iter()
                    .map(|(k, r)| Ok((k.clone(), state::decode(k, r)?)))
                    .collect::<Result<_, StorageError>>()?
            };
            let mut queues = Vec::new();
            let mut lag = 0u64;
            for (q, ext) in extents.iter().enumerate() {
                let hw = &ext.high_water;
                let live_committed = live.and_then(|m| m.live_committed(q));
                let (committed, head_attempts, head_due) = match (live, live_committed) {
                    (Some(m), Some(c)) => (
                        c,
                        m.head_attempts[q].load(Ordering::Relaxed),
                        m.head_due[q].load(Ordering::Relaxed),
                    ),
                    _ => stored
                        .get(&state::cursor_key(&name, q as u32))
                        .map_or((0, 0, 0), |c| (c.committed, c.head_attempts, c.head_due)),
                };
                // What lies below the low water is gone, not waiting (the runner moves up to it
                // on its next read and counts it as expired).
                let low = ext.low_water;
                let l = hw.saturating_sub(committed.max(low));
                lag += l;
                let unit = if broadcast {
                    share::UnitKey::Instance(i)
                } else {
                    share::UnitKey::Queue(q as u32)
                };
                queues.push(QueueStatus {
                    queue: q as u32,
                    committed,
                    low_water: low,
                    high_water: *hw,
                    lag: l,
                    blocked_attempts: (head_attempts > 0).then_some(head_attempts),
                    retry_at: (head_due > 0).then_some(head_due),
                    node: owners.get(&share::lease_key(group, unit)).cloned(),
                });
            }
            total_lag += lag;
            let pending = match live {
                Some(m) => m.pending_timers(),
                None => usize::try_from(
                    state::count(
                        self.env.storage.as_ref(),
                        &state::timer_space(group),
                        &format!("{name}/"),
                    )
                    .await?,
                )
                .unwrap_or(usize::MAX),
            };
            timers += pending;
            member_views.push(InstanceStatus {
                instance: i,
                lag,
                pending_timers: pending,
                queues,
            });
        }
        let dlq = usize::try_from(dlq::count(self.env.storage.as_ref(), group).await?)
            .unwrap_or(usize::MAX);
        let tally = self
            .add_stored_counts(
                group,
                self.tally(group, shared.as_deref()),
                shared.is_some(),
                record.created_at,
            )
            .await?;
        let (instances, queues) = if broadcast {
            (Some(member_views), None)
        } else {
            (
                None,
                Some(member_views.pop().map(|m| m.queues).unwrap_or_default()),
            )
        };
        Ok(SubscriptionStatus {
            group: group.to_string(),
            state: record.state,
            spec: record.spec,
            created_at: record.created_at,
            updated_at: record.updated_at,
            lag: total_lag,
            pending_timers: timers,
            dlq,
            instances,
            queues,
            plugin_version: tally.map(|t| t.plugin_version),
            in_flight: tally.map(|t| t.in_flight),
            counters: tally.map(|t| DeliveryCounters {
                delivered: t.counts.delivered,
                acked: t.counts.acked,
                retried: t.counts.retried,
                dead_lettered: t.counts.dead_lettered,
                failed: t.counts.failed,
                expired_unconsumed: t.counts.expired,
            }),
        })
    }

    /// Dead letters, oldest first, after the key `after` (for paging).
    pub async fn dlq(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DispatchError> {
        self.record(group).await?;
        let page = self
            .env
            .storage
            .list_records_after(&state::dlq_space(group), "", after.unwrap_or(""), limit)
            .await?;
        page.iter().map(|(k, r)| Ok(state::decode(k, r)?)).collect()
    }

    /// Delivers dead letters again (all, or those with these message ids) as fresh attempts.
    pub async fn redrive(
        &self,
        group: &str,
        ids: Option<&[String]>,
    ) -> Result<usize, DispatchError> {
        let _g = self.lock_group(group).await;
        let mut record = self.record(group).await?;
        let store = &self.env.storage;
        let space = state::dlq_space(group);
        // Timers of a running member are also held in memory: stop, write, start again.
        self.halt(group).await;
        let mut n = 0;
        let mut after = String::new();
        loop {
            let page = store
                .list_records_after(&space, "", &after, dlq::PAGE)
                .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = last.clone();
            let mut remove = Vec::new();
            for (k, r) in &page {
                let dl: DeadLetter = state::decode(k, r)?;
                if ids.is_some_and(|ids| !ids.contains(&dl.message_id)) {
                    continue;
                }
                let t = Timer {
                    member: dl.member.clone(),
                    due: now_ms(),
                    queue: dl.queue,
                    offset: dl.offset,
                    attempts: 0,
                    kind: TimerKind::Redrive,
                    last_error: None,
                };
                // The timer replaces its dead letter in one step: never both, never neither.
                remove.push((dl, Some(t)));
            }
            let change = dlq::Change {
                add: Vec::new(),
                remove,
            };
            n += dlq::apply(store.as_ref(), group, change).await? as usize;
        }
        // The nodes running the group's queues load the new timers when they restart.
        self.touch(&mut record).await?;
        if record.state == SubState::Running {
            self.start_group(&record).await?;
        }
        Ok(n)
    }

    /// How far the slowest running subscription of `topic` is behind, in messages.
    pub async fn backlog(&self, topic: &str, high_water: &[u64]) -> u64 {
        let behind = |offsets: &Vec<u64>| -> u64 {
            offsets
                .iter()
                .zip(high_water)
                .map(|(c, hw)| hw.saturating_sub(*c))
                .sum()
        };
        // Queues other nodes run: as stored at the last reconcile (a second old at most).
        let stored = self
            .stored_offsets
            .lock()
            .ok()
            .and_then(|s| {
                s.get(topic)
                    .map(|m| m.iter().map(behind).max().unwrap_or(0))
            })
            .unwrap_or(0);
        let runners = self.runners.lock().await;
        let live = runners
            .values()
            .filter(|r| r.topic == topic)
            .flat_map(|r| r.shared.members.iter())
            .map(|m| {
                high_water
                    .iter()
                    .enumerate()
                    .filter_map(|(q, hw)| Some(hw.saturating_sub(m.live_committed(q)?)))
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0);
        live.max(stored)
    }
}
