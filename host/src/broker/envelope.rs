//! The publish envelope: what a producer sends for one message, and the checks it must pass.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::base::MAX_DELAY_MS;
use crate::config::LimitsConfig;
use crate::storage::BodyKind;
use crate::storage::keys::MAX_KEY_LEN;

/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 256;
/// Most properties on one message, and their total size in bytes.
pub const MAX_PROPERTIES: usize = 64;
pub const MAX_PROPERTIES_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("give either \"body\" or \"body_base64\", not both")]
    BothBodies,
    #[error("a message needs \"body\" (JSON) or \"body_base64\"")]
    MissingBody,
    #[error("\"body_base64\" is not valid base64: {0}")]
    BadBase64(String),
    #[error("the message body has {len} bytes; the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("{field} is too long ({len} bytes; the limit is {max})")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{0} must not be empty")]
    EmptyField(&'static str),
    #[error(
        "a message has at most {MAX_PROPERTIES} properties of {MAX_PROPERTIES_BYTES} bytes in all"
    )]
    TooManyProperties,
    #[error("tag {0:?} may not contain '|', '*' or spaces (they are filter syntax)")]
    BadTag(String),
    #[error(
        "a delay is at most 30 days ({MAX_DELAY_MS} ms); give delay_ms or deliver_at, not both"
    )]
    BadDelay,
    #[error(
        "check_after_ms is for transactional messages (POST /v1/topics/{{topic}}/transactions)"
    )]
    TxnOnly,
    #[error("{field} is at most {max} ms")]
    TooLong { field: &'static str, max: u64 },
}

/// One message as a producer sends it (`POST /v1/topics/{topic}/messages`): `body` or
/// `body_base64` (one of them), and at most one of `delay_ms` and `deliver_at`.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[schemars(extend(
    "oneOf" = [{"required": ["body"]}, {"required": ["body_base64"]}],
    "not" = {"required": ["delay_ms", "deliver_at"], "properties": {
        "delay_ms": {"type": "integer"}, "deliver_at": {"type": "integer"}}}
))]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Any JSON value, kept byte for byte. `null` is a body too.
    #[serde(default, deserialize_with = "present")]
    pub body: Option<Box<RawValue>>,
    #[serde(default)]
    #[schemars(
        with = "String",
        regex(pattern = r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
    )]
    pub body_base64: Option<String>,
    #[schemars(length(min = 1, max = MAX_KEY_LEN))]
    pub key: Option<String>,
    /// No `|`, `*` or white space (they are filter syntax).
    #[schemars(length(min = 1, max = MAX_TAG_LEN), regex(pattern = r"^[^|*\s\u0085]+$"))]
    pub tag: Option<String>,
    #[schemars(length(min = 1, max = MAX_KEY_LEN))]
    pub sharding_key: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[schemars(range(max = MAX_DELAY_MS))]
    pub delay_ms: Option<u64>,
    /// Absolute due time, ms since the Unix epoch.
    pub deliver_at: Option<u64>,
    /// Transactions only: when to first ask the checker, overriding the topic's setting.
    #[schemars(range(max = crate::base::MAX_CHECK_MS))]
    pub check_after_ms: Option<u64>,
}

/// A field that is present is `Some`, even when it is JSON `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// An envelope that passed every check.
#[derive(Debug)]
pub struct Checked {
    pub key: Option<String>,
    pub tag: Option<String>,
    pub sharding_key: Option<String>,
    pub properties: BTreeMap<String, String>,
    pub body_kind: BodyKind,
    pub body: Vec<u8>,
    pub deliver_at: u64,
}

impl Checked {
    /// The message a plugin sees for this envelope when it is run outside any queue (the
    /// invoke API, `wasmq plugin test`): a new id, queue 0, `born_at` and `attempt` as given.
    pub fn into_trial_message(
        self,
        topic: String,
        offset: u64,
        born_at: u64,
        attempt: u32,
    ) -> crate::bindings::Message {
        crate::bindings::Message {
            id: uuid::Uuid::now_v7().to_string(),
            topic,
            queue: 0,
            offset,
            key: self.key,
            tag: self.tag,
            sharding_key: self.sharding_key,
            properties: self.properties.into_iter().collect(),
            body: self.body,
            born_at,
            attempt,
        }
    }
}

