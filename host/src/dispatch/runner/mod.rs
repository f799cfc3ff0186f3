//! A running subscription (on this node: the queues it holds, when nodes share the work). Its
//! members (one shared member for clustering; one per instance for broadcast) each run a loop
//! per queue, a timer loop (delays, retries, redrives) and plugin workers. Offsets advance only
//! over messages that are done: acknowledged, dead-lettered, or handed durably to a timer, so a
//! crash redelivers at most what was in flight.

mod offsets;
mod ordered;
mod outcome;
mod timers;
mod unordered;
mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pins;
use super::spec::{OnExhausted, RetryPolicy, Start, SubscriptionSpec, TagFilter};
use super::state::{self, Cursor, DeadLetter, SubscriptionRecord, Timer, TimerKind};
use super::{DispatchError, Handles};
use crate::base::now_ms;
use crate::bindings::{Message, Outcome};
use crate::metrics::OUTCOMES;
use crate::runtime::{
    CommitError, InstanceContext, InvokeError, PluginCode, PluginLimits, PoolKey, Services, Staged,
};
use crate::storage::{Expect, RecordWrite, Storage, StorageError, StoredMessage};
use offsets::{Done, Marked, Parked, load_marked, park};
pub use offsets::{ensure_cursors, start_offset};
use outcome::{Disposition, Effects, count, judge, outcome_index};
use timers::sleep_until_ms;
use worker::{CallInfo, Handled, Rate, WorkItem, WorkQueue, worker};

/// Numbers runner starts (pool keys of their instances).
static RUNS: AtomicU64 = AtomicU64::new(0);

/// Messages read from storage per round trip.
const READ_BATCH: usize = 256;

/// Pause after a storage error before trying again.
const STORAGE_RETRY: Duration = Duration::from_millis(200);

/// Pause before reading again after a read that came back empty below the queue's high water:
/// on JetStream a replica answering the read may not have applied the newest appends yet.
const SHORT_READ_RETRY: Duration = Duration::from_millis(20);

/// Ready at once, or after [`SHORT_READ_RETRY`] when the last read came back `short`: how a
/// reader below the high water waits before its next read, since no append news may come.
async fn read_again(short: bool) {
    if short {
        tokio::time::sleep(SHORT_READ_RETRY).await;
    }
}

