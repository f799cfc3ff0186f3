//! RocksDB key encodings: the one place that knows how keys are laid out in each column family.
//!
//! Every variable-length part is length-prefixed, so no name can be a prefix of another's keys,
//! and integers are big-endian, so RocksDB's byte order is numeric order.

use super::{MessageId, StorageError};

/// Longest topic name (it is length-prefixed by one byte).
pub const MAX_TOPIC_LEN: usize = crate::base::MAX_NAME_LEN;
/// Longest business key (length-prefixed by two bytes).
pub const MAX_KEY_LEN: usize = 1024;

fn push_str8(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u8::MAX as usize);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// `messages` CF: topic, queue, offset.
pub fn message(topic: &str, queue: u32, offset: u64) -> Vec<u8> {
    let mut k = queue_prefix(topic, queue);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The prefix shared by every message of one queue.
pub fn queue_prefix(topic: &str, queue: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + topic.len() + 12);
    push_str8(&mut k, topic);
    k.extend_from_slice(&queue.to_be_bytes());
    k
}

/// Default-CF prefix of the low-water markers, one per truncated queue.
pub const LOW_WATER_PREFIX: &[u8] = b"low_water/";

/// Default-CF key of one queue's low-water marker (a big-endian u64: the first offset kept).
pub fn low_water(topic: &str, queue: u32) -> Vec<u8> {
    let mut k = LOW_WATER_PREFIX.to_vec();
    k.extend_from_slice(&queue_prefix(topic, queue));
    k
}

/// Default-CF prefix of the stored-bytes markers, one per queue that ever held a message.
pub const QUEUE_BYTES_PREFIX: &[u8] = b"queue_bytes/";

/// Default-CF key of one queue's stored-bytes marker (a big-endian u64: the bytes its messages
/// between low and high water take).
pub fn queue_bytes(topic: &str, queue: u32) -> Vec<u8> {
    let mut k = QUEUE_BYTES_PREFIX.to_vec();
    k.extend_from_slice(&queue_prefix(topic, queue));
    k
}

/// Splits a per-queue marker's key (`prefix`, then the queue prefix) back into (topic, queue).
pub fn parse_queue_marker(prefix: &[u8], key: &[u8]) -> Result<(String, u32), StorageError> {
    let bad = || StorageError::Corrupt(format!("bad queue marker key {key:02x?}"));
    let rest = key.strip_prefix(prefix).ok_or_else(bad)?;
    let (&len, rest) = rest.split_first().ok_or_else(bad)?;
    let len = len as usize;
    if rest.len() != len + 4 {
        return Err(bad());
    }
    let topic = std::str::from_utf8(&rest[..len]).map_err(|_| bad())?;
    let queue = u32::from_be_bytes(rest[len..].try_into().map_err(|_| bad())?);
    Ok((topic.to_string(), queue))
}

/// Splits a `messages` key back into (topic, queue, offset).
pub fn parse_message(key: &[u8]) -> Result<(String, u32, u64), StorageError> {
    let bad = || StorageError::Corrupt(format!("bad message key {key:02x?}"));
    let (&len, rest) = key.split_first().ok_or_else(bad)?;
    let len = len as usize;
    if rest.len() != len + 12 {
        return Err(bad());
    }
    let topic = std::str::from_utf8(&rest[..len]).map_err(|_| bad())?;
    let queue = u32::from_be_bytes(rest[len..len + 4].try_into().map_err(|_| bad())?);
    let offset = u64::from_be_bytes(rest[len + 4..].try_into().map_err(|_| bad())?);
    Ok((topic.to_string(), queue, offset))
}

