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

/// Timer records read per storage round trip while counting those past the window.
const COUNT_PAGE: usize = 4096;

/// A member's timers in due order (their keys sort so): every stored one of the queues this
/// node runs, or, past `cap`, the earliest `cap` to `2 × cap` of them and how many more wait in
/// storage after `horizon`. 10⁷ delayed messages then take `cap` timers' memory, not 10⁷.
#[derive(Debug, Default)]
pub(super) struct TimerWindow {
    pub(super) map: BTreeMap<String, Timer>,
    /// `Some(k)`: stored timers with keys after `k` are not in `map`.
    horizon: Option<String>,
    /// How many stored timers lie after `horizon`.
    beyond: u64,
    cap: usize,
    /// While a page after the horizon is read: the timers added after the horizon meanwhile
    /// (the read may have missed them).
    refilling: Option<BTreeMap<String, Timer>>,
}

/// The queue of a timer key (`{member}/{due}/{queue}/{offset}`, hex).
fn key_queue(key: &str) -> Option<u32> {
    let mut parts = key.rsplit('/');
    parts.next();
    u32::from_str_radix(parts.next()?, 16).ok()
}

/// The start of every timer key of `member`.
fn prefix_of(member: &str) -> String {
    format!("{member}/")
}

impl TimerWindow {
    /// Reads `member`'s timers of the `owned` queues: the `cap` due first into memory, the
    /// rest only counted, a page at a time. `held` gets the (queue, offset) of every one at or
    /// past its queue's `committed` offset. Memory is bounded by `cap` and a page: the held
    /// ones and the stale ones come from a walk over the queues' pins (see
    /// [`crate::dispatch::pins`]), which sort by (queue, offset).
    pub(super) async fn load(
        storage: &dyn Storage,
        group: &str,
        member: &str,
        (owned, committed): (&[bool], &[u64]),
        cap: usize,
        held: &mut Vec<(u32, u64)>,
    ) -> Result<Self, DispatchError> {
        pins::build(storage, group).await?;
        let space = state::timer_space(group);
        let prefix = prefix_of(member);
        let mut w = Self {
            cap,
            ..Self::default()
        };
        let owns = |q: u32| owned.get(q as usize).copied().unwrap_or(false);
        let mut after = String::new();
        loop {
            let page = storage
                .list_records_after(&space, &prefix, &after, COUNT_PAGE)
                .await?;
            let full = page.len() == COUNT_PAGE;
            for (key, r) in page {
                if key_queue(&key).is_some_and(owns) {
                    if w.map.len() < cap {
                        w.map
                            .insert(key.clone(), state::decode::<Timer>("timer", &r)?);
                    } else {
                        if w.horizon.is_none() {
                            w.horizon = w.map.keys().next_back().cloned();
                        }
                        w.beyond += 1;
                    }
                }
                after = key;
            }
            if !full {
                break;
            }
        }
        // The pins of a message's timers sort together, a member's by due time: of several,
        // the latest stored is its timer; an earlier one is a predecessor a crash kept from
        // being removed after its successor was stored. Only a stored timer holds its offset.
        let (pin_space, mine) = (pins::space(group), prefix_of(member));
        let mut writes = Vec::new();
        for q in (0..owned.len() as u32).filter(|&q| owns(q)) {
            let (prefix, mut after) = (pins::queue_prefix(q), String::new());
            let committed = committed.get(q as usize).copied().unwrap_or(0);
            // The current message's offset and its timers' (key, pin key, pin).
            let mut same: (u64, Vec<(String, String, crate::storage::Record)>) = (0, Vec::new());
            loop {
                let page = storage
                    .list_records_after(&pin_space, &prefix, &after, COUNT_PAGE)
                    .await?;
                let full = page.len() == COUNT_PAGE;
                for (key, record) in &page {
                    let Some((offset, timer)) = pins::parse_timer_pin(key) else {
                        continue;
                    };
                    if !timer.starts_with(&mine) {
                        continue;
                    }
                    if offset != same.0 {
                        let (at, timers) = std::mem::replace(&mut same, (offset, Vec::new()));
                        if w.settle_message(storage, group, timers, at >= committed, &mut writes)
                            .await?
                        {
                            held.push((q, at));
                        }
                    }
                    same.1
                        .push((timer.to_string(), key.clone(), record.clone()));
                }
                match page.last() {
                    Some((last, _)) if full => after = last.clone(),
                    _ => break,
                }
            }
            let (at, timers) = same;
            if w.settle_message(storage, group, timers, at >= committed, &mut writes)
                .await?
            {
                held.push((q, at));
            }
        }
        if !writes.is_empty() {
            storage.put_records_in_order(writes).await?;
        }
        Ok(w)
    }

