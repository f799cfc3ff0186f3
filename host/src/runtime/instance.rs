//! One live plugin instance and its calls: each call under the fair scheduler, a CPU budget and
//! a wall-clock deadline; how a failed call is classified ([`InvokeError`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use wasmtime::{Store, Trap};

use super::{CallClock, HostState, InvokeError, Scheduler, Staged, Tenant, host};
use crate::bindings::{
    CHECKER_EXPORT, CONSUMER_EXPORT, CheckResult, Message, Outcome, checker, consumer,
};

/// A trap's text (it names the plugin's own functions and may carry its messages): capped and
/// escaped like every plugin-provided string.
fn trap_text(e: &wasmtime::Error) -> String {
    crate::text::from_plugin(&format!("{e:#}"), 2 * crate::text::MAX_REASON_BYTES)
}

/// Maps a wasmtime error to what happened to the plugin; `Err` gives back anything else.
pub(super) fn classify(
    e: wasmtime::Error,
    timeout_ms: u64,
) -> Result<InvokeError, wasmtime::Error> {
    if e.downcast_ref::<host::DeadlineExceeded>().is_some()
        || e.downcast_ref::<Trap>() == Some(&Trap::Interrupt)
    {
        return Ok(InvokeError::Timeout(timeout_ms));
    }
    if let Some(m) = e.downcast_ref::<host::MemoryLimitExceeded>() {
        return Ok(InvokeError::MemoryLimit(m.limit));
    }
    if e.downcast_ref::<Trap>().is_some() {
        return Ok(InvokeError::Trap(trap_text(&e)));
    }
    Err(e)
}

/// How long one scheduler turn may go on serving a batch of messages
/// ([`PluginInstance::handle_batch`]) before it lets other tenants in, counted as the time its
/// calls held a slot (waits for a slot and for host capabilities do not count).
pub const BATCH_QUANTUM: Duration = Duration::from_millis(2);

/// How long a turn goes on serving a batch before a waiting tenant that used less CPU may cut
/// it (as CFS's minimum granularity): a turn's hand-over (lease, slot, wake-ups) costs ~40 µs of
/// CPU, so with many subscriptions waiting, cutting each turn after one ~10 µs call spent most
/// of the CPU on hand-overs (issue 25: 1 000 topics with a subscription each ran 1.4 messages a
/// turn and drained at a quarter of one topic's rate).
pub const MIN_TURN: Duration = Duration::from_micros(500);

/// One live instance: reused across calls until a call fails, then it must be replaced.
pub struct PluginInstance {
    pub(super) store: Store<HostState>,
    pub(super) consumer: Option<consumer::Guest>,
    pub(super) checker: Option<checker::Guest>,
    pub(super) broken: bool,
    /// CPU budget and wall-clock deadline of one call (ms).
    pub(super) timeout_ms: u64,
    pub(super) calls: Counter,
    pub(super) sched: Arc<Scheduler>,
    pub(super) tenant: Arc<Tenant>,
    pub(super) clock: Arc<CallClock>,
}

