//! A running subscription (on this node: the queues it holds, when nodes share the work). Its
//! members (one shared member for clustering; one per instance for broadcast) each run a loop
//! per queue, a timer loop (delays, retries, redrives) and plugin workers. Offsets advance only
//! over messages that are done: acknowledged, dead-lettered, or handed durably to a timer, so a
//! crash redelivers at most what was in flight.

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

use super::spec::{OnExhausted, RetryPolicy, Start, SubscriptionSpec, TagFilter};
use super::state::{self, Cursor, DeadLetter, SubscriptionRecord, Timer, TimerKind};
use super::{DispatchError, Env};
use crate::broker::now_ms;
use crate::runtime::bindings::{Message, Outcome};
use crate::runtime::{InstanceContext, InvokeError, PluginCode, PluginInstance, PluginLimits};
use crate::storage::{Expect, Storage, StorageError, StoredMessage};

/// Messages read from storage per round trip.
const READ_BATCH: usize = 256;
/// Pause after a storage error before trying again.
const STORAGE_RETRY: Duration = Duration::from_millis(200);

/// Delivery counters since the subscription (re)started.
#[derive(Debug, Default)]
pub struct Counters {
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Calls that trapped, timed out or hit the memory limit (each also counts as a retry).
    pub failed: AtomicU64,
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
    timers: std::sync::Mutex<BTreeMap<String, Timer>>,
    timer_wake: Notify,
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

    pub fn pending_timers(&self) -> usize {
        self.timers.lock().map_or(0, |t| t.len())
    }

    fn add_timer(&self, t: Timer) {
        if let Ok(mut timers) = self.timers.lock() {
            timers.insert(t.key(), t);
        }
        self.timer_wake.notify_one();
    }

    fn next_due(&self) -> Option<u64> {
        self.timers.lock().ok()?.values().next().map(|t| t.due)
    }

    /// The earliest timer of `queue` (ordered delivery runs its queue's timers itself).
    fn first_of_queue(&self, queue: u32) -> Option<Timer> {
        self.timers
            .lock()
            .ok()?
            .values()
            .find(|t| t.queue == queue)
            .cloned()
    }

    /// The earliest retry timer of `queue`: in ordered delivery it blocks its queue.
    fn retry_of_queue(&self, queue: u32) -> Option<Timer> {
        self.timers
            .lock()
            .ok()?
            .values()
            .find(|t| t.queue == queue && t.kind == TimerKind::Retry)
            .cloned()
    }

    fn forget_timer(&self, key: &str) {
        if let Ok(mut timers) = self.timers.lock() {
            timers.remove(key);
        }
    }

    fn pop_due(&self, now: u64) -> Option<Timer> {
        let mut timers = self.timers.lock().ok()?;
        let key = timers
            .iter()
            .next()
            .filter(|(_, t)| t.due <= now)
            .map(|(k, _)| k.clone())?;
        timers.remove(&key)
    }
}

pub struct RunnerShared {
    pub plugin_version: u32,
    pub counters: Counters,
    pub members: Vec<Arc<MemberShared>>,
    in_flight: Arc<Semaphore>,
    max_in_flight: u32,
}

impl RunnerShared {
    /// Its counters, in-flight count and plugin version, as status shows them.
    pub fn tally(&self) -> super::Tally {
        let c = &self.counters;
        super::Tally {
            delivered: c.delivered.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            in_flight: u64::from(self.in_flight()),
            plugin_version: self.plugin_version,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.max_in_flight
            .saturating_sub(self.in_flight.available_permits() as u32)
    }
}

/// Which (member, queue) pairs a runner runs; `None` means all of them.
pub type Units = Option<BTreeSet<(u32, u32)>>;

fn owns(units: &Units, member: u32, queue: u32) -> bool {
    units.as_ref().is_none_or(|u| u.contains(&(member, queue)))
}

pub struct Runner {
    /// The topic it reads.
    pub topic: String,
    /// The (member, queue) pairs it was started for.
    pub units: Units,
    /// The `updated_at` of the subscription record it was started from (a newer record, say
    /// written by another node, means it must restart).
    pub record_updated_at: u64,
    cancel: CancellationToken,
    tracker: TaskTracker,
    pub shared: Arc<RunnerShared>,
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

