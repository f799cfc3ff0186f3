//! Fair CPU scheduling of plugin calls between subscriptions: at most `slots` calls run wasm at
//! once, and a freed slot goes to the waiting tenant (subscription, invoke API, checker) that has
//! used the least CPU so far, its *virtual runtime*, as Linux's CFS picks the next task. A call
//! holds a slot only while wasm runs (one poll of its future): a call waiting on a host
//! capability, a WASI sleep or a timer holds none.
//!
//! Why not tokio's own scheduling: a looping call yields once per epoch tick and goes to the back
//! of the run queue, behind every other looping call, so with k looping subscriptions a healthy
//! one ran one call per k ticks (issue 22: 12 msg/s beside 8 loops). Here a healthy tenant's
//! virtual runtime stays low, so it is served first, and when it waits while all slots are busy
//! it bumps the engine's epoch so that running calls reach their yield point now, not at the
//! next tick.
//!
//! With three slots or more, one is kept for short calls while any tenant made short calls in the
//! last [`SHORT_DEMAND_WINDOW`]: tenants whose last poll ran long ([`LONG_POLL`], a looping or
//! CPU-heavy plugin) may hold at most `slots - 1` at once. A healthy subscription then takes a
//! free slot at once instead of preempting a loop for each batch; every hand-over through
//! preemption cost ~1.3 ms beside 4 loops on 2 cores (the loop must reach its yield point, and
//! the woken worker must get a thread), which held the healthy drain to ~0.17 of alone. When
//! short calls stop for a window, the long ones get every slot again (at the next tick). With two
//! slots it is off: long calls would share one, and a call's wall-clock deadline (its
//! `timeout_ms`, also its CPU budget) counts its waits for a slot, so CPU-heavy calls beside
//! each other timed out (`tests/tests/hostile.rs`, a log-flooding plugin beside 4 others).
//!
//! Virtual runtime counts the CPU time of the polling thread (`CLOCK_THREAD_CPUTIME_ID`), not the
//! poll's wall time: a poll whose thread the OS preempted (for the broker's own threads, which run
//! at a higher priority) is not charged for the time it did not run. Counted in wall time, a
//! healthy subscription beside 8 loops was charged ~3x its CPU and held to ~0.09 of its drain
//! alone; the CPU budget of a call ([`CallClock`]) stays in poll wall time.
//!
//! A poll of a looping call blocks its tokio worker thread for up to a tick. Tasks queued on that
//! worker (a woken subscription worker in its LIFO slot, a task that used up its cooperative
//! budget) would wait behind it unless another worker happens to steal them (measured: a healthy
//! worker took ~1.4 ms to see each work item beside 4 loops). So a tenant whose last poll ran
//! long ([`LONG_POLL`]) runs its next one inside `block_in_place`, which hands the worker's queue
//! to another thread first; short polls (the common case) pay nothing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A waiter preempts a running call only if it has used this much less CPU (ns): running calls
/// of tenants with similar use are not interrupted for each other, only at the next tick.
const PREEMPT_GRANULARITY_NS: u64 = 2_000_000;
/// How much CPU credit (ns) a tenant that was idle may bring back: it is placed at most this far
/// behind the tenants that kept running, so a long pause does not buy a long monopoly.
const IDLE_CREDIT_NS: u64 = 20_000_000;
/// From this many slots on, one is kept for short calls (see the module docs).
const RESERVE_FROM_SLOTS: usize = 3;
/// Unheld tenants remembered at most (their names come from subscriptions, topics and plugins).
const MAX_REMEMBERED_TENANTS: usize = 4096;
/// How long after a tenant's last short poll a slot stays kept for short calls.
pub const SHORT_DEMAND_WINDOW: Duration = Duration::from_millis(100);
/// A poll this long marks its tenant as running long polls: its next poll runs in
/// `block_in_place` (see the module docs).
pub const LONG_POLL: Duration = Duration::from_millis(1);

/// One party whose calls share a fair part of the CPU (by name: a subscription's group, the
/// invoke API, a topic's checker).
#[derive(Debug)]
pub struct Tenant {
    name: String,
    /// CPU (ns) its calls have used, moved up to the floor when it comes back from idle.
    vruntime: AtomicU64,
    /// Its last poll ran at least [`LONG_POLL`].
    ran_long: AtomicBool,
}

impl Tenant {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// CPU (ns) its calls have used, as the scheduler counts it.
    pub fn vruntime_ns(&self) -> u64 {
        self.vruntime.load(Ordering::Relaxed)
    }
}