    /// Of one message's timers (keys with their pins' keys and pins, in due order), keeps the
    /// latest stored and adds to `writes` the removal of the others, and of pins whose timer
    /// is gone (once [`pins::may_go`] lets them). Only checks storage when there are several,
    /// or when `ahead` (the message is at or past its queue's offset); returns whether a
    /// stored timer holds the message then.
    async fn settle_message(
        &mut self,
        storage: &dyn Storage,
        group: &str,
        timers: Vec<(String, String, crate::storage::Record)>,
        ahead: bool,
        writes: &mut Vec<crate::storage::RecordWrite>,
    ) -> Result<bool, DispatchError> {
        if timers.is_empty() || (timers.len() < 2 && !ahead) {
            return Ok(false);
        }
        let space = state::timer_space(group);
        let mut kept = false;
        for (timer, pin_key, pin) in timers.into_iter().rev() {
            let stored = self.map.contains_key(&timer)
                || storage.get_record(&space, &timer).await?.is_some();
            if stored && !kept {
                kept = true;
                continue;
            }
            if stored {
                if self.map.remove(&timer).is_none() {
                    self.beyond = self.beyond.saturating_sub(1);
                }
                writes.push(crate::storage::RecordWrite {
                    space: space.clone(),
                    key: timer,
                    value: None,
                    expect: Expect::Any,
                });
            } else if !pins::may_go(storage, &pin) {
                continue;
            }
            writes.push(crate::storage::RecordWrite {
                space: pins::space(group),
                key: pin_key,
                value: None,
                expect: Expect::Any,
            });
        }
        Ok(kept)
    }

    /// Stored timers, in memory or not.
    pub(super) fn len(&self) -> u64 {
        (self.map.len() as u64).saturating_add(self.beyond)
    }

    /// Takes a stored timer into memory if it is due before the horizon; past `2 × cap` the
    /// latest go back to storage only.
    pub(super) fn insert(&mut self, t: Timer) {
        let key = t.key();
        if self.horizon.as_ref().is_some_and(|h| key > *h) {
            self.beyond += 1;
            if let Some(recent) = &mut self.refilling {
                recent.insert(key, t);
            }
            return;
        }
        self.map.insert(key, t);
        // Not while a page is read: timers dropped below the horizon now would be after the
        // horizon the page sets, and missed.
        if self.refilling.is_none() && self.map.len() > self.cap.saturating_mul(2) {
            while self.map.len() > self.cap {
                self.map.pop_last();
                self.beyond += 1;
            }
            self.horizon = self.map.keys().next_back().cloned();
        }
    }
}