    /// Stops fetching, lets in-flight messages finish and their offsets be stored, then returns.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// In-flight permits of handled messages whose offset is not stored yet, by offset. A permit
/// is released only once the stored offset passes its message, so the messages a crash can
/// deliver twice never outnumber `max_in_flight`.
type Parked = Arc<std::sync::Mutex<BTreeMap<u64, OwnedSemaphorePermit>>>;

fn park(parked: &Parked, offset: u64, permit: OwnedSemaphorePermit) {
    if let Ok(mut p) = parked.lock() {
        p.insert(offset, permit);
    }
}

/// The receiving end of a work channel, shared by the instances that serve it.
type WorkQueue = Arc<Mutex<mpsc::Receiver<WorkItem>>>;

struct WorkItem {
    message: Arc<StoredMessage>,
    attempt: u32,
    reply: oneshot::Sender<Result<Outcome, InvokeError>>,
}

/// Spaces messages `1/rate` seconds apart, across all queues of a subscription.
struct Rate {
    interval: Duration,
    next: std::sync::Mutex<Instant>,
}

impl Rate {
    async fn wait(&self) {
        let at = {
            let Ok(mut next) = self.next.lock() else {
                return;
            };
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// Everything the loops of one member share.
struct Member {
    group: String,
    spec: Arc<SubscriptionSpec>,
    filter: TagFilter,
    storage: Arc<dyn Storage>,
    shared: Arc<MemberShared>,
    runner: Arc<RunnerShared>,
    work: mpsc::Sender<WorkItem>,
    rate: Option<Arc<Rate>>,
    cancel: CancellationToken,
    /// Several nodes share the storage: a timer fires only while its record still exists
    /// (another node's reset or delete may have dropped it).
    shared_storage: bool,
}

/// What happens to a message after a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Done,
    Retry {
        due: u64,
        attempts: u32,
        error: String,
    },
    Dead {
        attempts: u32,
        reason: String,
    },
}

/// The fate of a message after attempt number `attempts` (1-based) answered `result`, at `now`
/// (ms since the epoch): RocketMQ's rules. `ack` is done; `reject` dead-letters at once; a
/// `retry`, trap, timeout or memory overrun retries after the policy's backoff (or the delay
/// the plugin asked for), until `max_attempts` are spent, then dead-letters, unless `block`
/// (ordered `on_exhausted: block`) keeps retrying at the last backoff. A pure function: it reads
/// no clock and counts nothing ([`count`] does).
fn judge(
    result: &Result<Outcome, InvokeError>,
    attempts: u32,
    policy: &RetryPolicy,
    block: bool,
    now: u64,
) -> Fate {
    let (asked, error) = match result {
        Ok(Outcome::Ack) => return Fate::Done,
        Ok(Outcome::Reject(reason)) => {
            return Fate::Dead {
                attempts,
                reason: format!("rejected: {reason}"),
            };
        }
        Ok(Outcome::Retry(ms)) => (*ms, "the plugin asked for a retry".to_string()),
        Err(e) => (0, e.to_string()),
    };
    if attempts >= policy.max_attempts && !block {
        return Fate::Dead {
            attempts,
            reason: format!("{attempts} attempts failed; last: {error}"),
        };
    }
    let delay = policy.backoff(attempts.min(policy.max_attempts), asked);
    Fate::Retry {
        due: now.saturating_add(delay),
        attempts,
        error,
    }
}

/// Counts a delivery's result and fate (dead letters are counted once stored).
fn count(counters: &Counters, result: &Result<Outcome, InvokeError>, fate: &Fate) {
    if result.is_err() {
        counters.failed.fetch_add(1, Ordering::Relaxed);
    }
    match fate {
        Fate::Done => counters.acked.fetch_add(1, Ordering::Relaxed),
        Fate::Retry { .. } => counters.retried.fetch_add(1, Ordering::Relaxed),
        Fate::Dead { .. } => 0,
    };
}

impl Member {
    fn topic(&self) -> &str {
        &self.spec.topic
    }

    /// Retries a durable write until it succeeds: an offset must not pass a message whose
    /// timer or dead letter is not stored.
    async fn persist<F, Fut>(&self, what: &str, mut write: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), crate::storage::StorageError>>,
    {
        loop {
            match write().await {
                Ok(()) | Err(crate::storage::StorageError::Closed) => return,
                Err(e) => {
                    tracing::error!(group = %self.group, error = %e, "cannot store {what}; retrying");
                    tokio::time::sleep(STORAGE_RETRY).await;
                }
            }
        }
    }

    async fn dead_letter(&self, m: &StoredMessage, attempts: u32, reason: String) {
        let dl = DeadLetter {
            message_id: m.message.id.to_string(),
            member: self.shared.name.clone(),
            queue: m.message.queue,
            offset: m.offset,
            attempts,
            reason,
            dead_at: now_ms(),
        };
        let space = state::dlq_space(&self.group);
        tracing::info!(group = %self.group, message = %dl.message_id, reason = %dl.reason, "dead-lettered");
        let key = dl.key();
        self.persist("a dead letter", || {
            state::put(self.storage.as_ref(), &space, &key, &dl)
        })
        .await;
        // Counted once stored, so whoever sees the count can read the entry.
        self.runner
            .counters
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Stores what becomes of a delivered message besides its offset: a retry timer (whose key
    /// is returned) or a dead letter; an ack needs nothing.
    async fn settle(
        &self,
        result: &Result<Outcome, InvokeError>,
        attempt: u32,
        m: &StoredMessage,
        block: bool,
    ) -> Option<String> {
        let fate = judge(result, attempt, &self.spec.retry, block, now_ms());
        count(&self.runner.counters, result, &fate);
        match fate {
            Fate::Done => None,
            Fate::Retry {
                due,
                attempts,
                error,
            } => {
                let t = Timer {
                    member: self.shared.name.clone(),
                    due,
                    queue: m.message.queue,
                    offset: m.offset,
                    attempts,
                    kind: TimerKind::Retry,
                    last_error: Some(error),
                };
                let key = t.key();
                self.add_timer(t).await;
                Some(key)
            }
            Fate::Dead { attempts, reason } => {
                self.dead_letter(m, attempts, reason).await;
                None
            }
        }
    }

    /// The timer that holds a delayed message until it is due.
    fn delay_timer(&self, m: &StoredMessage) -> Timer {
        Timer {
            member: self.shared.name.clone(),
            due: m.message.deliver_at,
            queue: m.message.queue,
            offset: m.offset,
            attempts: 0,
            kind: TimerKind::Delay,
            last_error: None,
        }
    }

    async fn remove_timer(&self, timer: &Timer) {
        let (space, key) = (state::timer_space(&self.group), timer.key());
        self.persist("a timer removal", || {
            state::delete(self.storage.as_ref(), &space, &key)
        })
        .await;
        self.shared.forget_timer(&key);
    }

    async fn add_timer(&self, t: Timer) {
        let space = state::timer_space(&self.group);
        let key = t.key();
        self.persist("a timer", || {
            state::put(self.storage.as_ref(), &space, &key, &t)
        })
        .await;
        self.shared.add_timer(t);
    }

    /// Hands a message to the workers (after the rate allows it). The caller holds an in-flight
    /// permit until the outcome is handled (stored), so `in_flight` counts a message until its
    /// fate is durable. `None`: the runner stopped first and nothing was handed out. The
    /// receiver yields an error if a worker dropped the message unstarted because the runner
    /// stopped: the message is not done, and no attempt was made.
    async fn dispatch(
        &self,
        message: Arc<StoredMessage>,
        attempt: u32,
    ) -> Option<oneshot::Receiver<Result<Outcome, InvokeError>>> {
        if let Some(rate) = &self.rate {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return None,
                () = rate.wait() => {}
            }
        }
        let (reply, rx) = oneshot::channel();
        self.runner
            .counters
            .delivered
            .fetch_add(1, Ordering::Relaxed);
        // Workers outlive the loops that feed them, so this send only fails during teardown,
        // and then the dropped reply reads as a failed call that is retried.
        let _ = self
            .work
            .send(WorkItem {
                message,
                attempt,
                reply,
            })
            .await;
        Some(rx)
    }

    /// A sender for the queue's cursor and the task that stores it: writes coalesce (only the
    /// newest cursor is stored), and the last one is stored before the task ends. Each write
    /// names the revision this runner last saw: if another node wrote the cursor meanwhile (a
    /// reset, or a node that took the queue over after this one lost its lease) the write is
    /// refused and the runner stops, so an offset is never moved by two nodes at once.
    fn cursor_committer(
        &self,
        queue: u32,
        initial: (Cursor, u64),
        parked: Parked,
    ) -> (
        watch::Sender<Cursor>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (tx, mut rx) = watch::channel(initial.0);
        let mut revision = initial.1;
        let storage = self.storage.clone();
        let space = state::cursor_space(&self.group);
        let key = state::cursor_key(&self.shared.name, queue);
        let group = self.group.clone();
        let cancel = self.cancel.clone();
        let task = async move {
            while rx.changed().await.is_ok() {
                let cursor = *rx.borrow_and_update();
                let Ok(value) = state::encode(&cursor) else {
                    break;
                };
                loop {
                    match storage
                        .put_record(
                            &space,
                            &key,
                            Some(value.clone()),
                            Expect::Revision(revision),
                        )
                        .await
                    {
                        Ok(r) => {
                            revision = r;
                            if let Ok(mut p) = parked.lock() {
                                let keep = p.split_off(&cursor.committed);
                                *p = keep;
                            }
                            break;
                        }
                        Err(StorageError::Closed) => return,
                        Err(StorageError::Conflict { .. }) => {
                            tracing::warn!(%group, queue, "offset moved by another node; this node stops the queue");
                            cancel.cancel();
                            return;
                        }
                        Err(e) => {
                            tracing::error!(%group, error = %e, "cannot store offset; retrying");
                            tokio::time::sleep(STORAGE_RETRY).await;
                        }
                    }
                }
            }
        };
        (tx, task)
    }

    /// Unordered: many messages of the queue in flight; a failing one goes to a retry timer.
    async fn run_unordered(
        self: Arc<Self>,
        queue: u32,
        start: Cursor,
        committer: watch::Sender<Cursor>,
        parked: Parked,
    ) {
        let mut watch = self.storage.watch(self.topic());
        let mut committed = start.committed;
        let mut done: BTreeSet<u64> = BTreeSet::new();
        let mut fetch = committed;
        let mut buffer: std::collections::VecDeque<Arc<StoredMessage>> = Default::default();
        let mut pending = FuturesUnordered::new();
        let mut stopping = false;
        let per_queue_cap = self.spec.max_in_flight as usize;
        let mut high_water = fetch;
        loop {
            watch.borrow_and_update();
            // Asked only when the buffer ran dry: on a networked backend it is a round trip.
            if buffer.is_empty() && !stopping {
                high_water = self
                    .storage
                    .high_water(self.topic(), queue)
                    .await
                    .unwrap_or(fetch);
            }
            if buffer.is_empty() && fetch < high_water && !stopping {
                match self
                    .storage
                    .read(self.topic(), queue, fetch, READ_BATCH)
                    .await
                {
                    Ok(batch) => {
                        if let Some(last) = batch.last() {
                            fetch = last.offset + 1;
                        }
                        buffer.extend(batch.into_iter().map(Arc::new));
                    }
                    Err(e) => {
                        tracing::error!(group = %self.group, error = %e, "read failed");
                        tokio::time::sleep(STORAGE_RETRY).await;
                        continue;
                    }
                }
            }
            // Messages that need no delivery are done at once.
            let mut finished = Vec::new();
            while let Some(m) = buffer.front() {
                if !self.filter.matches(m.message.tag.as_deref()) {
                    finished.push(m.offset);
                } else if m.message.deliver_at > now_ms() {
                    self.add_timer(self.delay_timer(m)).await;
                    finished.push(m.offset);
                } else {
                    break;
                }
                buffer.pop_front();
            }
            for o in finished {
                mark_done(&mut committed, &mut done, o);
            }
            self.publish(queue, &committer, committed);
            let want = !stopping && !buffer.is_empty() && pending.len() < per_queue_cap;
            let idle = !stopping && buffer.is_empty() && fetch >= high_water;
            // Cancellation is seen first: the other branches may be ready all the time.
            tokio::select! {
                biased;
                () = self.cancel.cancelled(), if !stopping => { stopping = true; }
                Some((m, attempt, result, permit)) = pending.next() => {
                    let m: Arc<StoredMessage> = m;
                    let permit: OwnedSemaphorePermit = permit;
                    let result: Option<Result<Outcome, InvokeError>> = result;
                    match result {
                        Some(result) => {
                            self.settle(&result, attempt, &m, false).await;
                            mark_done(&mut committed, &mut done, m.offset);
                            self.publish(queue, &committer, committed);
                            park(&parked, m.offset, permit);
                        }
                        // Dropped unstarted by a stopping worker: not done, delivered later.
                        None => buffer.push_front(m),
                    }
                }
                permit = self.runner.in_flight.clone().acquire_owned(), if want => {
                    let Ok(permit) = permit else { break };
                    if let Some(m) = buffer.pop_front() {
                        match self.dispatch(m.clone(), 1).await {
                            Some(rx) => pending.push(async move { (m, 1u32, rx.await.ok(), permit) }),
                            None => {
                                buffer.push_front(m);
                                stopping = true;
                            }
                        }
                    }
                }
                changed = watch.changed(), if idle => {
                    if changed.is_err() { stopping = true; }
                }
                else => break,
            }
            if stopping && pending.is_empty() {
                break;
            }
        }
    }

    fn publish(&self, queue: u32, committer: &watch::Sender<Cursor>, committed: u64) {
        self.shared.committed[queue as usize].store(committed, Ordering::Relaxed);
        committer.send_if_modified(|c| {
            let next = Cursor {
                committed,
                ..Cursor::default()
            };
            let changed = *c != next;
            *c = next;
            changed
        });
    }

    /// Ordered: one message of the queue at a time, in queue order; message n+1 is handed out
    /// only after n is done. A failing message blocks its queue while it is retried; its
    /// attempts and next-attempt time are stored with the cursor, so its backoff holds across
    /// pause, update and restart. A delayed message leaves the queue order until it is due (a
    /// durable timer of this queue holds it), then takes its place: it is delivered between
    /// two messages of the queue, never beside one, so a delay never holds up messages that are
    /// due. Messages published without a delay keep their queue order (FIFO per sharding key).
    async fn run_ordered(
        self: Arc<Self>,
        queue: u32,
        start: Cursor,
        committer: watch::Sender<Cursor>,
        parked: Parked,
    ) {
        let mut watch = self.storage.watch(self.topic());
        let mut cursor = start;
        let block = self.spec.on_exhausted == OnExhausted::Block;
        // Messages read ahead of the cursor: one storage read per batch, not per message.
        let mut ahead: std::collections::VecDeque<Arc<StoredMessage>> = Default::default();
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            watch.borrow_and_update();
            let now = now_ms();
            // A message of the queue being retried (the head, or one a timer delivered) blocks
            // the queue until its next attempt; nothing passes it.
            let timer = if cursor.head_attempts == 0 {
                self.shared
                    .retry_of_queue(queue)
                    .or_else(|| self.shared.first_of_queue(queue))
            } else {
                None
            };
            if let Some(t) = &timer
                && (t.due <= now || t.kind == TimerKind::Retry)
            {
                if t.due > now {
                    if !self.sleep_until(t.due).await {
                        break;
                    }
                } else if !self.deliver_in_order(t.clone(), block).await {
                    break;
                }
                continue;
            }
            while ahead.front().is_some_and(|m| m.offset < cursor.committed) {
                ahead.pop_front();
            }
            if ahead.front().is_some_and(|m| m.offset != cursor.committed) {
                ahead.clear();
            }
            if ahead.is_empty() {
                match self
                    .storage
                    .read(self.topic(), queue, cursor.committed, READ_BATCH)
                    .await
                {
                    Ok(v) => ahead.extend(v.into_iter().map(Arc::new)),
                    Err(e) => {
                        tracing::error!(group = %self.group, error = %e, "read failed");
                        tokio::time::sleep(STORAGE_RETRY).await;
                        continue;
                    }
                }
            }
            let head = ahead.front().cloned();
            let Some(m) = head else {
                // Idle: wake for an append, or for the next delayed message of the queue.
                let next_timer = timer.map(|t| t.due);
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => break,
                    r = watch.changed() => if r.is_err() { break },
                    _ = sleep_until_ms(next_timer.unwrap_or(u64::MAX)), if next_timer.is_some() => {}
                }
                continue;
            };
            if !self.filter.matches(m.message.tag.as_deref()) {
                cursor = Cursor {
                    committed: cursor.committed.saturating_add(1),
                    ..Cursor::default()
                };
                self.store_cursor(queue, &committer, cursor);
                continue;
            }
            if cursor.head_attempts == 0 && m.message.deliver_at > now {
                // Out of the queue order until due: stored as a timer of this queue first, so
                // the offset passes it only once the timer is durable.
                self.add_timer(self.delay_timer(&m)).await;
                cursor = Cursor {
                    committed: cursor.committed.saturating_add(1),
                    ..Cursor::default()
                };
                self.store_cursor(queue, &committer, cursor);
                continue;
            }
            if cursor.head_due > now {
                if !self.sleep_until(cursor.head_due).await {
                    break;
                }
                continue;
            }
            let permit = tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                p = self.runner.in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let attempt = cursor.head_attempts.saturating_add(1);
            let Some(rx) = self.dispatch(m.clone(), attempt).await else {
                break;
            };
            // Once handed out, the call is waited for, even when stopping; a message a
            // stopping worker dropped unstarted stays the head, its attempts unchanged.
            let Ok(result) = rx.await else { break };
            let fate = judge(&result, attempt, &self.spec.retry, block, now_ms());
            count(&self.runner.counters, &result, &fate);
            match fate {
                Fate::Done => {
                    cursor = Cursor {
                        committed: cursor.committed.saturating_add(1),
                        ..Cursor::default()
                    };
                }
                Fate::Retry {
                    due,
                    attempts,
                    error,
                } => {
                    tracing::debug!(group = %self.group, queue, attempts, %error, "ordered retry");
                    cursor.head_attempts = attempts;
                    cursor.head_due = due;
                }
                Fate::Dead { attempts, reason } => {
                    self.dead_letter(&m, attempts, reason).await;
                    cursor = Cursor {
                        committed: cursor.committed.saturating_add(1),
                        ..Cursor::default()
                    };
                }
            }
            if cursor.committed > m.offset {
                park(&parked, m.offset, permit);
            }
            self.store_cursor(queue, &committer, cursor);
        }
    }

    /// Sleeps until `due` (ms since the epoch); false if the runner stopped first.
    async fn sleep_until(&self, due: u64) -> bool {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => false,
            () = sleep_until_ms(due) => true,
        }
    }