/// `ids` CF: the message id's 16 bytes.
pub fn id(id: &MessageId) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// `keys` CF prefix for one business key of one topic.
pub fn business_key_prefix(topic: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + topic.len() + key.len() + 12);
    push_str8(&mut k, topic);
    k.extend_from_slice(&(key.len() as u16).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// `keys` CF entry: topic, key, queue, offset; the value is empty.
pub fn business_key(topic: &str, key: &str, queue: u32, offset: u64) -> Vec<u8> {
    let mut k = business_key_prefix(topic, key);
    k.extend_from_slice(&queue.to_be_bytes());
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// Splits a `keys` entry back into (topic, queue, offset).
pub fn parse_business_key(key: &[u8]) -> Result<(String, u32, u64), StorageError> {
    let bad = || StorageError::Corrupt(format!("bad key index entry {key:02x?}"));
    let (&len, rest) = key.split_first().ok_or_else(bad)?;
    let topic = rest.get(..len as usize).ok_or_else(bad)?;
    let topic = std::str::from_utf8(topic).map_err(|_| bad())?;
    let (queue, offset) = parse_business_key_tail(key)?;
    if rest.len() < len as usize + 2 + 12 {
        return Err(bad());
    }
    Ok((topic.to_string(), queue, offset))
}

/// The (queue, offset) that ends a `keys` entry.
pub fn parse_business_key_tail(key: &[u8]) -> Result<(u32, u64), StorageError> {
    let n = key.len();
    if n < 12 {
        return Err(StorageError::Corrupt(format!(
            "bad key index entry {key:02x?}"
        )));
    }
    let bad = |_| StorageError::Corrupt("bad key index entry".into());
    let queue = u32::from_be_bytes(key[n - 12..n - 8].try_into().map_err(bad)?);
    let offset = u64::from_be_bytes(key[n - 8..].try_into().map_err(bad)?);
    Ok((queue, offset))
}

/// `records` CF: space, then the record's own key bytes.
pub fn record(space: &str, key: &str) -> Vec<u8> {
    let mut k = record_space(space);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The first key after every key that starts with `prefix` (its last byte below 0xff counted
/// up, the rest cut): an iterator bounded by it stops at the prefix's end instead of stepping
/// over deleted keys beyond it. `None` when every byte is 0xff (no bound).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|b| *b != 0xff)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

/// The prefix of every record in one space.
pub fn record_space(space: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + space.len());
    push_str8(&mut k, space);
    k
}

/// The record key without its space prefix.
pub fn parse_record_key<'a>(space: &str, key: &'a [u8]) -> Result<&'a str, StorageError> {
    let rest = key
        .get(1 + space.len()..)
        .ok_or_else(|| StorageError::Corrupt("short record key".into()))?;
    std::str::from_utf8(rest).map_err(|_| StorageError::Corrupt("record key not utf-8".into()))
}

/// A record value: its revision (big-endian u64), then the payload.
pub fn record_value(revision: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&revision.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn parse_record_value(value: &[u8]) -> Result<(u64, &[u8]), StorageError> {
    if value.len() < 8 {
        return Err(StorageError::Corrupt("short record value".into()));
    }
    let (rev, payload) = value.split_at(8);
    let rev = u64::from_be_bytes(
        rev.try_into()
            .map_err(|_| StorageError::Corrupt("short record value".into()))?,
    );
    Ok((rev, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_round_trip_and_sort_numerically() {
        let k = message("orders", 3, 258);
        assert_eq!(parse_message(&k).unwrap(), ("orders".to_string(), 3, 258));
        assert!(message("orders", 3, 9) < message("orders", 3, 10));
        assert!(message("orders", 3, u64::MAX) < message("orders", 4, 0));
        assert!(k.starts_with(&queue_prefix("orders", 3)));
    }

    #[test]
    fn topic_prefixes_do_not_overlap() {
        // "a" must not see keys of "ab", even though "a" is a string prefix of "ab".
        let a = queue_prefix("a", 0);
        assert!(!message("ab", 0, 0).starts_with(&a));
        assert!(!business_key("ab", "k", 0, 0).starts_with(&business_key_prefix("a", "bk")));
        assert!(!business_key("t", "kx", 0, 1).starts_with(&business_key_prefix("t", "k")));
        assert!(!record("ab", "x").starts_with(&record_space("a")));
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse_message(&[]).is_err());
        assert!(parse_message(&[5, b'a']).is_err());
        let mut k = message("t", 0, 1);
        k.push(0);
        assert!(parse_message(&k).is_err());
        assert!(parse_business_key_tail(&[1, 2]).is_err());
        assert!(parse_record_value(&[0; 7]).is_err());
    }

    #[test]
    fn business_keys_name_their_topic() {
        let k = business_key("orders", "k-1", 3, 9);
        assert_eq!(
            parse_business_key(&k).unwrap(),
            ("orders".to_string(), 3, 9)
        );
        assert!(parse_business_key(b"").is_err());
        assert!(parse_business_key(&[9, b'a']).is_err());
    }

    #[test]
    fn low_water_keys_round_trip() {
        let k = low_water("orders", 7);
        assert_eq!(
            parse_queue_marker(LOW_WATER_PREFIX, &k).unwrap(),
            ("orders".to_string(), 7)
        );
        assert!(parse_queue_marker(LOW_WATER_PREFIX, b"low_water/").is_err());
        assert!(parse_queue_marker(LOW_WATER_PREFIX, &message("orders", 7, 1)).is_err());
        let k = queue_bytes("orders", 7);
        assert_eq!(
            parse_queue_marker(QUEUE_BYTES_PREFIX, &k).unwrap(),
            ("orders".to_string(), 7)
        );
        assert!(parse_queue_marker(QUEUE_BYTES_PREFIX, &low_water("orders", 7)).is_err());
    }

    #[test]
    fn business_key_tail_round_trip() {
        let k = business_key("users", "u-17", 2, 99);
        assert!(k.starts_with(&business_key_prefix("users", "u-17")));
        assert_eq!(parse_business_key_tail(&k).unwrap(), (2, 99));
    }

    #[test]
    fn record_round_trip() {
        let k = record("topic", "orders");
        assert_eq!(parse_record_key("topic", &k).unwrap(), "orders");
        let v = record_value(7, b"{}");
        assert_eq!(parse_record_value(&v).unwrap(), (7, &b"{}"[..]));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn topic() -> impl Strategy<Value = String> {
            "[A-Za-z0-9._-]{1,128}"
        }

        proptest! {
            #[test]
            fn message_keys_round_trip(t in topic(), q in any::<u32>(), o in any::<u64>()) {
                prop_assert_eq!(parse_message(&message(&t, q, o)).unwrap(), (t, q, o));
            }

            #[test]
            fn byte_order_is_offset_order_within_a_queue(t in topic(), q in any::<u32>(), a in any::<u64>(), b in any::<u64>()) {
                prop_assert_eq!(message(&t, q, a).cmp(&message(&t, q, b)), a.cmp(&b));
            }

            #[test]
            fn other_topics_never_share_a_queue_prefix(a in topic(), b in topic(), q in any::<u32>(), o in any::<u64>()) {
                prop_assume!(a != b);
                prop_assert!(!message(&b, q, o).starts_with(&queue_prefix(&a, q)));
            }

            #[test]
            fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let _ = parse_message(&bytes);
                let _ = parse_business_key_tail(&bytes);
                let _ = parse_record_value(&bytes);
            }
        }
    }

    #[test]
    fn prefix_end_bounds_exactly_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
        assert_eq!(prefix_end(b""), None);
        let space = record_space("timer/g");
        let end = prefix_end(&space).unwrap();
        assert!(record("timer/g", "\u{10ffff}") < end);
        assert!(record("timer/g", "") >= space);
        assert!(record("timer/h", "") >= end);
    }
}
