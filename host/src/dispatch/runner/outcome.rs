//! A delivery's outcome: the fate the retry policy gives it (a pure function of result,
//! attempts, policy and time), the counters, and settling it durably (retry timer or dead letter).

use super::*;

/// What happens to a message after a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Disposition {
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
pub(super) fn judge(
    result: &Result<Outcome, InvokeError>,
    attempts: u32,
    policy: &RetryPolicy,
    block: bool,
    now: u64,
) -> Disposition {
    let (asked, error) = match result {
        Ok(Outcome::Ack) => return Disposition::Done,
        Ok(Outcome::Reject(reason)) => {
            return Disposition::Dead {
                attempts,
                reason: format!("rejected: {reason}"),
            };
        }
        Ok(Outcome::Retry(ms)) => (*ms, "the plugin asked for a retry".to_string()),
        Err(e) => (0, e.to_string()),
    };
    if attempts >= policy.max_attempts && !block {
        return Disposition::Dead {
            attempts,
            reason: format!("{attempts} attempts failed; last: {error}"),
        };
    }
    let delay = policy.backoff(attempts.min(policy.max_attempts), asked);
    Disposition::Retry {
        due: now.saturating_add(delay),
        attempts,
        error,
    }
}

/// Counts a delivery's result and fate (dead letters are counted once stored).
pub(super) fn count(
    counters: &Counters,
    result: &Result<Outcome, InvokeError>,
    fate: &Disposition,
) {
    if result.is_err() {
        counters.failed.fetch_add(1, Ordering::Relaxed);
    }
    match fate {
        Disposition::Done => counters.acked.fetch_add(1, Ordering::Relaxed),
        Disposition::Retry { .. } => counters.retried.fetch_add(1, Ordering::Relaxed),
        Disposition::Dead { .. } => 0,
    };
}

pub(super) fn outcome_index(result: &Result<Outcome, InvokeError>) -> usize {
    match result {
        Ok(Outcome::Ack) => 0,
        Ok(Outcome::Retry(_)) => 1,
        Ok(Outcome::Reject(_)) => 2,
        Err(InvokeError::Timeout(_) | InvokeError::WallClock(_)) => 3,
        Err(InvokeError::MemoryLimit(_)) => 4,
        Err(InvokeError::Trap(_)) => 5,
        Err(InvokeError::MissingExport(_) | InvokeError::Instantiate(_)) => 6,
    }
}

/// What became of a call's staged kv writes and publishes (issue 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effects {
    /// It staged nothing, or did not ack and they were discarded: settle as usual.
    Discarded,
    /// Stored with the delivery's completion: the delivery is done; settle it as acked.
    Committed,
    /// Found completed already (by another delivery of the same message: a fresh one and
    /// its retry timer both ran after a crash): nothing stored; done, settle it as acked.
    AlreadyDone,
    /// A kv key it read changed meanwhile: nothing was stored; run the delivery again, as the
    /// same attempt.
    Rerun,
    /// The runner is stopping and storage is closed: the delivery is not done.
    Stopped,
}

impl Member {
    /// The record write that completes a first delivery of `offset`: its marker, which must
    /// not exist yet.
    pub(super) fn marker(&self, queue: u32, offset: u64) -> RecordWrite {
        RecordWrite {
            space: state::done_space(&self.group),
            key: state::done_key(&self.shared.name, queue, offset),
            value: Some(Vec::new()),
            expect: Expect::Absent,
        }
    }

