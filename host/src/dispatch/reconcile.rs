//! Reconciling: which subscriptions (and, with shared storage, which of their units) this node
//! runs, started, restarted when their record changes and halted when they go away.

use super::*;

impl Dispatcher {
    /// Makes the runners match the stored subscriptions, as changed by this or another node:
    /// starts running ones, stops paused and deleted ones, restarts those whose record, plugin
    /// version (when following the latest), queue count or share of the work changed.
    pub async fn reconcile(&self) -> Result<(), DispatchError> {
        let _g = self.control.write().await;
        self.reconcile_locked().await
    }

    pub(super) async fn reconcile_locked(&self) -> Result<(), DispatchError> {
        if !self.is_active() {
            return Ok(());
        }
        let mut wanted = HashMap::new();
        for (group, record) in self.subscriptions().await? {
            if record.state != SubState::Running {
                continue;
            }
            match self.env.broker.topic(&record.spec.topic) {
                Ok(t) => {
                    wanted.insert(group, (record, t.queues));
                }
                Err(e) => tracing::warn!(%group, error = %e, "subscription's topic unknown"),
            }
        }
        // What this node should run of each subscription.
        let (targets, release): (HashMap<String, runner::Assignment>, Vec<String>) =
            match &self.share {
                None => (
                    wanted.keys().map(|g| (g.clone(), None)).collect(),
                    Vec::new(),
                ),
                Some(share) => {
                    let list: Vec<(&SubscriptionRecord, u32)> =
                        wanted.values().map(|(r, q)| (r, *q)).collect();
                    let a = share.assign(&list).await?;
                    let run = a.run.into_iter().map(|(g, u)| (g, Some(u))).collect();
                    (run, a.release)
                }
            };
        if self.share.is_some()
            && self.env.broker.limits().max_backlog > 0
            && let Err(e) = self.read_stored_offsets(&wanted).await
        {
            // The bound then works from offsets a little older; dispatch goes on regardless.
            tracing::warn!(error = %e, "cannot read stored offsets for the backlog bound");
        }
        let running: Vec<String> = self.runners.lock().await.keys().cloned().collect();
        for group in running {
            let stale = match (wanted.get(&group), targets.get(&group)) {
                (Some((record, _)), Some(units)) => {
                    self.runner_differs(&group, units).await || self.is_stale(&group, record).await
                }
                _ => true,
            };
            if stale {
                self.halt(&group).await;
            }
        }
        if let Some(share) = &self.share {
            share.release(&release).await;
        }
        for (group, units) in targets {
            if self.runners.lock().await.contains_key(&group) {
                continue;
            }
            let Some((record, queues)) = wanted.get(&group) else {
                continue;
            };
            if let Err(e) = self.launch(record, *queues, units).await {
                tracing::error!(%group, error = %e, "cannot start subscription");
            }
        }
        Ok(())
    }

    /// Refreshes [`Self::stored_offsets`] from the cursors of the running subscriptions.
    pub(super) async fn read_stored_offsets(
        &self,
        wanted: &HashMap<String, (SubscriptionRecord, u32)>,
    ) -> Result<(), DispatchError> {
        let mut by_topic: HashMap<String, Vec<Vec<u64>>> = HashMap::new();
        for (group, (record, queues)) in wanted {
            let mut members: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
            for (key, r) in self
                .env
                .storage
                .list_records(&state::cursor_space(group), "", usize::MAX)
                .await?
            {
                let c: state::Cursor = state::decode(&key, &r)?;
                let Some((member, q)) = state::parse_cursor_key(&key) else {
                    continue;
                };
                let offsets = members
                    .entry(member.to_string())
                    .or_insert_with(|| vec![0; *queues as usize]);
                if let Some(o) = offsets.get_mut(q as usize) {
                    *o = c.committed;
                }
            }
            by_topic
                .entry(record.spec.topic.clone())
                .or_default()
                .extend(members.into_values());
        }
        if let Ok(mut stored) = self.stored_offsets.lock() {
            *stored = by_topic;
        }
        Ok(())
    }

    /// Whether `group`'s runner stopped on its own or runs other units than `units`.
    pub(super) async fn runner_differs(&self, group: &str, units: &runner::Assignment) -> bool {
        self.runners
            .lock()
            .await
            .get(group)
            .is_some_and(|r| r.fenced() || r.units != *units)
    }

    /// Runs a subscription after a change made through this node: at once when alone, through
    /// the lease assignment when the storage is shared.
    pub(super) async fn start_group(
        &self,
        record: &SubscriptionRecord,
    ) -> Result<(), DispatchError> {
        if self.share.is_some() {
            return self.reconcile_locked().await;
        }
        let queues = self.env.broker.topic(&record.spec.topic)?.queues;
        self.launch(record, queues, None).await
    }

    /// Whether the runner of `group` no longer matches what is stored.
    pub(super) async fn is_stale(&self, group: &str, record: &SubscriptionRecord) -> bool {
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

    pub(super) async fn launch(
        &self,
        record: &SubscriptionRecord,
        queues: u32,
        units: runner::Assignment,
    ) -> Result<(), DispatchError> {
        if !self.is_active() {
            return Ok(());
        }
        let node = self.share.as_ref().map(|s| s.node.as_str());
        let runner = runner::start(&self.env, record, units.clone(), node).await?;
        if let (Some(share), Some(pairs)) = (&self.share, &units) {
            // Fencing: the runner stops the moment a lease it runs under is lost.
            let lost = share.on_lost(&record.group, record, queues, pairs).await;
            let stop = runner.stop_token();
            let group = record.group.clone();
            runner.spawn(async move {
                if crate::cluster::fence(lost, stop).await {
                    tracing::warn!(%group, "a lease of this subscription was lost; its runner stops");
                }
            });
        }
        self.runners
            .lock()
            .await
            .insert(record.group.clone(), runner);
        Ok(())
    }

    pub(super) async fn halt(&self, group: &str) {
        let runner = self.runners.lock().await.remove(group);
        if let Some(r) = runner {
            r.stop().await;
        }
    }
}