    /// Ordered delivery of a due timer of the queue (a delayed message, a redrive, or the retry
    /// of one of them), in the queue's turn. False if the runner stopped before the call began
    /// (the timer is kept).
    async fn deliver_in_order(&self, timer: Timer, block: bool) -> bool {
        let Ok(Some(m)) = self.timer_message(&timer).await else {
            return true;
        };
        let permit = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return false,
            p = self.runner.in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return false },
        };
        let attempt = timer.attempts.saturating_add(1);
        let Some(rx) = self.dispatch(m.clone(), attempt).await else {
            return false;
        };
        let Ok(result) = rx.await else { return false };
        self.finish_timer(&timer, &result, attempt, &m, block).await;
        drop(permit);
        true
    }

    /// The message a due timer delivers. `Ok(None)`: nothing to deliver any more (another node
    /// dropped the timer, or the message is gone and the timer is removed). `Err`: the read
    /// failed; the timer is kept under its stored key (a changed due time would leave the stored
    /// record behind, to fire again after a restart) and the caller tries again later.
    async fn timer_message(&self, timer: &Timer) -> Result<Option<Arc<StoredMessage>>, ()> {
        if self.shared_storage && !self.timer_stored(timer).await {
            self.shared.forget_timer(&timer.key());
            return Ok(None);
        }
        match self
            .storage
            .read(self.topic(), timer.queue, timer.offset, 1)
            .await
        {
            Ok(mut v) => match v.pop().filter(|m| m.offset == timer.offset) {
                Some(m) => Ok(Some(Arc::new(m))),
                None => {
                    self.remove_timer(timer).await;
                    Ok(None)
                }
            },
            Err(e) => {
                tracing::error!(group = %self.group, error = %e, "read failed; timer kept");
                self.shared.add_timer(timer.clone());
                tokio::time::sleep(STORAGE_RETRY).await;
                Err(())
            }
        }
    }

