//! Message routes: publish (single and batch), look up by id, by business key, or by offset.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ApiError, AppState, parse_json, read_body};
use crate::broker::Envelope;
use crate::storage::{Appended, BodyKind, MessageId, StoredMessage};

/// Most messages one listing returns.
const MAX_LIST: usize = 1000;

/// With an `Idempotency-Key` header, a retried publish returns the original answer (200 and
/// `Idempotent-Replayed: true`) instead of storing the message again. A CloudEvent (binary
/// mode: `ce-*` headers; structured mode: `Content-Type: application/cloudevents+json`) is
/// published as [`super::cloudevents::from_request`] maps it.
pub async fn publish(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, HeaderMap, Json<Appended>), ApiError> {
    // Check the topic (and its backlog) before reading a possibly large body.
    admit(&state, &topic).await?;
    let bytes = read_body(body, state.broker.limits().max_request_bytes).await?;
    let mut out = HeaderMap::new();
    let explicit_key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        Some(Ok(k)) => Some(k.to_string()),
        Some(Err(_)) => {
            return Err(ApiError::bad_request(
                "bad_idempotency_key",
                "Idempotency-Key must be visible ASCII",
            ));
        }
        None => None,
    };
    // A CloudEvent (binary or structured mode) is deduplicated by its source and id unless the
    // producer names its own Idempotency-Key.
    if super::cloudevents::is_batch(&headers) {
        return Err(ApiError::bad_request(
            "bad_cloudevent",
            format!(
                "a batch of CloudEvents goes to POST /v1/topics/{topic}/messages/batch; this route takes one event"
            ),
        ));
    }
    let (envelope, key) = if super::cloudevents::is_cloudevent(&headers) {
        let event = super::cloudevents::from_request(&headers, bytes.to_vec())?;
        (
            event.envelope,
            Some(explicit_key.unwrap_or(event.idempotency_key)),
        )
    } else {
        (parse_json::<Envelope>(&bytes)?, explicit_key)
    };
    let Some(key) = key else {
        let appended = state.broker.publish(&topic, envelope).await?;
        return Ok((StatusCode::CREATED, out, Json(appended)));
    };
    let (appended, replayed) = state
        .broker
        .publish_idempotent(&topic, &key, envelope)
        .await?;
    if replayed {
        out.insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
        return Ok((StatusCode::OK, out, Json(appended)));
    }
    Ok((StatusCode::CREATED, out, Json(appended)))
}

/// Backpressure: a topic whose slowest subscription is `max_backlog` behind takes no more
/// messages for now (429 with `Retry-After`), instead of failing later or growing without end.
pub async fn admit(state: &AppState, topic: &str) -> Result<(), ApiError> {
    let max = state.broker.limits().max_backlog;
    if max == 0 {
        state.broker.topic_exists(topic).await?;
        return Ok(());
    }
    let high_water = state.broker.high_water_of(topic).await?;
    let backlog = state.dispatcher.backlog(topic, &high_water).await;
    if backlog >= max {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "backlog_full",
            format!("topic {topic:?} has {backlog} unconsumed messages (limit {max}); retry later"),
        )
        .retry_after(1));
    }
    Ok(())
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// At least one; at most `[limits] max_batch` (1000 by default), else 413.
    #[schemars(length(min = 1))]
    messages: Vec<Envelope>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct BatchResponse {
    results: Vec<Appended>,
}

/// A batch of envelopes is stored atomically (one group commit). A batch of CloudEvents
/// (`Content-Type: application/cloudevents-batch+json`) is checked whole first (a bad event
/// stores nothing), then each event is published as a single structured-mode event is,
/// deduplicated by its source and id, in order: not one atomic write, but a retried batch
/// stores each event once.
pub async fn publish_batch(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<BatchResponse>), ApiError> {
    admit(&state, &topic).await?;
    let bytes = read_body(body, state.broker.limits().max_request_bytes).await?;
    if super::cloudevents::is_batch(&headers) {
        let events = super::cloudevents::batch_from_body(&bytes)?;
        let limits = state.broker.limits();
        if events.len() > limits.max_batch {
            return Err(crate::broker::BrokerError::BatchTooLarge {
                len: events.len(),
                max: limits.max_batch,
            }
            .into());
        }
        let now = crate::base::now_ms();
        for (i, e) in events.iter().enumerate() {
            e.envelope.clone().check(limits, now).map_err(|err| {
                let inner = ApiError::from(err);
                ApiError::new(
                    inner.status,
                    inner.code,
                    format!("event {i}: {}", inner.message),
                )
            })?;
        }
        let mut results = Vec::with_capacity(events.len());
        for e in events {
            let (appended, _) = state
                .broker
                .publish_idempotent(&topic, &e.idempotency_key, e.envelope)
                .await?;
            results.push(appended);
        }
        return Ok((StatusCode::CREATED, Json(BatchResponse { results })));
    }
    let req: BatchRequest = parse_json(&bytes)?;
    let results = state.broker.publish_batch(&topic, req.messages).await?;
    Ok((StatusCode::CREATED, Json(BatchResponse { results })))
}

