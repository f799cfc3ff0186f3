//! Retention enforcement: each pass deletes, per queue and as one range, what a topic's
//! [`Retention`](crate::broker::Retention) lets go; `after_consumed` asks what every
//! subscription of the topic still needs.

use std::collections::{HashMap, HashSet};

use super::state::{self, Cursor, DeadLetter};
use super::{DispatchError, Dispatcher, Mode, dlq, pins};
use crate::broker::TopicMeta;
use crate::metrics::TopicLabel;

/// What one pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPass {
    pub messages: u64,
    /// Queues whose low water moved.
    pub queues: u64,
    /// Idempotency keys whose window passed.
    pub idempotency_keys: u64,
    /// Dead letters past their age.
    pub dead_letters: u64,
}

impl Dispatcher {
    /// One pass over every topic at `now_ms`: for each queue, the first offset its age and size
    /// limits keep (the storage finds it) or, with `after_consumed`, what no subscription needs
    /// any more, whichever is later; everything below goes with one truncation. Errors of one
    /// topic are logged and the pass goes on with the next.
    pub async fn enforce_retention(&self, now_ms: u64) -> RetentionPass {
        let mut pass = RetentionPass::default();
        let topics = self.env.broker.topics();
        if !topics.is_empty() {
            // Index entries live as long as the longest-lived topic's messages may.
            let longest = topics
                .iter()
                .map(|t| t.retention.max_age_ms)
                .try_fold(0u64, |longest, age| Some(longest.max(age?)));
            if let Err(e) = self.env.storage.limit_index_age(longest).await {
                tracing::warn!(error = %e, "setting the index age failed; next pass tries again");
            }
        }
        for topic in topics {
            if let Err(e) = self.enforce_topic(&topic, now_ms, &mut pass).await {
                tracing::warn!(topic = %topic.name, error = %e, "retention pass failed; next pass tries again");
            }
            match self
                .env
                .broker
                .expire_idempotency_keys(&topic.name, now_ms)
                .await
            {
                Ok(n) => pass.idempotency_keys += n,
                Err(e) => {
                    tracing::warn!(topic = %topic.name, error = %e, "expiring idempotency keys failed; next pass tries again");
                }
            }
        }
        self.env.broker.forget_deleted_topics();
        match self.expire_dead_letters(now_ms).await {
            Ok(n) => pass.dead_letters += n,
            Err(e) => {
                tracing::warn!(error = %e, "expiring dead letters failed; next pass tries again");
            }
        }
        if self.trace_max_age_ms > 0
            && let Err(e) = self.expire_trace(now_ms, self.trace_max_age_ms).await
        {
            tracing::warn!(error = %e, "expiring message trace records failed; next pass tries again");
        }
        self.env.broker.metrics().retention_passes.inc();
        pass
    }

    /// Deletes every subscription's dead letters that died `dead_letters_max_age_ms` or longer
    /// before `now` (ms since the epoch), then the oldest beyond `dead_letters_max_count`:
    /// their keys sort by time of death, so a pass reads what it deletes and one more, and the
    /// count is one record ([`dlq::count`]). Returns how many went.
    pub async fn expire_dead_letters(&self, now: u64) -> Result<u64, DispatchError> {
        let storage = self.env.storage.as_ref();
        let due = &self.env.dead_letters_due;
        let mut n = 0;
        let groups = self.subscriptions().await?;
        for (group, _) in &groups {
            // Not read again until its oldest dead letter ages out or one is added.
            let Some(visit) = due.visit(group, now) else {
                continue;
            };
            let space = state::dlq_space(group);
            loop {
                let mut excess = dlq::count(storage, group)
                    .await?
                    .saturating_sub(self.dead_letters_max_count);
                let page = storage.list_records(&space, "", dlq::PAGE).await?;
                let mut expired = Vec::new();
                for (key, r) in &page {
                    let old = DeadLetter::died_at(key)
                        .and_then(|at| at.checked_add(self.dead_letters_max_age_ms))
                        .is_some_and(|until| until <= now);
                    if !old && excess == 0 {
                        break;
                    }
                    excess = excess.saturating_sub(1);
                    expired.push((state::decode::<DeadLetter>(key, r)?, None));
                }
                if expired.is_empty() {
                    // Within the count limit; the oldest left goes when its age passes (one
                    // whose key names no time is looked at every pass, as before).
                    let next = page.first().map(|(key, _)| {
                        DeadLetter::died_at(key)
                            .map_or(now, |at| at.saturating_add(self.dead_letters_max_age_ms))
                    });
                    due.learned(group, visit, next, now);
                    break;
                }
                let change = dlq::Change {
                    add: Vec::new(),
                    remove: expired,
                };
                n += dlq::apply(storage, group, change).await?;
            }
        }
        let names: HashSet<&str> = groups.iter().map(|(g, _)| g.as_str()).collect();
        due.retain(|g| names.contains(g));
        Ok(n)
    }