/// Whether `tag` is a tag: 1 to [`MAX_TAG_LEN`] bytes, no `|`, `*` or white space (they are
/// the filter syntax of a subscription's `tag_filter`).
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && !tag
            .chars()
            .any(|c| c == '|' || c == '*' || c.is_whitespace() || c == '\u{feff}')
}

fn check_field(
    field: &'static str,
    value: Option<String>,
    max: usize,
) -> Result<Option<String>, EnvelopeError> {
    match value {
        Some(v) if v.is_empty() => Err(EnvelopeError::EmptyField(field)),
        Some(v) if v.len() > max => Err(EnvelopeError::FieldTooLong {
            field,
            len: v.len(),
            max,
        }),
        other => Ok(other),
    }
}

impl Envelope {
    /// Validates the envelope against the limits; `now` is ms since the epoch.
    pub fn check(self, limits: &LimitsConfig, now: u64) -> Result<Checked, EnvelopeError> {
        if self.check_after_ms.is_some() {
            return Err(EnvelopeError::TxnOnly);
        }
        let max = limits.max_message_bytes;
        let (body_kind, body) = match (self.body, self.body_base64) {
            (Some(_), Some(_)) => return Err(EnvelopeError::BothBodies),
            (None, None) => return Err(EnvelopeError::MissingBody),
            (Some(raw), None) => (BodyKind::Json, raw.get().as_bytes().to_vec()),
            (None, Some(b64)) => {
                // Reject before decoding what cannot fit anyway.
                if b64.len() / 4 * 3 > max + 3 {
                    return Err(EnvelopeError::TooLarge {
                        len: b64.len() / 4 * 3,
                        max,
                    });
                }
                // Standard alphabet, padded; unused bits of the last symbol are ignored, as
                // RFC 4648 lets decoders do (`Zm9=` and `Zm8=` are both "fo").
                const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
                    &base64::alphabet::STANDARD,
                    base64::engine::GeneralPurposeConfig::new()
                        .with_decode_allow_trailing_bits(true),
                );
                let bytes = LENIENT
                    .decode(b64.as_bytes())
                    .map_err(|e| EnvelopeError::BadBase64(e.to_string()))?;
                (BodyKind::Binary, bytes)
            }
        };
        if body.len() > max {
            return Err(EnvelopeError::TooLarge {
                len: body.len(),
                max,
            });
        }
        let key = check_field("key", self.key, MAX_KEY_LEN)?;
        let sharding_key = check_field("sharding_key", self.sharding_key, MAX_KEY_LEN)?;
        let tag = check_field("tag", self.tag, MAX_TAG_LEN)?;
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(EnvelopeError::BadTag(t.clone()));
        }
        let prop_bytes: usize = self.properties.iter().map(|(k, v)| k.len() + v.len()).sum();
        if self.properties.len() > MAX_PROPERTIES || prop_bytes > MAX_PROPERTIES_BYTES {
            return Err(EnvelopeError::TooManyProperties);
        }
        let deliver_at = match (self.delay_ms, self.deliver_at) {
            (Some(_), Some(_)) => return Err(EnvelopeError::BadDelay),
            (Some(d), None) if d <= MAX_DELAY_MS => now.saturating_add(d),
            (None, Some(at)) if at <= now.saturating_add(MAX_DELAY_MS) => at.max(now),
            (None, None) => now,
            _ => return Err(EnvelopeError::BadDelay),
        };
        Ok(Checked {
            key,
            tag,
            sharding_key,
            properties: self.properties,
            body_kind,
            body,
            deliver_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Checked, EnvelopeError> {
        let e: Envelope = serde_json::from_str(json).unwrap();
        e.check(
            &LimitsConfig {
                max_message_bytes: 16,
                ..Default::default()
            },
            1000,
        )
    }

    #[test]
    fn json_body_is_kept_verbatim() {
        let c = parse(r#"{"body": {"b":1, "a" : 2}, "key":"k"}"#).unwrap();
        assert_eq!(c.body, br#"{"b":1, "a" : 2}"#);
        assert_eq!(c.body_kind, BodyKind::Json);
        assert_eq!(c.deliver_at, 1000);
        assert_eq!(parse(r#"{"body": null}"#).unwrap().body, b"null");
    }

    #[test]
    fn base64_body() {
        let c = parse(r#"{"body_base64": "AAEC"}"#).unwrap();
        assert_eq!((c.body_kind, c.body), (BodyKind::Binary, vec![0, 1, 2]));
        assert!(matches!(
            parse(r#"{"body_base64": "!!"}"#),
            Err(EnvelopeError::BadBase64(_))
        ));
    }

    #[test]
    fn bad_envelopes() {
        assert!(matches!(parse(r#"{}"#), Err(EnvelopeError::MissingBody)));
        assert!(matches!(
            parse(r#"{"body":1,"body_base64":"AA=="}"#),
            Err(EnvelopeError::BothBodies)
        ));
        assert!(matches!(
            parse(r#"{"body":"0123456789abcdefgh"}"#),
            Err(EnvelopeError::TooLarge { .. })
        ));
        assert!(matches!(
            parse(r#"{"body_base64":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#),
            Err(EnvelopeError::TooLarge { .. })
        ));
        assert!(matches!(
            parse(r#"{"body":1,"tag":"a||b"}"#),
            Err(EnvelopeError::BadTag(_))
        ));
        assert!(matches!(
            parse(r#"{"body":1,"key":""}"#),
            Err(EnvelopeError::EmptyField("key"))
        ));
        assert!(matches!(
            parse(r#"{"body":1,"delay_ms":2592000001}"#),
            Err(EnvelopeError::BadDelay)
        ));
        assert!(matches!(
            parse(r#"{"body":1,"delay_ms":1,"deliver_at":5}"#),
            Err(EnvelopeError::BadDelay)
        ));
        assert!(serde_json::from_str::<Envelope>(r#"{"body":1,"bogus":1}"#).is_err());
    }

    #[test]
    fn delays() {
        assert_eq!(
            parse(r#"{"body":1,"delay_ms":500}"#).unwrap().deliver_at,
            1500
        );
        // A due time in the past means "now", not an error.
        assert_eq!(
            parse(r#"{"body":1,"deliver_at":10}"#).unwrap().deliver_at,
            1000
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever bytes arrive, parsing and checking answer Ok or Err, never panic, and an
            /// accepted body is within the limit.
            #[test]
            fn any_input_is_parsed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(e) = serde_json::from_slice::<Envelope>(&bytes) {
                    let limits = LimitsConfig { max_message_bytes: 64, ..Default::default() };
                    if let Ok(c) = e.check(&limits, 1000) {
                        prop_assert!(c.body.len() <= 64);
                    }
                }
            }

            #[test]
            fn structured_envelopes_are_checked_not_panicked(
                body in proptest::option::of(".{0,80}"),
                b64 in proptest::option::of("[A-Za-z0-9+/=]{0,40}"),
                key in proptest::option::of(".{0,8}"),
                tag in proptest::option::of(".{0,8}"),
                delay in proptest::option::of(any::<u64>()),
            ) {
                let mut v = serde_json::json!({});
                if let Some(b) = body { v["body"] = b.into(); }
                if let Some(b) = b64 { v["body_base64"] = b.into(); }
                if let Some(k) = key { v["key"] = k.into(); }
                if let Some(t) = tag { v["tag"] = t.into(); }
                if let Some(d) = delay { v["delay_ms"] = d.into(); }
                let e: Envelope = serde_json::from_value(v).unwrap();
                let _ = e.check(&LimitsConfig::default(), 1000);
            }
        }
    }
}
