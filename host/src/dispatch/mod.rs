//! Dispatch: subscriptions (consumer groups) and their delivery to plugin instances, with
//! RocketMQ's semantics: clustering and broadcast, ordered queues, retries with backoff, a
//! dead-letter queue per group, delayed messages, rate and in-flight limits.

pub mod runner;
pub mod share;
pub mod spec;
pub mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde_json::{Value, json};

use crate::broker::{Broker, BrokerError, now_ms};
use crate::plugins::{PluginError, Plugins};
use crate::storage::{Expect, Storage, StorageError};
use runner::Runner;
pub use spec::{Mode, Start, SubscriptionSpec};
use state::{DeadLetter, SubState, SubscriptionRecord, Timer, TimerKind};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("subscription name: {0}")]
    BadName(String),
    #[error("subscription {0:?} does not exist")]
    Unknown(String),
    #[error("invalid subscription: {0}")]
    Invalid(String),
    #[error("a subscription cannot move to another topic ({0:?}); create a new group")]
    TopicChange(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The services a runner needs.
#[derive(Clone)]
pub struct Env {
    pub broker: Arc<Broker>,
    pub plugins: Arc<Plugins>,
}

pub struct Dispatcher {
    env: Env,
    runners: tokio::sync::Mutex<HashMap<String, Runner>>,
    /// Control changes (create, update, pause, resume, reset, redrive, delete, refresh) take it
    /// shared, each with its group's lock, so changes of different subscriptions never wait on
    /// each other's plugin calls; a reconcile pass, a change on shared storage (which places
    /// every subscription's work in one pass) and shutdown take it alone.
    control: tokio::sync::RwLock<()>,
    /// One lock per subscription with a change in progress (dropped when no one holds it).
    group_locks: GroupLocks,
    /// False once shut down: nothing starts again.
    active: std::sync::atomic::AtomicBool,
    /// Set when several nodes share the storage: this node runs only the units it holds
    /// leases for. `None`: it runs everything.
    share: Option<share::Share>,
    /// Shared storage with a backlog bound: the stored offsets of every running subscription's
    /// members, per topic, read at each reconcile, for the backlog of queues other nodes run.
    stored_offsets: std::sync::Mutex<HashMap<String, Vec<Vec<u64>>>>,
    /// Shared storage: the other nodes' last tallies, by node, with when they arrived.
    peer_tallies: std::sync::Mutex<HashMap<String, PeerTallies>>,
}

type GroupLocks = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// What a control change holds while it runs: see [`Dispatcher::lock_group`].
enum ControlGuard<'a> {
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
    Group {
        _shared: tokio::sync::RwLockReadGuard<'a, ()>,
        _group: GroupGuard<'a>,
    },
}

/// One subscription's lock, held; its map entry goes once nobody holds or waits for it.
struct GroupGuard<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    lock: Arc<tokio::sync::Mutex<()>>,
    locks: &'a GroupLocks,
    name: String,
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = match self.locks.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        // The map's reference and ours: nobody else holds or waits for it.
        if Arc::strong_count(&self.lock) <= 2 {
            locks.remove(&self.name);
        }
    }
}

fn storage(env: &Env) -> &Arc<dyn Storage> {
    env.broker.storage()
}

pub fn validate_group(group: &str) -> Result<(), DispatchError> {
    crate::broker::validate_topic_name(group).map_err(|_| {
        DispatchError::BadName(format!(
            "{group:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with '.'"
        ))
    })
}

/// A runner's delivery counters (since it started), in-flight count and plugin version: this
/// node's, or summed over the nodes running parts of a subscription.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Tally {
    pub delivered: u64,
    pub acked: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub failed: u64,
    pub in_flight: u64,
    pub plugin_version: u32,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.delivered += o.delivered;
        self.acked += o.acked;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.failed += o.failed;
        self.in_flight += o.in_flight;
        self.plugin_version = self.plugin_version.max(o.plugin_version);
    }
}

