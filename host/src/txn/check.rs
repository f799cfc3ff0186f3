//! The check-back loop: pending transactions asked of their topic's checker plugin when due,
//! at most `PARALLEL_CHECKS` at once, parked as unresolved after `max_checks`.

use super::*;

impl Transactions {
    /// Runs due checks, and moves and expires decided transactions, until `cancel`; checks in
    /// progress finish first.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let keeper = tokio::spawn(self.clone().keep_decided(cancel.clone()));
        let mut running = tokio::task::JoinSet::new();
        loop {
            let now = now_ms();
            let next = self
                .schedule
                .lock()
                .ok()
                .and_then(|s| s.first().map(|(at, _)| *at));
            let due = next.is_some_and(|at| at <= now) && running.len() < PARALLEL_CHECKS;
            if due {
                let popped = self.schedule.lock().ok().and_then(|mut s| s.pop_first());
                if let Some((_, id)) = popped {
                    let me = self.clone();
                    running.spawn(async move {
                        if let Err(e) = me.check(&id).await {
                            tracing::error!(txn = %id, error = %e, "transaction check failed");
                            me.schedule(now_ms().saturating_add(1000), &id);
                        }
                    });
                }
                continue;
            }
            let sleep = match next {
                Some(at) if at > now => std::time::Duration::from_millis(at - now),
                _ => std::time::Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep), if running.len() < PARALLEL_CHECKS => {}
                Some(_) = running.join_next() => {}
                _ = self.wake.notified() => {}
                _ = cancel.cancelled() => break,
            }
        }
        while running.join_next().await.is_some() {}
        let _ = keeper.await;
    }

    /// Asks the checker about one transaction, if it is still pending and due.
    pub(super) async fn check(&self, id: &str) -> Result<(), TxnError> {
        let (t, _) = self.load(id).await?;
        // Decided (or parked) transactions are never checked; a stale schedule entry is dropped.
        if t.state != TxnState::Pending {
            return Ok(());
        }
        if t.next_check_at > now_ms() {
            self.schedule(t.next_check_at, id);
            return Ok(());
        }
        let (answer, staged) = match self.ask_checker(&t).await {
            Ok((a, s)) => (Ok(a), s),
            Err(e) => (Err(e), Staged::default()),
        };
        // The checker's kv writes are stored with its decision, in one step (issue 24); a key
        // that changed under it leaves the transaction undecided, checked again at once.
        let decided = match answer {
            Ok(CheckResult::Commit) => Some(self.commit_with(id, "checker", &staged).await),
            Ok(CheckResult::Rollback) => Some(self.rollback_with(id, "checker", &staged).await),
            _ => None,
        };
        if let Some(decided) = decided {
            if decided.is_err() {
                staged.discard(self.broker.as_ref()).await;
            }
            return match decided {
                Ok(_) | Err(TxnError::Decided { .. }) => Ok(()),
                Err(TxnError::Storage(StorageError::Conflict { .. })) => {
                    self.schedule(now_ms(), id);
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        // No decision: what the checker staged is dropped with it.
        staged.discard(self.broker.as_ref()).await;
        match answer {
            Ok(CheckResult::Commit | CheckResult::Rollback) => Ok(()),
            Ok(CheckResult::Unknown) | Err(_) => {
                let detail = match &answer {
                    Err(e) => e.clone(),
                    _ => "the checker does not know yet".to_string(),
                };
                let t = self
                    .update(id, |t| {
                        if t.state != TxnState::Pending {
                            return Ok(false);
                        }
                        t.checks += 1;
                        t.log("checked: unknown", Some(detail.clone()));
                        if t.checks >= t.max_checks {
                            t.state = TxnState::Unresolved;
                            t.next_check_at = 0;
                            t.log(
                                "unresolved",
                                Some(format!(
                                    "{} checks gave no answer; an operator must decide",
                                    t.checks
                                )),
                            );
                        } else {
                            t.next_check_at = now_ms().saturating_add(t.check_interval_ms);
                        }
                        Ok(true)
                    })
                    .await?;
                if t.state == TxnState::Pending {
                    self.schedule(t.next_check_at, id);
                }
                Ok(())
            }
        }
    }

    /// Calls the topic checker's `check-transaction`; any failure reads as "unknown".
    pub(super) async fn ask_checker(&self, t: &TxnRecord) -> Result<(CheckResult, Staged), String> {
        let topic = self
            .broker
            .topic_loaded(&t.topic)
            .await
            .map_err(|e| e.to_string())?;
        let Some(plugin) = topic.transaction_checker else {
            return Err(format!("topic {} has no transaction_checker", t.topic));
        };
        let (version, code) = self
            .plugins
            .code(&plugin, None)
            .await
            .map_err(|e: PluginError| e.to_string())?;
        if !code.has_checker() {
            return Err(format!("plugin {plugin} does not export check-transaction"));
        }
        let config_json = self
            .broker
            .secrets()
            .resolve(
                &topic
                    .transaction_checker_config
                    .clone()
                    .unwrap_or_else(|| serde_json::json!({})),
            )
            .map_err(|e| format!("transaction_checker_config: {e}"))?
            .to_string();
        let grants = topic.transaction_checker_grants.to_grants()?;
        // Instances are reused per plugin version, topic, config and grants.
        let key = PoolKey {
            plugin: plugin.clone(),
            version: version.version,
            owner: format!("check/{}/{config_json}|{grants:?}", t.topic),
        };
        let ctx = Arc::new(InstanceContext {
            // A checker looks up what the topic's consumers keep in their plugin's shared kv.
            kv_space: crate::runtime::host::kv_space(crate::runtime::host::KvOwner::Plugin(
                &plugin,
            )),
            plugin,
            version: version.version,
            group: format!("txn-checker:{}", t.topic),
            member: "checker".into(),
            instance_index: 0,
            instance_count: 1,
            config_json,
            grants,
            limits: version.limits,
            // Its kv writes are stored with its answer (issue 24).
            stage_effects: true,
            services: self.broker.clone(),
        });
        let Some(m) = &t.message else {
            return Err("the half message is gone".into());
        };
        let message = Message::of(&t.topic, 0, m, t.checks + 1);
        let runtime = self.plugins.runtime().clone();
        let result = self
            .plugins
            .runtime()
            .spawn(async move {
                let mut lease = runtime.lease(key, &code, || ctx).await?;
                lease.check_transaction(&message).await
            })
            .await
            .unwrap_or_else(|e| Err(InvokeError::Trap(format!("the call's task failed: {e}"))));
        result.map_err(|e| e.to_string())
    }
}
