//! The unordered loop of one queue: many messages in flight, a failing one goes to a retry timer.

use super::*;

impl Member {
    /// Unordered: many messages of the queue in flight; a failing one goes to a retry timer.
    pub(super) async fn run_unordered(
        self: Arc<Self>,
        queue: u32,
        start: Cursor,
        committer: watch::Sender<Cursor>,
        parked: Parked,
    ) {
        let mut watch = self.storage.watch(self.topic());
        let mut committed = start.committed;
        let mut done = Done::default();
        let mut fetch = committed;
        let mut buffer: std::collections::VecDeque<Arc<StoredMessage>> = Default::default();
        let mut pending = FuturesUnordered::new();
        let mut stopping = false;
        let per_queue_cap = self.spec.max_in_flight as usize;
        let mut high_water = fetch;
        // The last read returned nothing below the high water (see `read_again`).
        let mut short_read = false;
        let recheck_every = self.storage.recheck_idle();
        loop {
            watch.borrow_and_update();
            // Asked only when the buffer ran dry: on a networked backend it is a round trip.
            if buffer.is_empty() && !stopping {
                high_water = self
                    .storage
                    .high_water(self.topic(), queue)
                    .await
                    .unwrap_or(fetch);
            }
            if buffer.is_empty() && fetch < high_water && !stopping {
                match self
                    .storage
                    .read(self.topic(), queue, fetch, READ_BATCH)
                    .await
                {
                    Ok(batch) => {
                        // Retention deleted what lay between: nothing of it is left to deliver.
                        let first = batch.first().map(|m| m.offset);
                        if let Some(end) = self.deleted_from(queue, fetch, first).await {
                            done.mark_range(&mut committed, fetch, end);
                            fetch = end;
                        }
                        if let Some(last) = batch.last() {
                            fetch = last.offset + 1;
                        }
                        short_read = batch.is_empty() && fetch < high_water;
                        buffer.extend(batch.into_iter().map(Arc::new));
                    }
                    Err(e) => {
                        tracing::error!(group = %self.group, error = %e, "read failed");
                        tokio::time::sleep(STORAGE_RETRY).await;
                        continue;
                    }
                }
            }
            // Messages that need no delivery are done at once.
            let mut finished = Vec::new();
            while let Some(m) = buffer.front() {
                // Completed (with its effects) before a restart, the offset not yet stored.
                if !self.filter.matches(m.message.tag.as_deref()) || self.is_marked(queue, m.offset)
                {
                    finished.push(m.offset);
                } else if m.message.deliver_at > now_ms() {
                    self.add_timer(self.delay_timer(m)).await;
                    finished.push(m.offset);
                } else {
                    break;
                }
                buffer.pop_front();
            }
            for o in finished {
                done.mark(&mut committed, o);
            }
            self.publish(queue, &committer, committed);
            let want = !stopping && !buffer.is_empty() && pending.len() < per_queue_cap;
            let idle = !stopping && buffer.is_empty() && fetch >= high_water;
            // Nothing buffered below the high water: every message read needed no delivery
            // (filtered out, delayed), so read on at once; or the read came back short.
            let behind = !stopping && buffer.is_empty() && fetch < high_water;
            // Cancellation is seen first: the other branches may be ready all the time.
            tokio::select! {
                biased;
                () = self.cancel.cancelled(), if !stopping => { stopping = true; }
                Some((m, attempt, handled, permit)) = pending.next() => {
                    let m: Arc<StoredMessage> = m;
                    let permit: OwnedSemaphorePermit = permit;
                    let handled: Option<Handled> = handled;
                    match handled {
                        Some((result, staged, call)) => {
                            match self.commit_effects(&result, staged, &m, None).await {
                                // Delivered again as the same attempt, its permit kept.
                                Effects::Rerun => {
                                    self.trace(&m, attempt, &call, &result, "rerun", None);
                                    match self.dispatch(m.clone(), attempt).await {
                                        Some(rx) => pending.push(answer(m, attempt, rx, permit)),
                                        None => {
                                            buffer.push_front(m);
                                            stopping = true;
                                        }
                                    }
                                }
                                Effects::Stopped => buffer.push_front(m),
                                Effects::Committed | Effects::AlreadyDone | Effects::Discarded => {
                                    self.settle(&result, attempt, &m, false, &call).await;
                                    done.mark(&mut committed, m.offset);
                                    park(&parked, m.offset, permit);
                                    self.publish(queue, &committer, committed);
                                }
                            }
                        }
                        // Dropped unstarted by a stopping worker: not done, delivered later.
                        None => buffer.push_front(m),
                    }
                }
                permit = self.runner.in_flight.clone().acquire_owned(), if want => {
                    let Ok(permit) = permit else { break };
                    if let Some(m) = buffer.pop_front() {
                        match self.dispatch(m.clone(), 1).await {
                            Some(rx) => pending.push(answer(m, 1, rx, permit)),
                            None => {
                                buffer.push_front(m);
                                stopping = true;
                            }
                        }
                    }
                }
                changed = watch.changed(), if idle => {
                    if changed.is_err() { stopping = true; }
                }
                () = read_again(short_read), if behind => {}
                () = recheck(recheck_every), if idle => {}
                else => break,
            }
            if stopping && pending.is_empty() {
                break;
            }
        }
    }
}

/// Waits for a dispatched message's answer (`None`: dropped unstarted by a stopping worker);
/// one function, so every pending delivery is the same future type.
async fn answer(
    m: Arc<StoredMessage>,
    attempt: u32,
    rx: oneshot::Receiver<Handled>,
    permit: OwnedSemaphorePermit,
) -> (
    Arc<StoredMessage>,
    u32,
    Option<Handled>,
    OwnedSemaphorePermit,
) {
    (m, attempt, rx.await.ok(), permit)
}
