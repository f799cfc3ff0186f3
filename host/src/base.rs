//! The bottom layer every other module may use: the clock, the name rule for topics, groups and
//! plugins, the time bounds every layer checks against (delays, check-backs), hex, and when a
//! housekeeping pass next has work in a place ([`NextDue`]).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
/// The longest age any retention accepts (topics, decided transactions): 100 years in ms, so
/// time sums stay far from overflow.
pub const MAX_RETENTION_AGE_MS: u64 = 100 * 365 * 86_400_000;
/// The most entries a count-bounded retention accepts.
pub const MAX_RETENTION_COUNT: u64 = 1_000_000_000;

/// The longest a message may be delayed: 30 days.
pub const MAX_DELAY_MS: u64 = 30 * 24 * 3600 * 1000;
/// The longest a transaction waits for its first check-back or between two (30 days, as a
/// delay): `check_after_ms` and `check_interval_ms` past it are refused with a 400.
pub const MAX_CHECK_MS: u64 = MAX_DELAY_MS;
/// The most check-backs a transaction may ask for before it is parked as unresolved.
pub const MAX_CHECKS: u32 = 10_000;
/// The longest topic, group or plugin name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Turns transparent huge pages off for this process (Linux `prctl(PR_SET_THP_DISABLE)`, kept
/// by child processes); the broker calls it first thing. mimalloc asks the kernel for huge
/// pages for its arenas (and a kernel whose THP mode is `always` gives them unasked), so each
/// first touch of a 2 MiB region, also after mimalloc gave it back, zeroed all 2 MiB: in the
/// dispatch bench's 1 000 topics with a subscription each, page zeroing under mimalloc's page
/// faults was 14% of the CPU. Off: 71 000-82 000 -> 98 000-102 000 msgs/s there; the peers
/// bench's publish and end-to-end rows did not move beyond their noise. mimalloc's own switch
/// (`MIMALLOC_ALLOW_THP=0`) is read before `main` runs, so a variable set from here is too
/// late, and its `no_thp` build feature only stops asking, which a kernel in `always` mode
/// ignores. Elsewhere, or if the call fails, nothing changes: it is a speed matter only.
pub fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of this
        // process; it changes only how the kernel backs later page faults.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// Lower-case hex of `bytes` (digests in ids and keys).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the Unix epoch by the wall clock (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Topic, consumer group and plugin names: 1–128 of `A-Z a-z 0-9 . _ -`, not starting with
/// `.` (they appear in URLs and storage keys as they are). The error quotes the name and says
/// the rule.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || name.starts_with('.') {
        return Err(format!(
            "{name:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with '.'"
        ));
    }
    Ok(())
}

/// Transaction check-back timings (any unset one falls back to the next level).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct TxnTimings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_CHECK_MS))]
    pub check_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_CHECK_MS))]
    pub check_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_CHECKS))]
    pub max_checks: Option<u32>,
}

impl TxnTimings {
    /// Every duration at most [`MAX_CHECK_MS`], `check_interval_ms` and `max_checks` positive,
    /// `max_checks` at most [`MAX_CHECKS`]; the error names the field and its bound.
    pub fn validate(&self) -> Result<(), String> {
        for (field, v) in [
            ("check_after_ms", self.check_after_ms),
            ("check_interval_ms", self.check_interval_ms),
        ] {
            if v.is_some_and(|v| v > MAX_CHECK_MS) {
                return Err(format!(
                    "transactions.{field} is at most {MAX_CHECK_MS} ms (30 days)"
                ));
            }
        }
        if self.check_interval_ms == Some(0) {
            return Err("transactions.check_interval_ms must be positive".into());
        }
        if self.max_checks.is_some_and(|n| n == 0 || n > MAX_CHECKS) {
            return Err(format!(
                "transactions.max_checks is between 1 and {MAX_CHECKS}"
            ));
        }
        Ok(())
    }
}

/// On storage other nodes share, how long [`NextDue`] trusts a learned time (ms): an entry
/// another node added expires at most this much later than its time.
pub const SHARED_TRUST_MS: u64 = 60_000;

/// When a periodic housekeeping pass (the retention pass) next has work in each of its places
/// (a topic's idempotency keys, a subscription's dead letters), as the pass learned from what
/// it read there last: the oldest entry's expiry time, or nothing left. A pass skips a place
/// until that time, so a pass over many idle topics and subscriptions reads nothing per place
/// (the many-topics profile of issue 25: an idle server with 1 000 topics and subscriptions
/// spent a fifth of a core on reads that found nothing to do).
///
/// A place not learned yet, or written by this process while a visit read it, is due. Writes
/// that add an entry call [`NextDue::added`] once the entry is stored. On storage shared
/// with other nodes their writes are not seen here, so a learned time is trusted for at most
/// `trust_ms` (then the place is visited again), which bounds how late their entries expire.
#[derive(Debug, Default)]
pub struct NextDue {
    trust_ms: Option<u64>,
    places: Mutex<HashMap<String, Place>>,
}

#[derive(Debug, Default)]
struct Place {
    /// `Some(None)`: nothing left to expire; `Some(Some(t))`: the oldest entry expires at `t`
    /// (ms since the epoch); `None`: not known (due).
    next: Option<Option<u64>>,
    /// When `next` was learned (ms since the epoch).
    learned_at: u64,
    /// Bumped by each write, so a visit that read before it does not store what it learned.
    writes: u64,
}