impl Member {
    /// When every timer in memory fired and more wait in storage: reads the next page after
    /// the horizon (timers added meanwhile are kept aside, so none is skipped).
    async fn refill_timers(&self) {
        let after = match self.shared.timers.lock() {
            Ok(mut w) if w.map.is_empty() && w.refilling.is_none() => {
                let h = w.horizon.clone();
                if h.is_some() {
                    w.refilling = Some(BTreeMap::new());
                }
                h
            }
            _ => None,
        };
        let Some(after) = after else { return };
        let space = state::timer_space(&self.group);
        let prefix = format!("{}/", self.shared.name);
        let cap = self.shared.timers.lock().map_or(COUNT_PAGE, |w| w.cap);
        let read = self
            .storage
            .list_records_after(&space, &prefix, &after, cap)
            .await;
        let page = match read {
            Ok(page) => page,
            Err(e) => {
                if let Ok(mut w) = self.shared.timers.lock() {
                    w.refilling = None;
                }
                tracing::error!(group = %self.group, error = %e, "reading timers failed; tried again");
                tokio::time::sleep(STORAGE_RETRY).await;
                return;
            }
        };
        let Ok(mut w) = self.shared.timers.lock() else {
            return;
        };
        let recent = w.refilling.take().unwrap_or_default();
        let next = (page.len() == cap)
            .then(|| page.last().map(|(k, _)| k.clone()))
            .flatten();
        let within = |k: &String| next.as_ref().is_none_or(|h| k <= h);
        let mut taken = 0u64;
        let owned = &self.shared.owned;
        let loaded = page.into_iter().filter_map(|(k, r)| {
            let queue = key_queue(&k)?;
            owned
                .get(queue as usize)
                .copied()
                .unwrap_or(false)
                .then_some(())?;
            Some((k, state::decode::<Timer>("timer", &r).ok()?))
        });
        let loaded: Vec<(String, Timer)> = loaded.collect();
        for (k, t) in loaded
            .into_iter()
            .chain(recent.into_iter().filter(|(k, _)| within(k)))
        {
            if w.map.insert(k, t).is_none() {
                taken += 1;
            }
        }
        w.beyond = if next.is_none() {
            0
        } else {
            w.beyond.saturating_sub(taken)
        };
        w.horizon = next;
    }

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
        let key = timer.key();
        // The timer, then its pin (see `crate::dispatch::pins`), in one step.
        let writes = vec![
            RecordWrite {
                space: state::timer_space(&self.group),
                key: key.clone(),
                value: None,
                expect: Expect::Any,
            },
            pins::of_timer(&self.group, timer, false),
        ];
        self.persist("a timer removal", || {
            self.storage.put_records_in_order(writes.clone())
        })
        .await;
        self.shared.forget_timer(&key);
    }

    pub(super) async fn add_timer(&self, t: Timer) {
        let value = match state::encode(&t) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(group = %self.group, error = %e, "cannot encode a timer");
                return;
            }
        };
        // Its pin (see `crate::dispatch::pins`) and the timer, in one step.
        let writes = vec![
            pins::of_timer(&self.group, &t, true),
            RecordWrite {
                space: state::timer_space(&self.group),
                key: t.key(),
                value: Some(value),
                expect: Expect::Any,
            },
        ];
        self.persist("a timer", || {
            self.storage.put_records_in_order(writes.clone())
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

    /// Stores what became of a timer's delivery: its staged effects with the message's
    /// completion on ack ([`Member::commit_effects`]), else its successor timer or dead letter
    /// (the old timer goes only after its successor is stored, and not at all when the
    /// successor has the same key). A delivery to run again, or cut short by a stop, keeps its
    /// timer (back in memory, due as it was). Returns false when the runner stopped before the
    /// delivery was done.
    pub(super) async fn finish_timer(
        &self,
        timer: Timer,
        (result, staged, call): Handled,
        attempt: u32,
        m: &StoredMessage,
        block: bool,
    ) -> bool {
        match self.commit_effects(&result, staged, m, Some(&timer)).await {
            Effects::Rerun => {
                self.trace(m, attempt, &call, &result, "rerun", None);
                self.shared.add_timer(timer);
            }
            Effects::Stopped => {
                self.shared.add_timer(timer);
                return false;
            }
            Effects::Committed => {
                self.settle(&result, attempt, m, block, &call).await;
                self.shared.forget_timer(&timer.key());
            }
            // Its message was completed by another delivery: the timer goes.
            Effects::AlreadyDone => {
                self.settle(&result, attempt, m, block, &call).await;
                self.remove_timer(&timer).await;
            }
            Effects::Discarded => {
                let successor = self.settle(&result, attempt, m, block, &call).await;
                if successor.as_deref() != Some(timer.key().as_str()) {
                    self.remove_timer(&timer).await;
                }
            }
        }
        true
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
            if !stopping && self.shared.next_due().is_none() {
                self.refill_timers().await;
            }
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
                Some((timer, m, attempt, handled, permit)) = pending.next() => {
                    let timer: Timer = timer;
                    let permit: OwnedSemaphorePermit = permit;
                    let m: Arc<StoredMessage> = m;
                    let handled: Option<Handled> = handled;
                    match handled {
                        // Due now when run again: delivered as the same attempt.
                        Some(handled) => {
                            self.finish_timer(timer, handled, attempt, &m, false).await;
                        }
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