    /// Stores what became of a timer's delivery. The old timer goes only after its successor
    /// (if any) is stored, and not at all when the successor has the same key.
    async fn finish_timer(
        &self,
        timer: &Timer,
        result: &Result<Outcome, InvokeError>,
        attempt: u32,
        m: &StoredMessage,
        block: bool,
    ) {
        if self.settle(result, attempt, m, block).await.as_deref() != Some(timer.key().as_str()) {
            self.remove_timer(timer).await;
        }
    }

    fn store_cursor(&self, queue: u32, committer: &watch::Sender<Cursor>, cursor: Cursor) {
        self.shared.head_due[queue as usize].store(cursor.head_due, Ordering::Relaxed);
        self.shared.committed[queue as usize].store(cursor.committed, Ordering::Relaxed);
        self.shared.head_attempts[queue as usize].store(cursor.head_attempts, Ordering::Relaxed);
        committer.send_replace(cursor);
    }

    /// Whether a due timer is still stored (read errors keep it: a timer is never lost).
    async fn timer_stored(&self, timer: &Timer) -> bool {
        let space = state::timer_space(&self.group);
        !matches!(
            self.storage.get_record(&space, &timer.key()).await,
            Ok(None)
        )
    }

    /// Delivers delayed messages, retries and redrives when they are due.
    async fn run_timers(self: Arc<Self>) {
        let mut pending = FuturesUnordered::new();
        let mut stopping = false;
        loop {
            let next = self.shared.next_due();
            let now = now_ms();
            let due_now = !stopping && next.is_some_and(|d| d <= now);
            let sleep = match next {
                Some(d) if d > now && !stopping => Duration::from_millis(d - now),
                _ => Duration::from_secs(3600),
            };
            // Cancellation is seen first: a due timer may be ready all the time.
            tokio::select! {
                biased;
                () = self.cancel.cancelled(), if !stopping => { stopping = true; }
                Some((timer, m, attempt, result, permit)) = pending.next() => {
                    let timer: Timer = timer;
                    let permit: OwnedSemaphorePermit = permit;
                    let m: Arc<StoredMessage> = m;
                    let result: Option<Result<Outcome, InvokeError>> = result;
                    match result {
                        Some(result) => self.finish_timer(&timer, &result, attempt, &m, false).await,
                        // Dropped unstarted by a stopping worker: the stored timer stays.
                        None => self.shared.add_timer(timer),
                    }
                    drop(permit);
                }
                permit = self.runner.in_flight.clone().acquire_owned(), if due_now => {
                    let Ok(permit) = permit else { break };
                    let Some(timer) = self.shared.pop_due(now_ms()) else { continue };
                    let Ok(Some(m)) = self.timer_message(&timer).await else { continue };
                    let attempt = timer.attempts.saturating_add(1);
                    match self.dispatch(m.clone(), attempt).await {
                        Some(rx) => pending.push(async move { (timer, m, attempt, rx.await.ok(), permit) }),
                        None => {
                            self.shared.add_timer(timer);
                            stopping = true;
                        }
                    }
                }
                _ = tokio::time::sleep(sleep), if !stopping && !due_now => {}
                _ = self.shared.timer_wake.notified(), if !stopping => {}
                else => break,
            }
            if stopping && pending.is_empty() {
                break;
            }
        }
    }
}

