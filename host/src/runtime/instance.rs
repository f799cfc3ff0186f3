//! One live plugin instance and its calls: each call under the fair scheduler, a CPU budget and
//! a wall-clock deadline; how a failed call is classified ([`InvokeError`]).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use wasmtime::{Store, Trap};

use super::{CallClock, HostState, InvokeError, Scheduler, Tenant, host};
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

    pub async fn handle(&mut self, message: &Message) -> Result<Outcome, InvokeError> {
        let Some(guest) = self.consumer.clone() else {
            return Err(InvokeError::MissingExport(CONSUMER_EXPORT));
        };
        self.start_call(&message.id);
        let (sched, tenant, clock) = (self.sched.clone(), self.tenant.clone(), self.clock.clone());
        let r = tokio::time::timeout(
            self.deadline(),
            sched.run(&tenant, &clock, guest.call_handle(&mut self.store, message)),
        )
        .await;
        // A reason is kept in dead letters, shown by the API and logged: capped and escaped.
        self.finish(r).map(|o| match o {
            Outcome::Reject(reason) => Outcome::Reject(crate::text::from_plugin(
                &reason,
                crate::text::MAX_REASON_BYTES,
            )),
            other => other,
        })
    }

    pub async fn check_transaction(
        &mut self,
        message: &Message,
    ) -> Result<CheckResult, InvokeError> {
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
        self.finish(r)
    }
}