struct Waiter {
    tenant: Arc<Tenant>,
    tx: oneshot::Sender<()>,
}

struct Inner {
    free: usize,
    /// Virtual runtime of the last tenant granted a slot from the queue (never decreases).
    floor: u64,
    seq: u64,
    /// Invariant: every waiter is held back (`free` is 0, or it runs long polls and the long
    /// ones hold all they may). Keyed by (its tenant's virtual runtime when last looked at,
    /// arrival): a tenant's virtual runtime only grows (its other calls run while this one
    /// waits), so a key is a lower bound of the waiter's true standing, and a key found stale
    /// at the front is corrected in place ([`Scheduler::grant`]). A linear scan for the least
    /// per handed-over slot cost time per waiter: with 1 000 subscriptions waiting for 2
    /// slots, 6% of a many-topics run's CPU.
    waiters: BTreeMap<(u64, u64), Waiter>,
    /// Tenants holding a slot (one entry per slot held) and whether they ran long when granted.
    running: Vec<(Arc<Tenant>, bool)>,
    /// When a tenant last asked for a slot for a short poll.
    short_seen: Option<Instant>,
}

/// Hands out `slots` wasm-running slots fairly between tenants.
pub struct Scheduler {
    slots: usize,
    inner: Mutex<Inner>,
    /// Every tenant held by a caller, and those unheld that used more than a new one would
    /// start with (see [`Scheduler::tenant`]).
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
    /// Called when a waiter should preempt a running call (bumps the engine's epoch).
    preempt: Box<dyn Fn() + Send + Sync>,
}