impl PluginInstance {
    /// False after a trap, timeout or memory overrun: its state can no longer be trusted.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    fn start_call(&mut self, message_id: &str) {
        self.calls.inc();
        self.clock.reset();
        let state = self.store.data_mut();
        state.lines_this_call = 0;
        state.message_id = Some(message_id.to_string());
        state.turns.last_yield = std::time::Instant::now();
        self.store.set_epoch_deadline(1);
        // Until the call returns: a call dropped half-way (deadline, cancellation) leaves the
        // store mid-execution, never to be used again.
        self.broken = true;
    }

    fn finish<T>(
        &mut self,
        r: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, InvokeError> {
        match r {
            Err(_) => Err(InvokeError::WallClock(self.timeout_ms)),
            Ok(Err(e)) => {
                Err(classify(e, self.timeout_ms)
                    .unwrap_or_else(|e| InvokeError::Trap(trap_text(&e))))
            }
            Ok(Ok(v)) => {
                self.broken = false;
                Ok(v)
            }
        }
    }

    fn deadline(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Handles one message: [`PluginInstance::handle_batch`] with a batch of one.
    pub async fn handle(&mut self, message: &Message) -> Result<Outcome, InvokeError> {
        let mut out = None;
        self.handle_batch(
            message.clone(),
            || None,
            |r, _, _| {
                out = Some(r);
                true
            },
        )
        .await;
        out.unwrap_or_else(|| Err(InvokeError::Instantiate("the call was not made".into())))
    }

    /// Handles `first`, then each message `next` hands out, one after another within one
    /// scheduler turn: while each call finishes without waiting, the next one starts on the
    /// same slot, so a subscription with a backlog pays one slot hand-over per batch instead of
    /// one per message (issue 22: a hand-over beside looping plugins costs ~0.3–1.3 ms, a no-op
    /// call ~5 µs). `next` is asked only when the next call can start at once, so a message it
    /// hands out is always handled (a caller taking messages from a queue never holds some it
    /// has not started). Each call keeps its own CPU budget and wall-clock deadline
    /// (`timeout_ms`, from the call's start: waiting for a first slot is the neighbours' doing,
    /// not the plugin's).
    ///
    /// `done(result, took)` is called after each call, in order; it returns false to stop. The
    /// batch also stops after a failed call (the instance must be replaced), once the turn has
    /// run [`BATCH_QUANTUM`], or, once it has run [`MIN_TURN`], when a tenant that used less CPU
    /// waits for a slot. Returns how many messages were handled.
    pub async fn handle_batch(
        &mut self,
        first: Message,
        mut next: impl FnMut() -> Option<Message>,
        mut done: impl FnMut(Result<Outcome, InvokeError>, Duration, Staged) -> bool,
    ) -> usize {
        let Some(guest) = self.consumer.clone() else {
            done(
                Err(InvokeError::MissingExport(CONSUMER_EXPORT)),
                Duration::ZERO,
                Staged::default(),
            );
            return 1;
        };
        let (sched, tenant, clock) = (self.sched.clone(), self.tenant.clone(), self.clock.clone());
        let mut ran = Duration::ZERO;
        let mut handled = 0;
        let calls = async {
            let mut message = Some(first);
            while let Some(m) = message {
                self.start_call(&m.id);
                let started = Instant::now();
                let r =
                    tokio::time::timeout(self.deadline(), guest.call_handle(&mut self.store, &m))
                        .await;
                // A reason is kept in dead letters, shown by the API and logged: capped and
                // escaped.
                let r = self.finish(r).map(|o| match o {
                    Outcome::Reject(reason) => Outcome::Reject(crate::text::from_plugin(
                        &reason,
                        crate::text::MAX_REASON_BYTES,
                    )),
                    other => other,
                });
                let failed = r.is_err();
                let staged = self.store.data_mut().take_staged();
                let go_on = done(r, started.elapsed(), staged);
                handled += 1;
                // The turn's length is the time its calls held a slot, not its wall time: with
                // many tenants a turn's polls wait for slots, and counted in wall time every
                // turn ended after one call (1.4 calls a turn with 1 000 subscriptions).
                ran = ran.saturating_add(Duration::from_nanos(clock.used_ns()));
                if failed
                    || !go_on
                    || ran >= BATCH_QUANTUM
                    || (ran >= MIN_TURN && sched.should_yield(&tenant))
                {
                    break;
                }
                message = next();
            }
        };
        sched.run(&tenant, &clock, calls).await;
        handled
    }

    /// Calls the checker export; its answer comes with the kv writes it staged (to commit with
    /// the decision; empty unless its context stages effects). A failed call's are discarded.
    pub async fn check_transaction(
        &mut self,
        message: &Message,
    ) -> Result<(CheckResult, Staged), InvokeError> {
        let Some(guest) = self.checker.clone() else {
            return Err(InvokeError::MissingExport(CHECKER_EXPORT));
        };
        self.start_call(&message.id);
        let (sched, tenant, clock) = (self.sched.clone(), self.tenant.clone(), self.clock.clone());
        let r = tokio::time::timeout(
            self.deadline(),
            sched.run(
                &tenant,
                &clock,
                guest.call_check_transaction(&mut self.store, message),
            ),
        )
        .await;
        let r = self.finish(r);
        let staged = self.store.data_mut().take_staged();
        match r {
            Ok(answer) => Ok((answer, staged)),
            Err(e) => {
                let services = self.store.data().ctx.services.clone();
                staged.discard(services.as_ref()).await;
                Err(e)
            }
        }
    }
}
