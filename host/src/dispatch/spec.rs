//! What a subscription (consumer group) is: its spec as the API takes it, validation, defaults
//! (RocketMQ's retry schedule), and tag filter expressions.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::capabilities::GrantSpec;
use crate::runtime::PluginLimits;

/// RocketMQ's default backoff: 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h.
pub const DEFAULT_BACKOFF_MS: [u64; 16] = [
    10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000, 480_000, 540_000,
    600_000, 1_200_000, 1_800_000, 3_600_000, 7_200_000,
];
pub const MAX_INSTANCES: u32 = 256;
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 256;
/// The most messages a subscription may have in flight (`max_in_flight`).
pub const MAX_IN_FLIGHT: u32 = 65_536;
/// `max_rate` bounds, messages per second: one per ~17 minutes up to ten million.
pub const MIN_RATE: f64 = 0.001;
pub const MAX_RATE: f64 = 10_000_000.0;

/// Whose kv state a subscription's instances read and write (issue 22).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum KvScope {
    /// Its own namespace, which no other subscription sees; removed with the subscription.
    #[default]
    Subscription,
    /// The plugin's namespace, shared with the other subscriptions of the plugin that ask for
    /// it and with topic transaction checkers of the plugin; removed with the plugin.
    Plugin,
}

/// What becomes of a plugin's kv writes and publishes when a delivery is repeated (issue 24;
/// the names are Kafka Streams' `processing.guarantee` values).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingGuarantee {
    /// A call's kv writes and publishes are staged and stored in one atomic step with the
    /// delivery's completion on `ack`; discarded on `retry`, `reject`, a trap, a timeout or a
    /// crash. A delivery whose kv reads changed under it runs again. Email, SMS and HTTP
    /// cannot be taken back: `once()` guards them.
    #[default]
    ExactlyOnce,
    /// kv writes and publishes take effect when called; a repeated delivery repeats them.
    AtLeastOnce,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each message to one instance.
    #[default]
    Clustering,
    /// Every message to every instance, each with its own offsets.
    Broadcast,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// After `max_attempts`, to the dead-letter queue; the queue moves on.
    #[default]
    DeadLetter,
    /// (Ordered only) keep retrying at the last backoff; the queue stays blocked.
    Block,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    #[schemars(range(min = 1, max = u32::MAX))]
    pub max_attempts: u32,
    #[schemars(length(min = 1, max = 64), inner(range(max = crate::base::MAX_DELAY_MS)))]
    pub backoff_ms: Vec<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 16,
            backoff_ms: DEFAULT_BACKOFF_MS.to_vec(),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`, after `attempt` failed; the plugin may ask for its own.
    pub fn backoff(&self, attempt: u32, asked_ms: u64) -> u64 {
        if asked_ms > 0 {
            return asked_ms.min(crate::base::MAX_DELAY_MS);
        }
        let i = (attempt.max(1) as usize - 1).min(self.backoff_ms.len().saturating_sub(1));
        self.backoff_ms.get(i).copied().unwrap_or(1000)
    }
}

/// Where a new subscription (or a reset) starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    #[default]
    Earliest,
    Latest,
    /// The first message the broker stored at or after this time (ms since the epoch; see
    /// `stored_at` on each message): a transaction's message counts from its commit.
    Time(u64),
}

impl Serialize for Start {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Start::Earliest => s.serialize_str("earliest"),
            Start::Latest => s.serialize_str("latest"),
            Start::Time(t) => s.serialize_u64(*t),
        }
    }
}

impl schemars::JsonSchema for Start {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Start".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "\"earliest\", \"latest\", or a time in ms since the epoch (the first message stored at or after it)",
            "anyOf": [
                {"type": "string", "enum": ["earliest", "latest"]},
                {"type": "integer", "minimum": 0}
            ]
        })
    }
}

impl<'de> Deserialize<'de> for Start {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s == "earliest" => Ok(Start::Earliest),
            Value::String(s) if s == "latest" => Ok(Start::Latest),
            Value::Number(n) if n.as_u64().is_some() => Ok(Start::Time(n.as_u64().unwrap_or(0))),
            // A whole number written as a float (`299.0`) is that number.
            Value::Number(n)
                if n.as_f64()
                    .is_some_and(|f| f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64) =>
            {
                Ok(Start::Time(n.as_f64().map_or(0, |f| f as u64)))
            }
            other => Err(serde::de::Error::custom(format!(
                "start must be \"earliest\", \"latest\" or a time in ms since the epoch, not {other}"
            ))),
        }
    }
}

/// The body of `PUT /v1/subscriptions/{group}`. `on_exhausted: "block"` needs ordered delivery
/// (`ordered`, or broadcast).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend(
    "if" = {"required": ["on_exhausted"], "properties": {"on_exhausted": {"const": "block"}}},
    "then" = {"anyOf": [
        {"required": ["ordered"], "properties": {"ordered": {"const": true}}},
        {"required": ["mode"], "properties": {"mode": {"const": "broadcast"}}}
    ]}
))]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"))]
    pub topic: String,
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"))]
    pub plugin: String,
    /// Pinned plugin version; unset follows the latest upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub plugin_version: Option<u32>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub ordered: bool,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = MAX_INSTANCES))]
    pub instances: u32,
    #[serde(default = "star")]
    /// `*` (everything) or tags joined by `||` (`a || b`).
    #[schemars(regex(
        pattern = r"^[\s\u0085]*(\*|[^|*\s\u0085]+([\s\u0085]*\|\|[\s\u0085]*[^|*\s\u0085]+)*)?[\s\u0085]*$"
    ))]
    pub filter: String,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default)]
    pub on_exhausted: OnExhausted,
    #[serde(default = "default_in_flight")]
    #[schemars(range(min = 1, max = MAX_IN_FLIGHT))]
    pub max_in_flight: u32,
    /// Messages per second, for draining a burst at the downstream's pace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = MIN_RATE, max = MAX_RATE))]
    pub max_rate: Option<f64>,
    #[serde(default)]
    pub start: Start,
    /// A JSON object the plugin reads (`{"$secret": "NAME"}` values are resolved in the host).
    #[serde(default = "empty_object")]
    #[schemars(with = "serde_json::Map<String, Value>")]
    pub config: Value,
    #[serde(default)]
    pub grants: GrantSpec,
    #[serde(default)]
    pub limits: PluginLimits,
    #[serde(default)]
    pub kv_scope: KvScope,
    #[serde(default)]
    pub processing_guarantee: ProcessingGuarantee,
}

fn one() -> u32 {
    1
}
fn star() -> String {
    "*".into()
}
fn default_in_flight() -> u32 {
    DEFAULT_MAX_IN_FLIGHT
}
fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl SubscriptionSpec {
    /// Checks what can be checked without the broker; returns the parsed filter.
    /// The storage space of its instances' kv state (see [`KvScope`]).
    pub fn kv_space(&self, group: &str) -> String {
        use crate::runtime::host::{KvOwner, kv_space};
        match self.kv_scope {
            KvScope::Subscription => kv_space(KvOwner::Subscription(group)),
            KvScope::Plugin => kv_space(KvOwner::Plugin(&self.plugin)),
        }
    }

    pub fn validate(&self) -> Result<TagFilter, String> {
        if self.instances == 0 || self.instances > MAX_INSTANCES {
            return Err(format!("instances must be 1 to {MAX_INSTANCES}"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            return Err(format!("max_in_flight must be 1 to {MAX_IN_FLIGHT}"));
        }
        if self.retry.max_attempts == 0 {
            return Err("retry.max_attempts must be at least 1".into());
        }
        if self.retry.backoff_ms.is_empty() || self.retry.backoff_ms.len() > 64 {
            return Err("retry.backoff_ms needs 1 to 64 delays".into());
        }
        if self
            .retry
            .backoff_ms
            .iter()
            .any(|&b| b > crate::base::MAX_DELAY_MS)
        {
            return Err("a retry delay is at most 30 days".into());
        }
        if let Some(r) = self.max_rate
            && !(MIN_RATE..=MAX_RATE).contains(&r)
        {
            return Err(format!(
                "max_rate must be {MIN_RATE} to {MAX_RATE} messages per second"
            ));
        }
        self.limits.validate()?;
        if self.on_exhausted == OnExhausted::Block && !self.ordered && self.mode == Mode::Clustering
        {
            return Err("on_exhausted \"block\" needs ordered delivery".into());
        }
        self.grants.to_grants()?;
        if !self.config.is_object() {
            return Err("config must be a JSON object".into());
        }
        if self.config.to_string().len() > 64 * 1024 {
            return Err("config is larger than 64 KiB".into());
        }
        TagFilter::parse(&self.filter)
    }

    /// Broadcast delivers in queue order to each instance, whatever `ordered` says.
    pub fn is_ordered(&self) -> bool {
        self.ordered || self.mode == Mode::Broadcast
    }
}

/// A tag filter: `*` (everything) or `a || b || c` (messages with one of these tags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    All,
    AnyOf(Vec<String>),
}

impl TagFilter {
    pub fn parse(expr: &str) -> Result<Self, String> {
        // White space as Unicode and JSON Schema (ECMAScript `\s`, which has U+FEFF) see it.
        let space = |c: char| c.is_whitespace() || c == '\u{feff}';
        let expr = expr.trim_matches(space);
        if expr.is_empty() || expr == "*" {
            return Ok(TagFilter::All);
        }
        let mut tags = Vec::new();
        for part in expr.split("||") {
            let tag = part.trim_matches(space);
            if tag.is_empty() || tag.contains(|c: char| space(c) || c == '|' || c == '*') {
                return Err(format!(
                    "filter {expr:?}: write \"*\" or tags joined by \"||\", like \"a || b\""
                ));
            }
            tags.push(tag.to_string());
        }
        Ok(TagFilter::AnyOf(tags))
    }

    pub fn matches(&self, tag: Option<&str>) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::AnyOf(tags) => tag.is_some_and(|t| tags.iter().any(|x| x == t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert_eq!(TagFilter::parse("*").unwrap(), TagFilter::All);
        assert_eq!(TagFilter::parse("").unwrap(), TagFilter::All);
        let f = TagFilter::parse(" a || b ").unwrap();
        assert!(f.matches(Some("a")) && f.matches(Some("b")));
        assert!(!f.matches(Some("c")) && !f.matches(None));
        assert!(TagFilter::All.matches(None));
        for bad in ["a ||", "|| b", "a | b", "a b", "a||*"] {
            assert!(TagFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_follows_the_schedule_then_stays_at_its_end() {
        let p = RetryPolicy {
            max_attempts: 5,
            backoff_ms: vec![10, 20],
        };
        assert_eq!(p.backoff(1, 0), 10);
        assert_eq!(p.backoff(2, 0), 20);
        assert_eq!(p.backoff(9, 0), 20);
        assert_eq!(p.backoff(1, 7), 7);
    }

    #[test]
    fn spec_defaults_and_checks() {
        let s: SubscriptionSpec = serde_json::from_str(r#"{"topic":"t","plugin":"p"}"#).unwrap();
        assert_eq!(
            (s.mode, s.instances, s.retry.max_attempts, s.start),
            (Mode::Clustering, 1, 16, Start::Earliest)
        );
        assert_eq!(s.retry.backoff_ms.len(), 16);
        assert!(s.validate().is_ok());
        let s: SubscriptionSpec =
            serde_json::from_str(r#"{"topic":"t","plugin":"p","start":1700000000000}"#).unwrap();
        assert_eq!(s.start, Start::Time(1_700_000_000_000));
        assert!(
            serde_json::from_str::<SubscriptionSpec>(
                r#"{"topic":"t","plugin":"p","start":"soon"}"#
            )
            .is_err()
        );
        assert!(
            serde_json::from_str::<SubscriptionSpec>(
                r#"{"topic":"t","plugin":"p","mode":"fanout"}"#
            )
            .is_err()
        );
        let bad = [
            r#""instances":0"#,
            r#""max_rate":-1"#,
            r#""retry":{"max_attempts":0}"#,
            r#""config":[1]"#,
            r#""on_exhausted":"block""#,
        ];
        for b in bad {
            let s: SubscriptionSpec =
                serde_json::from_str(&format!(r#"{{"topic":"t","plugin":"p",{b}}}"#)).unwrap();
            assert!(s.validate().is_err(), "{b}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn filter_parsing_never_panics(expr in ".{0,64}", tag in proptest::option::of("[a-z|* ]{0,8}")) {
                if let Ok(f) = TagFilter::parse(&expr) {
                    let _ = f.matches(tag.as_deref());
                }
            }

            #[test]
            fn a_tag_list_matches_exactly_its_tags(tags in proptest::collection::vec("[a-z0-9_.-]{1,8}", 1..6), probe in "[a-z0-9_.-]{1,8}") {
                let f = TagFilter::parse(&tags.join(" || ")).unwrap();
                prop_assert_eq!(f.matches(Some(&probe)), tags.contains(&probe));
                prop_assert!(!f.matches(None));
            }
        }
    }
}
