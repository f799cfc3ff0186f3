//! A subscription's dead-letter queue: its entries and their running count, always changed
//! together in one atomic step, so status, `/metrics` and count-based retention read one
//! record instead of every entry (issue 23: costs that do not grow with history).

use serde::{Deserialize, Serialize};

use super::pins;
use super::state::{self, DeadLetter, Timer};
use crate::storage::{Commit, Expect, RecordWrite, Storage, StorageError};

/// Where dead-letter counts live: one space per subscription ([`count_space`]), so a step's
/// lock on a backend that locks kv spaces (JetStream) is its subscription's alone. Counts
/// stored before (in this space itself, keyed by group) are no longer read: the first read
/// after an upgrade counts the entries once and stores the count in its new place;
/// [`clear`] removes both.
pub const COUNT_SPACE: &str = "dlq-count";

/// The key of the count in its space.
pub const COUNT_KEY: &str = "n";

/// The space of `group`'s dead-letter count.
pub fn count_space(group: &str) -> String {
    format!("{COUNT_SPACE}/{group}")
}

/// How many entries one step adds or removes at most (a redrive or an expiry of many entries
/// is several steps, each whole).
pub const PAGE: usize = 256;

/// The stored count.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Count {
    n: u64,
}

/// A change to one subscription's dead-letter queue, made whole or not at all, with the pins
/// of what it adds and removes ([`super::pins`]).
#[derive(Debug, Default)]
pub struct Change {
    /// Entries to add.
    pub add: Vec<DeadLetter>,
    /// Entries to remove, each with the timer written in its place in the same step (a
    /// redrive), which is left out with it if it is already gone.
    pub remove: Vec<(DeadLetter, Option<Timer>)>,
}

/// The count and the condition a write of it must carry. A subscription whose dead letters
/// were stored before the count existed has none: its entries are counted once.
async fn read(storage: &dyn Storage, group: &str) -> Result<(u64, Expect), StorageError> {
    match storage.get_record(&count_space(group), COUNT_KEY).await? {
        Some(r) => {
            let c: Count = state::decode("dead-letter count", &r)?;
            Ok((c.n, Expect::Revision(r.revision)))
        }
        None => Ok((
            state::count(storage, &state::dlq_space(group), "").await?,
            Expect::Absent,
        )),
    }
}