impl Scheduler {
    /// `slots` calls may run wasm at once (at least 1); `preempt` makes running calls reach
    /// their epoch callback, where they yield if [`Scheduler::should_yield`] says so.
    pub fn new(slots: usize, preempt: impl Fn() + Send + Sync + 'static) -> Self {
        let slots = slots.max(1);
        Self {
            slots,
            inner: Mutex::new(Inner {
                free: slots,
                floor: 0,
                seq: 0,
                waiters: BTreeMap::new(),
                running: Vec::with_capacity(slots),
                short_seen: None,
            }),
            tenants: Mutex::new(HashMap::new()),
            preempt: Box::new(preempt),
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The tenant called `name`; every caller with the same name shares one, and it keeps its
    /// virtual runtime while nobody holds it until a new tenant would stand as well: a
    /// subscription whose every call traps holds its tenant only through an instance, and
    /// forgetting it with each dropped instance gave it [`IDLE_CREDIT_NS`] of credit back per
    /// call, ahead of a healthy tenant (issue 22: a healthy drain at 0.02x of alone beside 4
    /// subscriptions whose calls each grew memory to their cap and trapped).
    pub fn tenant(&self, name: &str) -> Arc<Tenant> {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = tenants.get(name) {
            return t.clone();
        }
        let floor = self.lock().floor;
        let fresh = floor.saturating_sub(IDLE_CREDIT_NS);
        // Forget tenants nobody else holds whose standing a new one would have anyway, and any
        // unheld one past MAX_REMEMBERED_TENANTS, so the map stays near the live set.
        let crowded = tenants.len() >= MAX_REMEMBERED_TENANTS;
        tenants.retain(|_, t| Arc::strong_count(t) > 1 || (!crowded && t.vruntime_ns() > fresh));
        let t = Arc::new(Tenant {
            name: name.to_string(),
            vruntime: AtomicU64::new(fresh),
            ran_long: AtomicBool::new(false),
        });
        tenants.insert(name.to_string(), t.clone());
        t
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls waiting for a slot right now.
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }

    /// True if a waiter has used clearly less CPU than `tenant`: a running call of `tenant`
    /// should give its slot up at its next yield point.
    pub fn should_yield(&self, tenant: &Tenant) -> bool {
        let inner = self.lock();
        let mine = tenant.vruntime_ns();
        let clearly_less = |v: u64| v.saturating_add(PREEMPT_GRANULARITY_NS) < mine;
        // Keys are lower bounds: past the first key that is not clearly less, none can be.
        inner
            .waiters
            .iter()
            .take_while(|((key, _), _)| clearly_less(*key))
            .any(|(_, w)| clearly_less(w.tenant.vruntime_ns()))
    }

    /// Whether `tenant` may take a free slot now: a tenant running long polls may not take the
    /// last one while short calls were asked for within [`SHORT_DEMAND_WINDOW`].
    fn may_take(&self, inner: &Inner, tenant: &Tenant, now: Instant) -> bool {
        if inner.free == 0 {
            return false;
        }
        if self.slots < RESERVE_FROM_SLOTS || !tenant.ran_long.load(Ordering::Relaxed) {
            return true;
        }
        let short_wanted = inner
            .short_seen
            .is_some_and(|t| now.saturating_duration_since(t) < SHORT_DEMAND_WINDOW);
        let long_running = inner.running.iter().filter(|(_, long)| *long).count();
        !short_wanted || long_running + 1 < self.slots
    }

    fn take(inner: &mut Inner, tenant: Arc<Tenant>) {
        inner.free -= 1;
        let long = tenant.ran_long.load(Ordering::Relaxed);
        inner.running.push((tenant, long));
    }

    fn try_acquire(&self, tenant: &Arc<Tenant>) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        if !tenant.ran_long.load(Ordering::Relaxed) {
            inner.short_seen = Some(now);
        }
        if self.may_take(&inner, tenant, now) {
            Self::take(&mut inner, tenant.clone());
            return true;
        }
        false
    }

    /// Queues a request for a slot; the receiver completes when one is handed over.
    fn enqueue(&self, tenant: &Arc<Tenant>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let preempt = {
            let now = Instant::now();
            let mut inner = self.lock();
            if !tenant.ran_long.load(Ordering::Relaxed) {
                inner.short_seen = Some(now);
            }
            if self.may_take(&inner, tenant, now) {
                Self::take(&mut inner, tenant.clone());
                let _ = tx.send(());
                return rx;
            }
            // Back from idle: no more than a little credit over those that kept running.
            let floor = inner.floor.saturating_sub(IDLE_CREDIT_NS);
            tenant.vruntime.fetch_max(floor, Ordering::Relaxed);
            inner.seq += 1;
            let seq = inner.seq;
            inner.waiters.insert(
                (tenant.vruntime_ns(), seq),
                Waiter {
                    tenant: tenant.clone(),
                    tx,
                },
            );
            let mine = tenant.vruntime_ns().saturating_add(PREEMPT_GRANULARITY_NS);
            // Preempting helps only if the freed slot could be this waiter's.
            inner.free == 0 && inner.running.iter().any(|(r, _)| mine < r.vruntime_ns())
        };
        if preempt {
            (self.preempt)();
        }
        rx
    }

    /// Gives a slot back after `tenant` ran `used` on it, handing it to the waiter with the
    /// least virtual runtime (the earliest among equals) that may take it.
    fn release(&self, tenant: &Arc<Tenant>, used: Duration) {
        let used_ns = u64::try_from(used.as_nanos()).unwrap_or(u64::MAX);
        tenant.vruntime.fetch_add(used_ns, Ordering::Relaxed);
        let mut inner = self.lock();
        if let Some(i) = inner
            .running
            .iter()
            .position(|(r, _)| Arc::ptr_eq(r, tenant))
        {
            inner.running.swap_remove(i);
        }
        inner.free += 1;
        self.grant(&mut inner);
    }

    /// Hands free slots to waiters, least virtual runtime first, skipping those held back.
    fn grant(&self, inner: &mut Inner) {
        let now = Instant::now();
        // Waiters passed over because they may not take a slot now; they stay queued.
        let mut held_back = Vec::new();
        while inner.free > 0 {
            let Some(((key, seq), w)) = inner.waiters.pop_first() else {
                break;
            };
            let v = w.tenant.vruntime_ns();
            if v != key {
                // Its tenant ran since it queued: put it where it stands now and look again.
                inner.waiters.insert((v, seq), w);
                continue;
            }
            // Every other key is at least this one, and keys are lower bounds: this is the
            // least virtual runtime (the earliest among equals).
            if !self.may_take(inner, &w.tenant, now) {
                held_back.push(((key, seq), w));
                continue;
            }
            if w.tx.send(()).is_ok() {
                inner.floor = inner.floor.max(v);
                Self::take(inner, w.tenant);
            }
            // Else that waiter gave up (its call was dropped): offer the slot to the next.
        }
        inner.waiters.extend(held_back);
    }

    /// Called each epoch tick: once short calls stopped for a window, waiters held back for
    /// them get the free slots.
    pub fn tick(&self) {
        let mut inner = self.lock();
        if inner.free > 0 && !inner.waiters.is_empty() {
            self.grant(&mut inner);
        }
    }

    /// Runs `fut` so that each of its polls (each stretch of wasm between yields) holds a slot;
    /// `clock` learns when a poll starts and how long polls took, for the call's CPU budget.
    pub async fn run<F: Future>(
        &self,
        tenant: &Arc<Tenant>,
        clock: &CallClock,
        fut: F,
    ) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        // `block_in_place` needs a multi-thread runtime (a current-thread one has no other
        // worker to hand its queue to).
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let mut turn = Turn {
            sched: self,
            tenant,
            waiting: None,
        };
        std::future::poll_fn(|cx: &mut Context<'_>| {
            match turn.waiting.as_mut() {
                Some(rx) => match Pin::new(rx).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(_) => turn.waiting = None,
                },
                None => {
                    if !self.try_acquire(tenant) {
                        let mut rx = self.enqueue(tenant);
                        if Pin::new(&mut rx).poll(cx).is_pending() {
                            turn.waiting = Some(rx);
                            return Poll::Pending;
                        }
                    }
                }
            }
            let started = Instant::now();
            let cpu_started = thread_cpu_ns();
            clock.poll_started(started);
            let r = if tenant.ran_long.load(Ordering::Relaxed) && multi_thread {
                tokio::task::block_in_place(|| fut.as_mut().poll(cx))
            } else {
                fut.as_mut().poll(cx)
            };
            let used = started.elapsed();
            tenant.ran_long.store(used >= LONG_POLL, Ordering::Relaxed);
            clock.poll_ended(used);
            let cpu = thread_cpu_ns().saturating_sub(cpu_started);
            self.release(tenant, Duration::from_nanos(cpu));
            r
        })
        .await
    }
}