    /// Runs a retention pass every `every` until `stop`.
    pub async fn run_retention(
        self: std::sync::Arc<Self>,
        every: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            self.enforce_retention(crate::base::now_ms()).await;
        }
    }

    async fn enforce_topic(
        &self,
        topic: &TopicMeta,
        now_ms: u64,
        pass: &mut RetentionPass,
    ) -> Result<(), DispatchError> {
        let storage = &self.env.storage;
        let needed = if topic.retention.after_consumed {
            self.still_needed(topic).await?
        } else {
            None
        };
        let limits = topic.retention.limits();
        for q in 0..topic.queues {
            let low = storage.low_water(&topic.name, q).await?;
            let mut cut = storage
                .retention_cut(&topic.name, q, limits, now_ms)
                .await?;
            if let Some(needed) = &needed {
                cut = cut.max(needed.get(q as usize).copied().unwrap_or(0));
            }
            if cut <= low {
                continue;
            }
            let new_low = storage.truncate(&topic.name, q, cut).await?;
            let deleted = new_low.saturating_sub(low);
            if deleted > 0 {
                pass.messages += deleted;
                pass.queues += 1;
                self.env
                    .broker
                    .metrics()
                    .retention_deleted
                    .get_or_create(&TopicLabel {
                        topic: topic.name.clone(),
                    })
                    .inc_by(deleted);
                tracing::debug!(topic = %topic.name, queue = q, from = low, to = new_low, "retention deleted a range");
            }
        }
        Ok(())
    }

    /// Per queue, the first offset some subscription of `topic` still needs: the lowest of its
    /// members' committed offsets and of the offsets its timers (retries, delays, redrives) and
    /// dead letters hold, read from their pins ([`pins::lowest`]: one short listing per queue,
    /// however many are pending). `None` when the topic has no subscription (nothing is deleted
    /// for being consumed then).
    ///
    /// Read from storage, so it holds for queues other nodes run. Cursors are read first: a
    /// committed offset moves only after the message's timer or dead letter (and its pin) is
    /// stored, so one read earlier than the pins can only be lower. A timer turns into a dead
    /// letter, or back, in steps that store the new pin no later than they delete the old.
    async fn still_needed(&self, topic: &TopicMeta) -> Result<Option<Vec<u64>>, DispatchError> {
        let storage = &self.env.storage;
        let queues = topic.queues as usize;
        let mut needed: Option<Vec<u64>> = None;
        for (group, r) in storage
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            let record: state::SubscriptionRecord = state::decode(&group, &r)?;
            if record.spec.topic != topic.name {
                continue;
            }
            let needed = needed.get_or_insert_with(|| vec![u64::MAX; queues]);
            let broadcast = record.spec.mode == Mode::Broadcast;
            let members = if broadcast { record.spec.instances } else { 1 };
            let cursors: HashMap<String, Cursor> = storage
                .list_records(&state::cursor_space(&group), "", usize::MAX)
                .await?
                .iter()
                .map(|(k, r)| Ok((k.clone(), state::decode(k, r)?)))
                .collect::<Result<_, DispatchError>>()?;
            for i in 0..members {
                let member = state::member_name(broadcast, i);
                for (q, n) in needed.iter_mut().enumerate() {
                    // A member that has not stored where it starts needs everything.
                    let committed = cursors
                        .get(&state::cursor_key(&member, q as u32))
                        .map_or(0, |c| c.committed);
                    *n = (*n).min(committed);
                }
            }
            pins::build(storage.as_ref(), &group).await?;
            for (q, n) in needed.iter_mut().enumerate() {
                if let Some(pinned) = pins::lowest(storage.as_ref(), &group, q as u32).await? {
                    *n = (*n).min(pinned);
                }
            }
        }
        Ok(needed)
    }
}
