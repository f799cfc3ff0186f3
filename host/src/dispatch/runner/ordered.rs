//! The ordered loop of one queue: messages called in queue order (in runs), retried in place,
//! delayed messages and retries delivered between messages of the queue, never beside one.

use super::*;
use worker::Gate;

impl Member {
    /// Ordered: the queue's messages in queue order; message n+1 is called only after n is
    /// acked (a run of them goes to the worker at once, which stops at the first one not
    /// acked: see `Member::run_length`). A failing message blocks its queue while it is retried; its
    /// attempts and next-attempt time are stored with the cursor, so its backoff holds across
    /// pause, update and restart. A delayed message leaves the queue order until it is due (a
    /// durable timer of this queue holds it), then takes its place: it is delivered between
    /// two messages of the queue, never beside one, so a delay never holds up messages that are
    /// due. Messages published without a delay keep their queue order (FIFO per sharding key).
    pub(super) async fn run_ordered(
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
                    Ok(v) => {
                        // Retention deleted the head and what followed: go on after it.
                        let first = v.first().map(|m| m.offset);
                        if let Some(end) = self.deleted_from(queue, cursor.committed, first).await {
                            cursor = Cursor {
                                committed: end,
                                ..Cursor::default()
                            };
                            self.store_cursor(queue, &committer, cursor);
                        }
                        ahead.extend(v.into_iter().map(Arc::new));
                    }
                    Err(e) => {
                        tracing::error!(group = %self.group, error = %e, "read failed");
                        tokio::time::sleep(STORAGE_RETRY).await;
                        continue;
                    }
                }
            }
            let head = ahead.front().cloned();
            let Some(m) = head else {
                // The read came back empty below the high water (see `read_again`).
                let short = self
                    .storage
                    .high_water(self.topic(), queue)
                    .await
                    .is_ok_and(|high| high > cursor.committed);
                // Idle: wake for an append, for the next delayed message of the queue, or to
                // look again for appends whose news was lost.
                let next_timer = timer.map(|t| t.due);
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => break,
                    () = read_again(true), if short => {}
                    r = watch.changed(), if !short => if r.is_err() { break },
                    _ = sleep_until_ms(next_timer.unwrap_or(u64::MAX)), if next_timer.is_some() => {}
                    () = recheck(self.storage.recheck_idle()) => {}
                }
                continue;
            };
            // Completed (with its effects) before a restart, the offset not yet stored.
            if !self.filter.matches(m.message.tag.as_deref()) || self.is_marked(queue, m.offset) {
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
            let mut run = vec![(m, cursor.head_attempts.saturating_add(1), permit)];
            // The messages after a head on its first attempt that need nothing but delivery
            // go out with it, while in-flight permits are free (see `Member::run_length`).
            if cursor.head_attempts == 0 {
                for next in ahead.iter().skip(1).take(self.run_length.saturating_sub(1)) {
                    let follows = run
                        .last()
                        .is_some_and(|(p, _, _)| p.offset + 1 == next.offset);
                    if !follows
                        || !self.filter.matches(next.message.tag.as_deref())
                        || self.is_marked(queue, next.offset)
                        || next.message.deliver_at > now
                    {
                        break;
                    }
                    let Ok(permit) = self.runner.in_flight.clone().try_acquire_owned() else {
                        break;
                    };
                    run.push((next.clone(), 1, permit));
                }
            }
            let gate: Option<Gate> = (run.len() > 1).then(Gate::default);
            let mut answers = Vec::with_capacity(run.len());
            for (m, attempt, _) in &run {
                match self.dispatch_gated(m.clone(), *attempt, gate.clone()).await {
                    Some(rx) => answers.push(rx),
                    None => break,
                }
            }
            if answers.is_empty() {
                break;
            }
            // Once handed out, the calls are waited for, even when stopping. The first one
            // not done (retried, dropped unstarted, run again) halts the run: what follows it
            // was dropped unstarted and stays ahead of the cursor, its attempts unchanged.
            let mut halted = false;
            let mut stop = false;
            for ((m, attempt, permit), rx) in run.into_iter().zip(answers) {
                let answer = rx.await;
                if halted {
                    match answer {
                        // Dropped unstarted: the worker calls a run's items in order and drops
                        // the rest once one is not acked.
                        Err(_) => {
                            self.runner
                                .counters
                                .delivered
                                .fetch_sub(1, Ordering::Relaxed);
                        }
                        // Called after one that runs again (a kv key it read changed before
                        // its effects were stored): its staged effects are dropped, and it runs
                        // again after that one, as the same attempt.
                        Ok((result, staged, call)) => {
                            staged.discard(self.services.as_ref()).await;
                            self.trace(&m, attempt, &call, &result, "rerun", None);
                        }
                    }
                    continue;
                }
                let Ok((result, staged, call)) = answer else {
                    // Dropped unstarted by a stopping worker: not delivered.
                    self.runner
                        .counters
                        .delivered
                        .fetch_sub(1, Ordering::Relaxed);
                    halted = true;
                    stop = true;
                    worker::close(gate.as_ref());
                    continue;
                };
                match self.commit_effects(&result, staged, &m, None).await {
                    // The head again, as the same attempt; what the run has not called yet is
                    // not called before it.
                    Effects::Rerun => {
                        self.trace(&m, attempt, &call, &result, "rerun", None);
                        halted = true;
                        worker::close(gate.as_ref());
                        continue;
                    }
                    Effects::Stopped => {
                        halted = true;
                        stop = true;
                        worker::close(gate.as_ref());
                        continue;
                    }
                    Effects::Committed | Effects::AlreadyDone | Effects::Discarded => {}
                }
                let fate = judge(&result, attempt, &self.spec.retry, block, now_ms());
                count(&self.runner.counters, &result, &fate);
                let (traced, next) = match &fate {
                    Disposition::Done => ("done", None),
                    Disposition::Retry { due, .. } => ("retry", Some(*due)),
                    Disposition::Dead { .. } => ("dead_lettered", None),
                };
                self.trace(&m, attempt, &call, &result, traced, next);
                // Anything but an ack closed the gate in the worker; what followed is dropped.
                halted = !matches!(result, Ok(Outcome::Ack));
                match fate {
                    Disposition::Done => {
                        cursor = Cursor {
                            committed: cursor.committed.saturating_add(1),
                            ..Cursor::default()
                        };
                    }
                    Disposition::Retry {
                        due,
                        attempts,
                        error,
                    } => {
                        tracing::debug!(group = %self.group, queue, attempts, %error, "ordered retry");
                        cursor.head_attempts = attempts;
                        cursor.head_due = due;
                    }
                    Disposition::Dead { attempts, reason } => {
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
            if stop {
                break;
            }
        }
    }

    /// Sleeps until `due` (ms since the epoch); false if the runner stopped first.
    pub(super) async fn sleep_until(&self, due: u64) -> bool {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => false,
            () = sleep_until_ms(due) => true,
        }
    }

    /// Ordered delivery of a due timer of the queue (a delayed message, a redrive, or the retry
    /// of one of them), in the queue's turn. False if the runner stopped before the call began
    /// (the timer is kept).
    pub(super) async fn deliver_in_order(&self, timer: Timer, block: bool) -> bool {
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
        let Ok(handled) = rx.await else {
            return false;
        };
        // A delivery run again is tried in the queue's next turn, as the same attempt.
        let done = self.finish_timer(timer, handled, attempt, &m, block).await;
        drop(permit);
        done
    }
}