/// CPU time (ns) the calling thread has used.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// A place in the queue; dropped with the call, it gives back a slot handed over but not used.
struct Turn<'a> {
    sched: &'a Scheduler,
    tenant: &'a Arc<Tenant>,
    waiting: Option<oneshot::Receiver<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.waiting.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.sched.release(self.tenant, Duration::ZERO);
            }
        }
    }
}

/// The CPU a call has used: the time its polls held a slot, plus the poll running now. Shared by
/// the scheduler (which times polls) and the epoch callback (which enforces the budget).
#[derive(Debug)]
pub struct CallClock {
    base: Instant,
    /// CPU (ns) of finished polls of the current call.
    used_ns: AtomicU64,
    /// When the running poll started (ns after `base`); 0 while none runs.
    poll_start_ns: AtomicU64,
}

impl Default for CallClock {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            used_ns: AtomicU64::new(0),
            poll_start_ns: AtomicU64::new(0),
        }
    }
}

impl CallClock {
    fn since_base(&self, at: Instant) -> u64 {
        // +1: a poll starting at the base instant still reads as running.
        u64::try_from(at.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    fn poll_started(&self, at: Instant) {
        self.poll_start_ns
            .store(self.since_base(at), Ordering::Relaxed);
    }

    fn poll_ended(&self, used: Duration) {
        self.poll_start_ns.store(0, Ordering::Relaxed);
        let ns = u64::try_from(used.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .used_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_add(ns))
            });
    }

    /// Starts a new call: nothing used yet (when calls follow each other within one poll, the
    /// running poll counts for the new call from now on).
    pub fn reset(&self) {
        self.used_ns.store(0, Ordering::Relaxed);
        if self.poll_start_ns.load(Ordering::Relaxed) != 0 {
            self.poll_started(Instant::now());
        }
    }

