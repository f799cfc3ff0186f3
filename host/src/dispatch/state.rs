//! What dispatch keeps durably, and how it is keyed: subscription records, committed offsets
//! (cursors, per member and queue), timers (delayed messages and retries) and dead letters.
//! Every key layout of dispatch lives here.

use serde::{Deserialize, Serialize};

use super::spec::SubscriptionSpec;
use crate::storage::{Expect, Record, Storage, StorageError};

pub const SUB_SPACE: &str = "sub";

pub fn cursor_space(group: &str) -> String {
    format!("cursor/{group}")
}
pub fn timer_space(group: &str) -> String {
    format!("timer/{group}")
}
pub fn dlq_space(group: &str) -> String {
    format!("dlq/{group}")
}
/// Completion markers: a delivery whose plugin staged kv writes or publishes is completed by
/// writing its marker in the same atomic step as them (issue 24), so a crash before the offset
/// passes it never runs it again. Removed once the stored offset passes it.
pub fn done_space(group: &str) -> String {
    format!("done/{group}")
}

/// `{member}/{queue:08x}/{offset:016x}`: a member's markers sort by queue, then offset.
pub fn done_key(member: &str, queue: u32, offset: u64) -> String {
    format!("{}{offset:016x}", done_prefix(member, queue))
}

/// The keys of a member's markers on one queue start with this.
pub fn done_prefix(member: &str, queue: u32) -> String {
    format!("{member}/{queue:08x}/")
}

/// A subscription's delivery counters (a node alone on its storage keeps them).
pub fn counts_space(group: &str) -> String {
    format!("counts/{group}")
}

/// The key of the counters in [`counts_space`] of a node alone on its storage (on shared
/// storage each node's are under its node id).
pub const LOCAL_NODE: &str = "local";

/// A node's delivery counters of one subscription as stored, with the incarnation they belong
/// to: a runner of a deleted subscription on another node may store its record after the
/// deletion cleared the space, and a subscription created again under the name must not
/// count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounts {
    /// The subscription's `created_at` (0: stored before incarnations were kept; taken as
    /// the current one).
    #[serde(default)]
    pub incarnation: u64,
    #[serde(flatten)]
    pub counts: StoredCounts,
}

impl NodeCounts {
    /// The counters, if they belong to the incarnation created at `created_at`.
    pub fn of(&self, created_at: u64) -> Option<StoredCounts> {
        (self.incarnation == 0 || self.incarnation == created_at).then_some(self.counts)
    }
}

/// Delivery counters as stored: what a runner counted since the subscription was created,
/// so status and `/metrics` keep them across restarts, pauses and updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCounts {
    pub delivered: u64,
    pub acked: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub failed: u64,
    #[serde(default)]
    pub expired: u64,
}

/// The clustering member, shared by all instances; broadcast members are instance indexes.
pub const SHARED_MEMBER: &str = "all";

pub fn member_name(broadcast: bool, instance: u32) -> String {
    if broadcast {
        format!("i{instance:04}")
    } else {
        SHARED_MEMBER.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SubState {
    Running,
    Paused,
}

/// A subscription as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    pub group: String,
    pub spec: SubscriptionSpec,
    pub state: SubState,
    pub created_at: u64,
    pub updated_at: u64,
    /// Set while a reset or delete holds a running subscription paused on shared storage
    /// (`Dispatcher::quiesce`), so that its end runs it again even when a spec update made
    /// through another node meanwhile replaced the record (the update keeps this mark). A
    /// pause or resume clears it: what the client asked for last wins. Absent (false) in
    /// records written before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiesced: bool,
}

/// Progress of one member on one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Every offset below this one is done (acknowledged, dead-lettered, or handed to a timer).
    pub committed: u64,
    /// Ordered delivery: attempts already made on the message at `committed`.
    #[serde(default)]
    pub head_attempts: u32,
    /// Ordered delivery: not before this time (ms since the epoch) is the message at
    /// `committed` tried again (0: no retry pending). Stored with the attempts, so a retry's
    /// backoff holds across pause, update and restart as every other timer does.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub head_due: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub fn cursor_key(member: &str, queue: u32) -> String {
    format!("{member}/{queue:08x}")
}

/// The member and queue of a key made by [`cursor_key`].
pub fn parse_cursor_key(key: &str) -> Option<(&str, u32)> {
    let (member, queue) = key.rsplit_once('/')?;
    Some((member, u32::from_str_radix(queue, 16).ok()?))
}

/// Why a timer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimerKind {
    Delay,
    Retry,
    Redrive,
}