/// What a node tells the others about its runners, every second.
#[derive(Serialize, serde::Deserialize)]
struct TallyReport {
    node: String,
    groups: HashMap<String, Tally>,
}

/// A node's last report: when it arrived, and its tallies by subscription.
type PeerTallies = (std::time::Instant, HashMap<String, Tally>);

/// The channel tallies are announced on.
const TALLY_CHANNEL: &str = "tallies";
/// A node's report older than this is ignored (the node stopped or died).
const TALLY_FRESH: std::time::Duration = std::time::Duration::from_secs(3);

/// Where to move a subscription's offsets (`POST …/reset`).
#[derive(Debug, Clone, Copy)]
pub struct ResetTo(pub Start);

impl Dispatcher {
    /// A dispatcher alone on its storage: it runs every subscription.
    pub fn new(broker: Arc<Broker>, plugins: Arc<Plugins>) -> Self {
        Self {
            env: Env { broker, plugins },
            runners: Default::default(),
            control: Default::default(),
            group_locks: Default::default(),
            active: std::sync::atomic::AtomicBool::new(true),
            share: None,
            stored_offsets: Default::default(),
            peer_tallies: Default::default(),
        }
    }

    /// A dispatcher on storage shared with other nodes: it runs the subscription queues and
    /// broadcast instances it holds leases for ([`Self::reconcile`] takes and gives them up).
    pub fn shared(broker: Arc<Broker>, plugins: Arc<Plugins>, node: String) -> Self {
        let storage = broker.storage().clone();
        Self {
            share: Some(share::Share::new(node, storage)),
            ..Self::new(broker, plugins)
        }
    }

