//! Dispatch: subscriptions (consumer groups) and their delivery to plugin instances, with
//! RocketMQ's semantics: clustering and broadcast, ordered queues, retries with backoff, a
//! dead-letter queue per group, delayed messages, rate and in-flight limits.

pub mod dlq;
pub mod pins;
mod reconcile;
mod retention;
pub mod runner;
pub mod share;
pub mod spec;
pub mod state;
mod status;
mod tally;
pub mod trace;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::base::now_ms;
use crate::broker::{Broker, BrokerError};
use crate::plugins::{PluginError, Plugins};
use crate::storage::{Expect, Storage, StorageError};
pub use retention::RetentionPass;
use runner::Runner;
pub use spec::{Mode, Start, SubscriptionSpec};
use state::{DeadLetter, SubState, SubscriptionRecord, Timer, TimerKind};
pub use status::{
    DeadLetterView, DeliveryCounters, InstanceStatus, QueueStatus, SubscriptionStatus,
};
pub use tally::Tally;

/// How long a reset or delete on shared storage waits for the other nodes to stop their
/// runners of the subscription (see `Dispatcher::quiesce`): several heartbeats and lease
/// lapses, so only a node that keeps its lease without acting on the change makes it fail.
pub const QUIESCE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How often that wait looks at the leases.
const QUIESCE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// How many times a subscription record change is read again and re-applied when other nodes
/// stored the record first, before the call answers 503 (see `Dispatcher::update_record`).
pub const UPDATE_TRIES: usize = 16;

/// The error of a record change that lost [`UPDATE_TRIES`] races in a row (a 503).
fn changing_under_us(group: &str) -> DispatchError {
    StorageError::Unavailable(format!(
        "subscription {group:?} was changed by others {UPDATE_TRIES} times while this change was made; try again"
    ))
    .into()
}

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
    #[error(
        "topic {topic:?} has subscriptions ({}); delete them first, or delete the topic with ?force=true to delete them with it",
        groups.join(", ")
    )]
    TopicInUse { topic: String, groups: Vec<String> },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What dispatch works with: the broker (topics, publish), the plugin catalogue, and the storage
/// that keeps subscriptions, cursors, timers and dead letters (passed, not reached through the
/// broker).
#[derive(Clone)]
pub struct Handles {
    pub broker: Arc<Broker>,
    pub plugins: Arc<Plugins>,
    /// Where subscriptions, cursors, timers and dead letters are kept (the broker's storage).
    pub storage: Arc<dyn Storage>,
    /// Where delivery attempts are traced.
    pub trace: Arc<trace::TraceWriter>,
    /// Per subscription, when the retention pass next has dead letters to expire.
    pub dead_letters_due: Arc<crate::base::NextDue>,
}

pub struct Dispatcher {
    env: Handles,
    runners: tokio::sync::Mutex<HashMap<String, Runner>>,
    /// Control changes (create, update, pause, resume, reset, redrive, delete, refresh) take it
    /// shared, each with its group's lock, so changes of different subscriptions never wait on
    /// each other's plugin calls; a reconcile pass, a change on shared storage (which places
    /// every subscription's work in one pass) and shutdown take it alone.
    control: tokio::sync::RwLock<()>,
    /// One lock per subscription with a change in progress (dropped when no one holds it).
    group_locks: GroupLocks,
    /// False once shut down: nothing starts again.
    active: std::sync::atomic::AtomicBool,
    /// Set when several nodes share the storage: this node runs only the units it holds
    /// leases for. `None`: it runs everything.
    share: Option<share::Share>,
    /// Shared storage with a backlog bound: the stored offsets of every running subscription's
    /// members, per topic, read at each reconcile, for the backlog of queues other nodes run.
    stored_offsets: std::sync::Mutex<HashMap<String, Vec<Vec<u64>>>>,
    /// Shared storage: the other nodes' last tallies, by node, with when they arrived.
    peer_tallies: std::sync::Mutex<HashMap<String, PeerTallies>>,
    /// Dead letters are deleted this long after they died (ms; `[retention]
    /// dead_letters_max_age_ms`).
    dead_letters_max_age_ms: u64,
    /// At most this many dead letters are kept per subscription, the oldest deleted first
    /// (`[retention] dead_letters_max_count`).
    dead_letters_max_count: u64,
    /// How long trace records are kept (`[retention] trace_max_age_ms`; 0: none are made).
    trace_max_age_ms: u64,
}

