//! Dispatch: subscriptions (consumer groups) and their delivery to plugin instances, with
//! RocketMQ's semantics: clustering and broadcast, ordered queues, retries with backoff, a
//! dead-letter queue per group, delayed messages, rate and in-flight limits.

pub mod runner;
pub mod spec;
pub mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde_json::{Value, json};

use crate::broker::{Broker, BrokerError, now_ms};
use crate::plugins::{PluginError, Plugins};
use crate::storage::{Expect, Storage, StorageError};
use runner::Runner;
pub use spec::{Mode, Start, SubscriptionSpec};
use state::{DeadLetter, SubState, SubscriptionRecord, Timer, TimerKind};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("subscription name: {0}")]
    BadName(String),
    #[error("subscription {0:?} does not exist")]
    Unknown(String),
    #[error("invalid subscription: {0}")]
    Invalid(String),
    #[error("a subscription cannot move to another topic ({0:?}); create a new group")]
    TopicChange(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The services a runner needs.
#[derive(Clone)]
pub struct Env {
    pub broker: Arc<Broker>,
    pub plugins: Arc<Plugins>,
}

pub struct Dispatcher {
    env: Env,
    runners: tokio::sync::Mutex<HashMap<String, Runner>>,
    /// Serialises control operations (create, update, pause, reset) across groups.
    control: tokio::sync::Mutex<()>,
    /// Whether this node dispatches. On a shared backend only the holder of the dispatch lease
    /// does; the others store subscription changes, which the holder picks up ([`Self::reconcile`]).
    active: std::sync::atomic::AtomicBool,
}

fn storage(env: &Env) -> &Arc<dyn Storage> {
    env.broker.storage()
}

pub fn validate_group(group: &str) -> Result<(), DispatchError> {
    crate::broker::validate_topic_name(group).map_err(|_| {
        DispatchError::BadName(format!(
            "{group:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with '.'"
        ))
    })
}

/// Where to move a subscription's offsets (`POST …/reset`).
#[derive(Debug, Clone, Copy)]
pub struct ResetTo(pub Start);

impl Dispatcher {
    pub fn new(broker: Arc<Broker>, plugins: Arc<Plugins>) -> Self {
        Self {
            env: Env { broker, plugins },
            runners: Default::default(),
            control: Default::default(),
            active: std::sync::atomic::AtomicBool::new(true),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Starts dispatching (this node took the dispatch lease): every running subscription.
    pub async fn activate(&self) -> Result<(), DispatchError> {
        self.active.store(true, Ordering::Release);
        self.reconcile().await
    }

    /// Stops dispatching (the lease is gone or going): runners stop, in-flight messages finish
    /// and their offsets are stored.
    pub async fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        self.shutdown().await;
    }

    /// Makes the runners match the stored subscriptions, as changed by this or another node:
    /// starts running ones, stops paused and deleted ones, restarts those whose record, plugin
    /// version (when following the latest) or queue count changed.
    pub async fn reconcile(&self) -> Result<(), DispatchError> {
        if !self.is_active() {
            return Ok(());
        }
        let _g = self.control.lock().await;
        let mut wanted = HashMap::new();
        for (group, r) in storage(&self.env)
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            let record: SubscriptionRecord = state::decode(&group, &r)?;
            if record.state == SubState::Running {
                wanted.insert(group, record);
            }
        }
        let running: Vec<String> = self.runners.lock().await.keys().cloned().collect();
        for group in running {
            let stale = match wanted.get(&group) {
                None => true,
                Some(record) => self.is_stale(&group, record).await,
            };
            if stale {
                self.halt(&group).await;
            }
        }
        for (group, record) in wanted {
            if self.runners.lock().await.contains_key(&group) {
                continue;
            }
            if let Err(e) = self.launch(&record).await {
                tracing::error!(%group, error = %e, "cannot start subscription");
            }
        }
        Ok(())
    }

    /// Whether the runner of `group` no longer matches what is stored.
    async fn is_stale(&self, group: &str, record: &SubscriptionRecord) -> bool {
        let (updated_at, version, queues) = {
            let runners = self.runners.lock().await;
            let Some(r) = runners.get(group) else {
                return false;
            };
            let queues = r.shared.members.first().map_or(0, |m| m.committed.len());
            (r.record_updated_at, r.shared.plugin_version, queues)
        };
        if updated_at != record.updated_at {
            return true;
        }
        if record.spec.plugin_version.is_none()
            && let Ok(p) = self.env.plugins.get(&record.spec.plugin).await
            && p.latest().is_some_and(|v| v.version != version)
        {
            return true;
        }
        self.env
            .broker
            .topic(&record.spec.topic)
            .is_ok_and(|t| t.queues as usize != queues)
    }

    async fn launch(&self, record: &SubscriptionRecord) -> Result<(), DispatchError> {
        if !self.is_active() {
            return Ok(());
        }
        let runner = runner::start(&self.env, record).await?;
        self.runners
            .lock()
            .await
            .insert(record.group.clone(), runner);
        Ok(())
    }

    async fn halt(&self, group: &str) {
        let runner = self.runners.lock().await.remove(group);
        if let Some(r) = runner {
            r.stop().await;
        }
    }

    async fn record(&self, group: &str) -> Result<SubscriptionRecord, DispatchError> {
        validate_group(group)?;
        match storage(&self.env)
            .get_record(state::SUB_SPACE, group)
            .await?
        {
            Some(r) => Ok(state::decode(group, &r)?),
            None => Err(DispatchError::Unknown(group.to_string())),
        }
    }

    async fn save(&self, record: &SubscriptionRecord) -> Result<(), DispatchError> {
        state::put(
            storage(&self.env).as_ref(),
            state::SUB_SPACE,
            &record.group,
            record,
        )
        .await?;
        Ok(())
    }

    /// Creates or updates a subscription. An update drains in-flight messages, then restarts
    /// from the stored offsets: nothing is lost or delivered twice beyond what was in flight.
    pub async fn put(
        &self,
        group: &str,
        spec: SubscriptionSpec,
    ) -> Result<(Value, bool), DispatchError> {
        validate_group(group)?;
        spec.validate().map_err(DispatchError::Invalid)?;
        self.env.broker.topic_loaded(&spec.topic).await?;
        let (_, code) = self
            .env
            .plugins
            .code(&spec.plugin, spec.plugin_version)
            .await?;
        if !code.has_consumer() {
            return Err(DispatchError::Invalid(format!(
                "plugin {:?} does not export a consumer",
                spec.plugin
            )));
        }
        let _g = self.control.lock().await;
        let existing = match self.record(group).await {
            Ok(r) => Some(r),
            Err(DispatchError::Unknown(_)) => None,
            Err(e) => return Err(e),
        };
        if let Some(old) = &existing
            && old.spec.topic != spec.topic
        {
            return Err(DispatchError::TopicChange(old.spec.topic.clone()));
        }
        let now = now_ms();
        let record = SubscriptionRecord {
            group: group.to_string(),
            state: existing.as_ref().map_or(SubState::Running, |r| r.state),
            created_at: existing.as_ref().map_or(now, |r| r.created_at),
            updated_at: now,
            spec,
        };
        self.halt(group).await;
        self.save(&record).await?;
        if record.state == SubState::Running {
            self.launch(&record).await?;
        }
        drop(_g);
        Ok((self.status(group).await?, existing.is_none()))
    }

    pub async fn list(&self) -> Result<Vec<Value>, DispatchError> {
        let mut out = Vec::new();
        for (group, _) in storage(&self.env)
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            out.push(self.status(&group).await?);
        }
        Ok(out)
    }

    /// The spec, state, offsets and lag per queue (and per instance for broadcast), counters.
    pub async fn status(&self, group: &str) -> Result<Value, DispatchError> {
        let record = self.record(group).await?;
        let topic = self.env.broker.topic(&record.spec.topic)?;
        let high_water = self.env.broker.high_water(&topic).await?;
        let runners = self.runners.lock().await;
        let runner = runners.get(group);
        let broadcast = record.spec.mode == Mode::Broadcast;
        let members = if broadcast { record.spec.instances } else { 1 };
        let mut member_views = Vec::new();
        let mut total_lag = 0u64;
        let mut timers = 0usize;
        for i in 0..members {
            let name = state::member_name(broadcast, i);
            let live = runner.and_then(|r| r.shared.members.iter().find(|m| m.name == name));
            let stored: HashMap<String, state::Cursor> = storage(&self.env)
                .list_records(&state::cursor_space(group), &format!("{name}/"), usize::MAX)
                .await?
                .iter()
                .map(|(k, r)| Ok((k.clone(), state::decode(k, r)?)))
                .collect::<Result<_, StorageError>>()?;
            let mut queues = Vec::new();
            let mut lag = 0u64;
            for (q, hw) in high_water.iter().enumerate() {
                let (committed, head_attempts) = match live {
                    Some(m) if q < m.committed.len() => (
                        m.committed[q].load(Ordering::Relaxed),
                        m.head_attempts[q].load(Ordering::Relaxed),
                    ),
                    _ => stored
                        .get(&state::cursor_key(&name, q as u32))
                        .map_or((0, 0), |c| (c.committed, c.head_attempts)),
                };
                let l = hw.saturating_sub(committed);
                lag += l;
                let mut v = json!({"queue": q, "committed": committed, "high_water": hw, "lag": l});
                if head_attempts > 0 {
                    v["blocked_attempts"] = json!(head_attempts);
                }
                queues.push(v);
            }
            total_lag += lag;
            let pending = match live {
                Some(m) => m.pending_timers(),
                None => storage(&self.env)
                    .list_records(&state::timer_space(group), &format!("{name}/"), usize::MAX)
                    .await?
                    .len(),
            };
            timers += pending;
            member_views.push(
                json!({"instance": i, "lag": lag, "pending_timers": pending, "queues": queues}),
            );
        }
        let dlq = storage(&self.env)
            .list_records(&state::dlq_space(group), "", usize::MAX)
            .await?
            .len();
        let mut v = json!({
            "group": group,
            "state": record.state,
            "spec": record.spec,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
            "lag": total_lag,
            "pending_timers": timers,
            "dlq": dlq,
        });
        if broadcast {
            v["instances"] = Value::Array(member_views);
        } else if let Some(m) = member_views.pop() {
            v["queues"] = m["queues"].clone();
        }
        if let Some(r) = runner {
            let c = &r.shared.counters;
            v["plugin_version"] = json!(r.shared.plugin_version);
            v["in_flight"] = json!(r.shared.in_flight());
            v["counters"] = json!({
                "delivered": c.delivered.load(Ordering::Relaxed),
                "acked": c.acked.load(Ordering::Relaxed),
                "retried": c.retried.load(Ordering::Relaxed),
                "dead_lettered": c.dead_lettered.load(Ordering::Relaxed),
                "failed": c.failed.load(Ordering::Relaxed),
            });
        }
        Ok(v)
    }

    async fn set_state(&self, group: &str, state: SubState) -> Result<Value, DispatchError> {
        let _g = self.control.lock().await;
        let mut record = self.record(group).await?;
        self.halt(group).await;
        record.state = state;
        record.updated_at = now_ms();
        self.save(&record).await?;
        if state == SubState::Running {
            self.launch(&record).await?;
        }
        drop(_g);
        self.status(group).await
    }

    pub async fn pause(&self, group: &str) -> Result<Value, DispatchError> {
        self.set_state(group, SubState::Paused).await
    }

    pub async fn resume(&self, group: &str) -> Result<Value, DispatchError> {
        self.set_state(group, SubState::Running).await
    }

    /// Moves every offset of the group to `to` (replay, or skip ahead); pending delays and
    /// retries are dropped, dead letters kept.
    pub async fn reset(&self, group: &str, to: Start) -> Result<Value, DispatchError> {
        let _g = self.control.lock().await;
        let record = self.record(group).await?;
        self.halt(group).await;
        let store = storage(&self.env);
        let topic = self.env.broker.topic(&record.spec.topic)?;
        state::clear(store.as_ref(), &state::timer_space(group), "").await?;
        let broadcast = record.spec.mode == Mode::Broadcast;
        let members = if broadcast { record.spec.instances } else { 1 };
        for i in 0..members {
            let name = state::member_name(broadcast, i);
            for q in 0..topic.queues {
                let committed = runner::start_offset(store.as_ref(), &topic.name, q, to).await?;
                let c = state::Cursor {
                    committed,
                    head_attempts: 0,
                };
                state::put(
                    store.as_ref(),
                    &state::cursor_space(group),
                    &state::cursor_key(&name, q),
                    &c,
                )
                .await?;
            }
        }
        if record.state == SubState::Running {
            self.launch(&record).await?;
        }
        drop(_g);
        self.status(group).await
    }

    /// Deletes a subscription with its offsets, timers and dead letters.
    pub async fn delete(&self, group: &str) -> Result<(), DispatchError> {
        let _g = self.control.lock().await;
        self.record(group).await?;
        self.halt(group).await;
        let store = storage(&self.env);
        for space in [
            state::cursor_space(group),
            state::timer_space(group),
            state::dlq_space(group),
        ] {
            state::clear(store.as_ref(), &space, "").await?;
        }
        store
            .put_record(state::SUB_SPACE, group, None, Expect::Any)
            .await?;
        Ok(())
    }

    /// Dead letters, oldest first, after the key `after` (for paging).
    pub async fn dlq(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DispatchError> {
        self.record(group).await?;
        let all = storage(&self.env)
            .list_records(&state::dlq_space(group), "", usize::MAX)
            .await?;
        all.iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take(limit)
            .map(|(k, r)| Ok(state::decode(k, r)?))
            .collect()
    }

    /// Delivers dead letters again (all, or those with these message ids) as fresh attempts.
    pub async fn redrive(
        &self,
        group: &str,
        ids: Option<&[String]>,
    ) -> Result<usize, DispatchError> {
        let _g = self.control.lock().await;
        let record = self.record(group).await?;
        let store = storage(&self.env);
        let space = state::dlq_space(group);
        // Timers of a running member are also held in memory: stop, write, start again.
        self.halt(group).await;
        let mut n = 0;
        for (k, r) in store.list_records(&space, "", usize::MAX).await? {
            let dl: DeadLetter = state::decode(&k, &r)?;
            if ids.is_some_and(|ids| !ids.contains(&dl.message_id)) {
                continue;
            }
            let t = Timer {
                member: dl.member.clone(),
                due: now_ms(),
                queue: dl.queue,
                offset: dl.offset,
                attempts: 0,
                kind: TimerKind::Redrive,
                last_error: None,
            };
            state::put(store.as_ref(), &state::timer_space(group), &t.key(), &t).await?;
            state::delete(store.as_ref(), &space, &k).await?;
            n += 1;
        }
        if record.state == SubState::Running {
            self.launch(&record).await?;
        }
        Ok(n)
    }

    /// The subscription using a plugin, if any (a used plugin cannot be deleted).
    pub async fn plugin_user(&self, plugin: &str) -> Result<Option<String>, DispatchError> {
        for (group, r) in storage(&self.env)
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            let record: SubscriptionRecord = state::decode(&group, &r)?;
            if record.spec.plugin == plugin {
                return Ok(Some(group));
            }
        }
        Ok(None)
    }

    /// Restarts running subscriptions that follow `plugin`'s latest version (after an upload)
    /// or read `topic` (after queues were added), so they pick the change up.
    pub async fn refresh(
        &self,
        plugin: Option<&str>,
        topic: Option<&str>,
    ) -> Result<(), DispatchError> {
        let _g = self.control.lock().await;
        let groups: Vec<String> = self.runners.lock().await.keys().cloned().collect();
        for group in groups {
            let record = self.record(&group).await?;
            let follows = plugin
                .is_some_and(|p| record.spec.plugin == p && record.spec.plugin_version.is_none());
            let reads = topic.is_some_and(|t| record.spec.topic == t);
            if follows || reads {
                self.halt(&group).await;
                if let Err(e) = self.launch(&record).await {
                    tracing::error!(%group, error = %e, "cannot restart subscription");
                }
            }
        }
        Ok(())
    }

    /// How far the slowest running subscription of `topic` is behind, in messages.
    pub async fn backlog(&self, topic: &str, high_water: &[u64]) -> u64 {
        let runners = self.runners.lock().await;
        runners
            .values()
            .filter(|r| r.topic == topic)
            .flat_map(|r| r.shared.members.iter())
            .map(|m| {
                m.committed
                    .iter()
                    .zip(high_water)
                    .map(|(c, hw)| hw.saturating_sub(c.load(Ordering::Relaxed)))
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0)
    }

    /// Stops every subscription, letting in-flight messages finish.
    pub async fn shutdown(&self) {
        let _g = self.control.lock().await;
        let runners: Vec<Runner> = self.runners.lock().await.drain().map(|(_, r)| r).collect();
        futures::future::join_all(runners.into_iter().map(Runner::stop)).await;
    }
}

/// A dead letter as the API shows it.
#[derive(Serialize)]
pub struct DeadLetterView {
    pub key: String,
    #[serde(flatten)]
    pub entry: DeadLetter,
}
