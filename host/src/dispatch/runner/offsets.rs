//! Offset tracking: which handled messages let a queue's committed offset advance, the cursor
//! writes that store it (fenced by revision), where a member starts, and in-flight permits
//! parked until the stored offset passes their message.

use super::*;

/// In-flight permits of handled messages whose offset is not stored yet, by offset. A permit
/// is released only once the stored offset passes its message, so the messages a crash can
/// deliver twice never outnumber `max_in_flight`.
pub(super) type Parked = Arc<std::sync::Mutex<BTreeMap<u64, OwnedSemaphorePermit>>>;

pub(super) fn park(parked: &Parked, offset: u64, permit: OwnedSemaphorePermit) {
    if let Ok(mut p) = parked.lock() {
        p.insert(offset, permit);
    }
}

pub(super) fn mark_done(committed: &mut u64, done: &mut BTreeSet<u64>, offset: u64) {
    if offset < *committed {
        return;
    }
    done.insert(offset);
    while done.remove(committed) {
        *committed += 1;
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
    let (mut lo, mut hi) = (0u64, storage.high_water(topic, queue).await?);
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
        Start::Earliest => 0,
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
        let task = async move {
            while rx.changed().await.is_ok() {
                let cursor = *rx.borrow_and_update();
                let Ok(value) = state::encode(&cursor) else {
                    break;
                };
                loop {
                    match storage
                        .put_record(
                            &space,
                            &key,
                            Some(value.clone()),
                            Expect::Revision(revision),
                        )
                        .await
                    {
                        Ok(r) => {
                            revision = r;
                            if let Ok(mut p) = parked.lock() {
                                let keep = p.split_off(&cursor.committed);
                                *p = keep;
                            }
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
        let (mut c, mut done) = (5u64, BTreeSet::new());
        mark_done(&mut c, &mut done, 7);
        mark_done(&mut c, &mut done, 6);
        assert_eq!(c, 5, "5 is not done yet");
        mark_done(&mut c, &mut done, 5);
        assert_eq!(c, 8);
        mark_done(&mut c, &mut done, 3);
        assert_eq!((c, done.len()), (8, 0));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Messages finish in any order; the committed offset is always exactly the length
            /// of the finished prefix, so it never passes a message still in flight.
            #[test]
            fn committed_offset_never_passes_an_unacked_message(order in Just((0u64..200).collect::<Vec<_>>()).prop_shuffle()) {
                let (mut committed, mut done) = (0u64, BTreeSet::new());
                let mut finished = vec![false; order.len()];
                for o in order {
                    mark_done(&mut committed, &mut done, o);
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