    /// Stores an acked call's staged effects in one atomic step with the delivery's
    /// completion: the marker of its message (`m` at its queue and offset) and, for a
    /// delivery by `timer`, deleting that timer, which must still exist. Every delivery of a
    /// message writes the same marker, so only one completes: after a crash between storing a
    /// retry timer and the offset, the message is delivered both fresh and by the timer. A
    /// call that did not ack has its effects discarded. Storage errors are retried (the
    /// delivery is not done until its effects are stored).
    pub(super) async fn commit_effects(
        &self,
        result: &Result<Outcome, InvokeError>,
        staged: Staged,
        m: &StoredMessage,
        timer: Option<&Timer>,
    ) -> Effects {
        if staged.is_empty() {
            return Effects::Discarded;
        }
        if !matches!(result, Ok(Outcome::Ack)) {
            staged.discard(self.services.as_ref()).await;
            return Effects::Discarded;
        }
        let (queue, offset) = (m.message.queue, m.offset);
        let mut completion = vec![self.marker(queue, offset)];
        if let Some(t) = timer {
            completion.push(RecordWrite {
                space: state::timer_space(&self.group),
                key: t.key(),
                value: None,
                expect: Expect::Present,
            });
            completion.push(pins::of_timer(&self.group, t, false));
        }
        loop {
            let commit = staged.to_commit(completion.clone());
            let e = match self.services.commit(commit).await {
                Ok(_) => {
                    // Deleted by the queue's offset writer once the stored offset passes it.
                    self.note_marker(queue, offset);
                    return Effects::Committed;
                }
                Err(e) => Staged::classify(&completion, e),
            };
            match e {
                CommitError::AlreadyDone => {
                    // Done by an earlier try whose answer was lost (a storage server died
                    // after the commit point), or by a run before a restart. On a backend
                    // that finishes a commit after its commit point (JetStream), what that
                    // commit left (its appends, its other writes) is finished now, while its
                    // marker still names it: the marker goes once the offset passes it, and
                    // recovery then takes an intent without its guard for one never committed.
                    let marker = &completion[0];
                    if let Err(e) = self
                        .storage
                        .finish_commits_of(&marker.space, &marker.key)
                        .await
                    {
                        tracing::error!(group = %self.group, error = %e, "cannot finish a delivery's earlier commit; retrying");
                        tokio::time::sleep(STORAGE_RETRY).await;
                        continue;
                    }
                    staged.discard(self.services.as_ref()).await;
                    // Its marker is stored: deleted like one of this runner's.
                    self.note_marker(queue, offset);
                    return Effects::AlreadyDone;
                }
                CommitError::Conflict { space, key } => {
                    tracing::debug!(group = %self.group, %space, %key, "kv changed during the call; delivering again");
                    self.runner.counters.reruns.fetch_add(1, Ordering::Relaxed);
                    staged.discard(self.services.as_ref()).await;
                    return Effects::Rerun;
                }
                CommitError::Storage(StorageError::Closed) => {
                    staged.discard(self.services.as_ref()).await;
                    return Effects::Stopped;
                }
                CommitError::Storage(e) => {
                    tracing::error!(group = %self.group, error = %e, "cannot store a delivery's effects; retrying");
                    tokio::time::sleep(STORAGE_RETRY).await;
                    if self.cancel.is_cancelled() && self.shared_storage {
                        // Fenced: another node owns the queue now and delivers it.
                        staged.discard(self.services.as_ref()).await;
                        return Effects::Stopped;
                    }
                }
            }
        }
    }

    pub(super) fn topic(&self) -> &str {
        &self.spec.topic
    }

    /// Retries a durable write until it succeeds: an offset must not pass a message whose
    /// timer or dead letter is not stored.
    pub(super) async fn persist<F, Fut>(&self, what: &str, mut write: F)
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

