//! The one bounded pool of plugin instances that every caller leases from: subscription workers,
//! the invoke API and transaction check-backs. At most `max_live` instances exist at once; an
//! idle instance is kept under its caller's key for the next call of that caller, and evicted
//! (least recently used first) when another key needs room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use super::{InstanceContext, InvokeError, PluginCode, PluginInstance, Runtime};
use crate::bindings::{CheckResult, Message, Outcome};

/// Whose instance it is: instances are reused only by the same key. `plugin` lets a deleted
/// plugin's idle instances go at once; `owner` names the caller and everything its instances
/// carry (a worker of a subscription run, or a config and grants hash).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub plugin: String,
    pub version: u32,
    pub owner: String,
}

#[derive(Default)]
struct Inner {
    /// Instances that exist: idle plus leased.
    live: usize,
    /// Callers waiting for room.
    waiting: usize,
    /// Bumped at each return; orders idle instances for eviction.
    clock: u64,
    idle: HashMap<PoolKey, Vec<(u64, PluginInstance)>>,
    /// How many instances `idle` holds over all keys, kept as they come and go: summing the
    /// lists on every lease and return cost time per key under the lock (with 1 000
    /// subscriptions, 5% of the CPU of a many-topics run).
    idle_count: usize,
}

impl Inner {
    /// Takes an idle instance of `key` out, the least recently returned (`oldest`) or the
    /// most; keeps `idle_count` and drops an emptied list.
    fn take_idle(&mut self, key: &PoolKey, oldest: bool) -> Option<PluginInstance> {
        let list = self.idle.get_mut(key)?;
        let (_, instance) = if oldest {
            (!list.is_empty()).then(|| list.remove(0))?
        } else {
            list.pop()?
        };
        if list.is_empty() {
            self.idle.remove(key);
        }
        self.idle_count -= 1;
        Some(instance)
    }
}

/// Pool counters for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct PoolStats {
    pub live: Gauge,
    pub idle: Gauge,
    pub evictions: Counter,
    pub waits: Counter,
}

pub(super) struct Pool {
    max_live: usize,
    inner: Mutex<Inner>,
    room: Notify,
    pub(super) stats: PoolStats,
}

impl Pool {
    pub(super) fn new(max_live: usize) -> Self {
        Self {
            max_live: max_live.max(1),
            inner: Mutex::new(Inner::default()),
            room: Notify::new(),
            stats: PoolStats::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, inner: &Inner) {
        self.stats.live.set(inner.live as i64);
        self.stats.idle.set(inner.idle_count as i64);
    }

    /// Takes out the least recently returned idle instance of any key.
    fn evict_lru(inner: &mut Inner) -> Option<PluginInstance> {
        let key = inner
            .idle
            .iter()
            .filter_map(|(k, v)| v.first().map(|(at, _)| (*at, k)))
            .min_by_key(|(at, _)| *at)
            .map(|(_, k)| k.clone())?;
        inner.take_idle(&key, true)
    }

    /// Removes every idle instance whose key matches; leased ones are dropped when returned
    /// only if `forget` runs again, so callers forget after their last lease ends.
    pub(super) fn forget(&self, matches: impl Fn(&PoolKey) -> bool) {
        let gone: Vec<PluginInstance> = {
            let mut inner = self.lock();
            let keys: Vec<PoolKey> = inner.idle.keys().filter(|k| matches(k)).cloned().collect();
            let mut gone = Vec::new();
            for k in keys {
                if let Some(list) = inner.idle.remove(&k) {
                    gone.extend(list.into_iter().map(|(_, i)| i));
                }
            }
            inner.live -= gone.len();
            inner.idle_count -= gone.len();
            self.publish(&inner);
            gone
        };
        for _ in &gone {
            self.room.notify_one();
        }
        drop(gone);
    }

    fn give_back(&self, key: PoolKey, instance: PluginInstance) {
        let dropped = {
            let mut inner = self.lock();
            let dropped = if instance.is_usable() {
                inner.clock += 1;
                let at = inner.clock;
                inner.idle.entry(key).or_default().push((at, instance));
                inner.idle_count += 1;
                None
            } else {
                inner.live -= 1;
                Some(instance)
            };
            self.publish(&inner);
            // A waiter may now reuse, evict or create.
            if inner.waiting > 0 {
                self.room.notify_one();
            }
            dropped
        };
        drop(dropped);
    }

    fn lost(&self) {
        let mut inner = self.lock();
        inner.live -= 1;
        self.publish(&inner);
        if inner.waiting > 0 {
            self.room.notify_one();
        }
    }
}

/// One caller counted in `waiting` until it stops waiting (woken or dropped).
struct Waiting<'a>(&'a Pool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

/// An instance lent to one caller; it goes back to the pool (or, broken, away) when dropped.
pub struct Lease {
    instance: Option<PluginInstance>,
    key: PoolKey,
    runtime: Arc<Runtime>,
}

impl Lease {
    fn instance(&mut self) -> Result<&mut PluginInstance, InvokeError> {
        // Present from creation until drop; the error only keeps this free of panics.
        self.instance
            .as_mut()
            .ok_or_else(|| InvokeError::Instantiate("the lease was already returned".into()))
    }

