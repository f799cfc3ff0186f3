//! Offset tracking: which handled messages let a queue's committed offset advance, the cursor
//! writes that store it (fenced by revision), where a member starts, and in-flight permits
//! parked until the stored offset passes their message.

use super::*;

/// In-flight permits of handled messages whose offset is not stored yet, by offset. A permit
/// is released only once the stored offset passes its message, so the messages a crash can
/// deliver twice never outnumber `max_in_flight`.
pub(super) type Parked = Arc<std::sync::Mutex<ParkedPermits>>;

/// The permits of [`Parked`] and the offset last stored, under one lock.
#[derive(Default)]
pub(super) struct ParkedPermits {
    permits: BTreeMap<u64, OwnedSemaphorePermit>,
    /// The committed offset the cursor writer stored last: a permit of a message below it is
    /// released at once.
    stored: u64,
}

/// Holds `permit` of the handled message at `offset` until the stored offset passes it, or
/// releases it now if the stored offset already has. Parking after the cursor writer stored
/// past `offset` would otherwise hold the permit until the next write, which an idle queue
/// never makes: its `in_flight` stayed 1 with nothing in flight (1 000 subscriptions of 100
/// messages each left one or two so).
pub(super) fn park(parked: &Parked, offset: u64, permit: OwnedSemaphorePermit) {
    if let Ok(mut p) = parked.lock()
        && offset >= p.stored
    {
        p.permits.insert(offset, permit);
    }
}

/// After the cursor writer stored `committed`: releases the permits of the messages below it.
pub(super) fn release_below(parked: &Parked, committed: u64) {
    let released = parked.lock().map(|mut p| {
        p.stored = p.stored.max(committed);
        let keep = p.permits.split_off(&committed);
        std::mem::replace(&mut p.permits, keep)
    });
    // Dropped (released) outside the lock.
    drop(released);
}

/// Offsets of a queue whose delivery was completed with a marker (see [`state::done_space`])
/// that the stored offset has not passed yet: not to be delivered again.
pub(super) type Marked = Arc<std::sync::Mutex<BTreeSet<u64>>>;

/// Notes a completion marker just stored.
pub(super) fn mark(marked: &Marked, offset: u64) {
    if let Ok(mut m) = marked.lock() {
        m.insert(offset);
    }
}

/// The completion markers of a member's queue at or above `committed` (those below are left
/// over from a crash after the offset passed them, and are deleted here).
pub(super) async fn load_marked(
    storage: &dyn Storage,
    group: &str,
    member: &str,
    queue: u32,
    committed: u64,
) -> Result<Marked, DispatchError> {
    let space = state::done_space(group);
    let prefix = state::done_prefix(member, queue);
    let mut marked = BTreeSet::new();
    let mut stale = Vec::new();
    for (key, _) in storage.list_records(&space, &prefix, usize::MAX).await? {
        let offset = key
            .strip_prefix(&prefix)
            .and_then(|o| u64::from_str_radix(o, 16).ok());
        match offset {
            Some(o) if o >= committed => {
                marked.insert(o);
            }
            _ => stale.push(RecordWrite {
                space: space.clone(),
                key,
                value: None,
                expect: Expect::Any,
            }),
        }
    }
    if !stale.is_empty() {
        storage.put_records(stale).await?;
    }
    if !marked.is_empty() {
        // Completed by an owner that died before its offset was stored: what it committed is
        // made complete first, so the queue's derived messages keep its order.
        storage.finish_commits_of(&space, &prefix).await?;
    }
    Ok(Arc::new(std::sync::Mutex::new(marked)))
}

/// What is finished above a queue's committed offset, out of order: single messages, and ranges
/// retention deleted before they were delivered. The committed offset moves only over a
/// finished prefix, so it never passes a message still in flight.
#[derive(Debug, Default)]
pub(super) struct Done {
    offsets: BTreeSet<u64>,
    /// Deleted ranges, start → end (exclusive).
    ranges: BTreeMap<u64, u64>,
}

impl Done {
    /// `offset` is finished.
    pub(super) fn mark(&mut self, committed: &mut u64, offset: u64) {
        if offset < *committed {
            return;
        }
        self.offsets.insert(offset);
        self.advance(committed);
    }