/// A visit to a due place, handed back with what it learned ([`NextDue::learned`]).
#[derive(Debug, Clone, Copy)]
pub struct Visit {
    writes: u64,
}

impl NextDue {
    /// Times trusted until a write of this process changes them (`None`: one process sees
    /// every write), or at most `trust_ms` ms after they were learned.
    pub fn new(trust_ms: Option<u64>) -> Self {
        Self {
            trust_ms,
            places: Mutex::default(),
        }
    }

    /// For places on a storage that other nodes share (`shared`) or not: shared, a time is
    /// trusted [`SHARED_TRUST_MS`].
    pub fn for_storage(shared: bool) -> Self {
        Self::new(shared.then_some(SHARED_TRUST_MS))
    }

    fn places(&self) -> std::sync::MutexGuard<'_, HashMap<String, Place>> {
        self.places.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Some` if `place` may have work at `now` (ms since the epoch): never visited, its oldest
    /// entry expired, written to since, or its time no longer trusted. `None`: skip it.
    pub fn visit(&self, place: &str, now: u64) -> Option<Visit> {
        let mut places = self.places();
        let p = places.entry(place.to_string()).or_default();
        let trusted = self
            .trust_ms
            .is_none_or(|t| now.saturating_sub(p.learned_at) < t);
        let waiting = match p.next {
            Some(None) => true,
            Some(Some(at)) => at > now,
            None => false,
        };
        (!(trusted && waiting)).then_some(Visit { writes: p.writes })
    }

    /// What `visit` read at `now`: the oldest entry left expires at `next` (`None`: none is
    /// left). Dropped when a write came in meanwhile: the place stays due.
    pub fn learned(&self, place: &str, visit: Visit, next: Option<u64>, now: u64) {
        if let Some(p) = self.places().get_mut(place)
            && p.writes == visit.writes
        {
            p.next = Some(next);
            p.learned_at = now;
        }
    }

    /// This process stored an entry in `place` that expires at `at` (`None`: may be due at
    /// once, say by a count limit): the place is due by then. Call it after the entry is
    /// stored, so a visit that did not see it does not store what it learned.
    pub fn added(&self, place: &str, at: Option<u64>) {
        let mut places = self.places();
        let p = places.entry(place.to_string()).or_default();
        p.writes = p.writes.wrapping_add(1);
        p.next = match (p.next, at) {
            (Some(None), Some(at)) => Some(Some(at)),
            (Some(Some(t)), Some(at)) => Some(Some(t.min(at))),
            _ => None,
        };
    }

    /// Forgets every place `keep` says is gone (a deleted topic or subscription).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.places().retain(|place, _| keep(place));
    }
}

#[cfg(test)]
mod tests {
    use super::NextDue;

    #[test]
    fn a_place_is_skipped_only_until_its_oldest_entry_expires() {
        let due = NextDue::new(None);
        let v = due.visit("t", 100).expect("never visited: due");
        due.learned("t", v, Some(500), 100);
        assert!(due.visit("t", 499).is_none(), "nothing expires before 500");
        let v = due.visit("t", 500).expect("the oldest entry expired");
        due.learned("t", v, None, 500);
        assert!(due.visit("t", u64::MAX).is_none(), "nothing left");
        assert!(due.visit("other", 500).is_some(), "places are apart");
    }

    #[test]
    fn an_entry_added_makes_its_place_due_by_its_expiry() {
        let due = NextDue::new(None);
        let v = due.visit("t", 0).unwrap();
        due.learned("t", v, None, 0);
        due.added("t", Some(700));
        assert!(due.visit("t", 699).is_none());
        assert!(due.visit("t", 700).is_some());
        // An earlier expiry than the one learned lowers it; a later one does not raise it.
        let v = due.visit("t", 700).unwrap();
        due.learned("t", v, Some(900), 700);
        due.added("t", Some(800));
        due.added("t", Some(2000));
        assert!(due.visit("t", 799).is_none());
        assert!(due.visit("t", 800).is_some());
        // An entry that may be due at once (a count limit) makes the place due.
        due.added("t", None);
        assert!(due.visit("t", 0).is_some());
    }

    /// A visit that read before a write stored its entry must not store "nothing left": the
    /// entry would never expire.
    #[test]
    fn what_a_visit_learned_before_a_write_is_dropped() {
        let due = NextDue::new(None);
        let v = due.visit("t", 0).unwrap();
        due.added("t", Some(50));
        due.learned("t", v, None, 10);
        assert!(
            due.visit("t", 10).is_some(),
            "still due: the visit missed the entry"
        );
        let v = due.visit("t", 10).unwrap();
        due.learned("t", v, Some(50), 10);
        assert!(due.visit("t", 49).is_none());
    }

    #[test]
    fn on_shared_storage_a_learned_time_is_trusted_only_so_long() {
        let due = NextDue::new(Some(1000));
        let v = due.visit("t", 0).unwrap();
        due.learned("t", v, None, 0);
        assert!(due.visit("t", 999).is_none());
        assert!(
            due.visit("t", 1000).is_some(),
            "another node may have written"
        );
        due.retain(|p| p != "t");
        assert!(due.places().is_empty());
    }
}