/// Ready after `every` ([`Storage::recheck_idle`]), never when it is `None`: the wake-up of
/// an idle reader whose append news can be lost.
async fn recheck(every: Option<Duration>) {
    match every {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Delivery counters since the subscription was created (on shared storage: since this node
/// started running it): loaded from storage when a runner starts, stored every
/// `COUNTS_EVERY` while it runs and when it stops (a crash loses at most that much counting,
/// never a delivery).
#[derive(Debug, Default)]
pub struct Counters {
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Calls that trapped, timed out or hit the memory limit (each also counts as a retry).
    pub failed: AtomicU64,
    /// Messages retention deleted before this subscription handled them.
    pub expired: AtomicU64,
    /// Deliveries run again because a kv key they read changed before their effects were
    /// stored (exactly-once processing; not attempts). Since this runner started.
    pub reruns: AtomicU64,
}

/// What status reads of one member.
pub struct MemberShared {
    pub name: String,
    /// The queues this node runs for the member (all of them unless several nodes share the
    /// work); `committed` of the others is only where they stood at start.
    pub owned: Vec<bool>,
    pub committed: Vec<AtomicU64>,
    /// Ordered delivery: attempts made on each queue's head message (0 = not blocked).
    pub head_attempts: Vec<AtomicU32>,
    /// Ordered delivery: when each queue's head message is tried again (0 = not waiting).
    pub head_due: Vec<AtomicU64>,
    timers: std::sync::Mutex<timers::TimerWindow>,
    timer_wake: Notify,
    /// Per queue, the completion markers the stored offset has not passed (empty for queues
    /// this node does not run).
    marked: Vec<Marked>,
}

impl MemberShared {
    /// The committed offset of `queue` if this node runs it.
    pub fn live_committed(&self, queue: usize) -> Option<u64> {
        self.owned
            .get(queue)
            .filter(|o| **o)
            .and_then(|_| self.committed.get(queue))
            .map(|c| c.load(Ordering::Relaxed))
    }

    /// Its stored timers: those in memory and those past the window.
    pub fn pending_timers(&self) -> usize {
        self.timers
            .lock()
            .map_or(0, |t| usize::try_from(t.len()).unwrap_or(usize::MAX))
    }

    fn add_timer(&self, t: Timer) {
        if let Ok(mut timers) = self.timers.lock() {
            timers.insert(t);
        }
        self.timer_wake.notify_one();
    }

    fn next_due(&self) -> Option<u64> {
        self.timers.lock().ok()?.map.values().next().map(|t| t.due)
    }

    /// The earliest timer of `queue` (ordered delivery runs its queue's timers itself, all in
    /// memory).
    fn first_of_queue(&self, queue: u32) -> Option<Timer> {
        self.timers
            .lock()
            .ok()?
            .map
            .values()
            .find(|t| t.queue == queue)
            .cloned()
    }

    /// The earliest retry timer of `queue`: in ordered delivery it blocks its queue.
    fn retry_of_queue(&self, queue: u32) -> Option<Timer> {
        self.timers
            .lock()
            .ok()?
            .map
            .values()
            .find(|t| t.queue == queue && t.kind == TimerKind::Retry)
            .cloned()
    }

    fn forget_timer(&self, key: &str) {
        if let Ok(mut timers) = self.timers.lock() {
            timers.map.remove(key);
        }
    }

    fn pop_due(&self, now: u64) -> Option<Timer> {
        let mut timers = self.timers.lock().ok()?;
        let key = timers
            .map
            .iter()
            .next()
            .filter(|(_, t)| t.due <= now)
            .map(|(k, _)| k.clone())?;
        timers.map.remove(&key)
    }
}

pub struct RunnerShared {
    pub plugin_version: u32,
    pub counters: Counters,
    pub members: Vec<Arc<MemberShared>>,
    in_flight: Arc<Semaphore>,
    max_in_flight: u32,
}

/// How often a running subscription's counters are stored (when they changed).
const COUNTS_EVERY: Duration = Duration::from_secs(1);

impl Counters {
    fn from_stored(c: state::StoredCounts) -> Self {
        Self {
            delivered: AtomicU64::new(c.delivered),
            acked: AtomicU64::new(c.acked),
            retried: AtomicU64::new(c.retried),
            dead_lettered: AtomicU64::new(c.dead_lettered),
            failed: AtomicU64::new(c.failed),
            expired: AtomicU64::new(c.expired),
            reruns: AtomicU64::new(0),
        }
    }

    fn stored(&self) -> state::StoredCounts {
        state::StoredCounts {
            delivered: self.delivered.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
        }
    }
}

/// Where a runner keeps its counters: its node's record in the subscription's counts space,
/// for the subscription's current incarnation.
#[derive(Clone)]
struct CountsRecord {
    storage: Arc<dyn Storage>,
    space: String,
    node: String,
    incarnation: u64,
}

impl CountsRecord {
    async fn load(&self) -> Result<state::StoredCounts, DispatchError> {
        match self.storage.get_record(&self.space, &self.node).await? {
            Some(r) => {
                let stored: state::NodeCounts = state::decode("delivery counters", &r)?;
                Ok(stored.of(self.incarnation).unwrap_or_default())
            }
            None => Ok(state::StoredCounts::default()),
        }
    }

    async fn store(&self, counts: state::StoredCounts) {
        let record = state::NodeCounts {
            incarnation: self.incarnation,
            counts,
        };
        if let Err(e) = state::put(self.storage.as_ref(), &self.space, &self.node, &record).await {
            tracing::warn!(space = %self.space, error = %e, "cannot store delivery counters");
        }
    }

    /// Stores `counters` whenever they changed, every [`COUNTS_EVERY`], until `cancel`.
    async fn keep(self, shared: Arc<RunnerShared>, cancel: CancellationToken) {
        let mut last = shared.counters.stored();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(COUNTS_EVERY) => {}
            }
            let now = shared.counters.stored();
            if now != last {
                self.store(now).await;
                last = now;
            }
        }
    }
}

impl RunnerShared {
    /// Its counters, in-flight count and plugin version, as status shows them.
    pub fn tally(&self) -> super::Tally {
        super::Tally {
            counts: self.counters.stored(),
            in_flight: u64::from(self.in_flight()),
            plugin_version: self.plugin_version,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.max_in_flight
            .saturating_sub(self.in_flight.available_permits() as u32)
    }
}

/// A runner's assignment (as Kafka names a consumer's partitions): the (member, queue)
/// pairs it runs; `None` means all of them.
pub type Assignment = Option<BTreeSet<(u32, u32)>>;

fn owns(units: &Assignment, member: u32, queue: u32) -> bool {
    units.as_ref().is_none_or(|u| u.contains(&(member, queue)))
}

pub struct Runner {
    /// The topic it reads.
    pub topic: String,
    /// The (member, queue) pairs it was started for.
    pub units: Assignment,
    /// The `updated_at` of the subscription record it was started from (a newer record, say
    /// written by another node, means it must restart).
    pub record_updated_at: u64,
    cancel: CancellationToken,
    /// Cuts off plugin calls still running (after the grace, or at once when fenced).
    abort: CancellationToken,
    /// How long a stop waits for running calls before cutting them off.
    grace: Duration,
    tracker: TaskTracker,
    pub shared: Arc<RunnerShared>,
    counts: CountsRecord,
}

impl Runner {
    /// Whether it stopped on its own: a lease was lost or another node moved an offset.
    pub fn fenced(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A token that stops the runner when cancelled (a lost lease cancels it).
    pub fn stop_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Runs `task` (say, a lease watcher) until the runner stops.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Stops fetching and lets in-flight messages finish and their offsets be stored, then
    /// returns. Calls still running after `[plugins] stop_grace_ms` are cut off (not done, no
    /// attempt counted; the message is delivered again), so a stop never waits out a sleeping
    /// or slow plugin. A fenced runner (lost lease, offset moved by another node) cuts them at
    /// once: their work belongs to another owner now.
    pub async fn stop(self) {
        if self.cancel.is_cancelled() {
            self.abort.cancel();
        }
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.abort.cancel();
            self.tracker.wait().await;
        }
        // Every delivery is settled: the counters are final for this run.
        self.counts.store(self.shared.counters.stored()).await;
    }
}

/// Everything the loops of one member share.
struct Member {
    group: String,
    spec: Arc<SubscriptionSpec>,
    filter: TagFilter,
    storage: Arc<dyn Storage>,
    /// Where staged effects are committed (the broker).
    services: Arc<dyn Services>,
    shared: Arc<MemberShared>,
    runner: Arc<RunnerShared>,
    work: mpsc::Sender<WorkItem>,
    rate: Option<Arc<Rate>>,
    cancel: CancellationToken,
    /// Several nodes share the storage: a timer fires only while its record still exists
    /// (another node's reset or delete may have dropped it).
    shared_storage: bool,
    /// `wasmq_messages_expired_unconsumed_total` of this subscription.
    expired: prometheus_client::metrics::counter::Counter,
    /// Where delivery attempts are traced, and this node's name in the records.
    trace: Arc<super::trace::TraceWriter>,
    /// Told of each dead letter stored, so the retention pass visits the subscription.
    dead_letters_due: Arc<crate::base::NextDue>,
    node: String,
    /// Ordered delivery: how many consecutive messages of a queue are handed to the worker at
    /// once ([`ORDERED_RUN`], or 1). The worker calls them in order and drops the rest of a run
    /// once one is not acked (`worker::Gate`), so the order holds; without runs each message
    /// cost a hand-over to the plugin thread and back (fan-out to 4 broadcast instances ran at
    /// 0.33x Redis's 4 consumer groups). Runs need one worker per channel (broadcast, or one
    /// instance) and no rate limit (each message of a run takes a slot of the rate before it
    /// goes out). Under exactly-once, also a plugin that does not import kv: message n+1 of a
    /// run would read kv before n's staged writes are committed, and reads that write nothing
    /// and key listings are not checked at commit.
    run_length: usize,
}

/// The most messages of an ordered queue handed out as one run (see `Member::run_length`).
const ORDERED_RUN: usize = 64;

/// Starts a subscription's members, loops and workers, for the (member, queue) pairs in
/// `units` (all when `None`). `shared_storage`: other nodes may write this subscription's
/// state too.
pub async fn start(
    env: &Handles,
    record: &SubscriptionRecord,
    units: Assignment,
    node: Option<&str>,
) -> Result<Runner, DispatchError> {
    let shared_storage = node.is_some();
    let spec = Arc::new(record.spec.clone());
    let filter = spec.validate().map_err(DispatchError::Invalid)?;
    let topic = env.broker.topic(&spec.topic)?;
    let (version, code) = env.plugins.code(&spec.plugin, spec.plugin_version).await?;
    if !code.has_consumer() {
        return Err(DispatchError::Invalid(format!(
            "plugin {:?} does not export a consumer (handle)",
            spec.plugin
        )));
    }
    let storage = env.storage.clone();
    let broadcast = spec.mode == super::spec::Mode::Broadcast;
    let member_count = if broadcast { spec.instances } else { 1 };
    let limits = PluginLimits {
        timeout_ms: spec.limits.timeout_ms.or(version.limits.timeout_ms),
        memory_mb: spec.limits.memory_mb.or(version.limits.memory_mb),
    };
    ensure_cursors(storage.as_ref(), record, topic.queues).await?;
    let cursor_space = state::cursor_space(&record.group);
    let mut members = Vec::new();
    let mut starts = Vec::new();
    for i in 0..member_count {
        let name = state::member_name(broadcast, i);
        let stored: BTreeMap<String, (Cursor, u64)> = storage
            .list_records(&cursor_space, &format!("{name}/"), usize::MAX)
            .await?
            .iter()
            .map(|(k, r)| {
                Ok((
                    k.clone(),
                    (state::decode::<Cursor>("cursor", r)?, r.revision),
                ))
            })
            .collect::<Result<_, DispatchError>>()?;
        let mut cursors = Vec::new();
        for q in 0..topic.queues {
            let key = state::cursor_key(&name, q);
            let stored = stored.get(&key).copied().ok_or_else(|| {
                StorageError::Corrupt(format!("cursor {key} of {} vanished", record.group))
            })?;
            cursors.push(stored);
        }
        let owned: Vec<bool> = (0..topic.queues).map(|q| owns(&units, i, q)).collect();
        // Timers belong to the node that runs their queue.
        let window = if spec.is_ordered() {
            usize::MAX
        } else {
            env.broker.limits().max_timers_in_memory
        };
        let mut held = Vec::new();
        let committed: Vec<u64> = cursors.iter().map(|(c, _)| c.committed).collect();
        let timers = timers::TimerWindow::load(
            storage.as_ref(),
            &record.group,
            &name,
            (&owned, &committed),
            window,
            &mut held,
        )
        .await?;
        let mut marked = Vec::new();
        for (q, (cursor, _)) in cursors.iter().enumerate() {
            marked.push(if owned[q] {
                load_marked(
                    storage.as_ref(),
                    &record.group,
                    &name,
                    q as u32,
                    cursor.committed,
                )
                .await?
            } else {
                Marked::default()
            });
        }
        // A timer at or past its queue's offset was stored just before a crash that kept the
        // offset from passing its message: the timer delivers it, not the queue loop too (two
        // deliveries of one message could both complete once the first one's marker is gone).
        for (q, offset) in held {
            if let (Some(m), Some((c, _))) = (marked.get(q as usize), cursors.get(q as usize))
                && offset >= c.committed
            {
                offsets::mark(m, offset);
            }
        }
        members.push(Arc::new(MemberShared {
            marked,
            name,
            owned,
            committed: cursors
                .iter()
                .map(|(c, _)| AtomicU64::new(c.committed))
                .collect(),
            head_attempts: cursors
                .iter()
                .map(|(c, _)| AtomicU32::new(c.head_attempts))
                .collect(),
            head_due: cursors
                .iter()
                .map(|(c, _)| AtomicU64::new(c.head_due))
                .collect(),
            timers: std::sync::Mutex::new(timers),
            timer_wake: Notify::new(),
        }));
        starts.push(cursors);
    }
    // Each node keeps its own record (status sums the records of nodes not running the
    // group now with the live tallies), so counts survive restarts of runners and nodes, also
    // a node whose id changes at each start.
    let counts = CountsRecord {
        storage: storage.clone(),
        space: state::counts_space(&record.group),
        node: node.unwrap_or(state::LOCAL_NODE).to_string(),
        incarnation: record.created_at,
    };
    let stored = counts.load().await?;
    let shared = Arc::new(RunnerShared {
        plugin_version: version.version,
        counters: Counters::from_stored(stored),
        members: members.clone(),
        in_flight: Arc::new(Semaphore::new(spec.max_in_flight as usize)),
        max_in_flight: spec.max_in_flight,
    });
    // Nodes sharing a subscription share its rate by the part of its queues each runs, so
    // together they never exceed it.
    let share = match &units {
        None => 1.0,
        Some(u) => u.len() as f64 / (f64::from(member_count) * f64::from(topic.queues)).max(1.0),
    };
    let rate = spec.max_rate.filter(|_| share > 0.0).map(|r| {
        Arc::new(Rate {
            interval: Duration::from_secs_f64(1.0 / (r * share)),
            next: std::sync::Mutex::new(Instant::now()),
        })
    });
    let grants = spec.grants.to_grants().map_err(DispatchError::Invalid)?;
    // Secret references are resolved here, for the instances only.
    let config_json = env
        .broker
        .secrets()
        .resolve(&spec.config)
        .map_err(|e| DispatchError::Invalid(format!("config: {e}")))?
        .to_string();
    let cancel = CancellationToken::new();
    let abort = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Each run's instances are its own: a restarted runner (new config, grants, version) never
    // gets an instance of the run before it.
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let ctx_for = |index: u32| InstanceContext {
        plugin: spec.plugin.clone(),
        version: version.version,
        group: record.group.clone(),
        member: state::member_name(broadcast, index),
        instance_index: index,
        instance_count: spec.instances,
        config_json: config_json.clone(),
        grants: grants.clone(),
        limits,
        kv_space: spec.kv_space(&record.group),
        stage_effects: spec.processing_guarantee == super::spec::ProcessingGuarantee::ExactlyOnce,
        services: env.broker.clone(),
    };
    let active: Vec<bool> = members.iter().map(|m| m.owned.contains(&true)).collect();
    // Clustering: one channel that every instance pulls from. Broadcast: a channel per instance.
    let channels: Vec<(mpsc::Sender<WorkItem>, WorkQueue)> = (0..member_count)
        .map(|_| {
            let (tx, rx) = mpsc::channel(spec.max_in_flight as usize);
            (tx, Arc::new(Mutex::new(rx)))
        })
        .collect();
    for i in 0..spec.instances {
        let m = if broadcast { i as usize } else { 0 };
        // Instances serve only members this node runs something of.
        if active[m] {
            let rx = channels[m].1.clone();
            let key = PoolKey {
                plugin: spec.plugin.clone(),
                version: version.version,
                owner: format!("sub/{}/{run}/{i}", record.group),
            };
            tracker.spawn_on(
                worker(
                    env.clone(),
                    code.clone(),
                    Arc::new(ctx_for(i)),
                    key,
                    rx,
                    cancel.clone(),
                    abort.clone(),
                ),
                env.plugins.runtime().executor(),
            );
        }
    }
    // Looked up once, and present (at 0) from the start.
    let expired = env
        .broker
        .metrics()
        .expired_unconsumed
        .get_or_create(&crate::metrics::GroupLabel {
            group: record.group.clone(),
        })
        .clone();
    for (m, (shared_member, cursors)) in members.iter().zip(starts).enumerate() {
        if !active[m] {
            continue;
        }
        let member = Arc::new(Member {
            group: record.group.clone(),
            spec: spec.clone(),
            filter: filter.clone(),
            storage: storage.clone(),
            services: env.broker.clone(),
            shared: shared_member.clone(),
            runner: shared.clone(),
            work: channels[m].0.clone(),
            rate: rate.clone(),
            cancel: cancel.clone(),
            shared_storage,
            expired: expired.clone(),
            trace: env.trace.clone(),
            dead_letters_due: env.dead_letters_due.clone(),
            node: node.unwrap_or(state::LOCAL_NODE).to_string(),
            run_length: if (broadcast || spec.instances == 1)
                && spec.max_rate.is_none()
                && (spec.processing_guarantee == super::spec::ProcessingGuarantee::AtLeastOnce
                    || !code.imports_kv())
            {
                ORDERED_RUN
            } else {
                1
            },
        });
        for (q, cursor) in cursors.into_iter().enumerate() {
            if !shared_member.owned[q] {
                continue;
            }
            let parked = Parked::default();
            let marked = shared_member.marked[q].clone();
            let (committer, store_task) =
                member.cursor_committer(q as u32, cursor, parked.clone(), marked);
            tracker.spawn(store_task);
            if spec.is_ordered() {
                tracker.spawn(
                    member
                        .clone()
                        .run_ordered(q as u32, cursor.0, committer, parked),
                );
            } else {
                tracker.spawn(
                    member
                        .clone()
                        .run_unordered(q as u32, cursor.0, committer, parked),
                );
            }
        }
        // Ordered delivery runs each queue's timers in its queue loop.
        if !spec.is_ordered() {
            tracker.spawn(member.clone().run_timers());
        }
    }
    drop(channels);
    tracker.spawn(counts.clone().keep(shared.clone(), cancel.clone()));
    Ok(Runner {
        counts,
        topic: spec.topic.clone(),
        units,
        record_updated_at: record.updated_at,
        cancel,
        abort,
        grace: Duration::from_millis(env.plugins.runtime().config().stop_grace_ms),
        tracker,
        shared,
    })
}
