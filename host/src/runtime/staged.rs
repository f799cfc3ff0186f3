//! What one plugin call wrote to kv and published, held back until its delivery is done
//! (issue 24): committed with the delivery's completion in one atomic storage step on `ack`,
//! discarded on `retry`, `reject`, a trap, a timeout or a memory overrun.

use std::collections::{BTreeMap, BTreeSet};

use crate::storage::{Commit, Expect, NewMessage, RecordCheck, RecordWrite, StorageError};

/// A kv key as stored: (space, stored key).
pub type KvKey = (String, String);

/// A call's staged effects. Reads inside the call see its own staged writes.
#[derive(Debug, Default, Clone)]
pub struct Staged {
    /// kv writes, the last per key: `Some(value)`, or `None` for a delete.
    pub writes: BTreeMap<KvKey, Option<Vec<u8>>>,
    /// The revision each key had in storage when the call first looked at it (0: absent).
    pub seen: BTreeMap<KvKey, u64>,
    /// Keys the call read from storage: the commit holds only if they are still at the
    /// revision seen (a blind write checks nothing).
    pub read: BTreeSet<KvKey>,
    /// Messages published, with their topic, in call order (ids already given out).
    pub publishes: Vec<(String, NewMessage)>,
    /// kv bytes reserved against the namespace cap, in call order: (space, old, new).
    pub reserved: Vec<(String, u64, u64)>,
}

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The delivery was already completed (another run committed it before a crash or a
    /// lease change): its effects are in storage once; this run's are dropped.
    #[error("the delivery was already completed")]
    AlreadyDone,
    /// A kv key the call read changed under it: run the delivery again (not an attempt).
    #[error("kv key {space}/{key} changed during the call")]
    Conflict { space: String, key: String },
    /// Storage failed; nothing was written. Try the commit again.
    #[error(transparent)]
    Storage(StorageError),
}

impl Staged {
    /// Whether the call wrote and published nothing (its completion needs no commit).
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.publishes.is_empty()
    }

    /// The value `key` has for the call: its own staged write if it made one, else `None`
    /// (look in storage).
    pub fn staged_value(&self, key: &KvKey) -> Option<Option<&[u8]>> {
        self.writes.get(key).map(|v| v.as_deref())
    }

    /// Notes what storage held for `key` when the call first looked (`read`: the call's
    /// result depends on it).
    pub fn saw(&mut self, key: &KvKey, revision: u64, read: bool) {
        self.seen.entry(key.clone()).or_insert(revision);
        if read {
            self.read.insert(key.clone());
        }
    }

    /// Drops the effects, giving back the kv bytes they reserved (latest first).
    pub async fn discard(self, services: &dyn super::Services) {
        for (space, old, new) in self.reserved.into_iter().rev() {
            // Undoing a delete grows the namespace again; refused past the cap, it stays
            // counted low until the next start recounts.
            let _ = services.reserve_kv(&space, new, old).await;
        }
    }

    /// The storage step that makes these effects durable together with `completion` (record
    /// writes that mark the delivery done; the first is the commit point).
    pub fn to_commit(&self, completion: Vec<RecordWrite>) -> Commit {
        let expect_seen = |key: &KvKey| match self.seen.get(key).copied() {
            Some(0) | None => Expect::Absent,
            Some(r) => Expect::Revision(r),
        };
        let checks = self
            .read
            .iter()
            .filter(|k| !self.writes.contains_key(*k))
            .map(|k| RecordCheck {
                space: k.0.clone(),
                key: k.1.clone(),
                expect: expect_seen(k),
            })
            .collect();
        let mut records = completion;
        for (k, value) in &self.writes {
            records.push(RecordWrite {
                space: k.0.clone(),
                key: k.1.clone(),
                value: value.clone(),
                expect: if self.read.contains(k) {
                    expect_seen(k)
                } else {
                    Expect::Any
                },
            });
        }
        let mut appends: Vec<(String, Vec<NewMessage>)> = Vec::new();
        for (topic, m) in &self.publishes {
            match appends.iter_mut().find(|(t, _)| t == topic) {
                Some((_, list)) => list.push(m.clone()),
                None => appends.push((topic.clone(), vec![m.clone()])),
            }
        }
        Commit {
            checks,
            records,
            appends,
        }
    }

    /// Sorts a storage conflict: on one of the `completion` records it means the delivery is
    /// already done; on anything else, a kv key changed.
    pub fn classify(completion: &[RecordWrite], e: StorageError) -> CommitError {
        match e {
            StorageError::Conflict { space, key } => {
                if completion.iter().any(|c| c.space == space && c.key == key) {
                    CommitError::AlreadyDone
                } else {
                    CommitError::Conflict { space, key }
                }
            }
            other => CommitError::Storage(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(key: &str) -> KvKey {
        ("kvsub/g".to_string(), key.to_string())
    }

    #[test]
    fn a_commit_checks_what_the_call_read_and_writes_what_it_staged() {
        let mut s = Staged::default();
        // Read and written: conditional on the revision read.
        s.saw(&k("counter"), 7, true);
        s.writes.insert(k("counter"), Some(b"8".to_vec()));
        // Read only: checked, not written.
        s.saw(&k("config"), 3, true);
        // Read while absent, then written: must still be absent.
        s.saw(&k("new"), 0, true);
        s.writes.insert(k("new"), Some(b"x".to_vec()));
        // Written blind: no condition.
        s.saw(&k("blind"), 5, false);
        s.writes.insert(k("blind"), None);
        let marker = RecordWrite {
            space: "done/g".into(),
            key: "all/0/1".into(),
            value: Some(Vec::new()),
            expect: Expect::Absent,
        };
        let c = s.to_commit(vec![marker.clone()]);
        assert_eq!(c.records[0], marker, "the completion is the commit point");
        let expect = |key: &str| {
            c.records
                .iter()
                .find(|r| r.key == key)
                .map(|r| r.expect)
                .unwrap()
        };
        assert_eq!(expect("counter"), Expect::Revision(7));
        assert_eq!(expect("new"), Expect::Absent);
        assert_eq!(expect("blind"), Expect::Any);
        assert_eq!(
            c.checks,
            vec![RecordCheck {
                space: "kvsub/g".into(),
                key: "config".into(),
                expect: Expect::Revision(3)
            }]
        );
        let conflict = |space: &str, key: &str| StorageError::Conflict {
            space: space.into(),
            key: key.into(),
        };
        assert!(matches!(
            Staged::classify(std::slice::from_ref(&marker), conflict("done/g", "all/0/1")),
            CommitError::AlreadyDone
        ));
        assert!(matches!(
            Staged::classify(&[marker], conflict("kvsub/g", "counter")),
            CommitError::Conflict { .. }
        ));
    }
}
