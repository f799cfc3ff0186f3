//! A topic's retention policy: how long and how much of each queue is kept, and whether what
//! every subscription is done with goes early. Shapes and bounds only; dispatch enforces it.

use serde::{Deserialize, Deserializer, Serialize};

use crate::storage::QueueLimits;

/// Age limit of a topic that does not set one: 72 h, as RocketMQ keeps its commit log
/// (`fileReservedTime`).
pub const DEFAULT_MAX_AGE_MS: u64 = 72 * 3_600_000;
/// Shortest age limit a topic may set: 1 s.
pub const MIN_MAX_AGE_MS: u64 = 1_000;
/// Longest age limit a topic may set: 100 years (time sums stay far from overflow).
pub const MAX_MAX_AGE_MS: u64 = crate::base::MAX_RETENTION_AGE_MS;
/// Smallest size limit per queue a topic may set: 4 KiB.
pub const MIN_MAX_BYTES: u64 = 4_096;
/// Largest size limit per queue a topic may set: 1 EiB.
pub const MAX_MAX_BYTES: u64 = 1 << 60;

/// What a topic keeps. Age and size limits apply to each queue whatever subscriptions do, as
/// Kafka's `retention.ms` / `retention.bytes` do per partition; a subscription behind what they
/// delete moves to the low water and counts what it lost
/// (`wasmq_messages_expired_unconsumed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Retention {
    /// Messages stored longer ago than this many milliseconds are deleted; `null`: no age
    /// limit. 72 h when the topic was created without saying.
    #[serde(default = "default_max_age")]
    pub max_age_ms: Option<u64>,
    /// The oldest messages of a queue are deleted while its messages take more bytes than
    /// this; `null`: no size limit.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Also delete what every subscription of the topic is done with: committed past, with no
    /// retry or delay timer and no dead letter left on it (as JetStream's interest policy).
    /// A topic without subscriptions keeps its messages (until the limits above).
    #[serde(default)]
    pub after_consumed: bool,
}

fn default_max_age() -> Option<u64> {
    Some(DEFAULT_MAX_AGE_MS)
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age_ms: default_max_age(),
            max_bytes: None,
            after_consumed: false,
        }
    }
}

impl Retention {
    /// The limits a storage backend applies per queue.
    pub fn limits(&self) -> QueueLimits {
        QueueLimits {
            max_age_ms: self.max_age_ms,
            max_bytes: self.max_bytes,
        }
    }
}

/// `retention` in the body of `PUT /v1/topics/{topic}`: fields left out keep their value,
/// `null` removes a limit.
#[derive(Debug, Clone, Copy, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    /// 1 000 ms to 100 years, or `null` for no age limit.
    #[serde(default, deserialize_with = "present")]
    #[schemars(with = "Option<u64>", range(min = 1000, max = 3153600000000u64))]
    pub max_age_ms: Option<Option<u64>>,
    /// Bytes per queue, 4 096 to 2^60, or `null` for no size limit.
    #[serde(default, deserialize_with = "present")]
    #[schemars(with = "Option<u64>", range(min = 4096, max = 1152921504606846976u64))]
    pub max_bytes: Option<Option<u64>>,
    pub after_consumed: Option<bool>,
}

/// A field that is present deserializes to `Some`, also when it is `null` (`Some(None)`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

impl RetentionSpec {
    /// `current` with this spec's fields applied; an error names the field and its bounds.
    pub fn apply(&self, current: Retention) -> Result<Retention, String> {
        let mut out = current;
        if let Some(age) = self.max_age_ms {
            if let Some(a) = age
                && !(MIN_MAX_AGE_MS..=MAX_MAX_AGE_MS).contains(&a)
            {
                return Err(format!(
                    "retention.max_age_ms must be between {MIN_MAX_AGE_MS} and {MAX_MAX_AGE_MS} (or null for no age limit), not {a}"
                ));
            }
            out.max_age_ms = age;
        }
        if let Some(bytes) = self.max_bytes {
            if let Some(b) = bytes
                && !(MIN_MAX_BYTES..=MAX_MAX_BYTES).contains(&b)
            {
                return Err(format!(
                    "retention.max_bytes must be between {MIN_MAX_BYTES} and {MAX_MAX_BYTES} (or null for no size limit), not {b}"
                ));
            }
            out.max_bytes = bytes;
        }
        if let Some(c) = self.after_consumed {
            out.after_consumed = c;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn left_out_keeps_null_removes_and_bounds_hold() {
        let spec: RetentionSpec = serde_json::from_str(r#"{"max_bytes": 8192}"#).unwrap();
        let r = spec.apply(Retention::default()).unwrap();
        assert_eq!(r.max_age_ms, Some(DEFAULT_MAX_AGE_MS));
        assert_eq!(r.max_bytes, Some(8192));
        let spec: RetentionSpec =
            serde_json::from_str(r#"{"max_age_ms": null, "after_consumed": true}"#).unwrap();
        let r = spec.apply(r).unwrap();
        assert_eq!(r.max_age_ms, None);
        assert_eq!(r.max_bytes, Some(8192));
        assert!(r.after_consumed);
        for bad in [
            r#"{"max_age_ms": 999}"#,
            r#"{"max_age_ms": 18446744073709551615}"#,
            r#"{"max_bytes": 4095}"#,
            r#"{"max_bytes": 2305843009213693952}"#,
        ] {
            let spec: RetentionSpec = serde_json::from_str(bad).unwrap();
            assert!(spec.apply(r).unwrap_err().contains("retention."), "{bad}");
        }
        assert!(serde_json::from_str::<RetentionSpec>(r#"{"max_age": 5}"#).is_err());
        assert!(serde_json::from_str::<RetentionSpec>(r#"{"max_age_ms": -1}"#).is_err());
    }

    #[test]
    fn a_topic_stored_before_retention_existed_gets_the_default() {
        let r: Retention = serde_json::from_str("{}").unwrap();
        assert_eq!(r, Retention::default());
        let r: Retention = serde_json::from_str(r#"{"max_age_ms": null}"#).unwrap();
        assert_eq!(r.max_age_ms, None);
    }
}