type GroupLocks = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// What a control change holds while it runs: see [`Dispatcher::lock_group`].
enum ControlGuard<'a> {
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
    Group {
        _shared: tokio::sync::RwLockReadGuard<'a, ()>,
        _group: GroupGuard<'a>,
    },
}

/// One subscription's lock, held; its map entry goes once nobody holds or waits for it.
struct GroupGuard<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    lock: Arc<tokio::sync::Mutex<()>>,
    locks: &'a GroupLocks,
    name: String,
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The map's reference and ours: nobody else holds or waits for it.
        if Arc::strong_count(&self.lock) <= 2 {
            locks.remove(&self.name);
        }
    }
}

pub fn validate_group(group: &str) -> Result<(), DispatchError> {
    crate::base::check_name(group).map_err(DispatchError::BadName)
}

/// A node's last report: when it arrived, and its tallies by subscription.
type PeerTallies = (std::time::Instant, HashMap<String, Tally>);

/// Where to move a subscription's offsets (`POST …/reset`).
#[derive(Debug, Clone, Copy)]
pub struct ResetTo(pub Start);

impl Dispatcher {
    /// A dispatcher alone on its storage: it runs every subscription.
    pub fn new(broker: Arc<Broker>, plugins: Arc<Plugins>) -> Self {
        let retention = crate::config::RetentionConfig::default();
        Self {
            env: Handles {
                storage: broker.storage().clone(),
                trace: Arc::new(trace::TraceWriter::new(broker.storage().clone(), true)),
                dead_letters_due: Arc::new(crate::base::NextDue::for_storage(
                    broker.storage().shared(),
                )),
                broker,
                plugins,
            },
            runners: Default::default(),
            control: Default::default(),
            group_locks: Default::default(),
            active: std::sync::atomic::AtomicBool::new(true),
            share: None,
            stored_offsets: Default::default(),
            dead_letters_max_age_ms: retention.dead_letters_max_age_ms,
            dead_letters_max_count: retention.dead_letters_max_count,
            trace_max_age_ms: retention.trace_max_age_ms,
            peer_tallies: Default::default(),
        }
    }

    /// A dispatcher on storage shared with other nodes: it runs the subscription queues and
    /// broadcast instances it holds leases for ([`Self::reconcile`] takes and gives them up).
    pub fn shared(broker: Arc<Broker>, plugins: Arc<Plugins>, node: String) -> Self {
        let storage = broker.storage().clone();
        Self {
            share: Some(share::Share::new(node, storage)),
            ..Self::new(broker, plugins)
        }
    }

    /// Keeps delivery attempts' trace records `max_age_ms` after their message was created
    /// (see [`Dispatcher::enforce_retention`]); 0 records none.
    pub fn with_trace_retention(mut self, max_age_ms: u64) -> Self {
        self.env.trace = Arc::new(trace::TraceWriter::new(
            self.env.storage.clone(),
            max_age_ms > 0,
        ));
        self.trace_max_age_ms = max_age_ms;
        self
    }

    /// Keeps dead letters `max_age_ms` after they died, and at most `max_count` per
    /// subscription (see [`Dispatcher::enforce_retention`]).
    pub fn with_dead_letter_retention(self, max_age_ms: u64, max_count: u64) -> Self {
        Self {
            dead_letters_max_age_ms: max_age_ms,
            dead_letters_max_count: max_count,
            ..self
        }
    }