/// Sleeps until `due` (ms since the epoch); at once if it has passed.
async fn sleep_until_ms(due: u64) {
    let wait = due.saturating_sub(now_ms());
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

fn mark_done(committed: &mut u64, done: &mut BTreeSet<u64>, offset: u64) {
    if offset < *committed {
        return;
    }
    done.insert(offset);
    while done.remove(committed) {
        *committed += 1;
    }
}

/// The offset of the first message of a queue stored at or after `time` (binary search over
/// store times, which never decrease along a queue; birth times may: a committed transaction
/// keeps its begin time, producers' clocks differ).
async fn offset_at(
    storage: &dyn Storage,
    topic: &str,
    queue: u32,
    time: u64,
) -> Result<u64, DispatchError> {
    let (mut lo, mut hi) = (0u64, storage.high_water(topic, queue).await?);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let stored = storage
            .read(topic, queue, mid, 1)
            .await?
            .first()
            .map_or(u64::MAX, |m| m.stored_at);
        if stored < time {
            lo = mid + 1
        } else {
            hi = mid
        }
    }
    Ok(lo)
}

/// Where a member with no stored cursor starts on a queue.
pub async fn start_offset(
    storage: &dyn Storage,
    topic: &str,
    queue: u32,
    start: Start,
) -> Result<u64, DispatchError> {
    Ok(match start {
        Start::Earliest => 0,
        Start::Latest => storage.high_water(topic, queue).await?,
        Start::Time(t) => offset_at(storage, topic, queue, t).await?,
    })
}