    /// Offsets `from..to` are gone (deleted by retention): nothing of them is left to deliver.
    pub(super) fn mark_range(&mut self, committed: &mut u64, from: u64, to: u64) {
        if to <= *committed || from >= to {
            return;
        }
        if from <= *committed {
            self.jump(committed, to);
        } else {
            let end = self.ranges.entry(from).or_insert(to);
            *end = (*end).max(to);
        }
        self.advance(committed);
    }

    /// Moves the committed offset over a deleted range; finished offsets inside it are settled.
    fn jump(&mut self, committed: &mut u64, to: u64) {
        if to > *committed {
            *committed = to;
            self.offsets = self.offsets.split_off(committed);
        }
    }

    fn advance(&mut self, committed: &mut u64) {
        loop {
            if self.offsets.remove(committed) {
                *committed += 1;
            } else if let Some((&start, &end)) = self.ranges.first_key_value()
                && start <= *committed
            {
                self.ranges.remove(&start);
                self.jump(committed, end);
            } else {
                return;
            }
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.offsets.is_empty() && self.ranges.is_empty()
    }
}

/// The offset of the first message of a queue stored at or after `time` (binary search over
/// store times, which never decrease along a queue; birth times may: a committed transaction
/// keeps its begin time, producers' clocks differ).
pub(super) async fn offset_at(
    storage: &dyn Storage,
    topic: &str,
    queue: u32,
    time: u64,
) -> Result<u64, DispatchError> {
    let (mut lo, mut hi) = (
        storage.low_water(topic, queue).await?,
        storage.high_water(topic, queue).await?,
    );
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let stored = storage
            .read(topic, queue, mid, 1)
            .await?
            .first()
            .map_or(u64::MAX, |m| m.stored_at);
        if stored < time {
            lo = mid + 1
        } else {
            hi = mid
        }
    }
    Ok(lo)
}

/// Where a member with no stored cursor starts on a queue.
pub async fn start_offset(
    storage: &dyn Storage,
    topic: &str,
    queue: u32,
    start: Start,
) -> Result<u64, DispatchError> {
    Ok(match start {
        // The oldest message still stored: what retention deleted before the subscription
        // existed is not its loss.
        Start::Earliest => storage.low_water(topic, queue).await?,
        Start::Latest => storage.high_water(topic, queue).await?,
        Start::Time(t) => offset_at(storage, topic, queue, t).await?,
    })
}