    /// Serialises control changes of `group`. Alone on its storage, a node lets changes of
    /// different groups run side by side (each waits only for its own group's calls in flight);
    /// on shared storage a change reconciles every subscription, so changes run one at a time.
    async fn lock_group(&self, group: &str) -> ControlGuard<'_> {
        if self.share.is_some() {
            return ControlGuard::Exclusive(self.control.write().await);
        }
        let shared = self.control.read().await;
        let lock = {
            let mut locks = match self.group_locks.lock() {
                Ok(l) => l,
                Err(poisoned) => poisoned.into_inner(),
            };
            locks.entry(group.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        ControlGuard::Group {
            _shared: shared,
            _group: GroupGuard {
                guard: Some(guard),
                lock,
                locks: &self.group_locks,
                name: group.to_string(),
            },
        }
    }

    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether this node runs any subscription queue.
    pub async fn dispatching(&self) -> bool {
        !self.runners.lock().await.is_empty()
    }

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
            storage(&self.env).announce(TALLY_CHANNEL, bytes).await;
        }
    }

    /// Keeps the other nodes' tallies as they announce them, until `stop`.
    pub async fn listen_tallies(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        use futures::StreamExt as _;
        let Some(share) = &self.share else {
            return;
        };
        let Some(mut reports) = storage(&self.env).listen(TALLY_CHANNEL).await else {
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
    /// runs it.
    fn tally(&self, group: &str, local: Option<&Runner>) -> Option<Tally> {
        let mut total = local.map(|r| r.shared.tally());
        if let Ok(peers) = self.peer_tallies.lock() {
            for (at, groups) in peers.values() {
                if let Some(t) = groups.get(group).filter(|_| at.elapsed() < TALLY_FRESH) {
                    total.get_or_insert_default().add(t);
                }
            }
        }
        total
    }

    /// Leases this node holds for subscription work.
    pub async fn leases_held(&self) -> usize {
        match &self.share {
            Some(s) => s.count().await,
            None => 0,
        }
    }

    /// Makes the runners match the stored subscriptions, as changed by this or another node:
    /// starts running ones, stops paused and deleted ones, restarts those whose record, plugin
    /// version (when following the latest), queue count or share of the work changed.
    pub async fn reconcile(&self) -> Result<(), DispatchError> {
        let _g = self.control.write().await;
        self.reconcile_locked().await
    }

    async fn reconcile_locked(&self) -> Result<(), DispatchError> {
        if !self.is_active() {
            return Ok(());
        }
        let mut wanted = HashMap::new();
        for (group, r) in storage(&self.env)
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            let record: SubscriptionRecord = state::decode(&group, &r)?;
            if record.state != SubState::Running {
                continue;
            }
            match self.env.broker.topic(&record.spec.topic) {
                Ok(t) => {
                    wanted.insert(group, (record, t.queues));
                }
                Err(e) => tracing::warn!(%group, error = %e, "subscription's topic unknown"),
            }
        }
        // What this node should run of each subscription.
        let (targets, release): (HashMap<String, runner::Units>, Vec<String>) = match &self.share {
            None => (
                wanted.keys().map(|g| (g.clone(), None)).collect(),
                Vec::new(),
            ),
            Some(share) => {
                let list: Vec<(&SubscriptionRecord, u32)> =
                    wanted.values().map(|(r, q)| (r, *q)).collect();
                let a = share.assign(&list).await?;
                let run = a.run.into_iter().map(|(g, u)| (g, Some(u))).collect();
                (run, a.release)
            }
        };
        if self.share.is_some()
            && self.env.broker.limits().max_backlog > 0
            && let Err(e) = self.read_stored_offsets(&wanted).await
        {
            // The bound then works from offsets a little older; dispatch goes on regardless.
            tracing::warn!(error = %e, "cannot read stored offsets for the backlog bound");
        }
        let running: Vec<String> = self.runners.lock().await.keys().cloned().collect();
        for group in running {
            let stale = match (wanted.get(&group), targets.get(&group)) {
                (Some((record, _)), Some(units)) => {
                    self.runner_differs(&group, units).await || self.is_stale(&group, record).await
                }
                _ => true,
            };
            if stale {
                self.halt(&group).await;
            }
        }
        if let Some(share) = &self.share {
            share.release(&release).await;
        }
        for (group, units) in targets {
            if self.runners.lock().await.contains_key(&group) {
                continue;
            }
            let Some((record, queues)) = wanted.get(&group) else {
                continue;
            };
            if let Err(e) = self.launch(record, *queues, units).await {
                tracing::error!(%group, error = %e, "cannot start subscription");
            }
        }
        Ok(())
    }

    /// Refreshes [`Self::stored_offsets`] from the cursors of the running subscriptions.
    async fn read_stored_offsets(
        &self,
        wanted: &HashMap<String, (SubscriptionRecord, u32)>,
    ) -> Result<(), DispatchError> {
        let mut by_topic: HashMap<String, Vec<Vec<u64>>> = HashMap::new();
        for (group, (record, queues)) in wanted {
            let mut members: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
            for (key, r) in storage(&self.env)
                .list_records(&state::cursor_space(group), "", usize::MAX)
                .await?
            {
                let c: state::Cursor = state::decode(&key, &r)?;
                let Some((member, q)) = state::parse_cursor_key(&key) else {
                    continue;
                };
                let offsets = members
                    .entry(member.to_string())
                    .or_insert_with(|| vec![0; *queues as usize]);
                if let Some(o) = offsets.get_mut(q as usize) {
                    *o = c.committed;
                }
            }
            by_topic
                .entry(record.spec.topic.clone())
                .or_default()
                .extend(members.into_values());
        }
        if let Ok(mut stored) = self.stored_offsets.lock() {
            *stored = by_topic;
        }
        Ok(())
    }

    /// Whether `group`'s runner stopped on its own or runs other units than `units`.
    async fn runner_differs(&self, group: &str, units: &runner::Units) -> bool {
        self.runners
            .lock()
            .await
            .get(group)
            .is_some_and(|r| r.fenced() || r.units != *units)
    }

    /// Runs a subscription after a change made through this node: at once when alone, through
    /// the lease assignment when the storage is shared.
    async fn start_group(&self, record: &SubscriptionRecord) -> Result<(), DispatchError> {
        if self.share.is_some() {
            return self.reconcile_locked().await;
        }
        let queues = self.env.broker.topic(&record.spec.topic)?.queues;
        self.launch(record, queues, None).await
    }

    /// Whether the runner of `group` no longer matches what is stored.
    async fn is_stale(&self, group: &str, record: &SubscriptionRecord) -> bool {
        let (updated_at, version, queues) = {
            let runners = self.runners.lock().await;
            let Some(r) = runners.get(group) else {
                return false;
            };
            let queues = r.shared.members.first().map_or(0, |m| m.committed.len());
            (r.record_updated_at, r.shared.plugin_version, queues)
        };
        if updated_at != record.updated_at {
            return true;
        }
        if record.spec.plugin_version.is_none()
            && let Ok(p) = self.env.plugins.get(&record.spec.plugin).await
            && p.latest().is_some_and(|v| v.version != version)
        {
            return true;
        }
        self.env
            .broker
            .topic(&record.spec.topic)
            .is_ok_and(|t| t.queues as usize != queues)
    }

    async fn launch(
        &self,
        record: &SubscriptionRecord,
        queues: u32,
        units: runner::Units,
    ) -> Result<(), DispatchError> {
        if !self.is_active() {
            return Ok(());
        }
        let runner = runner::start(&self.env, record, units.clone(), self.share.is_some()).await?;
        if let (Some(share), Some(pairs)) = (&self.share, &units) {
            // Fencing: the runner stops the moment a lease it runs under is lost.
            let lost = share.on_lost(&record.group, record, queues, pairs).await;
            let stop = runner.stop_token();
            let group = record.group.clone();
            runner.spawn(async move {
                if crate::cluster::fence(lost, stop).await {
                    tracing::warn!(%group, "a lease of this subscription was lost; its runner stops");
                }
            });
        }
        self.runners
            .lock()
            .await
            .insert(record.group.clone(), runner);
        Ok(())
    }

    async fn halt(&self, group: &str) {
        let runner = self.runners.lock().await.remove(group);
        if let Some(r) = runner {
            r.stop().await;
        }
    }

    async fn record(&self, group: &str) -> Result<SubscriptionRecord, DispatchError> {
        validate_group(group)?;
        match storage(&self.env)
            .get_record(state::SUB_SPACE, group)
            .await?
        {
            Some(r) => Ok(state::decode(group, &r)?),
            None => Err(DispatchError::Unknown(group.to_string())),
        }
    }

    /// Stores the record with a new `updated_at`, so every node restarts its runner of it.
    async fn touch(&self, record: &mut SubscriptionRecord) -> Result<(), DispatchError> {
        record.updated_at = now_ms().max(record.updated_at + 1);
        self.save(record).await
    }

    async fn save(&self, record: &SubscriptionRecord) -> Result<(), DispatchError> {
        state::put(
            storage(&self.env).as_ref(),
            state::SUB_SPACE,
            &record.group,
            record,
        )
        .await?;
        Ok(())
    }

    /// Creates or updates a subscription. An update drains in-flight messages, then restarts
    /// from the stored offsets: nothing is lost or delivered twice beyond what was in flight.
    pub async fn put(
        &self,
        group: &str,
        spec: SubscriptionSpec,
    ) -> Result<(Value, bool), DispatchError> {
        validate_group(group)?;
        spec.validate().map_err(DispatchError::Invalid)?;
        self.env
            .broker
            .secrets()
            .check(&spec.config)
            .map_err(|e| DispatchError::Invalid(format!("config: {e}")))?;
        self.env.broker.topic_loaded(&spec.topic).await?;
        let (_, code) = self
            .env
            .plugins
            .code(&spec.plugin, spec.plugin_version)
            .await?;
        if !code.has_consumer() {
            return Err(DispatchError::Invalid(format!(
                "plugin {:?} does not export a consumer",
                spec.plugin
            )));
        }
        let _g = self.lock_group(group).await;
        let existing = match self.record(group).await {
            Ok(r) => Some(r),
            Err(DispatchError::Unknown(_)) => None,
            Err(e) => return Err(e),
        };
        if let Some(old) = &existing
            && old.spec.topic != spec.topic
        {
            return Err(DispatchError::TopicChange(old.spec.topic.clone()));
        }
        let now = now_ms();
        let record = SubscriptionRecord {
            group: group.to_string(),
            state: existing.as_ref().map_or(SubState::Running, |r| r.state),
            created_at: existing.as_ref().map_or(now, |r| r.created_at),
            updated_at: now,
            spec,
        };
        self.halt(group).await;
        // Offsets first: whichever node runs the subscription finds them all where `start` says.
        let queues = self.env.broker.topic(&record.spec.topic)?.queues;
        runner::ensure_cursors(storage(&self.env).as_ref(), &record, queues).await?;
        self.save(&record).await?;
        if record.state == SubState::Running {
            self.start_group(&record).await?;
        }
        drop(_g);
        Ok((self.status(group).await?, existing.is_none()))
    }

    pub async fn list(&self) -> Result<Vec<Value>, DispatchError> {
        let mut out = Vec::new();
        for (group, _) in storage(&self.env)
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            out.push(self.status(&group).await?);
        }
        Ok(out)
    }

    /// The spec, state, offsets and lag per queue (and per instance for broadcast), counters.
    pub async fn status(&self, group: &str) -> Result<Value, DispatchError> {
        let record = self.record(group).await?;
        let topic = self.env.broker.topic(&record.spec.topic)?;
        let high_water = self.env.broker.high_water(&topic).await?;
        // Shared storage: which node runs each queue (or instance).
        let owners = match &self.share {
            Some(s) => s.owners(group).await?,
            None => HashMap::new(),
        };
        let runners = self.runners.lock().await;
        let runner = runners.get(group);
        let broadcast = record.spec.mode == Mode::Broadcast;
        let members = if broadcast { record.spec.instances } else { 1 };
        let mut member_views = Vec::new();
        let mut total_lag = 0u64;
        let mut timers = 0usize;
        for i in 0..members {
            let name = state::member_name(broadcast, i);
            let live = runner.and_then(|r| r.shared.members.iter().find(|m| m.name == name));
            let stored: HashMap<String, state::Cursor> = storage(&self.env)
                .list_records(&state::cursor_space(group), &format!("{name}/"), usize::MAX)
                .await?
                .iter()
                .map(|(k, r)| Ok((k.clone(), state::decode(k, r)?)))
                .collect::<Result<_, StorageError>>()?;
            let mut queues = Vec::new();
            let mut lag = 0u64;
            for (q, hw) in high_water.iter().enumerate() {
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
                let l = hw.saturating_sub(committed);
                lag += l;
                let mut v = json!({"queue": q, "committed": committed, "high_water": hw, "lag": l});
                if head_attempts > 0 {
                    v["blocked_attempts"] = json!(head_attempts);
                }
                if head_due > 0 {
                    v["retry_at"] = json!(head_due);
                }
                let unit = if broadcast {
                    share::UnitKey::Instance(i)
                } else {
                    share::UnitKey::Queue(q as u32)
                };
                if let Some(node) = owners.get(&share::lease_key(group, unit)) {
                    v["node"] = json!(node);
                }
                queues.push(v);
            }
            total_lag += lag;
            let pending = match live {
                Some(m) => m.pending_timers(),
                None => storage(&self.env)
                    .list_records(&state::timer_space(group), &format!("{name}/"), usize::MAX)
                    .await?
                    .len(),
            };
            timers += pending;
            member_views.push(
                json!({"instance": i, "lag": lag, "pending_timers": pending, "queues": queues}),
            );
        }
        let dlq = storage(&self.env)
            .list_records(&state::dlq_space(group), "", usize::MAX)
            .await?
            .len();
        let mut v = json!({
            "group": group,
            "state": record.state,
            "spec": record.spec,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
            "lag": total_lag,
            "pending_timers": timers,
            "dlq": dlq,
        });
        if broadcast {
            v["instances"] = Value::Array(member_views);
        } else if let Some(m) = member_views.pop() {
            v["queues"] = m["queues"].clone();
        }
        if let Some(t) = self.tally(group, runner) {
            v["plugin_version"] = json!(t.plugin_version);
            v["in_flight"] = json!(t.in_flight);
            v["counters"] = json!({
                "delivered": t.delivered,
                "acked": t.acked,
                "retried": t.retried,
                "dead_lettered": t.dead_lettered,
                "failed": t.failed,
            });
        }
        Ok(v)
    }

    async fn set_state(&self, group: &str, state: SubState) -> Result<Value, DispatchError> {
        let _g = self.lock_group(group).await;
        let mut record = self.record(group).await?;
        self.halt(group).await;
        record.state = state;
        record.updated_at = now_ms();
        self.save(&record).await?;
        if state == SubState::Running {
            self.start_group(&record).await?;
        }
        drop(_g);
        self.status(group).await
    }

    pub async fn pause(&self, group: &str) -> Result<Value, DispatchError> {
        self.set_state(group, SubState::Paused).await
    }

    pub async fn resume(&self, group: &str) -> Result<Value, DispatchError> {
        self.set_state(group, SubState::Running).await
    }

    /// Moves every offset of the group to `to` (replay, or skip ahead); pending delays and
    /// retries are dropped, dead letters kept.
    pub async fn reset(&self, group: &str, to: Start) -> Result<Value, DispatchError> {
        let _g = self.lock_group(group).await;
        let mut record = self.record(group).await?;
        self.halt(group).await;
        let store = storage(&self.env);
        let topic = self.env.broker.topic(&record.spec.topic)?;
        state::clear(store.as_ref(), &state::timer_space(group), "").await?;
        let broadcast = record.spec.mode == Mode::Broadcast;
        let members = if broadcast { record.spec.instances } else { 1 };
        for i in 0..members {
            let name = state::member_name(broadcast, i);
            for q in 0..topic.queues {
                let committed = runner::start_offset(store.as_ref(), &topic.name, q, to).await?;
                let c = state::Cursor {
                    committed,
                    ..state::Cursor::default()
                };
                state::put(
                    store.as_ref(),
                    &state::cursor_space(group),
                    &state::cursor_key(&name, q),
                    &c,
                )
                .await?;
            }
        }
        // Nodes running a queue of the group restart from the new offsets: their next offset
        // write is refused (the revision moved), and they see the record changed.
        self.touch(&mut record).await?;
        if record.state == SubState::Running {
            self.start_group(&record).await?;
        }
        drop(_g);
        self.status(group).await
    }

    /// Deletes a subscription with its offsets, timers and dead letters.
    pub async fn delete(&self, group: &str) -> Result<(), DispatchError> {
        let _g = self.lock_group(group).await;
        self.record(group).await?;
        self.halt(group).await;
        let store = storage(&self.env);
        for space in [
            state::cursor_space(group),
            state::timer_space(group),
            state::dlq_space(group),
        ] {
            state::clear(store.as_ref(), &space, "").await?;
        }
        store
            .put_record(state::SUB_SPACE, group, None, Expect::Any)
            .await?;
        Ok(())
    }

    /// Dead letters, oldest first, after the key `after` (for paging).
    pub async fn dlq(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DispatchError> {
        self.record(group).await?;
        let all = storage(&self.env)
            .list_records(&state::dlq_space(group), "", usize::MAX)
            .await?;
        all.iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take(limit)
            .map(|(k, r)| Ok(state::decode(k, r)?))
            .collect()
    }

    /// Delivers dead letters again (all, or those with these message ids) as fresh attempts.
    pub async fn redrive(
        &self,
        group: &str,
        ids: Option<&[String]>,
    ) -> Result<usize, DispatchError> {
        let _g = self.lock_group(group).await;
        let mut record = self.record(group).await?;
        let store = storage(&self.env);
        let space = state::dlq_space(group);
        // Timers of a running member are also held in memory: stop, write, start again.
        self.halt(group).await;
        let mut n = 0;
        for (k, r) in store.list_records(&space, "", usize::MAX).await? {
            let dl: DeadLetter = state::decode(&k, &r)?;
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
            state::put(store.as_ref(), &state::timer_space(group), &t.key(), &t).await?;
            state::delete(store.as_ref(), &space, &k).await?;
            n += 1;
        }
        // The nodes running the group's queues load the new timers when they restart.
        self.touch(&mut record).await?;
        if record.state == SubState::Running {
            self.start_group(&record).await?;
        }
        Ok(n)
    }

    /// The grants of every subscription of `plugin` (what admins allowed it).
    pub async fn plugin_grants(&self, plugin: &str) -> Result<Vec<spec::GrantSpec>, DispatchError> {
        let mut out = Vec::new();
        for (group, r) in storage(&self.env)
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            let record: SubscriptionRecord = state::decode(&group, &r)?;
            if record.spec.plugin == plugin {
                out.push(record.spec.grants);
            }
        }
        Ok(out)
    }

    /// The subscription using a plugin, if any (a used plugin cannot be deleted).
    pub async fn plugin_user(&self, plugin: &str) -> Result<Option<String>, DispatchError> {
        for (group, r) in storage(&self.env)
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            let record: SubscriptionRecord = state::decode(&group, &r)?;
            if record.spec.plugin == plugin {
                return Ok(Some(group));
            }
        }
        Ok(None)
    }

    /// Restarts running subscriptions that follow `plugin`'s latest version (after an upload)
    /// or read `topic` (after queues were added), so they pick the change up.
    pub async fn refresh(
        &self,
        plugin: Option<&str>,
        topic: Option<&str>,
    ) -> Result<(), DispatchError> {
        let affected = |record: &SubscriptionRecord| {
            let follows = plugin
                .is_some_and(|p| record.spec.plugin == p && record.spec.plugin_version.is_none());
            let reads = topic.is_some_and(|t| record.spec.topic == t);
            follows || reads
        };
        let groups: Vec<String> = self.runners.lock().await.keys().cloned().collect();
        if self.share.is_some() {
            let _g = self.control.write().await;
            let mut halted = false;
            for group in groups {
                if affected(&self.record(&group).await?) {
                    self.halt(&group).await;
                    halted = true;
                }
            }
            // The queue count may have changed, and with it the units: one pass places them.
            if halted {
                self.reconcile_locked().await?;
            }
            return Ok(());
        }
        // Alone: each affected group restarts under its own lock, one after another.
        for group in groups {
            let _g = self.lock_group(&group).await;
            let record = match self.record(&group).await {
                Ok(r) => r,
                Err(DispatchError::Unknown(_)) => continue,
                Err(e) => return Err(e),
            };
            if !affected(&record) || !self.runners.lock().await.contains_key(&group) {
                continue;
            }
            self.halt(&group).await;
            let queues = self.env.broker.topic(&record.spec.topic)?.queues;
            if let Err(e) = self.launch(&record, queues, None).await {
                tracing::error!(group = %record.group, error = %e, "cannot restart subscription");
            }
        }
        Ok(())
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

    /// Stops every subscription, letting in-flight messages finish, then gives up the leases
    /// so other nodes take the queues over at once.
    pub async fn shutdown(&self) {
        let _g = self.control.write().await;
        self.active.store(false, Ordering::Release);
        let runners: Vec<Runner> = self.runners.lock().await.drain().map(|(_, r)| r).collect();
        futures::future::join_all(runners.into_iter().map(Runner::stop)).await;
        if let Some(share) = &self.share {
            share.release_all().await;
        }
    }
}

/// A dead letter as the API shows it: its paging key, the broadcast instance that gave it up
/// (absent for clustering), and the stored entry.
#[derive(Serialize)]
pub struct DeadLetterView {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    #[serde(flatten)]
    pub entry: DeadLetter,
}