    /// CPU (ns) used by the current call so far, the running poll included.
    pub fn used_ns(&self) -> u64 {
        let done = self.used_ns.load(Ordering::Relaxed);
        match self.poll_start_ns.load(Ordering::Relaxed) {
            0 => done,
            start => done.saturating_add(self.since_base(Instant::now()).saturating_sub(start)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A future that "runs wasm" (busy, using CPU) for `step` per poll and yields, `polls`
    /// times, counting its polls in `count`.
    async fn spin(step: Duration, polls: u32, count: &AtomicUsize) {
        for _ in 0..polls {
            let until = Instant::now() + step;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            count.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn a_freed_slot_goes_to_the_tenant_that_used_least() {
        let bumps = Arc::new(AtomicUsize::new(0));
        let b = bumps.clone();
        let s = Scheduler::new(1, move || {
            b.fetch_add(1, Ordering::Relaxed);
        });
        let (hog, light) = (s.tenant("hog"), s.tenant("light"));
        assert!(s.try_acquire(&hog));
        s.release(&hog, Duration::from_millis(50));
        assert!(s.try_acquire(&hog));
        // Both wait; the light one has used nothing and is served first despite arriving last.
        let mut hog_rx = s.enqueue(&hog);
        let mut light_rx = s.enqueue(&light);
        assert_eq!(
            bumps.load(Ordering::Relaxed),
            1,
            "only the light waiter preempts"
        );
        assert!(s.should_yield(&hog));
        s.release(&hog, Duration::from_millis(10));
        assert!(light_rx.try_recv().is_ok());
        assert!(hog_rx.try_recv().is_err());
        s.release(&light, Duration::from_micros(5));
        assert!(hog_rx.try_recv().is_ok());
        s.release(&hog, Duration::ZERO);
        assert_eq!(s.lock().free, 1);
        assert!(s.lock().running.is_empty());
    }

    #[test]
    fn a_waiter_whose_tenant_ran_since_it_queued_stands_where_its_tenant_stands_now() {
        // Two slots; "busy" has a call running on one and another queued. While queued, its
        // running call uses 50 ms: the queued call must now rank behind "calm" (10 ms), which
        // queued later, although it queued with the lower virtual runtime.
        let s = Scheduler::new(2, || {});
        let (busy, calm, third) = (s.tenant("busy"), s.tenant("calm"), s.tenant("third"));
        assert!(s.try_acquire(&calm));
        s.release(&calm, Duration::from_millis(10));
        assert!(s.try_acquire(&busy));
        assert!(s.try_acquire(&third));
        let mut busy_rx = s.enqueue(&busy);
        let mut calm_rx = s.enqueue(&calm);
        assert_eq!(s.waiting(), 2);
        // Queued keys: busy at 0, calm at 10 ms. busy's running call ends having used 50 ms.
        s.release(&busy, Duration::from_millis(50));
        assert!(
            calm_rx.try_recv().is_ok(),
            "calm (10 ms) goes before busy (50 ms)"
        );
        assert!(busy_rx.try_recv().is_err());
        // busy's queued key (0) says it is clearly behind calm (10 ms); its tenant now stands
        // at 50 ms, so calm's call does not give its slot up for it.
        assert!(!s.should_yield(&calm));
        s.release(&third, Duration::ZERO);
        assert!(busy_rx.try_recv().is_ok());
        s.release(&calm, Duration::ZERO);
        s.release(&busy, Duration::ZERO);
        assert_eq!(s.lock().free, 2);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn a_tenant_back_from_idle_brings_little_credit() {
        let s = Scheduler::new(1, || {});
        let (a, b) = (s.tenant("a"), s.tenant("b"));
        assert!(s.try_acquire(&a));
        let rx = s.enqueue(&b);
        s.release(&a, Duration::from_secs(10));
        drop(rx);
        // b was granted at vruntime 0 and the floor is 0; now a long run of b moves the floor.
        s.release(&b, Duration::from_secs(20));
        assert!(s.try_acquire(&a));
        let _rx = s.enqueue(&b);
        s.release(&a, Duration::ZERO);
        let c = s.tenant("c");
        assert!(
            c.vruntime_ns() + IDLE_CREDIT_NS >= s.lock().floor,
            "a new tenant starts near the floor, not at 0"
        );
    }

    #[test]
    fn a_tenant_keeps_its_use_while_nobody_holds_it() {
        let s = Scheduler::new(1, || {});
        let (healthy, crasher) = (s.tenant("healthy"), s.tenant("crasher"));
        // The crasher ran 50 ms, then its only holder (a trapped instance) went away.
        assert!(s.try_acquire(&crasher));
        s.release(&crasher, Duration::from_millis(50));
        let used = crasher.vruntime_ns();
        drop(crasher);
        let again = s.tenant("crasher");
        assert_eq!(
            again.vruntime_ns(),
            used,
            "no credit back per dropped instance"
        );
        // A healthy waiter is served before it.
        assert!(s.try_acquire(&again));
        let mut crasher_rx = s.enqueue(&again);
        let mut healthy_rx = s.enqueue(&healthy);
        s.release(&again, Duration::from_millis(1));
        assert!(healthy_rx.try_recv().is_ok());
        assert!(crasher_rx.try_recv().is_err());
        s.release(&healthy, Duration::ZERO);
        assert!(crasher_rx.try_recv().is_ok());
        s.release(&again, Duration::ZERO);
        let used = again.vruntime_ns();
        drop(again);
        // An unheld tenant above what a new one would start at survives others being made.
        let _another = s.tenant("another");
        assert!(
            s.tenants
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key("crasher")
        );
        // Once a new tenant would stand as well, an unheld one is forgotten.
        s.lock().floor = used + IDLE_CREDIT_NS;
        let _other = s.tenant("other");
        let tenants = s.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(!tenants.contains_key("crasher"));
        assert!(tenants.contains_key("healthy"), "held tenants stay");
    }

    #[test]
    fn long_polls_leave_a_slot_for_short_calls_while_those_are_asked_for() {
        let s = Scheduler::new(3, || {});
        let (a, b, c, short) = (
            s.tenant("a"),
            s.tenant("b"),
            s.tenant("c"),
            s.tenant("short"),
        );
        for t in [&a, &b, &c] {
            t.ran_long.store(true, Ordering::Relaxed);
        }
        // No short call yet: long polls may take every slot.
        assert!(s.try_acquire(&a));
        assert!(s.try_acquire(&c));
        assert!(s.try_acquire(&b));
        s.release(&b, Duration::ZERO);
        // A short call was asked for: the second slot stays for short calls.
        assert!(s.try_acquire(&short));
        s.release(&short, Duration::ZERO);
        let mut rx_b = s.enqueue(&b);
        assert!(
            rx_b.try_recv().is_err(),
            "b is held back though a slot is free"
        );
        assert!(
            s.try_acquire(&short),
            "a short call takes the kept slot at once"
        );
        s.release(&short, Duration::ZERO);
        // Once short calls stopped for a window, the next tick gives the slot to b.
        std::thread::sleep(SHORT_DEMAND_WINDOW);
        s.tick();
        assert!(rx_b.try_recv().is_ok());
        assert_eq!(s.lock().free, 0);
    }

    #[test]
    fn a_dropped_waiter_hands_its_slot_on() {
        let s = Scheduler::new(1, || {});
        let (a, b, c) = (s.tenant("a"), s.tenant("b"), s.tenant("c"));
        assert!(s.try_acquire(&a));
        let rx_b = s.enqueue(&b);
        let mut rx_c = s.enqueue(&c);
        drop(rx_b);
        s.release(&a, Duration::ZERO);
        assert!(rx_c.try_recv().is_ok(), "b left the queue; c gets the slot");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn with_one_slot_a_light_tenant_waits_for_one_hog_poll_not_a_round_of_them() {
        const HOGS: usize = 6;
        let s = Arc::new(Scheduler::new(1, || {}));
        let hog_polls = Arc::new(AtomicUsize::new(0));
        let mut hogs = Vec::new();
        for i in 0..HOGS {
            let (s, hog_polls) = (s.clone(), hog_polls.clone());
            hogs.push(tokio::spawn(async move {
                let t = s.tenant(&format!("hog{i}"));
                let clock = CallClock::default();
                s.run(&t, &clock, spin(Duration::from_millis(2), 100, &hog_polls))
                    .await;
                clock.used_ns()
            }));
        }
        // Every hog has run (so none is still at virtual runtime 0, where ties go by arrival)
        // and all are running or queued before the light tenant starts asking.
        while hog_polls.load(Ordering::SeqCst) < 2 * HOGS || s.waiting() < HOGS - 1 {
            tokio::task::yield_now().await;
        }
        let light = s.tenant("light");
        let mut worst = 0;
        for _ in 0..30 {
            let clock = CallClock::default();
            let before = hog_polls.load(Ordering::SeqCst);
            let ran_after = s
                .run(&light, &clock, async { hog_polls.load(Ordering::SeqCst) })
                .await;
            worst = worst.max(ran_after - before);
            if s.waiting() == 0 {
                break;
            }
        }
        for h in hogs {
            let used = h.await.expect("hog");
            assert!(
                used >= 100 * 2_000_000,
                "a hog's clock counts its polls: {used} ns"
            );
        }
        // Counted, not timed: served in arrival order the light call would wait behind up to
        // HOGS polls; served by least CPU it waits for the poll running when it asked (and one
        // that started between reading the count and asking).
        assert!(worst <= 2, "hog polls ran before a light call: {worst}");
    }
}
