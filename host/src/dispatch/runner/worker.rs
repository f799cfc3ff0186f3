//! Plugin workers: the work channel a loop hands messages to, the rate limit in front of it,
//! and the instances that call the plugin.

use super::*;

/// The receiving end of a work channel, shared by the instances that serve it.
pub(super) type WorkQueue = Arc<Mutex<mpsc::Receiver<WorkItem>>>;

pub(super) struct WorkItem {
    pub(super) message: Arc<StoredMessage>,
    pub(super) attempt: u32,
    pub(super) reply: Reply,
    /// The run of an ordered queue this item belongs to ([`Gate`]); `None` outside one.
    pub(super) gate: Option<Gate>,
}

/// Closed by the worker when a call of an ordered run ends in anything but an ack: the items
/// of the run after it are then dropped unstarted (their replies close), so nothing passes a
/// message that is retried or dead-lettered. Sound because one worker serves the run's
/// channel and calls its items one after another.
pub(super) type Gate = Arc<std::sync::atomic::AtomicBool>;

/// Closes `gate` (if any): the worker drops the run's later items unstarted.
pub(super) fn close(gate: Option<&Gate>) {
    if let Some(g) = gate {
        g.store(true, Ordering::Release);
    }
}

/// Closes `gate` (if any) unless `result` is an ack.
fn close_unless_acked(gate: Option<&Gate>, result: &Result<Outcome, InvokeError>) {
    if !matches!(result, Ok(Outcome::Ack)) {
        close(gate);
    }
}

/// True if the item's run was halted before it started.
fn gated(item: &WorkItem) -> bool {
    item.gate
        .as_ref()
        .is_some_and(|g| g.load(Ordering::Acquire))
}

/// What a call answered, with the kv writes and publishes it staged and when and where it ran.
pub(super) type Handled = (Result<Outcome, InvokeError>, Staged, CallInfo);

/// When and where a call ran, for its trace record.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallInfo {
    pub(super) instance: u32,
    /// ms since the epoch.
    pub(super) started_at: u64,
    pub(super) duration_ms: f64,
}

impl CallInfo {
    /// A call that never ran (the instance could not be made).
    fn none(instance: u32) -> Self {
        Self {
            instance,
            started_at: crate::base::now_ms(),
            duration_ms: 0.0,
        }
    }
}

