//! The CloudEvents 1.0 HTTP binding on publish: a binary-mode or structured-mode event becomes
//! one message (what maps where is on [`from_request`]).
//!
//! Parsed here, not by the cloudevents-sdk crate (tried first): it reads a structured event's
//! `data` into a `serde_json::Value` tree, so a JSON body was not kept byte for byte (big
//! integers became floats) and a hostile document cost tens of bytes of tree per byte sent;
//! nor did it percent-decode binary-mode header values. Here `data` stays raw JSON text.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use base64::Engine as _;
use percent_encoding::percent_decode_str;
use serde_json::value::RawValue;
use sha2::Digest as _;

use super::ApiError;
use super::guard::{content_type_essence, media_essence};
use crate::broker::Envelope;

/// What a property name of a CloudEvents attribute starts with (`ce_id`, `ce_type`, …), as the
/// CloudEvents Kafka binding names its headers.
pub const PROPERTY_PREFIX: &str = "ce_";

/// The extension that carries a partition key (CloudEvents "Partitioning" extension); it
/// becomes the message's `sharding_key`.
const PARTITION_KEY: &str = "partitionkey";

/// The one spec version accepted.
const SPEC_VERSION: &str = "1.0";

/// The media type of a structured-mode event (JSON event format).
const STRUCTURED: &str = "application/cloudevents+json";

/// The media type of a batch of structured-mode events (JSON event format §4).
pub const BATCH: &str = "application/cloudevents-batch+json";

/// Whether the request carries a CloudEvent: structured mode (`Content-Type:
/// application/cloudevents+json`) or binary mode (a `ce-specversion` header).
pub fn is_cloudevent(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion")
        || content_type_essence(headers).as_deref() == Some(STRUCTURED)
}

/// A CloudEvent as a message to publish, and the idempotency key that deduplicates it.
#[derive(Debug)]
pub struct Mapped {
    pub envelope: Envelope,
    /// `ce:` and 32 hex digits of SHA-256 over `source` and `id`: the spec lets consumers
    /// treat events with the same `source` and `id` as duplicates, so the broker stores one
    /// within `[limits] idempotency_window_ms` (a retried publish gets the first answer; the
    /// same pair with other content is a 422 `idempotency_key_reused`).
    pub idempotency_key: String,
}

/// The data of an event, before it becomes a body.
enum EventData {
    None,
    /// Raw JSON text (structured mode's `data`).
    Json(Box<RawValue>),
    Bytes(Vec<u8>),
}

/// Reads a CloudEvent (binary or structured mode, spec version 1.0) from a publish request
/// and maps it onto a message:
/// - `data` is the body: JSON data (structured `data` kept as sent, or bytes whose
///   `datacontenttype` is JSON and that parse as JSON) is a JSON body; anything else
///   (`data_base64`, a string `data` of a non-JSON type, a binary-mode body) a binary one; no
///   data is an empty binary body;
/// - every attribute and extension is a property `ce_<name>` (`ce_id`, `ce_source`, `ce_type`,
///   `ce_specversion`, `ce_time`, `ce_datacontenttype`, …) with its value as sent (integers
///   and booleans as text; binary-mode header values percent-decoded, HTTP binding
///   §3.1.3.2), so plugins see them;
/// - `id` is the message `key` (look the event up by it), `type` its `tag` when it is a valid
///   tag (no `|`, `*` or white space; at most 256 bytes), so subscriptions filter on it, and
///   the `partitionkey` extension its `sharding_key`.
///
/// Errors: 400 `bad_cloudevent` naming what is wrong (no or empty `id`/`source`/`type`,
/// another `specversion`, a `time` that is not RFC 3339, an attribute name that is not
/// lower-case letters and digits, a value that is not a string, integer or boolean, bad
/// JSON or base64); the message checks (sizes, at most 64 properties) apply after mapping as
/// for any publish.
pub fn from_request(headers: &HeaderMap, body: Vec<u8>) -> Result<Mapped, ApiError> {
    let (attributes, data) = if content_type_essence(headers).as_deref() == Some(STRUCTURED) {
        structured(&body)?
    } else {
        binary(headers, body)?
    };
    map(attributes, data)
}

/// Whether the request is a batch of CloudEvents (`Content-Type:
/// application/cloudevents-batch+json`, the JSON event format's batch).
pub fn is_batch(headers: &HeaderMap) -> bool {
    content_type_essence(headers).as_deref() == Some(BATCH)
}

/// A batch-mode body (a JSON array of structured-mode events) as messages, in order, each
/// mapped as [`from_request`] maps one. Errors: 400 `bad_cloudevent` naming the event's
/// index and what is wrong with it, or an empty batch; nothing is published then.
pub fn batch_from_body(body: &[u8]) -> Result<Vec<Mapped>, ApiError> {
    let events: Vec<Box<RawValue>> = serde_json::from_slice(body)
        .map_err(|e| bad(format!("a batch is a JSON array of structured events: {e}")))?;
    if events.is_empty() {
        return Err(bad("the batch holds no event".into()));
    }
    events
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            structured(raw.get().as_bytes())
                .and_then(|(attributes, data)| map(attributes, data))
                .map_err(|e| bad(format!("event {i}: {}", e.message)))
        })
        .collect()
}

