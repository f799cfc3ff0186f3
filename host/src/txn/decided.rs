//! Decided transactions: moved out of the undecided space into their outcome's space, counted
//! in a durable tally, and deleted by `[retention] transactions_*` — so start-up, counts and
//! listings never read the decided history.
//!
//! One mover at a time (the node alone on its storage, or the check-back lease holder) does
//! both, a batch at a time, in steps that a crash can stop anywhere: (1) the records are
//! written to their outcome's space, (2) the tally counts them and names them as `moved`, (3)
//! they leave the undecided space. A mover finds the batch the tally names first and finishes
//! (3) without counting again. Retention does the same with `expired`: (1) the tally uncounts
//! a batch and names it, (2) the records go.

use super::*;

/// Committed transactions, by id (oldest first).
pub(super) const COMMITTED_SPACE: &str = "txn-committed";
/// Rolled-back transactions, by id.
pub(super) const ROLLED_BACK_SPACE: &str = "txn-rolled-back";
/// Where decided transactions live, in lookup order.
pub(super) const SPACES: [&str; 2] = [COMMITTED_SPACE, ROLLED_BACK_SPACE];
/// Each outcome and its space.
pub(super) const OUTCOMES: [(TxnState, &str); 2] = [
    (TxnState::Committed, COMMITTED_SPACE),
    (TxnState::RolledBack, ROLLED_BACK_SPACE),
];
/// The tally's record.
const TALLY_SPACE: &str = "txn-tally";
const TALLY_KEY: &str = "decided";
/// Decided transactions retention looks at per storage read.
const PAGE: usize = 256;

/// The space a transaction in `state` moves to; `None` while undecided.
pub(super) fn space_of(state: TxnState) -> Option<&'static str> {
    OUTCOMES
        .iter()
        .find(|(s, _)| *s == state)
        .map(|(_, sp)| *sp)
}

/// A write asked of a transaction that already moved on: only decided ones move, and those
/// are never written again, so this is a fault.
pub(super) fn moved_undecided(id: &str) -> TxnError {
    StorageError::Corrupt(format!(
        "transaction {id} left the undecided space but reads as undecided"
    ))
    .into()
}

/// How many decided transactions each outcome's space holds, and the transactions the last
/// step of each kind counted (so a repeated step does not count them twice).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Tally {
    pub committed: u64,
    pub rolled_back: u64,
    /// The last batch counted into its outcome's spaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<String>,
    /// The last batch retention counted out: (space, id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expired: Vec<(String, String)>,
}

impl Tally {
    /// The stored tally and its revision (`None`: never written).
    pub(super) async fn load(storage: &dyn Storage) -> Result<(Self, Option<u64>), TxnError> {
        match storage.get_record(TALLY_SPACE, TALLY_KEY).await? {
            Some(r) => Ok((
                serde_json::from_slice(&r.value)
                    .map_err(|e| StorageError::Corrupt(format!("transaction tally: {e}")))?,
                Some(r.revision),
            )),
            None => Ok((Self::default(), None)),
        }
    }

    fn count_mut(&mut self, state: TxnState) -> &mut u64 {
        if state == TxnState::Committed {
            &mut self.committed
        } else {
            &mut self.rolled_back
        }
    }