/// Spaces messages `1/rate` seconds apart, across all queues of a subscription.
pub(super) struct Rate {
    pub(super) interval: Duration,
    pub(super) next: std::sync::Mutex<Instant>,
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

/// One plugin instance's worth of service on a work channel (shared by the instances of a
/// clustering subscription). It calls the plugin on the item it received, then, while the channel
/// has more at once, on those too within the same scheduler turn ([`Lease::handle_batch`]), so a
/// backlog costs one slot hand-over per batch, not per message. An item is taken only when its
/// call starts, so a stopping worker never holds items it has not started. Each batch leases the
/// instance of `key` from the runtime's pool (the same one each time unless the pool evicted
/// it; a new one after a trap, timeout or memory overrun). Runs on the plugin threads. Once
/// `cancel` fires, messages still queued are dropped unstarted; once `abort` fires, a call
/// running is cut off too (their senders see the reply channel closed: not done, no attempt
/// counted), so a stop or a lost lease waits for no plugin.
pub(super) async fn worker(
    env: Handles,
    code: Arc<PluginCode>,
    ctx: Arc<InstanceContext>,
    key: PoolKey,
    work: WorkQueue,
    cancel: CancellationToken,
    abort: CancellationToken,
) {
    let runtime = env.plugins.runtime().clone();
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
    // The replies of the items handed to the running batch, oldest first (each call answers
    // the oldest); a Mutex only because the batch's future must be Send.
    let replies: std::sync::Mutex<std::collections::VecDeque<(Reply, String, Option<Gate>)>> =
        Default::default();
    let start = |item: WorkItem| -> Message {
        let m = &item.message.message;
        if item.attempt == 1 {
            // Retries wait by design; the first attempt shows how far behind dispatch runs.
            let due = m.born_at.max(m.deliver_at);
            delay.observe(crate::base::now_ms().saturating_sub(due) as f64 / 1000.0);
        }
        let message = Message::of(&item.message.topic, item.message.offset, m, item.attempt);
        replies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back((item.reply, message.id.clone(), item.gate));
        message
    };
    loop {
        let item = { work.lock().await.recv().await };
        let Some(item) = item else { break };
        if cancel.is_cancelled() || gated(&item) {
            continue;
        }
        let leased = tokio::select! {
            biased;
            () = cancel.cancelled() => continue,
            l = runtime.lease(key.clone(), &code, || ctx.clone()) => l,
        };
        let mut lease = match leased {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(group = %ctx.group, plugin = %ctx.plugin, error = %e, "cannot instantiate");
                close(item.gate.as_ref());
                let _ = item.reply.send((
                    Err(e),
                    Staged::default(),
                    CallInfo::none(ctx.instance_index),
                ));
                continue;
            }
        };
        let first = start(item);
        let next = || {
            if cancel.is_cancelled() {
                return None;
            }
            // Only what is there now: a batch never waits for work, nor for another instance
            // that is waiting for work. Items of a halted run are dropped unstarted.
            let mut rx = work.try_lock().ok()?;
            loop {
                let item = rx.try_recv().ok()?;
                if !gated(&item) {
                    return Some(start(item));
                }
            }
        };
        let done = |result: Result<Outcome, InvokeError>, took: Duration, staged: Staged| {
            duration.observe(took.as_secs_f64());
            let o = outcome_index(&result);
            outcomes[o]
                .get_or_insert_with(|| {
                    metrics
                        .deliveries
                        .get_or_create(&crate::metrics::OutcomeLabels {
                            group: ctx.group.clone(),
                            outcome: OUTCOMES[o],
                        })
                        .clone()
                })
                .inc();
            let oldest = replies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop_front();
            if let Some((reply, id, gate)) = oldest {
                close_unless_acked(gate.as_ref(), &result);
                if let Err(e) = &result {
                    // Sampled (1st, 2nd, 4th, … failure of this worker): a trap storm must not
                    // flood the log.
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(group = %ctx.group, plugin = %ctx.plugin, message = %id, error = %e, failures, "plugin call failed");
                    }
                }
                let call = CallInfo {
                    instance: ctx.instance_index,
                    started_at: crate::base::now_ms()
                        .saturating_sub(u64::try_from(took.as_millis()).unwrap_or(u64::MAX)),
                    duration_ms: took.as_secs_f64() * 1000.0,
                };
                let _ = reply.send((result, staged, call));
            }
            !cancel.is_cancelled()
        };
        let handled = tokio::select! {
            biased;
            // Cut off: the instance is dropped (its store stopped mid-call) and the reply of
            // the unfinished call too.
            () = abort.cancelled() => Ok(0),
            n = lease.handle_batch(first, next, done) => n,
        };
        drop(lease);
        let mut left = replies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = handled
            && let Some((reply, _, gate)) = left.pop_front()
        {
            close(gate.as_ref());
            let _ = reply.send((
                Err(e),
                Staged::default(),
                CallInfo::none(ctx.instance_index),
            ));
        }
        // Whatever is left was cut off by `abort`: its replies close (not done), and their runs
        // halt.
        for (_, _, gate) in left.drain(..) {
            close(gate.as_ref());
        }
    }
    runtime.forget_key(&key);
}

/// Where a worker sends what became of one work item.
pub(super) type Reply = oneshot::Sender<Handled>;

impl Member {
    /// Hands a message to the workers (after the rate allows it). The caller holds an in-flight
    /// permit until the outcome is handled (stored), so `in_flight` counts a message until its
    /// fate is durable. `None`: the runner stopped first and nothing was handed out. The
    /// receiver yields an error if a worker dropped the message unstarted because the runner
    /// stopped: the message is not done, and no attempt was made.
    pub(super) async fn dispatch(
        &self,
        message: Arc<StoredMessage>,
        attempt: u32,
    ) -> Option<oneshot::Receiver<Handled>> {
        self.dispatch_gated(message, attempt, None).await
    }

    /// [`Self::dispatch`] of an item of an ordered run (see [`Gate`]).
    pub(super) async fn dispatch_gated(
        &self,
        message: Arc<StoredMessage>,
        attempt: u32,
        gate: Option<Gate>,
    ) -> Option<oneshot::Receiver<Handled>> {
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
                gate,
            })
            .await;
        Some(rx)
    }
}