/// A message to deliver to a member at `due`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    pub member: String,
    pub due: u64,
    pub queue: u32,
    pub offset: u64,
    /// Attempts already made.
    pub attempts: u32,
    pub kind: TimerKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Timer {
    /// Keys sort by member, then due time, so a member loads its timers in firing order.
    pub fn key(&self) -> String {
        format!(
            "{}/{:016x}/{:08x}/{:016x}",
            self.member, self.due, self.queue, self.offset
        )
    }
}

/// A message that will not be delivered again unless redriven.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeadLetter {
    pub message_id: String,
    pub member: String,
    pub queue: u32,
    pub offset: u64,
    pub attempts: u32,
    pub reason: String,
    pub dead_at: u64,
}

impl DeadLetter {
    /// Keys sort by time of death; the message id and member make each entry its own, so
    /// broadcast instances dead-lettering one message in the same millisecond keep one entry
    /// each.
    pub fn key(&self) -> String {
        format!("{:016x}/{}/{}", self.dead_at, self.message_id, self.member)
    }

    /// When the dead letter under a key made by [`DeadLetter::key`] died (ms since the epoch).
    pub fn died_at(key: &str) -> Option<u64> {
        u64::from_str_radix(key.split_once('/')?.0, 16).ok()
    }

    /// The broadcast instance that dead-lettered it (`None` for a clustering subscription).
    pub fn instance(&self) -> Option<u32> {
        member_instance(&self.member)
    }
}

/// The instance index of a broadcast member name made by [`member_name`].
pub fn member_instance(member: &str) -> Option<u32> {
    member.strip_prefix('i')?.parse().ok()
}

pub fn decode<T: serde::de::DeserializeOwned>(what: &str, r: &Record) -> Result<T, StorageError> {
    serde_json::from_slice(&r.value).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(|e| StorageError::Encode(e.to_string()))
}

pub async fn put<T: Serialize>(
    storage: &dyn Storage,
    space: &str,
    key: &str,
    v: &T,
) -> Result<(), StorageError> {
    storage
        .put_record(space, key, Some(encode(v)?), Expect::Any)
        .await
        .map(drop)
}

pub async fn delete(storage: &dyn Storage, space: &str, key: &str) -> Result<(), StorageError> {
    storage
        .put_record(space, key, None, Expect::Any)
        .await
        .map(drop)
}

pub use crate::storage::clear_space as clear;

/// How many records of `space` have keys starting with `prefix`, read a page of 4 096 at a
/// time (memory stays bounded however many there are).
pub async fn count(storage: &dyn Storage, space: &str, prefix: &str) -> Result<u64, StorageError> {
    const PAGE: usize = 4096;
    let (mut n, mut after) = (0u64, String::new());
    loop {
        let page = storage
            .list_records_after(space, prefix, &after, PAGE)
            .await?;
        n = n.saturating_add(page.len() as u64);
        match page.last() {
            Some((last, _)) if page.len() == PAGE => after = last.clone(),
            _ => return Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_keys_round_trip() {
        let key = cursor_key(&member_name(true, 3), 17);
        assert_eq!(parse_cursor_key(&key), Some(("i0003", 17)));
        assert_eq!(parse_cursor_key("all/zz"), None);
    }

    #[test]
    fn timer_keys_sort_by_member_then_due() {
        let t = |member: &str, due: u64, offset: u64| Timer {
            member: member.into(),
            due,
            queue: 1,
            offset,
            attempts: 0,
            kind: TimerKind::Retry,
            last_error: None,
        };
        assert!(t("all", 9, 5).key() < t("all", 10, 1).key());
        assert!(t("all", u64::MAX, 0).key() < t("i0000", 0, 0).key());
        assert!(cursor_key("i0001", 2) < cursor_key("i0001", 10));
        assert_eq!(member_name(true, 3), "i0003");
        assert_eq!(member_instance(&member_name(true, 3)), Some(3));
        assert_eq!(member_instance(SHARED_MEMBER), None);
    }

    #[test]
    fn dead_letters_of_one_message_by_two_members_have_their_own_keys() {
        let dl = |member: &str| DeadLetter {
            message_id: "m".into(),
            member: member.into(),
            queue: 0,
            offset: 7,
            attempts: 1,
            reason: "rejected".into(),
            dead_at: 1000,
        };
        assert_ne!(dl("i0000").key(), dl("i0001").key());
        assert_eq!(DeadLetter::died_at(&dl("i0000").key()), Some(1000));
        assert_eq!(DeadLetter::died_at("zz/m/all"), None);
        assert_eq!(dl("i0002").instance(), Some(2));
        assert_eq!(dl(SHARED_MEMBER).instance(), None);
    }
}
