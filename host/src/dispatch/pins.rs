//! Pins: one record per timer and dead letter, keyed by the queue and offset of the message it
//! holds, so the lowest offset a subscription still needs on a queue is a listing of one record
//! (`after_consumed` retention), not a read of every timer and dead letter (issue 23: costs
//! that do not grow with what is pending).
//!
//! A pin is written in the same atomic step as its timer or dead letter, or before it, and
//! deleted in the same step or after it ([`Storage::put_records_in_order`], and a
//! [`Storage::commit`] shows its writes of values before its deletions), so every stored timer
//! and dead letter has its pin. A
//! pin left without one (a crash between two steps, a timer gone with its space) is found when
//! it is the lowest of its queue, and deleted then.

use super::state::{self, DeadLetter, Timer};
use crate::base::now_ms;
use crate::storage::{Expect, RecordWrite, Storage, StorageError};

/// Marks, per group, that pins of every timer and dead letter stored before pins existed were
/// written ([`build`]).
const BUILT_SPACE: &str = "pin-built";

/// How many records one [`build`] step writes.
const BUILD_PAGE: usize = 512;

/// How many pins without a timer or dead letter one [`lowest`] deletes before it answers the
/// offset of the next one (lower than or equal to what is really needed: retention keeps a
/// little more until the next pass).
const ORPHANS_PER_LOOKUP: usize = 256;

/// The space of `group`'s pins.
pub fn space(group: &str) -> String {
    format!("pin/{group}")
}

/// `{queue:08x}/{offset:016x}/{t|d}/{key of the timer or dead letter}`.
fn key(queue: u32, offset: u64, dead_letter: bool, referent: &str) -> String {
    let kind = if dead_letter { 'd' } else { 't' };
    format!("{queue:08x}/{offset:016x}/{kind}/{referent}")
}

/// Every pin of `queue` starts with this; they sort by offset after it.
pub fn queue_prefix(queue: u32) -> String {
    format!("{queue:08x}/")
}

/// The offset a timer's pin holds and the timer's key; `None` for a dead letter's pin or a key
/// not made here.
pub fn parse_timer_pin(key: &str) -> Option<(u64, &str)> {
    match parse(key)? {
        (offset, false, timer) => Some((offset, timer)),
        _ => None,
    }
}

/// The offset a pin holds, whether it pins a dead letter, and the key of what it pins.
fn parse(key: &str) -> Option<(u64, bool, &str)> {
    let (_queue, rest) = key.split_once('/')?;
    let (offset, rest) = rest.split_once('/')?;
    let (kind, referent) = rest.split_once('/')?;
    let dead_letter = match kind {
        "d" => true,
        "t" => false,
        _ => return None,
    };
    Some((u64::from_str_radix(offset, 16).ok()?, dead_letter, referent))
}

/// A pin's value: when it was written (ms since the epoch, 8 bytes big-endian).
fn write(group: &str, key: String, put: bool) -> RecordWrite {
    RecordWrite {
        space: space(group),
        key,
        value: put.then(|| now_ms().to_be_bytes().to_vec()),
        expect: Expect::Any,
    }
}

/// Whether a pin whose timer or dead letter is not (yet) visible may go: on a storage whose
/// commits other nodes can see half done (JetStream), only once it is older than any commit
/// in progress may be ([`Storage::recovery_age`], four times over), so the pin of a timer
/// whose record is still being written is kept.
pub fn may_go(storage: &dyn Storage, pin: &crate::storage::Record) -> bool {
    let age = storage.recovery_age().saturating_mul(4);
    if age.is_zero() {
        return true;
    }
    let written = pin
        .value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes);
    let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    written
        .checked_add(age_ms)
        .is_some_and(|until| until <= now_ms())
}

/// The write that stores `timer`'s pin (`put`) or deletes it.
pub fn of_timer(group: &str, timer: &Timer, put: bool) -> RecordWrite {
    write(
        group,
        key(timer.queue, timer.offset, false, &timer.key()),
        put,
    )
}

/// The write that stores the pin of the dead letter `dl` (`put`) or deletes it.
pub fn of_dead_letter(group: &str, dl: &DeadLetter, put: bool) -> RecordWrite {
    write(group, key(dl.queue, dl.offset, true, &dl.key()), put)
}