/// One plugin instance serving a work channel; replaced after a trap, timeout or memory overrun.
/// Once `cancel` fires, messages still queued are dropped unstarted (their senders see the
/// reply channel closed: not done, no attempt made), so a stop waits only for calls running.
async fn worker(
    env: Env,
    code: Arc<PluginCode>,
    ctx: Arc<InstanceContext>,
    work: WorkQueue,
    cancel: CancellationToken,
) {
    let mut instance: Option<PluginInstance> = None;
    let metrics = env.broker.metrics().clone();
    let group = crate::metrics::GroupLabel {
        group: ctx.group.clone(),
    };
    let delay = metrics.dispatch_delay_seconds.get_or_create(&group).clone();
    let duration = metrics.invocation_seconds.get_or_create(&group).clone();
    // One counter per outcome, looked up once: not a label map lookup per delivery.
    let mut outcomes: [Option<prometheus_client::metrics::counter::Counter>; OUTCOMES.len()] =
        Default::default();
    let mut failures = 0u64;
    loop {
        let item = { work.lock().await.recv().await };
        let Some(item) = item else { break };
        if cancel.is_cancelled() {
            continue;
        }
        if instance.is_none() {
            match env.plugins.runtime().instantiate(&code, ctx.clone()).await {
                Ok(i) => instance = Some(i),
                Err(e) => {
                    tracing::warn!(group = %ctx.group, plugin = %ctx.plugin, error = %e, "cannot instantiate");
                    let _ = item.reply.send(Err(e));
                    continue;
                }
            }
        }
        let Some(inst) = instance.as_mut() else {
            continue;
        };
        let m = &item.message.message;
        if item.attempt == 1 {
            // Retries wait by design; the first attempt shows how far behind dispatch runs.
            let due = m.born_at.max(m.deliver_at);
            delay.observe(crate::broker::now_ms().saturating_sub(due) as f64 / 1000.0);
        }
        let started = std::time::Instant::now();
        let result = inst
            .handle(&Message::of(
                &item.message.topic,
                item.message.offset,
                m,
                item.attempt,
            ))
            .await;
        duration.observe(started.elapsed().as_secs_f64());
        let i = outcome_index(&result);
        outcomes[i]
            .get_or_insert_with(|| {
                metrics
                    .deliveries
                    .get_or_create(&crate::metrics::OutcomeLabels {
                        group: ctx.group.clone(),
                        outcome: OUTCOMES[i],
                    })
                    .clone()
            })
            .inc();
        if let Err(e) = &result {
            // Sampled (1st, 2nd, 4th, … failure of this worker): a trap storm must not flood the log.
            failures += 1;
            if failures.is_power_of_two() {
                tracing::warn!(group = %ctx.group, plugin = %ctx.plugin, message = %m.id, error = %e, failures, "plugin call failed");
            }
        }
        if !inst.is_usable() {
            instance = None;
        }
        let _ = item.reply.send(result);
    }
}