    /// Serialises control changes of `group`. Alone on its storage, a node lets changes of
    /// different groups run side by side (each waits only for its own group's calls in flight);
    /// on shared storage a change reconciles every subscription, so changes run one at a time.
    async fn lock_group(&self, group: &str) -> ControlGuard<'_> {
        if self.share.is_some() {
            return ControlGuard::Exclusive(self.control.write().await);
        }
        let shared = self.control.read().await;
        let lock = {
            let mut locks = self
                .group_locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.entry(group.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        ControlGuard::Group {
            _shared: shared,
            _group: GroupGuard {
                guard: Some(guard),
                lock,
                locks: &self.group_locks,
                name: group.to_string(),
            },
        }
    }

    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether this node runs any subscription queue.
    pub async fn dispatching(&self) -> bool {
        !self.runners.lock().await.is_empty()
    }

    /// Leases this node holds for subscription work.
    pub async fn leases_held(&self) -> usize {
        match &self.share {
            Some(s) => s.count().await,
            None => 0,
        }
    }

    async fn record(&self, group: &str) -> Result<SubscriptionRecord, DispatchError> {
        validate_group(group)?;
        match self.env.storage.get_record(state::SUB_SPACE, group).await? {
            Some(r) => Ok(state::decode(group, &r)?),
            None => Err(DispatchError::Unknown(group.to_string())),
        }
    }

    /// Stops every runner of `record`'s group before the caller changes what they work from
    /// (a reset moves the offsets and drops the timers and completion markers; a delete removes
    /// everything). Alone on its storage this node just halts its own runner. On shared
    /// storage the subscription is first stored paused, so each node halts its runner and
    /// gives the group's leases back at its next reconcile (within a [`crate::cluster::HEARTBEAT`]
    /// or so; a dead node's leases lapse after [`share::UNIT_LEASE`]), and the call waits until
    /// no other node holds one. Before, a runner on another node went on delivering from the old
    /// offsets until it noticed the change, and what it stored meanwhile outlived the change: a
    /// reset followed by a publish dead-lettered each new message twice (once by the old runner,
    /// once after the restart from the reset offsets). Kafka refuses an offset reset while the
    /// group has active members for the same reason.
    ///
    /// While it waits it reconciles now and then, as the heartbeat would (it holds the lock
    /// the heartbeat's reconcile needs): this node gives back its own leases of the group, and
    /// those of any subscription another node is quiescing meanwhile.
    ///
    /// Returns whether the subscription was running; `record.state` is then paused on shared
    /// storage, and the caller ends with [`Self::unquiesce`], on error too. Errors:
    /// [`StorageError::Unavailable`] when another node still holds a lease after
    /// [`QUIESCE_WAIT`], or the storage's; the subscription is then as it was. A crash of this
    /// node while it waits leaves the subscription paused (its status says so; resume it).
    async fn quiesce(&self, record: &mut SubscriptionRecord) -> Result<bool, DispatchError> {
        let Some(share) = &self.share else {
            self.halt(&record.group).await;
            return Ok(record.state == SubState::Running);
        };
        // Paused over the revision read, so a pause, resume or update made through another
        // node in between is read again, not overwritten; `running` is what that read said.
        let mut running = false;
        if record.state == SubState::Running {
            *record = self
                .update_record(&record.group, |r| {
                    running = r.state == SubState::Running;
                    if running {
                        r.state = SubState::Paused;
                        r.quiesced = true;
                    }
                    Ok(())
                })
                .await?;
        }
        self.halt(&record.group).await;
        let waited = std::time::Instant::now();
        let mut reconciled = std::time::Instant::now();
        loop {
            let others = match share.owners(&record.group).await {
                Ok(owners) => owners
                    .into_values()
                    .filter(|owner| *owner != share.node)
                    .collect::<std::collections::BTreeSet<String>>(),
                Err(e) => {
                    self.unquiesce(record, running).await?;
                    return Err(e.into());
                }
            };
            if others.is_empty() {
                return Ok(running);
            }
            if waited.elapsed() >= QUIESCE_WAIT {
                self.unquiesce(record, running).await?;
                return Err(StorageError::Unavailable(format!(
                    "subscription {:?} still runs on {} after {} s; nothing was changed, try again",
                    record.group,
                    others.into_iter().collect::<Vec<_>>().join(", "),
                    QUIESCE_WAIT.as_secs()
                ))
                .into());
            }
            // This node's own reconcile waits on the lock held here, and another node may be
            // waiting in the same way for this one to give back leases of a subscription
            // paused through it: reconcile here, now and then, as the heartbeat would.
            if reconciled.elapsed() >= crate::cluster::HEARTBEAT {
                reconciled = std::time::Instant::now();
                if let Err(e) = self.reconcile_locked().await {
                    tracing::warn!(error = %e, "cannot reconcile subscriptions");
                }
            }
            tokio::time::sleep(QUIESCE_POLL).await;
        }
    }

    /// Ends what [`Self::quiesce`] began: stores `record` again (running again if it was, a
    /// new `updated_at` so every node restarts from what is stored now) and runs it here. If
    /// its stored record changed meanwhile (a change made through another node while this
    /// one waited), that one is kept, so the change is not undone: a spec update keeps the
    /// quiesce mark and the subscription runs again with the new spec; a pause or resume
    /// cleared the mark and stands. Only the call that paused the subscription (`running`)
    /// ends the mark: a reset through another node that began while it was paused leaves it
    /// to this one.
    async fn unquiesce(
        &self,
        record: &mut SubscriptionRecord,
        running: bool,
    ) -> Result<(), DispatchError> {
        let ended = self
            .update_record(&record.group, |r| {
                if running && r.quiesced {
                    r.quiesced = false;
                    r.state = SubState::Running;
                }
                Ok(())
            })
            .await;
        match ended {
            Ok(stored) => *record = stored,
            // Deleted through another node meanwhile: nothing to run.
            Err(DispatchError::Unknown(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        if record.state == SubState::Running {
            self.start_group(record).await?;
        }
        Ok(())
    }

    /// Stores the record again with a new `updated_at`, so every node restarts its runner of
    /// it; `record` becomes what is stored (a change made through another node is kept).
    async fn touch(&self, record: &mut SubscriptionRecord) -> Result<(), DispatchError> {
        *record = self.update_record(&record.group, |_| Ok(())).await?;
        Ok(())
    }

    /// Reads `group`'s stored record, lets `change` edit it, and stores it over the revision
    /// read, with a new `updated_at` (every node restarts its runner from what is stored).
    /// When another node stored the record in between, it is read again and `change` applied
    /// to that, so no node's change overwrites another's; every subscription record write but
    /// the first (`put` of a new one) and the last (`delete`) goes through here. Before, each
    /// wrote back what it had read earlier: a pause, resume or spec update made through
    /// another node meanwhile was undone, and a reset's end could store over a spec update.
    /// Errors: [`DispatchError::Unknown`] when there is no record; what `change` returns;
    /// [`StorageError::Unavailable`] after [`UPDATE_TRIES`] conflicts in a row; the storage's.
    async fn update_record(
        &self,
        group: &str,
        mut change: impl FnMut(&mut SubscriptionRecord) -> Result<(), DispatchError>,
    ) -> Result<SubscriptionRecord, DispatchError> {
        let store = self.env.storage.as_ref();
        for _ in 0..UPDATE_TRIES {
            let Some(stored) = store.get_record(state::SUB_SPACE, group).await? else {
                return Err(DispatchError::Unknown(group.to_string()));
            };
            let mut record: SubscriptionRecord = state::decode(group, &stored)?;
            let before = record.updated_at;
            change(&mut record)?;
            record.updated_at = now_ms().max(before.saturating_add(1));
            let value = Some(state::encode(&record)?);
            match store
                .put_record(
                    state::SUB_SPACE,
                    group,
                    value,
                    Expect::Revision(stored.revision),
                )
                .await
            {
                Ok(_) => return Ok(record),
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(changing_under_us(group))
    }

    /// Creates or updates a subscription. An update drains in-flight messages, then restarts
    /// from the stored offsets: nothing is lost or delivered twice beyond what was in flight.
    pub async fn put(
        &self,
        group: &str,
        spec: SubscriptionSpec,
    ) -> Result<(SubscriptionStatus, bool), DispatchError> {
        validate_group(group)?;
        spec.validate().map_err(DispatchError::Invalid)?;
        self.env
            .broker
            .secrets()
            .check(&spec.config)
            .map_err(|e| DispatchError::Invalid(format!("config: {e}")))?;
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
        let _g = self.lock_group(group).await;
        let queues = self.env.broker.topic(&spec.topic)?.queues;
        let store = self.env.storage.as_ref();
        let mut created = false;
        let mut record = None;
        for _ in 0..UPDATE_TRIES {
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
            self.halt(group).await;
            let now = now_ms();
            let new = SubscriptionRecord {
                group: group.to_string(),
                state: existing.as_ref().map_or(SubState::Running, |r| r.state),
                created_at: existing.as_ref().map_or(now, |r| r.created_at),
                updated_at: now,
                spec: spec.clone(),
                quiesced: existing.as_ref().is_some_and(|r| r.quiesced),
            };
            // Offsets first: whichever node runs the subscription finds them all where `start`
            // says.
            runner::ensure_cursors(store, &new, queues).await?;
            if existing.is_some() {
                // Over the stored record as read again now: state and mark as they are.
                let stored = self
                    .update_record(group, |r| {
                        if r.spec.topic != spec.topic {
                            return Err(DispatchError::TopicChange(r.spec.topic.clone()));
                        }
                        r.spec = spec.clone();
                        Ok(())
                    })
                    .await;
                match stored {
                    Ok(r) => {
                        record = Some(r);
                        break;
                    }
                    // Deleted through another node meanwhile: created anew.
                    Err(DispatchError::Unknown(_)) => continue,
                    Err(e) => return Err(e),
                }
            }
            let value = Some(state::encode(&new)?);
            match store
                .put_record(state::SUB_SPACE, group, value, Expect::Absent)
                .await
            {
                Ok(_) => {
                    (created, record) = (true, Some(new));
                    break;
                }
                // Created through another node meanwhile: updated instead.
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let Some(record) = record else {
            return Err(changing_under_us(group));
        };
        if record.state == SubState::Running {
            self.start_group(&record).await?;
        }
        drop(_g);
        Ok((self.status(group).await?, created))
    }

    async fn set_state(
        &self,
        group: &str,
        state: SubState,
    ) -> Result<SubscriptionStatus, DispatchError> {
        let _g = self.lock_group(group).await;
        self.record(group).await?;
        self.halt(group).await;
        let record = self
            .update_record(group, |r| {
                r.state = state;
                r.quiesced = false;
                Ok(())
            })
            .await?;
        if state == SubState::Running {
            self.start_group(&record).await?;
        }
        drop(_g);
        self.status(group).await
    }

    pub async fn pause(&self, group: &str) -> Result<SubscriptionStatus, DispatchError> {
        self.set_state(group, SubState::Paused).await
    }

    pub async fn resume(&self, group: &str) -> Result<SubscriptionStatus, DispatchError> {
        self.set_state(group, SubState::Running).await
    }

    /// Moves every offset of the group to `to` (replay, or skip ahead); pending delays and
    /// retries are dropped, dead letters kept.
    /// On shared storage every node's runner of the group is stopped first (see
    /// `quiesce`), so nothing delivered from the old offsets is stored after the move.
    pub async fn reset(&self, group: &str, to: Start) -> Result<SubscriptionStatus, DispatchError> {
        let _g = self.lock_group(group).await;
        let mut record = self.record(group).await?;
        let running = self.quiesce(&mut record).await?;
        let moved = self.move_offsets(&record, to).await;
        // Every node starts again from the new offsets (or, after an error, from the old ones).
        self.unquiesce(&mut record, running).await?;
        moved?;
        drop(_g);
        self.status(group).await
    }

    /// The body of [`Self::reset`], once nothing runs the group: drops its timers and
    /// completion markers and stores every member's offsets at `to`.
    async fn move_offsets(
        &self,
        record: &SubscriptionRecord,
        to: Start,
    ) -> Result<(), DispatchError> {
        let group = &record.group;
        let store = &self.env.storage;
        let topic = self.env.broker.topic(&record.spec.topic)?;
        pins::clear_timers(store.as_ref(), group).await?;
        // Completion markers name offsets that are delivered again after a reset.
        state::clear(store.as_ref(), &state::done_space(group), "").await?;
        let broadcast = record.spec.mode == Mode::Broadcast;
        let members = if broadcast { record.spec.instances } else { 1 };
        for i in 0..members {
            let name = state::member_name(broadcast, i);
            for q in 0..topic.queues {
                let committed = runner::start_offset(store.as_ref(), &topic.name, q, to).await?;
                let c = state::Cursor {
                    committed,
                    ..state::Cursor::default()
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
        Ok(())
    }

    /// Deletes a subscription with its offsets, timers and dead letters. On shared storage
    /// every node's runner of it is stopped first (see `quiesce`): one still running
    /// could otherwise store a dead letter or timer after the deletion, left behind for a
    /// subscription of the same name created later.
    pub async fn delete(&self, group: &str) -> Result<(), DispatchError> {
        let _g = self.lock_group(group).await;
        let mut record = self.record(group).await?;
        let running = self.quiesce(&mut record).await?;
        if let Err(e) = self.remove_stored(group).await {
            // Part may be gone; what is left runs on, and a retried delete finishes it.
            self.unquiesce(&mut record, running).await?;
            return Err(e);
        }
        self.env.broker.metrics().forget_group(group);
        Ok(())
    }

    /// The body of [`Self::delete`], once nothing runs the group: everything stored of it,
    /// its record last.
    async fn remove_stored(&self, group: &str) -> Result<(), DispatchError> {
        let store = &self.env.storage;
        let kv = crate::runtime::host::kv_space(crate::runtime::host::KvOwner::Subscription(group));
        for space in [
            state::cursor_space(group),
            state::timer_space(group),
            state::counts_space(group),
            state::done_space(group),
            kv.clone(),
        ] {
            state::clear(store.as_ref(), &space, "").await?;
        }
        dlq::clear(store.as_ref(), group).await?;
        pins::clear(store.as_ref(), group).await?;
        self.env.broker.forget_kv_usage(&kv);
        store
            .put_record(state::SUB_SPACE, group, None, Expect::Any)
            .await?;
        Ok(())
    }

    /// The versions of `plugin` that subscriptions pin (`plugin_version`).
    pub async fn pinned_versions(&self, plugin: &str) -> Result<Vec<u32>, DispatchError> {
        Ok(self
            .subscriptions()
            .await?
            .into_iter()
            .filter(|(_, r)| r.spec.plugin == plugin)
            .filter_map(|(_, r)| r.spec.plugin_version)
            .collect())
    }

    /// The groups subscribed to `topic`, in group order.
    pub async fn subscriptions_of(&self, topic: &str) -> Result<Vec<String>, DispatchError> {
        Ok(self
            .subscriptions()
            .await?
            .into_iter()
            .filter(|(_, r)| r.spec.topic == topic)
            .map(|(g, _)| g)
            .collect())
    }

    /// Every stored subscription, by group, in group order.
    async fn subscriptions(&self) -> Result<Vec<(String, SubscriptionRecord)>, DispatchError> {
        let mut out = Vec::new();
        for (group, r) in self
            .env
            .storage
            .list_records(state::SUB_SPACE, "", usize::MAX)
            .await?
        {
            let record: SubscriptionRecord = state::decode(&group, &r)?;
            out.push((group, record));
        }
        Ok(out)
    }

    /// The grants of every subscription of `plugin` (what admins allowed it).
    pub async fn plugin_grants(&self, plugin: &str) -> Result<Vec<spec::GrantSpec>, DispatchError> {
        Ok(self
            .subscriptions()
            .await?
            .into_iter()
            .filter(|(_, record)| record.spec.plugin == plugin)
            .map(|(_, record)| record.spec.grants)
            .collect())
    }

    /// The subscription using a plugin, if any (a used plugin cannot be deleted).
    pub async fn plugin_user(&self, plugin: &str) -> Result<Option<String>, DispatchError> {
        Ok(self
            .subscriptions()
            .await?
            .into_iter()
            .find(|(_, record)| record.spec.plugin == plugin)
            .map(|(group, _)| group))
    }

    /// Restarts running subscriptions that follow `plugin`'s latest version (after an upload)
    /// or read `topic` (after queues were added), so they pick the change up.
    pub async fn refresh(
        &self,
        plugin: Option<&str>,
        topic: Option<&str>,
    ) -> Result<(), DispatchError> {
        let affected = |record: &SubscriptionRecord| {
            let follows = plugin
                .is_some_and(|p| record.spec.plugin == p && record.spec.plugin_version.is_none());
            let reads = topic.is_some_and(|t| record.spec.topic == t);
            follows || reads
        };
        let groups: Vec<String> = self.runners.lock().await.keys().cloned().collect();
        if self.share.is_some() {
            let _g = self.control.write().await;
            let mut halted = false;
            for group in groups {
                if affected(&self.record(&group).await?) {
                    self.halt(&group).await;
                    halted = true;
                }
            }
            // The queue count may have changed, and with it the units: one pass places them.
            if halted {
                self.reconcile_locked().await?;
            }
            return Ok(());
        }
        // Alone: each affected group restarts under its own lock, one after another.
        for group in groups {
            let _g = self.lock_group(&group).await;
            let record = match self.record(&group).await {
                Ok(r) => r,
                Err(DispatchError::Unknown(_)) => continue,
                Err(e) => return Err(e),
            };
            if !affected(&record) || !self.runners.lock().await.contains_key(&group) {
                continue;
            }
            self.halt(&group).await;
            let queues = self.env.broker.topic(&record.spec.topic)?.queues;
            if let Err(e) = self.launch(&record, queues, None).await {
                tracing::error!(group = %record.group, error = %e, "cannot restart subscription");
            }
        }
        Ok(())
    }

    /// Stops every subscription, letting in-flight messages finish, writes their attempt
    /// records, then gives up the leases so other nodes take the queues over at once.
    pub async fn shutdown(&self) {
        let _g = self.control.write().await;
        self.active.store(false, Ordering::Release);
        let runners: Vec<Runner> = self.runners.lock().await.drain().map(|(_, r)| r).collect();
        futures::future::join_all(runners.into_iter().map(Runner::stop)).await;
        // The runners made their last attempt records: written before storage closes.
        self.env.trace.close().await;
        if let Some(share) = &self.share {
            share.release_all().await;
        }
    }
}