/// Writes the cursors a member lacks: where the subscription says for a member with none
/// stored (a new subscription or broadcast instance), the beginning for a queue added to the
/// topic later. Existing cursors are kept (`Expect::Absent`), so any node may call this.
pub async fn ensure_cursors(
    storage: &dyn Storage,
    record: &SubscriptionRecord,
    queues: u32,
) -> Result<(), DispatchError> {
    let spec = &record.spec;
    let broadcast = spec.mode == crate::dispatch::spec::Mode::Broadcast;
    let members = if broadcast { spec.instances } else { 1 };
    let space = state::cursor_space(&record.group);
    for i in 0..members {
        let name = state::member_name(broadcast, i);
        let stored = storage
            .list_records(&space, &format!("{name}/"), usize::MAX)
            .await?;
        for q in 0..queues {
            let key = state::cursor_key(&name, q);
            if stored.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let committed = if stored.is_empty() {
                start_offset(storage, &spec.topic, q, spec.start).await?
            } else {
                0
            };
            let c = Cursor {
                committed,
                ..Cursor::default()
            };
            match storage
                .put_record(&space, &key, Some(state::encode(&c)?), Expect::Absent)
                .await
            {
                Ok(_) | Err(StorageError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

impl Member {
    /// Whether `offset` of `queue` has a completion marker (its delivery is done).
    pub(super) fn is_marked(&self, queue: u32, offset: u64) -> bool {
        self.shared
            .marked
            .get(queue as usize)
            .is_some_and(|m| m.lock().is_ok_and(|m| m.contains(&offset)))
    }

    /// Notes a completion marker of `offset` of `queue` now stored, for the queue's offset
    /// writer to delete once the stored offset passes it.
    pub(super) fn note_marker(&self, queue: u32, offset: u64) {
        if let Some(m) = self.shared.marked.get(queue as usize) {
            mark(m, offset);
        }
    }

    /// Counts `n` messages retention deleted before this subscription handled them.
    pub(super) fn count_expired(&self, n: u64) {
        self.runner.counters.expired.fetch_add(n, Ordering::Relaxed);
        self.expired.inc_by(n);
    }

    /// After a read of `queue` from `from` whose first message is at `first` (`None`: nothing
    /// came back): the end of the range retention deleted from `from` on, if there is one
    /// (`first`, or the queue's low water when nothing came back), counted as expired. Messages
    /// the subscription's tag filter would have skipped count too: nobody can tell them apart
    /// any more.
    pub(super) async fn deleted_from(
        &self,
        queue: u32,
        from: u64,
        first: Option<u64>,
    ) -> Option<u64> {
        let end = match first {
            Some(o) => o,
            None => self.storage.low_water(self.topic(), queue).await.ok()?,
        };
        (end > from).then(|| {
            self.count_expired(end - from);
            end
        })
    }

    /// A sender for the queue's cursor and the task that stores it: writes coalesce (only the
    /// newest cursor is stored), and the last one is stored before the task ends. Each write
    /// names the revision this runner last saw: if another node wrote the cursor meanwhile (a
    /// reset, or a node that took the queue over after this one lost its lease) the write is
    /// refused and the runner stops, so an offset is never moved by two nodes at once.
    pub(super) fn cursor_committer(
        &self,
        queue: u32,
        initial: (Cursor, u64),
        parked: Parked,
        marked: Marked,
    ) -> (
        watch::Sender<Cursor>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (tx, mut rx) = watch::channel(initial.0);
        let mut revision = initial.1;
        let storage = self.storage.clone();
        let space = state::cursor_space(&self.group);
        let key = state::cursor_key(&self.shared.name, queue);
        let group = self.group.clone();
        let cancel = self.cancel.clone();
        let done_space = state::done_space(&self.group);
        let member = self.shared.name.clone();
        let task = async move {
            while rx.changed().await.is_ok() {
                let cursor = *rx.borrow_and_update();
                let Ok(value) = state::encode(&cursor) else {
                    break;
                };
                loop {
                    let written = storage
                        .put_record(
                            &space,
                            &key,
                            Some(value.clone()),
                            Expect::Revision(revision),
                        )
                        .await;
                    match written {
                        Ok(r) => {
                            revision = r;
                            // Completion markers the stored offset passed are not needed any
                            // more; one left behind by a crash is deleted at the next start.
                            let passed = marked.lock().map_or_else(
                                |_| BTreeSet::new(),
                                |mut m| {
                                    let keep = m.split_off(&cursor.committed);
                                    std::mem::replace(&mut *m, keep)
                                },
                            );
                            if !passed.is_empty() {
                                let deletes = passed
                                    .iter()
                                    .map(|o| RecordWrite {
                                        space: done_space.clone(),
                                        key: state::done_key(&member, queue, *o),
                                        value: None,
                                        expect: Expect::Any,
                                    })
                                    .collect();
                                if let Err(e) = storage.put_records(deletes).await {
                                    tracing::warn!(%group, error = %e, "cannot delete completion markers; the next start does");
                                }
                            }
                            release_below(&parked, cursor.committed);
                            break;
                        }
                        Err(StorageError::Closed) => return,
                        Err(StorageError::Conflict { .. }) => {
                            tracing::warn!(%group, queue, "offset moved by another node; this node stops the queue");
                            cancel.cancel();
                            return;
                        }
                        Err(e) => {
                            tracing::error!(%group, error = %e, "cannot store offset; retrying");
                            tokio::time::sleep(STORAGE_RETRY).await;
                        }
                    }
                }
            }
        };
        (tx, task)
    }

    pub(super) fn publish(&self, queue: u32, committer: &watch::Sender<Cursor>, committed: u64) {
        self.shared.committed[queue as usize].store(committed, Ordering::Relaxed);
        committer.send_if_modified(|c| {
            let next = Cursor {
                committed,
                ..Cursor::default()
            };
            let changed = *c != next;
            *c = next;
            changed
        });
    }

    pub(super) fn store_cursor(
        &self,
        queue: u32,
        committer: &watch::Sender<Cursor>,
        cursor: Cursor,
    ) {
        self.shared.head_due[queue as usize].store(cursor.head_due, Ordering::Relaxed);
        self.shared.committed[queue as usize].store(cursor.committed, Ordering::Relaxed);
        self.shared.head_attempts[queue as usize].store(cursor.head_attempts, Ordering::Relaxed);
        committer.send_replace(cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_offset_never_passes_an_unfinished_message() {
        let (mut c, mut done) = (5u64, Done::default());
        done.mark(&mut c, 7);
        done.mark(&mut c, 6);
        assert_eq!(c, 5, "5 is not done yet");
        done.mark(&mut c, 5);
        assert_eq!(c, 8);
        done.mark(&mut c, 3);
        assert_eq!(c, 8);
        assert!(done.is_empty());
    }

    #[test]
    fn a_deleted_range_is_passed_only_once_what_precedes_it_is_done() {
        let (mut c, mut done) = (5u64, Done::default());
        // 5 and 6 are in flight; 7..100 were deleted; 100 is done.
        done.mark_range(&mut c, 7, 100);
        done.mark(&mut c, 100);
        assert_eq!(c, 5);
        done.mark(&mut c, 6);
        assert_eq!(c, 5);
        done.mark(&mut c, 5);
        assert_eq!(c, 101);
        assert!(done.is_empty());
        // A range starting at or below the committed offset moves it at once.
        done.mark_range(&mut c, 90, 200);
        assert_eq!(c, 200);
        done.mark_range(&mut c, 10, 20);
        assert_eq!(c, 200);
    }

    /// Both orders of a permit's parking and the cursor writer's store release it: parked
    /// after the writer stored past its message (the runner published, the writer stored and
    /// released before the runner parked), it used to stay held, and an idle queue showed
    /// `in_flight` 1 for good.
    #[tokio::test]
    async fn a_permit_parked_after_its_offset_was_stored_is_released() {
        let sem = Arc::new(Semaphore::new(4));
        let parked = Parked::default();
        // Parked first, then stored past: released by the store.
        park(&parked, 0, sem.clone().acquire_owned().await.unwrap());
        park(&parked, 1, sem.clone().acquire_owned().await.unwrap());
        assert_eq!(sem.available_permits(), 2);
        release_below(&parked, 1);
        assert_eq!(sem.available_permits(), 3, "0 is stored, 1 is not");
        // Stored past first (offset 3 stored), then parked: released at once.
        release_below(&parked, 4);
        assert_eq!(sem.available_permits(), 4);
        park(&parked, 3, sem.clone().acquire_owned().await.unwrap());
        assert_eq!(
            sem.available_permits(),
            4,
            "3 was stored before it was parked"
        );
        // At or above the stored offset it is held; an older store does not lower the mark.
        park(&parked, 4, sem.clone().acquire_owned().await.unwrap());
        release_below(&parked, 2);
        assert_eq!(sem.available_permits(), 3);
        release_below(&parked, 5);
        assert_eq!(sem.available_permits(), 4);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Messages finish in any order; the committed offset is always exactly the length
            /// of the finished prefix, so it never passes a message still in flight.
            #[test]
            fn committed_offset_never_passes_an_unacked_message(order in Just((0u64..200).collect::<Vec<_>>()).prop_shuffle()) {
                let (mut committed, mut done) = (0u64, Done::default());
                let mut finished = vec![false; order.len()];
                for o in order {
                    done.mark(&mut committed, o);
                    finished[o as usize] = true;
                    let prefix = finished.iter().take_while(|f| **f).count() as u64;
                    prop_assert_eq!(committed, prefix);
                }
                prop_assert_eq!(committed, 200);
                prop_assert!(done.is_empty());
            }
        }
    }
}