    /// Applies `f` under compare-and-set; returns the stored tally.
    async fn update(storage: &dyn Storage, f: impl Fn(&mut Tally)) -> Result<Tally, TxnError> {
        loop {
            let (mut tally, rev) = Self::load(storage).await?;
            f(&mut tally);
            let value =
                serde_json::to_vec(&tally).map_err(|e| StorageError::Encode(e.to_string()))?;
            let expect = rev.map_or(Expect::Absent, Expect::Revision);
            match storage
                .put_record(TALLY_SPACE, TALLY_KEY, Some(value), expect)
                .await
            {
                Ok(_) => return Ok(tally),
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Where a crash test stops a move (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopAfter {
    Nothing,
    Counting,
}

impl Transactions {
    /// Moves and expires decided transactions until `cancel`: moves as soon as decisions are
    /// queued, applies retention every second.
    pub(super) async fn keep_decided(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            match self.move_decided(&cancel).await {
                // Retention waits for the moves: one half done leaves a transaction in its
                // outcome's space that the tally does not count yet.
                Ok(_) => {
                    if let Err(e) = self.expire_decided(now_ms(), &cancel).await {
                        tracing::warn!(error = %e, "cannot apply the retention of decided transactions");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot move decided transactions"),
            }
            tokio::select! {
                _ = self.moved.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Moves every queued decided transaction to its outcome's space, a batch at a time;
    /// returns how many moved.
    pub(super) async fn move_decided(&self, cancel: &CancellationToken) -> Result<usize, TxnError> {
        // A batch the last mover stopped between counting and leaving is finished first,
        // before the tally names another.
        let (tally, _) = Tally::load(self.broker.storage().as_ref()).await?;
        if !tally.moved.is_empty() {
            self.move_batch(tally.moved, StopAfter::Nothing).await?;
        }
        let mut n = 0;
        // Checked between batches: a node that lost the check-back lease stops before the
        // next holder starts (it waits for the lease to expire).
        while !cancel.is_cancelled() {
            let batch: Vec<String> = match self.to_move.lock() {
                Ok(mut q) => std::iter::from_fn(|| q.pop_first()).take(PAGE).collect(),
                Err(_) => Vec::new(),
            };
            if batch.is_empty() {
                return Ok(n);
            }
            match self.move_batch(batch.clone(), StopAfter::Nothing).await {
                Ok(moved) => n += moved,
                Err(e) => {
                    if let Ok(mut q) = self.to_move.lock() {
                        q.extend(batch);
                    }
                    return Err(e);
                }
            }
        }
        Ok(n)
    }

    /// Moves decided transactions out of the undecided space (those not there or not decided
    /// are skipped); returns how many moved. The writes of each step go out together, so they
    /// share group commits.
    pub(super) async fn move_batch(
        &self,
        ids: Vec<String>,
        stop: StopAfter,
    ) -> Result<usize, TxnError> {
        use futures::future::try_join_all;
        let storage = self.broker.storage();
        let found = try_join_all(ids.iter().map(|id| storage.get_record(TXN_SPACE, id))).await?;
        let mut batch = Vec::new();
        for (id, r) in ids.into_iter().zip(found) {
            let Some(r) = r else { continue };
            let state = decode(&id, &r.value)?.state;
            if let Some(space) = space_of(state) {
                batch.push((id, r, state, space));
            }
        }
        // A decided transaction's record is the commit point of what its decision stored with
        // it: a commit's half message append, a checker's kv writes and publishes (with a
        // commit or a rollback). On a backend that commits in steps (JetStream), a writer that
        // died past that point, or whose answer was lost, left the rest to recovery, which
        // finishes it only while the record is still here to compare with (and only once it
        // is `recovery_age` old). So a transaction whose decision is unfinished stays until it
        // is finished; the next pass (reload, every heartbeat on shared storage) finds it
        // again. Rolled-back ones were moved without this look, and a checker's rollback whose
        // answer was lost lost its kv writes. The records were read first: each one read as
        // decided was written after its decision's intent, so the listing sees that.
        if batch.is_empty() {
            return Ok(0);
        }
        let unfinished = storage.unfinished_commits(TXN_SPACE).await?;
        batch.retain(|(id, ..)| !unfinished.contains(id));
        if batch.is_empty() {
            return Ok(0);
        }
        try_join_all(batch.iter().map(|(id, r, _, space)| {
            storage.put_record(space, id, Some(r.value.clone()), Expect::Any)
        }))
        .await?;
        Tally::update(storage.as_ref(), |tally| {
            for (id, _, state, _) in &batch {
                if !tally.moved.contains(id) {
                    let n = tally.count_mut(*state);
                    *n = n.saturating_add(1);
                }
            }
            tally.moved = batch.iter().map(|(id, ..)| id.clone()).collect();
        })
        .await?;
        if stop == StopAfter::Counting {
            return Ok(0);
        }
        try_join_all(batch.iter().map(|(id, r, ..)| async move {
            match storage
                .put_record(TXN_SPACE, id, None, Expect::Revision(r.revision))
                .await
            {
                // Another mover (a lease holder that just lost its lease) finished it.
                Ok(_) | Err(StorageError::Conflict { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        }))
        .await?;
        // Done: the batch need not be named any more (a crash before this finds nothing left
        // to move in it).
        let tally = Tally::update(storage.as_ref(), |tally| tally.moved.clear()).await?;
        if let Some(mut index) = self.index() {
            for (id, ..) in &batch {
                index.remove(id);
            }
            index.decided = tally;
        }
        Ok(batch.len())
    }

    /// Deletes decided transactions past `[retention] transactions_max_age_ms` (counted from
    /// the decision) or beyond `transactions_max_count` per outcome, oldest first, a page at a
    /// time; returns how many went. A transaction decided late keeps those begun after it
    /// until it goes too.
    pub(super) async fn expire_decided(
        &self,
        now: u64,
        cancel: &CancellationToken,
    ) -> Result<usize, TxnError> {
        use futures::future::try_join_all;
        let storage = self.broker.storage();
        let (mut tally, _) = Tally::load(storage.as_ref()).await?;
        // A page the last pass counted out but did not delete.
        try_join_all(
            tally
                .expired
                .iter()
                .map(|(space, id)| storage.put_record(space, id, None, Expect::Any)),
        )
        .await?;
        if !tally.expired.is_empty() {
            tally = Tally::update(storage.as_ref(), |tally| tally.expired.clear()).await?;
        }
        let mut n = 0;
        for (state, space) in OUTCOMES {
            while !cancel.is_cancelled() {
                let page = storage.list_records(space, "", PAGE).await?;
                let mut count = *tally.count_mut(state);
                let mut expired = Vec::new();
                for (id, r) in &page {
                    let t = decode(id, &r.value)?;
                    let decided_at = t.history.last().map_or(t.created_at, |e| e.at);
                    let too_old = decided_at
                        .checked_add(self.retention.max_age_ms)
                        .is_some_and(|until| until <= now);
                    if !(too_old || count > self.retention.max_count) {
                        break;
                    }
                    count = count.saturating_sub(1);
                    expired.push((space.to_string(), id.clone()));
                }
                if expired.is_empty() {
                    break;
                }
                let gone = expired.len() as u64;
                Tally::update(storage.as_ref(), |tally| {
                    let c = tally.count_mut(state);
                    *c = c.saturating_sub(gone);
                    tally.expired = expired.clone();
                })
                .await?;
                try_join_all(
                    expired
                        .iter()
                        .map(|(space, id)| storage.put_record(space, id, None, Expect::Any)),
                )
                .await?;
                tally = Tally::update(storage.as_ref(), |tally| tally.expired.clear()).await?;
                if let Some(mut index) = self.index() {
                    index.decided = tally.clone();
                }
                n += expired.len();
            }
        }
        Ok(n)
    }
}
