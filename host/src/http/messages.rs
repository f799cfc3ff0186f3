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
/// `Idempotent-Replayed: true`) instead of storing the message again.
pub async fn publish(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, HeaderMap, Json<Appended>), ApiError> {
    // Check the topic (and its backlog) before reading a possibly large body.
    admit(&state, &topic).await?;
    let bytes = read_body(body, state.broker.limits().max_request_bytes).await?;
    let envelope: Envelope = parse_json(&bytes)?;
    let mut out = HeaderMap::new();
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        Some(Ok(k)) => Some(k.to_string()),
        Some(Err(_)) => {
            return Err(ApiError::bad_request(
                "bad_idempotency_key",
                "Idempotency-Key must be visible ASCII",
            ));
        }
        None => None,
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
    let meta = state.broker.topic_loaded(topic).await?;
    let max = state.broker.limits().max_backlog;
    if max == 0 {
        return Ok(());
    }
    let high_water = state.broker.high_water(&meta).await?;
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
    messages: Vec<Envelope>,
}

#[derive(Serialize)]
pub struct BatchResponse {
    results: Vec<Appended>,
}

pub async fn publish_batch(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<BatchResponse>), ApiError> {
    admit(&state, &topic).await?;
    let bytes = read_body(body, state.broker.limits().max_request_bytes).await?;
    let req: BatchRequest = parse_json(&bytes)?;
    let results = state.broker.publish_batch(&topic, req.messages).await?;
    Ok((StatusCode::CREATED, Json(BatchResponse { results })))
}

/// A stored message as the API shows it: JSON bodies inline, others as base64.
#[derive(Serialize)]
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

pub async fn by_id(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, ApiError> {
    let id: MessageId = id
        .parse()
        .map_err(|_| ApiError::bad_request("bad_id", format!("{id:?} is not a message id")))?;
    match state.broker.message(id).await? {
        Some(m) => Ok(Json(m.into())),
        None => Err(ApiError::not_found(
            "unknown_message",
            format!("no message with id {id}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    key: Option<String>,
    queue: Option<u32>,
    from: Option<u64>,
    limit: Option<usize>,
}

#[derive(Serialize)]
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
    let limit = q.limit.unwrap_or(100).min(MAX_LIST);
    let found = match (q.key, q.queue) {
        (Some(key), None) => state.broker.messages_by_key(&topic, &key, limit).await?,
        (None, Some(queue)) if queue < meta.queues => {
            state
                .broker
                .read(&topic, queue, q.from.unwrap_or(0), limit)
                .await?
        }
        (None, Some(queue)) => {
            return Err(ApiError::bad_request(
                "bad_queue",
                format!("topic {topic:?} has queues 0..{}, not {queue}", meta.queues),
            ));
        }
        _ => {
            return Err(ApiError::bad_request(
                "bad_query",
                "give either ?key=K, or ?queue=Q with optional &from=OFFSET&limit=N",
            ));
        }
    };
    Ok(Json(MessageList {
        messages: found.into_iter().map(MessageView::from).collect(),
    }))
}