/// An event's attributes and data, checked, as a message and its idempotency key.
fn map(attributes: BTreeMap<String, String>, data: EventData) -> Result<Mapped, ApiError> {
    check(&attributes)?;
    let attr = |name: &str| attributes.get(name).cloned().unwrap_or_default();
    let json_content = attributes
        .get("datacontenttype")
        .is_none_or(|t| is_json_media_type(t));
    let (body, body_base64) = match data {
        EventData::Json(raw) => (Some(raw), None),
        // JSON-typed bytes that are one JSON value: a JSON body, parsed once.
        EventData::Bytes(bytes) => match serde_json::from_slice::<&RawValue>(&bytes) {
            Ok(raw) if json_content => (Some(raw.to_owned()), None),
            _ => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
            ),
        },
        EventData::None => (None, Some(String::new())),
    };
    let digest = sha2::Sha256::new()
        .chain_update(attr("source").as_bytes())
        .chain_update([0u8])
        .chain_update(attr("id").as_bytes())
        .finalize();
    let idempotency_key = format!("ce:{}", crate::base::hex(&digest[..16]));
    let tag = Some(attr("type")).filter(|t| crate::broker::envelope::valid_tag(t));
    let sharding_key = attributes.get(PARTITION_KEY).cloned();
    let key = Some(attr("id"));
    let properties = attributes
        .into_iter()
        .map(|(name, value)| (format!("{PROPERTY_PREFIX}{name}"), value))
        .collect();
    Ok(Mapped {
        envelope: Envelope {
            body,
            body_base64,
            key,
            tag,
            sharding_key,
            properties,
            ..Envelope::default()
        },
        idempotency_key,
    })
}

/// Binary mode: attributes from the `ce-*` headers (percent-decoded), `datacontenttype` from
/// `Content-Type`, the body as the data.
fn binary(
    headers: &HeaderMap,
    body: Vec<u8>,
) -> Result<(BTreeMap<String, String>, EventData), ApiError> {
    let mut attributes = BTreeMap::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let value = value.to_str().map_err(|_| {
            bad(format!(
                "header {name} is not visible ASCII (percent-encode it)"
            ))
        })?;
        let value = percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| bad(format!("header {name} does not percent-decode to UTF-8")))?;
        if attributes
            .insert(attribute.to_string(), value.into_owned())
            .is_some()
        {
            return Err(bad(format!("header {name} is given twice")));
        }
    }
    if let Some(v) = headers.get(axum::http::header::CONTENT_TYPE) {
        let v = v
            .to_str()
            .map_err(|_| bad("Content-Type is not visible ASCII".into()))?;
        attributes.insert("datacontenttype".into(), v.to_string());
    }
    let data = if body.is_empty() {
        EventData::None
    } else {
        EventData::Bytes(body)
    };
    Ok((attributes, data))
}

/// Structured mode: one JSON object; `data` stays raw JSON text, `data_base64` is decoded,
/// every other member is an attribute (a string, integer or boolean; `null` is absent).
fn structured(body: &[u8]) -> Result<(BTreeMap<String, String>, EventData), ApiError> {
    let members: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(body)
        .map_err(|e| bad(format!("a structured event is one JSON object: {e}")))?;
    let mut attributes = BTreeMap::new();
    let mut data = EventData::None;
    let mut text_data = None;
    for (name, raw) in members {
        match name.as_str() {
            "data" => match serde_json::from_str::<String>(raw.get()) {
                // A string is text unless the event says its data is JSON (then decided below).
                Ok(text) => {
                    text_data = Some(text);
                    data = EventData::Json(raw);
                }
                Err(_) => data = EventData::Json(raw),
            },
            "data_base64" => {
                let text: String = serde_json::from_str(raw.get())
                    .map_err(|_| bad("data_base64 is a string".into()))?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| bad(format!("data_base64 is not base64: {e}")))?;
                if !matches!(data, EventData::None) {
                    return Err(bad("give data or data_base64, not both".into()));
                }
                data = EventData::Bytes(bytes);
            }
            _ => {
                let value: serde_json::Value = serde_json::from_str(raw.get())
                    .map_err(|e| bad(format!("attribute {name:?}: {e}")))?;
                let text = match value {
                    serde_json::Value::Null => continue,
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Bool(b) => b.to_string(),
                    serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                    _ => {
                        return Err(bad(format!(
                            "attribute {name:?} must be a string, an integer or a boolean"
                        )));
                    }
                };
                attributes.insert(name, text);
            }
        }
    }
    if let (Some(text), EventData::Json(_)) = (text_data, &data) {
        let json = attributes
            .get("datacontenttype")
            .is_none_or(|t| is_json_media_type(t));
        if !json {
            data = EventData::Bytes(text.into_bytes());
        }
    }
    Ok((attributes, data))
}

/// The rules every event follows, whatever its mode: spec version 1.0; `id`, `source` and
/// `type` present and not empty; `time` in RFC 3339; attribute names of lower-case letters
/// and digits (CloudEvents 1.0 §3.1.1).
fn check(attributes: &BTreeMap<String, String>) -> Result<(), ApiError> {
    match attributes.get("specversion").map(String::as_str) {
        Some(SPEC_VERSION) => {}
        Some(other) => {
            return Err(bad(format!(
                "specversion {other:?} is not supported; this server reads CloudEvents {SPEC_VERSION}"
            )));
        }
        None => return Err(bad("the event has no specversion".into())),
    }
    for name in ["id", "source", "type"] {
        if attributes.get(name).is_none_or(String::is_empty) {
            return Err(bad(format!("the event needs a non-empty {name:?}")));
        }
    }
    if let Some(t) = attributes.get("time")
        && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_err()
    {
        return Err(bad(format!("time {t:?} is not an RFC 3339 timestamp")));
    }
    if let Some(name) = attributes.keys().find(|n| {
        n.is_empty()
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    }) {
        return Err(bad(format!(
            "attribute name {name:?} is not lower-case letters and digits"
        )));
    }
    Ok(())
}

fn is_json_media_type(media_type: &str) -> bool {
    let essence = media_essence(media_type);
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request("bad_cloudevent", message)
}