/// How many dead letters `group` holds: one record read. The first call on a queue stored
/// before the count existed counts its entries and stores the count.
pub async fn count(storage: &dyn Storage, group: &str) -> Result<u64, StorageError> {
    let (n, expect) = read(storage, group).await?;
    if expect == Expect::Absent && n > 0 {
        let value = state::encode(&Count { n })?;
        match storage
            .put_record(&count_space(group), COUNT_KEY, Some(value), Expect::Absent)
            .await
        {
            // Another step stored it first; its count holds.
            Ok(_) | Err(StorageError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Adds and removes entries of `group`'s dead-letter queue, writes what replaces each removed
/// one and moves the count, in one [`Storage::commit`] (see [`step`]). The count's revision is
/// its condition: a concurrent change (another worker, another node) makes this one read it
/// again and retry. An entry added that is already stored (a write retried after an unclear
/// failure, or another writer's) is left out once the step that stored it is finished
/// (its pin and count, [`Storage::finish_commits_of`]); one removed that is already gone (a
/// concurrent expiry) is left out too. Returns how many entries it removed. Known gap: a
/// step that only removes and whose answer was lost after its count was written is applied
/// again by its retry (the count then ends low by the entries removed).
///
/// Errors: the storage's, except conflicts on the count or the entries, which are retried.
pub async fn apply(
    storage: &dyn Storage,
    group: &str,
    mut change: Change,
) -> Result<u64, StorageError> {
    let space = state::dlq_space(group);
    let counted = count_space(group);
    loop {
        if change.add.is_empty() && change.remove.is_empty() {
            return Ok(0);
        }
        let (n, expect) = read(storage, group).await?;
        let removed = change.remove.len() as u64;
        match storage.commit(step(group, n, expect, &change)?).await {
            Ok(_) => return Ok(removed),
            Err(StorageError::Conflict { space: s, key }) if s == counted && key == COUNT_KEY => {}
            Err(StorageError::Conflict { space: s, key }) if s == space => {
                // An entry this change adds is stored: an earlier try of this step got past
                // its commit point (that entry) and its answer was lost, or another writer
                // stored the same dead letter. What that commit left (the entry's pin, its
                // redrive timer, the count) is finished now, as a node taking over a queue
                // does; left to recovery, the cursor moved past the message first and
                // retention (after consumed) could delete it with no pin holding it.
                if change.add.iter().any(|dl| dl.key() == key) {
                    storage.finish_commits_of(&space, &key).await?;
                }
                let before = change.add.len() + change.remove.len();
                change.add.retain(|dl| dl.key() != key);
                change.remove.retain(|(dl, _)| dl.key() != key);
                if change.add.len() + change.remove.len() == before {
                    // Not one of this change's entries: retrying would not help.
                    return Err(StorageError::Conflict { space: s, key });
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The commit of one [`apply`] step over a count of `n` read under condition `expect`: the
/// entries added (each absent before) and removed (each present), their pins and redrive
/// timers, and the count. `change` must not be empty.
///
/// The first record is the commit point on a storage without transactions (JetStream, see
/// [`Storage::commit`]): recovery finishes a dead writer's commit only when that record still
/// holds what the writer wrote, and drops it otherwise. A step that adds entries goes first
/// with its first entry, whose key is its own: with the count first, as every step rewrites
/// the count, a step whose writer died past its commit point was judged never committed as
/// soon as another step had counted, and its entries were dropped though the count had
/// counted them (a lost dead letter). Such a step's entries are now written by recovery and
/// the count may stay one short of them (a newer count is kept). A step that only removes
/// goes first with the count: an entry gone since (expired, redriven, cleared) must not make
/// recovery take it as removed by the dead step and write its redrive timer; such a step is
/// dropped instead, its entries kept, the count one short.
pub fn step(group: &str, n: u64, expect: Expect, change: &Change) -> Result<Commit, StorageError> {
    let space = state::dlq_space(group);
    let after = n
        .saturating_add(change.add.len() as u64)
        .saturating_sub(change.remove.len() as u64);
    let mut records = Vec::with_capacity(1 + 2 * change.add.len() + 4 * change.remove.len());
    for dl in &change.add {
        records.push(RecordWrite {
            space: space.clone(),
            key: dl.key(),
            value: Some(state::encode(dl)?),
            expect: Expect::Absent,
        });
        records.push(pins::of_dead_letter(group, dl, true));
    }
    for (dl, instead) in &change.remove {
        records.push(RecordWrite {
            space: space.clone(),
            key: dl.key(),
            value: None,
            expect: Expect::Present,
        });
        records.push(pins::of_dead_letter(group, dl, false));
        if let Some(t) = instead {
            records.push(pins::of_timer(group, t, true));
            records.push(RecordWrite {
                space: state::timer_space(group),
                key: t.key(),
                value: Some(state::encode(t)?),
                expect: Expect::Any,
            });
        }
    }
    let count = RecordWrite {
        space: count_space(group),
        key: COUNT_KEY.to_string(),
        value: Some(state::encode(&Count { n: after })?),
        expect,
    };
    if change.add.is_empty() {
        records.insert(0, count);
    } else {
        records.push(count);
    }
    Ok(Commit {
        checks: Vec::new(),
        records,
        appends: Vec::new(),
    })
}

/// Removes `group`'s dead letters and their count (the subscription is deleted).
pub async fn clear(storage: &dyn Storage, group: &str) -> Result<(), StorageError> {
    state::clear(storage, &state::dlq_space(group), "").await?;
    storage
        .put_records(vec![
            RecordWrite {
                space: count_space(group),
                key: COUNT_KEY.to_string(),
                value: None,
                expect: Expect::Any,
            },
            // Where a count stored before the per-subscription spaces lies.
            RecordWrite {
                space: COUNT_SPACE.to_string(),
                key: group.to_string(),
                value: None,
                expect: Expect::Any,
            },
        ])
        .await
}
