//! Plugin workers: the work channel a loop hands messages to, the rate limit in front of it,
//! and the instances that call the plugin.

use super::*;

/// The receiving end of a work channel, shared by the instances that serve it.
pub(super) type WorkQueue = Arc<Mutex<mpsc::Receiver<WorkItem>>>;

pub(super) struct WorkItem {
    pub(super) message: Arc<StoredMessage>,
    pub(super) attempt: u32,
    pub(super) reply: oneshot::Sender<Result<Outcome, InvokeError>>,
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

/// The most work items one instance takes from its channel for one batch.
const MAX_BATCH: usize = 128;

/// One plugin instance's worth of service on a work channel shared by `sharers` instances: it
/// takes the items waiting (its share of them, at most [`MAX_BATCH`]) and calls the plugin on
/// them one after another in one scheduler turn ([`Lease::handle_batch`]), so a backlog costs
/// one slot hand-over per batch, not per message. Each batch leases the instance of `key` from
/// the runtime's pool (the same one each time unless the pool evicted it; a new one after a
/// trap, timeout or memory overrun). Runs on the plugin threads. Once `cancel` fires, messages
/// still queued are dropped unstarted; once `abort` fires, a call running is cut off too (their
/// senders see the reply channel closed: not done, no attempt counted), so a stop or a lost
/// lease waits for no plugin.
#[allow(clippy::too_many_arguments)]
pub(super) async fn worker(
    env: Handles,
    code: Arc<PluginCode>,
    ctx: Arc<InstanceContext>,
    key: PoolKey,
    work: WorkQueue,
    sharers: usize,
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
    let sharers = sharers.max(1);
    loop {
        let items: Vec<WorkItem> = {
            let mut rx = work.lock().await;
            let Some(first) = rx.recv().await else { break };
            let share = (rx.len() / sharers).min(MAX_BATCH - 1);
            let mut items = vec![first];
            while items.len() <= share
                && let Ok(next) = rx.try_recv()
            {
                items.push(next);
            }
            items
        };
        let mut messages = Vec::with_capacity(items.len());
        let mut replies = Vec::with_capacity(items.len());
        for item in items {
            let m = &item.message.message;
            if item.attempt == 1 {
                // Retries wait by design; the first attempt shows how far behind dispatch runs.
                let due = m.born_at.max(m.deliver_at);
                delay.observe(crate::base::now_ms().saturating_sub(due) as f64 / 1000.0);
            }
            messages.push(Message::of(
                &item.message.topic,
                item.message.offset,
                m,
                item.attempt,
            ));
            replies.push(Some(item.reply));
        }
        // messages[at..] are not handled yet. A reply dropped unsent (cancel, abort) reads as
        // "not done, no attempt made".
        let mut at = 0;
        while at < messages.len() && !cancel.is_cancelled() {
            let leased = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                l = runtime.lease(key.clone(), &code, || ctx.clone()) => l,
            };
            let mut lease = match leased {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(group = %ctx.group, plugin = %ctx.plugin, error = %e, "cannot instantiate");
                    if let Some(reply) = replies[at].take() {
                        let _ = reply.send(Err(e));
                    }
                    at += 1;
                    continue;
                }
            };
            let on_done = |i: usize, result: Result<Outcome, InvokeError>, took: Duration| {
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
                if let Err(e) = &result {
                    // Sampled (1st, 2nd, 4th, … failure of this worker): a trap storm must not
                    // flood the log.
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(group = %ctx.group, plugin = %ctx.plugin, message = %messages[at + i].id, error = %e, failures, "plugin call failed");
                    }
                }
                if let Some(reply) = replies.get_mut(at + i).and_then(Option::take) {
                    let _ = reply.send(result);
                }
                !cancel.is_cancelled()
            };
            let handled = tokio::select! {
                biased;
                // Cut off: the instance is dropped (its store stopped mid-call) and the replies
                // of the unfinished calls too.
                () = abort.cancelled() => break,
                n = lease.handle_batch(&messages[at..], on_done) => n,
            };
            drop(lease);
            match handled {
                Ok(n) => at += n.max(1),
                Err(e) => {
                    if let Some(reply) = replies[at].take() {
                        let _ = reply.send(Err(e));
                    }
                    at += 1;
                }
            }
        }
    }
    runtime.forget_key(&key);
}

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
}
