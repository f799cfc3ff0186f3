//! The CloudEvents 1.0 HTTP binding on publish: a binary-mode or structured-mode event becomes
//! one message (what maps where is on [`from_request`]).

use std::collections::BTreeMap;

use ::cloudevents::event::{AttributesReader as _, Data};
use axum::http::HeaderMap;
use base64::Engine as _;
use percent_encoding::percent_decode_str;
use serde_json::value::RawValue;
use sha2::Digest as _;

use super::ApiError;
use crate::broker::Envelope;

/// What a property name of a CloudEvents attribute starts with (`ce_id`, `ce_type`, …), as the
/// CloudEvents Kafka binding names its headers.
pub const PROPERTY_PREFIX: &str = "ce_";

/// The extension that carries a partition key (CloudEvents "Partitioning" extension); it
/// becomes the message's `sharding_key`.
const PARTITION_KEY: &str = "partitionkey";

/// Whether the request carries a CloudEvent: binary mode (a `ce-specversion` header) or
/// structured mode (`Content-Type: application/cloudevents+json`).
pub fn is_cloudevent(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion")
        || headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/cloudevents+json")
            })
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

/// Reads a CloudEvent (binary or structured mode; spec version 1.0, or 0.3) from a publish request
/// and maps it onto a message:
/// - `data` is the body: JSON data (structured `data`, or a binary-mode body whose
///   `Content-Type` is JSON and that parses as JSON) is a JSON body, anything else (`data_base64`,
///   text, bytes) a binary one; no data is an empty binary body;
/// - every attribute and extension is a property `ce_<name>` (`ce_id`, `ce_source`, `ce_type`,
///   `ce_specversion`, `ce_time` in RFC 3339, `ce_datacontenttype`, …), so plugins see them;
///   binary-mode header values are percent-decoded (HTTP binding §3.1.3.2);
/// - `id` is the message `key` (look the event up by it), `type` its `tag` when it is a valid
///   tag (no `|`, `*` or white space; at most 256 bytes), so subscriptions filter on it, and
///   the `partitionkey` extension its `sharding_key`.
///
/// Errors: 400 `bad_cloudevent` naming what is wrong (no `id`/`source`/`type`, another
/// `specversion`, a malformed attribute or JSON document); the message checks (sizes, at most
/// 64 properties) apply after mapping as for any publish.
pub fn from_request(headers: &HeaderMap, body: Vec<u8>) -> Result<Mapped, ApiError> {
    let binary = headers.contains_key("ce-specversion")
        && !headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("cloudevents"));
    let event =
        ::cloudevents::binding::http::to_event(headers, body).map_err(|e| bad(e.to_string()))?;
    for (name, value) in [
        ("id", event.id()),
        ("source", event.source().as_str()),
        ("type", event.ty()),
    ] {
        if value.is_empty() {
            return Err(bad(format!("the CloudEvent has an empty {name:?}")));
        }
    }
    let decode = |s: &str| -> String {
        if binary {
            percent_decode_str(s).decode_utf8_lossy().into_owned()
        } else {
            s.to_string()
        }
    };
    let mut properties = BTreeMap::new();
    for (name, value) in event.iter() {
        properties.insert(
            format!("{PROPERTY_PREFIX}{name}"),
            decode(&value.to_string()),
        );
    }
    let id = decode(event.id());
    let ty = decode(event.ty());
    let sharding_key = properties
        .get(&format!("{PROPERTY_PREFIX}{PARTITION_KEY}"))
        .cloned();
    let json_content = event.datacontenttype().is_none_or(is_json_media_type);
    let (body, body_base64) = match event.data() {
        Some(Data::Json(v)) => (Some(raw_json(&v.to_string())?), None),
        Some(Data::Binary(bytes))
            if json_content && serde_json::from_slice::<&RawValue>(bytes).is_ok() =>
        {
            // Checked just above: the bytes are one JSON value.
            (Some(raw_json(&String::from_utf8_lossy(bytes))?), None)
        }
        Some(Data::Binary(bytes)) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
        Some(Data::String(s)) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(s)),
        ),
        None => (None, Some(String::new())),
    };
    let source = event.source().as_str().to_string();
    let digest = sha2::Sha256::new()
        .chain_update(source.as_bytes())
        .chain_update([0u8])
        .chain_update(event.id().as_bytes())
        .finalize();
    let idempotency_key = format!("ce:{}", crate::plugins::hex(&digest[..16]));
    let tag = Some(ty).filter(|t| crate::broker::envelope::valid_tag(t));
    Ok(Mapped {
        envelope: Envelope {
            body,
            body_base64,
            key: Some(id),
            tag,
            sharding_key,
            properties,
            ..Envelope::default()
        },
        idempotency_key,
    })
}

fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

fn raw_json(text: &str) -> Result<Box<RawValue>, ApiError> {
    RawValue::from_string(text.to_string()).map_err(|e| bad(format!("data is not JSON: {e}")))
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request("bad_cloudevent", message)
}

/// The OpenAPI media type object of a structured-mode event (CloudEvents 1.0 JSON format:
/// required `specversion`, `id`, `source`, `type`; `data` or `data_base64`; extensions are
/// further members with lower-case alphanumeric names of at most 20 characters).
pub fn structured_schema() -> serde_json::Value {
    let max_key = crate::storage::keys::MAX_KEY_LEN;
    serde_json::json!({
        "schema": {
            "type": "object",
            "required": ["specversion", "id", "source", "type"],
            "properties": {
                "specversion": {"const": "1.0"},
                "id": {"type": "string", "minLength": 1, "maxLength": max_key},
                "source": {"type": "string", "minLength": 1, "maxLength": 1024, "pattern": "^[!-~]+$"},
                "type": {"type": "string", "minLength": 1, "maxLength": 1024},
                "subject": {"type": "string", "maxLength": 1024},
                "time": {"type": "string", "format": "date-time"},
                "datacontenttype": {"type": "string", "pattern": "^[a-z]+/[a-z0-9.+-]+$"},
                "data": {},
                "data_base64": {
                    "type": "string",
                    "pattern": "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
                }
            },
            "propertyNames": {"pattern": "^([a-z0-9]{1,20}|data_base64)$"},
            "additionalProperties": {"type": "string", "maxLength": 256},
            "maxProperties": 40,
            "not": {"required": ["data", "data_base64"]}
        },
        "example": {
            "specversion": "1.0", "id": "order-7", "source": "/shop/eu",
            "type": "com.example.order.created", "datacontenttype": "application/json",
            "data": {"order": 7}
        }
    })
}