/// Writes the pins of `group`'s timers and dead letters stored before pins existed, a page at
/// a time, once per group (a record marks it done; [`clear`] removes the mark). Timers and dead
/// letters written meanwhile carry their own pins; one removed meanwhile may leave its pin
/// behind, which [`lowest`] deletes.
pub async fn build(storage: &dyn Storage, group: &str) -> Result<(), StorageError> {
    if storage.get_record(BUILT_SPACE, group).await?.is_some() {
        return Ok(());
    }
    for dead_letters in [false, true] {
        let from = if dead_letters {
            state::dlq_space(group)
        } else {
            state::timer_space(group)
        };
        let mut after = String::new();
        loop {
            let page = storage
                .list_records_after(&from, "", &after, BUILD_PAGE)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            let mut pins = Vec::with_capacity(page.len());
            for (k, r) in &page {
                pins.push(if dead_letters {
                    of_dead_letter(group, &state::decode::<DeadLetter>(k, r)?, true)
                } else {
                    of_timer(group, &state::decode::<Timer>(k, r)?, true)
                });
            }
            storage.put_records(pins).await?;
        }
    }
    storage
        .put_record(BUILT_SPACE, group, Some(Vec::new()), Expect::Any)
        .await
        .map(drop)
}

/// The lowest offset of `queue` a timer or dead letter of `group` holds (`None`: none does),
/// after [`build`]. Reads the lowest pin and checks that what it pins is stored; a pin left
/// without it is deleted (unless it was written again meanwhile) and the next one read.
pub async fn lowest(
    storage: &dyn Storage,
    group: &str,
    queue: u32,
) -> Result<Option<u64>, StorageError> {
    let (space, prefix) = (space(group), queue_prefix(queue));
    let mut last = None;
    for _ in 0..ORPHANS_PER_LOOKUP {
        let Some((k, r)) = storage
            .list_records(&space, &prefix, 1)
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let (offset, dead_letter, referent) =
            parse(&k).ok_or_else(|| StorageError::Corrupt(format!("bad pin key {k:?}")))?;
        let of = if dead_letter {
            state::dlq_space(group)
        } else {
            state::timer_space(group)
        };
        if storage.get_record(&of, referent).await?.is_some() || !may_go(storage, &r) {
            return Ok(Some(offset));
        }
        last = Some(offset);
        match storage
            .put_record(&space, &k, None, Expect::Revision(r.revision))
            .await
        {
            Ok(_) | Err(StorageError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(last)
}

/// Deletes every timer of `group` with its pin, a page at a time (a reset drops pending delays
/// and retries; dead letters and their pins stay).
pub async fn clear_timers(storage: &dyn Storage, group: &str) -> Result<(), StorageError> {
    let space = state::timer_space(group);
    loop {
        let page = storage.list_records(&space, "", BUILD_PAGE).await?;
        if page.is_empty() {
            return Ok(());
        }
        let mut writes = Vec::with_capacity(2 * page.len());
        for (k, r) in &page {
            writes.push(RecordWrite {
                space: space.clone(),
                key: k.clone(),
                value: None,
                expect: Expect::Any,
            });
            // A timer that cannot be read leaves its pin to `lowest`.
            if let Ok(t) = state::decode::<Timer>(k, r) {
                writes.push(of_timer(group, &t, false));
            }
        }
        storage.put_records_in_order(writes).await?;
    }
}

/// Removes `group`'s pins and its build mark (its timers and dead letters are gone).
pub async fn clear(storage: &dyn Storage, group: &str) -> Result<(), StorageError> {
    state::clear(storage, &space(group), "").await?;
    storage
        .put_record(BUILT_SPACE, group, None, Expect::Any)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_keys_sort_by_queue_then_offset_and_name_what_they_pin() {
        let t = Timer {
            member: "i0001".into(),
            due: 99,
            queue: 3,
            offset: 17,
            attempts: 1,
            kind: state::TimerKind::Retry,
            last_error: None,
        };
        let k = of_timer("g", &t, true).key;
        assert!(k.starts_with("00000003/"));
        assert_eq!(parse(&k), Some((17, false, t.key().as_str())));
        assert!(key(3, 9, true, "z") < key(3, 10, false, "a"));
        assert!(key(3, u64::MAX, true, "z") < key(4, 0, false, "a"));
        assert_eq!(parse("00000003/zz/t/x"), None);
        assert_eq!(parse("00000003/0000000000000001/q/x"), None);
    }
}