/// Delivery outcomes as `wasmq_deliveries_total` labels them.
const OUTCOMES: [&str; 7] = ["ack", "retry", "reject", "timeout", "oom", "trap", "error"];

fn outcome_index(result: &Result<Outcome, InvokeError>) -> usize {
    match result {
        Ok(Outcome::Ack) => 0,
        Ok(Outcome::Retry(_)) => 1,
        Ok(Outcome::Reject(_)) => 2,
        Err(InvokeError::Timeout(_)) => 3,
        Err(InvokeError::MemoryLimit(_)) => 4,
        Err(InvokeError::Trap(_)) => 5,
        Err(InvokeError::MissingExport(_) | InvokeError::Instantiate(_)) => 6,
    }
}

/// Writes the cursors a member lacks: where the subscription says for a member with none
/// stored (a new subscription or broadcast instance), the beginning for a queue added to the
/// topic later. Existing cursors are kept (`Expect::Absent`), so any node may call this.
pub async fn ensure_cursors(
    storage: &dyn Storage,
    record: &SubscriptionRecord,
    queues: u32,
) -> Result<(), DispatchError> {
    let spec = &record.spec;
    let broadcast = spec.mode == super::spec::Mode::Broadcast;
    let members = if broadcast { spec.instances } else { 1 };
    let space = state::cursor_space(&record.group);
    for i in 0..members {
        let name = state::member_name(broadcast, i);
        let stored = storage
            .list_records(&space, &format!("{name}/"), usize::MAX)
            .await?;
        for q in 0..queues {
            let key = state::cursor_key(&name, q);
            if stored.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let committed = if stored.is_empty() {
                start_offset(storage, &spec.topic, q, spec.start).await?
            } else {
                0
            };
            let c = Cursor {
                committed,
                ..Cursor::default()
            };
            match storage
                .put_record(&space, &key, Some(state::encode(&c)?), Expect::Absent)
                .await
            {
                Ok(_) | Err(StorageError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Starts a subscription's members, loops and workers, for the (member, queue) pairs in
/// `units` (all when `None`). `shared_storage`: other nodes may write this subscription's
/// state too.
pub async fn start(
    env: &Env,
    record: &SubscriptionRecord,
    units: Units,
    shared_storage: bool,
) -> Result<Runner, DispatchError> {
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
    let storage = env.broker.storage().clone();
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
        let timers: BTreeMap<String, Timer> = storage
            .list_records(
                &state::timer_space(&record.group),
                &format!("{name}/"),
                usize::MAX,
            )
            .await?
            .iter()
            .map(|(k, r)| Ok((k.clone(), state::decode::<Timer>("timer", r)?)))
            .filter(|t: &Result<(String, Timer), DispatchError>| {
                t.as_ref().map_or(true, |(_, t)| {
                    owned.get(t.queue as usize).copied().unwrap_or(false)
                })
            })
            .collect::<Result<_, DispatchError>>()?;
        members.push(Arc::new(MemberShared {
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
    let shared = Arc::new(RunnerShared {
        plugin_version: version.version,
        counters: Counters::default(),
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
    let tracker = TaskTracker::new();
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
        broker: env.broker.clone(),
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
            tracker.spawn(worker(
                env.clone(),
                code.clone(),
                Arc::new(ctx_for(i)),
                rx,
                cancel.clone(),
            ));
        }
    }
    for (m, (shared_member, cursors)) in members.iter().zip(starts).enumerate() {
        if !active[m] {
            continue;
        }
        let member = Arc::new(Member {
            group: record.group.clone(),
            spec: spec.clone(),
            filter: filter.clone(),
            storage: storage.clone(),
            shared: shared_member.clone(),
            runner: shared.clone(),
            work: channels[m].0.clone(),
            rate: rate.clone(),
            cancel: cancel.clone(),
            shared_storage,
        });
        for (q, cursor) in cursors.into_iter().enumerate() {
            if !shared_member.owned[q] {
                continue;
            }
            let parked = Parked::default();
            let (committer, store_task) = member.cursor_committer(q as u32, cursor, parked.clone());
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
    Ok(Runner {
        topic: spec.topic.clone(),
        units,
        record_updated_at: record.updated_at,
        cancel,
        tracker,
        shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_offset_never_passes_an_unfinished_message() {
        let (mut c, mut done) = (5u64, BTreeSet::new());
        mark_done(&mut c, &mut done, 7);
        mark_done(&mut c, &mut done, 6);
        assert_eq!(c, 5, "5 is not done yet");
        mark_done(&mut c, &mut done, 5);
        assert_eq!(c, 8);
        mark_done(&mut c, &mut done, 3);
        assert_eq!((c, done.len()), (8, 0));
    }

    /// The outcome decision over its whole table: each result, below and at `max_attempts`,
    /// with and without `block`, with the plugin's own delay and the policy's, near the end of
    /// time.
    #[test]
    fn judge_decides_every_outcome_by_the_policy() {
        let policy = RetryPolicy {
            max_attempts: 3,
            backoff_ms: vec![100, 1000],
        };
        let now = 1_000_000;
        let retry =
            |r: &Result<Outcome, InvokeError>, a, block, now| judge(r, a, &policy, block, now);
        let ack = Ok(Outcome::Ack);
        let reject = Ok(Outcome::Reject("bad".into()));
        let asks = Ok(Outcome::Retry(0));
        let asks_5s = Ok(Outcome::Retry(5000));
        let trap = Err(InvokeError::Trap("boom".into()));
        for block in [false, true] {
            for a in 1..=4 {
                assert_eq!(retry(&ack, a, block, now), Fate::Done);
                assert_eq!(
                    retry(&reject, a, block, now),
                    Fate::Dead {
                        attempts: a,
                        reason: "rejected: bad".into()
                    },
                    "reject dead-letters at once, blocking or not"
                );
            }
        }
        // Below max_attempts: the policy's backoff by attempt, the last one repeated.
        let due = |f: Fate| match f {
            Fate::Retry { due, .. } => due,
            other => panic!("not a retry: {other:?}"),
        };
        assert_eq!(due(retry(&asks, 1, false, now)), now + 100);
        assert_eq!(due(retry(&asks, 2, false, now)), now + 1000);
        assert_eq!(
            due(retry(&asks_5s, 1, false, now)),
            now + 5000,
            "the plugin's delay wins"
        );
        assert!(matches!(
            retry(&trap, 2, false, now),
            Fate::Retry { attempts: 2, ref error, .. } if error.contains("boom")
        ));
        // At max_attempts: dead, unless blocking (then the last backoff, forever).
        for r in [&asks, &trap] {
            assert!(matches!(
                retry(r, 3, false, now),
                Fate::Dead { attempts: 3, ref reason } if reason.starts_with("3 attempts failed")
            ));
            assert_eq!(due(retry(r, 3, true, now)), now + 1000);
            assert_eq!(due(retry(r, 40, true, now)), now + 1000);
        }
        // A delay the plugin asks for is capped; time never wraps around.
        assert_eq!(
            due(retry(&Ok(Outcome::Retry(u64::MAX)), 1, false, now)),
            now + crate::broker::MAX_DELAY_MS
        );
        assert_eq!(due(retry(&asks, 1, false, u64::MAX - 5)), u64::MAX);
        // Counting: failed for errors, retried for retries, acked for acks; dead letters later.
        let c = Counters::default();
        count(&c, &trap, &retry(&trap, 1, false, now));
        count(&c, &ack, &Fate::Done);
        count(&c, &reject, &retry(&reject, 1, false, now));
        let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(
            (
                read(&c.failed),
                read(&c.retried),
                read(&c.acked),
                read(&c.dead_lettered)
            ),
            (1, 1, 1, 0)
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Messages finish in any order; the committed offset is always exactly the length
            /// of the finished prefix, so it never passes a message still in flight.
            #[test]
            fn committed_offset_never_passes_an_unacked_message(order in Just((0u64..200).collect::<Vec<_>>()).prop_shuffle()) {
                let (mut committed, mut done) = (0u64, BTreeSet::new());
                let mut finished = vec![false; order.len()];
                for o in order {
                    mark_done(&mut committed, &mut done, o);
                    finished[o as usize] = true;
                    let prefix = finished.iter().take_while(|f| **f).count() as u64;
                    prop_assert_eq!(committed, prefix);
                }
                prop_assert_eq!(committed, 200);
                prop_assert!(done.is_empty());
            }
        }
    }
}
