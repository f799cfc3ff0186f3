//! Timers of a member: delayed messages, retries and redrives, stored durably and fired in due
//! order by the timer loop (unordered subscriptions) or by the ordered loop of their queue.

use super::*;

/// Sleeps until `due` (ms since the epoch); at once if it has passed.
pub(super) async fn sleep_until_ms(due: u64) {
    let wait = due.saturating_sub(now_ms());
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

impl Member {
    /// The timer that holds a delayed message until it is due.
    pub(super) fn delay_timer(&self, m: &StoredMessage) -> Timer {
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

    pub(super) async fn remove_timer(&self, timer: &Timer) {
        let (space, key) = (state::timer_space(&self.group), timer.key());
        self.persist("a timer removal", || {
            state::delete(self.storage.as_ref(), &space, &key)
        })
        .await;
        self.shared.forget_timer(&key);
    }

    pub(super) async fn add_timer(&self, t: Timer) {
        let space = state::timer_space(&self.group);
        let key = t.key();
        self.persist("a timer", || {
            state::put(self.storage.as_ref(), &space, &key, &t)
        })
        .await;
        self.shared.add_timer(t);
    }

    /// The message a due timer delivers. `Ok(None)`: nothing to deliver any more (another node
    /// dropped the timer, or the message is gone and the timer is removed). `Err`: the read
    /// failed; the timer is kept under its stored key (a changed due time would leave the stored
    /// record behind, to fire again after a restart) and the caller tries again later.
    pub(super) async fn timer_message(
        &self,
        timer: &Timer,
    ) -> Result<Option<Arc<StoredMessage>>, ()> {
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
                // Deleted by retention before its delay or retry came due.
                None => {
                    self.count_expired(1);
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
    pub(super) async fn finish_timer(
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

    /// Whether a due timer is still stored (read errors keep it: a timer is never lost).
    pub(super) async fn timer_stored(&self, timer: &Timer) -> bool {
        let space = state::timer_space(&self.group);
        !matches!(
            self.storage.get_record(&space, &timer.key()).await,
            Ok(None)
        )
    }

    /// Delivers delayed messages, retries and redrives when they are due.
    pub(super) async fn run_timers(self: Arc<Self>) {
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