/// A stored message as the API shows it: JSON bodies inline, others as base64.
#[derive(Serialize, schemars::JsonSchema)]
pub struct MessageView {
    id: MessageId,
    topic: String,
    queue: u32,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sharding_key: Option<String>,
    properties: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    born_at: u64,
    /// When the broker stored it (a transaction's message: at commit); resets to a time
    /// search by it.
    stored_at: u64,
    deliver_at: u64,
}

impl From<StoredMessage> for MessageView {
    fn from(s: StoredMessage) -> Self {
        let m = s.message;
        let json = match m.body_kind {
            BodyKind::Json => String::from_utf8(m.body.clone())
                .ok()
                .and_then(|text| RawValue::from_string(text).ok()),
            BodyKind::Binary => None,
        };
        let body_base64 = json
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&m.body));
        MessageView {
            id: m.id,
            topic: s.topic,
            queue: m.queue,
            offset: s.offset,
            key: m.key,
            tag: m.tag,
            sharding_key: m.sharding_key,
            properties: m.properties,
            body: json,
            body_base64,
            born_at: m.born_at,
            stored_at: s.stored_at,
            deliver_at: m.deliver_at,
        }
    }
}

/// A message id from a path: 400 `bad_id` when it is not one.
fn message_id(id: &str) -> Result<MessageId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request("bad_id", format!("{id:?} is not a message id")))
}

pub async fn by_id(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, ApiError> {
    let id = message_id(&id)?;
    match state.broker.message(id).await? {
        Some(m) => Ok(Json(m.into())),
        None => Err(ApiError::not_found(
            "unknown_message",
            format!("no message with id {id}"),
        )),
    }
}

/// `GET /v1/messages/{id}/trace`: 404 `unknown_message` when neither the message nor any
/// attempt record of it exists.
pub async fn trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::dispatch::trace::MessageTrace>, ApiError> {
    let id = message_id(&id)?;
    match state.dispatcher.trace(id).await? {
        Some(t) => Ok(Json(t)),
        None => Err(ApiError::not_found(
            "unknown_message",
            format!("no message with id {id}, and no trace of one"),
        )),
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    key: Option<String>,
    #[schemars(range(max = u32::MAX))]
    queue: Option<u32>,
    /// An offset: at most 2^63 - 1, as every offset is.
    #[schemars(range(max = i64::MAX))]
    from: Option<u64>,
    #[schemars(range(max = u32::MAX))]
    limit: Option<u32>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct MessageList {
    messages: Vec<MessageView>,
}

/// `?key=K` finds messages by business key; `?queue=Q&from=O` reads a queue from an offset.
pub async fn list(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<MessageList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let meta = state.broker.topic_loaded(&topic).await?;
    let limit = q.limit.map_or(100, |l| l as usize).min(MAX_LIST);
    if q.from.is_some_and(|f| i64::try_from(f).is_err()) {
        return Err(ApiError::bad_request(
            "bad_query",
            "from is an offset: at most 9223372036854775807",
        ));
    }
    let found = match (q.key, q.queue) {
        // By business key; with a queue too, only that queue's.
        (Some(key), queue) => {
            let mut found = state.broker.messages_by_key(&topic, &key, limit).await?;
            if let Some(q) = queue {
                found.retain(|m| m.message.queue == q);
            }
            found
        }
        (None, Some(queue)) if queue < meta.queues => {
            state
                .broker
                .read(&topic, queue, q.from.unwrap_or(0), limit)
                .await?
        }
        (None, Some(queue)) => {
            return Err(ApiError::not_found(
                "unknown_queue",
                format!("topic {topic:?} has queues 0..{}, not {queue}", meta.queues),
            ));
        }
        // Neither: queue 0 from `from` (a one-queue topic's whole log).
        (None, None) => {
            state
                .broker
                .read(&topic, 0, q.from.unwrap_or(0), limit)
                .await?
        }
    };
    Ok(Json(MessageList {
        messages: found.into_iter().map(MessageView::from).collect(),
    }))
}