    pub(super) async fn dead_letter(&self, m: &StoredMessage, attempts: u32, reason: String) {
        let dl = DeadLetter {
            message_id: m.message.id.to_string(),
            member: self.shared.name.clone(),
            queue: m.message.queue,
            offset: m.offset,
            attempts,
            reason,
            dead_at: now_ms(),
        };
        tracing::info!(group = %self.group, message = %dl.message_id, reason = %dl.reason, "dead-lettered");
        self.persist("a dead letter", || async {
            let change = crate::dispatch::dlq::Change {
                add: vec![dl.clone()],
                remove: Vec::new(),
            };
            crate::dispatch::dlq::apply(self.storage.as_ref(), &self.group, change)
                .await
                .map(drop)
        })
        .await;
        // The count limit may be passed now: the next retention pass visits.
        self.dead_letters_due.added(&self.group, None);
        // Counted once stored, so whoever sees the count can read the entry.
        self.runner
            .counters
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Queues the trace record of one attempt (see [`crate::dispatch::trace`]).
    pub(super) fn trace(
        &self,
        m: &StoredMessage,
        attempt: u32,
        call: &CallInfo,
        result: &Result<Outcome, InvokeError>,
        fate: &str,
        next_attempt_at: Option<u64>,
    ) {
        let reason = match result {
            Ok(Outcome::Reject(r)) => Some(r.clone()),
            Ok(Outcome::Ack | Outcome::Retry(_)) => None,
            Err(e) => Some(e.to_string()),
        };
        self.trace.record(
            m.message.id,
            crate::dispatch::trace::Attempt {
                topic: m.topic.clone(),
                group: self.group.clone(),
                member: self.shared.name.clone(),
                instance: call.instance,
                node: self.node.clone(),
                attempt,
                started_at: call.started_at,
                duration_ms: call.duration_ms,
                outcome: OUTCOMES[outcome_index(result)].to_string(),
                reason,
                fate: fate.to_string(),
                next_attempt_at,
            },
        );
    }

    /// Stores what becomes of a delivered message besides its offset: a retry timer (whose key
    /// is returned) or a dead letter; an ack needs nothing. The attempt is traced.
    pub(super) async fn settle(
        &self,
        result: &Result<Outcome, InvokeError>,
        attempt: u32,
        m: &StoredMessage,
        block: bool,
        call: &CallInfo,
    ) -> Option<String> {
        let fate = judge(result, attempt, &self.spec.retry, block, now_ms());
        count(&self.runner.counters, result, &fate);
        match &fate {
            Disposition::Done => self.trace(m, attempt, call, result, "done", None),
            Disposition::Retry { due, .. } => {
                self.trace(m, attempt, call, result, "retry", Some(*due))
            }
            Disposition::Dead { .. } => self.trace(m, attempt, call, result, "dead_lettered", None),
        }
        match fate {
            Disposition::Done => None,
            Disposition::Retry {
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
            Disposition::Dead { attempts, reason } => {
                self.dead_letter(m, attempts, reason).await;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                assert_eq!(retry(&ack, a, block, now), Disposition::Done);
                assert_eq!(
                    retry(&reject, a, block, now),
                    Disposition::Dead {
                        attempts: a,
                        reason: "rejected: bad".into()
                    },
                    "reject dead-letters at once, blocking or not"
                );
            }
        }
        // Below max_attempts: the policy's backoff by attempt, the last one repeated.
        let due = |f: Disposition| match f {
            Disposition::Retry { due, .. } => due,
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
            Disposition::Retry { attempts: 2, ref error, .. } if error.contains("boom")
        ));
        // At max_attempts: dead, unless blocking (then the last backoff, forever).
        for r in [&asks, &trap] {
            assert!(matches!(
                retry(r, 3, false, now),
                Disposition::Dead { attempts: 3, ref reason } if reason.starts_with("3 attempts failed")
            ));
            assert_eq!(due(retry(r, 3, true, now)), now + 1000);
            assert_eq!(due(retry(r, 40, true, now)), now + 1000);
        }
        // A delay the plugin asks for is capped; time never wraps around.
        assert_eq!(
            due(retry(&Ok(Outcome::Retry(u64::MAX)), 1, false, now)),
            now + crate::base::MAX_DELAY_MS
        );
        assert_eq!(due(retry(&asks, 1, false, u64::MAX - 5)), u64::MAX);
        // Counting: failed for errors, retried for retries, acked for acks; dead letters later.
        let c = Counters::default();
        count(&c, &trap, &retry(&trap, 1, false, now));
        count(&c, &ack, &Disposition::Done);
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
}
