//! Decided transactions: moved out of the undecided space into their outcome's space, counted
//! in a durable tally, and deleted by `[retention] transactions_*` — so start-up, counts and
//! listings never read the decided history.
//!
//! One mover at a time (the node alone on its storage, or the check-back lease holder) does
//! both, a transaction at a time, in steps that a crash can stop anywhere: (1) the record is
//! written to its outcome's space, (2) the tally counts it and names it as `moved`, (3) it
//! leaves the undecided space. A mover finding the undecided record of the transaction the
//! tally names finishes (3) without counting again. Retention does the same with `expired`:
//! (1) the tally uncounts it and names it, (2) the record goes.

use super::*;
use crate::storage::Storage;

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

/// How many decided transactions each outcome's space holds, and the last transaction each
/// step counted (so a repeated step does not count twice).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Tally {
    pub committed: u64,
    pub rolled_back: u64,
    /// The last transaction counted into its outcome's space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved: Option<String>,
    /// The last transaction retention counted out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<String>,
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
            if let Err(e) = self.move_decided().await {
                tracing::warn!(error = %e, "cannot move decided transactions");
            }
            if let Err(e) = self.expire_decided(now_ms()).await {
                tracing::warn!(error = %e, "cannot apply the retention of decided transactions");
            }
            tokio::select! {
                _ = self.moved.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Moves every queued decided transaction to its outcome's space; returns how many moved.
    pub(super) async fn move_decided(&self) -> Result<usize, TxnError> {
        // A move the last mover stopped between counting and leaving is finished first, before
        // the tally names another.
        let (tally, _) = Tally::load(self.broker.storage().as_ref()).await?;
        if let Some(id) = tally.moved {
            self.move_one(&id, StopAfter::Nothing).await?;
        }
        let mut n = 0;
        loop {
            let next = self.to_move.lock().ok().and_then(|mut q| q.pop_first());
            let Some(id) = next else {
                return Ok(n);
            };
            match self.move_one(&id, StopAfter::Nothing).await {
                Ok(moved) => n += usize::from(moved),
                Err(e) => {
                    if let Ok(mut q) = self.to_move.lock() {
                        q.insert(id);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Moves one decided transaction out of the undecided space; `false` if it is not there or
    /// not decided.
    pub(super) async fn move_one(&self, id: &str, stop: StopAfter) -> Result<bool, TxnError> {
        let storage = self.broker.storage();
        let Some(r) = storage.get_record(TXN_SPACE, id).await? else {
            return Ok(false);
        };
        let t = decode(id, &r.value)?;
        let Some(space) = space_of(t.state) else {
            return Ok(false);
        };
        storage
            .put_record(space, id, Some(r.value.clone()), Expect::Any)
            .await?;
        let tally = Tally::update(storage.as_ref(), |tally| {
            if tally.moved.as_deref() != Some(id) {
                let n = tally.count_mut(t.state);
                *n = n.saturating_add(1);
                tally.moved = Some(id.to_string());
            }
        })
        .await?;
        if stop == StopAfter::Counting {
            return Ok(false);
        }
        match storage
            .put_record(TXN_SPACE, id, None, Expect::Revision(r.revision))
            .await
        {
            // Another mover (a lease holder that just lost its lease) finished it.
            Ok(_) | Err(StorageError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(mut index) = self.index() {
            index.remove(id);
            index.decided = tally;
        }
        Ok(true)
    }

    /// Deletes decided transactions past `[retention] transactions_max_age_ms` (counted from
    /// the decision) or beyond `transactions_max_count` per outcome, oldest first; returns how
    /// many went. A transaction decided late keeps those begun after it until it goes too.
    pub(super) async fn expire_decided(&self, now: u64) -> Result<usize, TxnError> {
        let storage = self.broker.storage();
        let (mut tally, _) = Tally::load(storage.as_ref()).await?;
        let mut n = 0;
        for (state, space) in OUTCOMES {
            'pages: loop {
                let page = storage.list_records(space, "", PAGE).await?;
                if page.is_empty() {
                    break;
                }
                for (id, r) in page {
                    let t = decode(&id, &r.value)?;
                    let decided_at = t.history.last().map_or(t.created_at, |e| e.at);
                    let too_old = decided_at
                        .checked_add(self.retention.max_age_ms)
                        .is_some_and(|until| until <= now);
                    let counted_out = tally.expired.as_deref() == Some(id.as_str());
                    let too_many = *tally.count_mut(state) > self.retention.max_count;
                    if !(too_old || too_many || counted_out) {
                        break 'pages;
                    }
                    if !counted_out {
                        tally = Tally::update(storage.as_ref(), |tally| {
                            let c = tally.count_mut(state);
                            *c = c.saturating_sub(1);
                            tally.expired = Some(id.clone());
                        })
                        .await?;
                    }
                    storage.put_record(space, &id, None, Expect::Any).await?;
                    if let Some(mut index) = self.index() {
                        index.decided = tally.clone();
                    }
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}