    /// Calls the consumer export (see [`PluginInstance::handle`]).
    pub async fn handle(&mut self, message: &Message) -> Result<Outcome, InvokeError> {
        self.instance()?.handle(message).await
    }

    /// Calls the checker export (see [`PluginInstance::check_transaction`]).
    /// [`PluginInstance::handle_batch`] on the leased instance.
    pub async fn handle_batch(
        &mut self,
        first: Message,
        next: impl FnMut() -> Option<Message>,
        done: impl FnMut(Result<Outcome, InvokeError>, std::time::Duration, super::Staged) -> bool,
    ) -> Result<usize, InvokeError> {
        Ok(self.instance()?.handle_batch(first, next, done).await)
    }

    pub async fn check_transaction(
        &mut self,
        message: &Message,
    ) -> Result<(CheckResult, super::Staged), InvokeError> {
        self.instance()?.check_transaction(message).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            self.runtime
                .pool
                .give_back(std::mem::replace(&mut self.key, PoolKey::empty()), instance);
        }
    }
}

impl PoolKey {
    fn empty() -> Self {
        Self {
            plugin: String::new(),
            version: 0,
            owner: String::new(),
        }
    }
}

impl Runtime {
    /// Lends an instance of `code` for `key`: an idle one of the same key, else a new one made
    /// with `ctx` once there is room (evicting the least recently used idle instance of another
    /// key, or waiting for a lease to end). Errors: the instantiation's.
    pub async fn lease(
        self: &Arc<Self>,
        key: PoolKey,
        code: &Arc<PluginCode>,
        ctx: impl FnOnce() -> Arc<InstanceContext>,
    ) -> Result<Lease, InvokeError> {
        let pool = &self.pool;
        let mut counted_wait = false;
        loop {
            let (victim, notified) = {
                let mut inner = pool.lock();
                if let Some(instance) = inner.take_idle(&key, false) {
                    pool.publish(&inner);
                    return Ok(Lease {
                        instance: Some(instance),
                        key,
                        runtime: self.clone(),
                    });
                }
                if inner.live < pool.max_live {
                    inner.live += 1;
                    pool.publish(&inner);
                    break;
                }
                if let Some(victim) = Pool::evict_lru(&mut inner) {
                    // Its room passes to the new instance: `live` stays.
                    pool.stats.evictions.inc();
                    pool.publish(&inner);
                    (Some(victim), None)
                } else {
                    inner.waiting += 1;
                    (None, Some(pool.room.notified()))
                }
            };
            if let Some(victim) = victim {
                drop(victim);
                break;
            }
            if let Some(n) = notified {
                let _waiting = Waiting(pool);
                if !counted_wait {
                    pool.stats.waits.inc();
                    counted_wait = true;
                }
                n.await;
            }
        }
        match self.instantiate(code, ctx()).await {
            Ok(instance) => Ok(Lease {
                instance: Some(instance),
                key,
                runtime: self.clone(),
            }),
            Err(e) => {
                pool.lost();
                Err(e)
            }
        }
    }

    /// Drops the idle instances of `plugin` (all versions): it was deleted or replaced.
    pub fn forget_plugin(&self, plugin: &str) {
        self.pool.forget(|k| k.plugin == plugin);
    }

    /// Drops the idle instances of one key (a worker that stopped).
    pub fn forget_key(&self, key: &PoolKey) {
        self.pool.forget(|k| k == key);
    }

    pub fn pool_stats(&self) -> &PoolStats {
        &self.pool.stats
    }
}
