//! The bottom layer every other module may use: the clock, the name rule for topics, groups and
//! plugins, the time bounds every layer checks against (delays, check-backs), and hex.

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
