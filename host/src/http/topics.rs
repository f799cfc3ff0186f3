//! Topic routes: create or update, show, list, delete.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState, detached, parse_json, read_body};
use crate::broker::{TopicMeta, TopicSpec};

/// Topic metadata bodies are tiny.
const MAX_TOPIC_BODY: usize = 64 * 1024;

#[derive(Serialize, schemars::JsonSchema)]
pub struct TopicView {
    #[serde(flatten)]
    meta: TopicMeta,
    /// Next offset of each queue.
    high_water: Vec<u64>,
    /// First offset still stored of each queue (retention deleted what lies below).
    low_water: Vec<u64>,
    /// Bytes the stored messages of each queue take.
    stored_bytes: Vec<u64>,
    /// Messages ever published to the topic.
    messages: u64,
    /// Messages stored now (what retention has not deleted).
    stored_messages: u64,
}

async fn view(state: &AppState, meta: TopicMeta) -> Result<TopicView, ApiError> {
    let extents = state.broker.extents(&meta).await?;
    Ok(TopicView {
        meta,
        high_water: extents.iter().map(|e| e.high_water).collect(),
        low_water: extents.iter().map(|e| e.low_water).collect(),
        stored_bytes: extents.iter().map(|e| e.bytes).collect(),
        messages: extents.iter().map(|e| e.high_water).sum(),
        stored_messages: extents
            .iter()
            .map(|e| e.high_water.saturating_sub(e.low_water))
            .sum(),
    })
}

pub async fn put(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<TopicView>), ApiError> {
    let bytes = read_body(body, MAX_TOPIC_BODY).await?;
    let spec: TopicSpec = if bytes.iter().all(u8::is_ascii_whitespace) {
        TopicSpec::default()
    } else {
        parse_json(&bytes)?
    };
    // A checker must be a plugin that can answer check-backs, or nothing would ever ask it.
    if let Some(checker) = spec
        .transaction_checker
        .as_deref()
        .filter(|c| !c.is_empty())
    {
        let (_, code) = state.plugins.code(checker, None).await?;
        if !code.has_checker() {
            return Err(ApiError::bad_request(
                "bad_topic_spec",
                format!(
                    "transaction_checker: plugin {checker:?} does not export check-transaction"
                ),
            ));
        }
    }
    let (broker, dispatcher) = (state.broker.clone(), state.dispatcher.clone());
    let (meta, created) = detached(async move {
        let queues_before = broker.topic_loaded(&topic).await.map(|t| t.queues).ok();
        let (meta, created) = broker.put_topic(&topic, spec).await?;
        if queues_before.is_some_and(|q| q != meta.queues) {
            // Subscriptions of the topic start reading its new queues.
            dispatcher.refresh(None, Some(&topic)).await?;
        }
        Ok((meta, created))
    })
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&state, meta).await?)))
}

pub async fn show(
    State(state): State<AppState>,
    Path(topic): Path<String>,
) -> Result<Json<TopicView>, ApiError> {
    let meta = state.broker.topic_loaded(&topic).await?;
    Ok(Json(view(&state, meta).await?))
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct TopicList {
    topics: Vec<TopicView>,
}

pub async fn list(State(state): State<AppState>) -> Result<Json<TopicList>, ApiError> {
    let mut topics = Vec::new();
    for meta in state.broker.topics() {
        topics.push(view(&state, meta).await?);
    }
    Ok(Json(TopicList { topics }))
}

/// Query of `DELETE /v1/topics/{topic}`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Also delete the topic's subscriptions (with their offsets, timers, dead letters and
    /// kv); without it a topic with subscriptions is refused with 409 `topic_in_use`.
    #[serde(default)]
    pub force: bool,
}

/// What deleting a topic removed.
#[derive(Serialize, schemars::JsonSchema)]
#[schemars(rename = "TopicDeleted")]
pub struct Deleted {
    topic: String,
    /// Messages deleted (what retention had not deleted already).
    messages: u64,
    /// Subscriptions deleted with it (`?force=true`).
    subscriptions: Vec<String>,
    /// Undecided transactions of the topic, rolled back.
    transactions_rolled_back: usize,
}

/// Deletes a topic, in this order: its subscriptions (only with `force`, else 409 while it
/// has any); its metadata, after which publishes answer 404 and none in flight is still
/// appending; its undecided transactions (rolled back, so no commit appends later); then its
/// messages, one range per queue. The change runs to its end even if the request is cut off.
pub async fn delete(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Json<Deleted>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    state.broker.topic_loaded(&topic).await?;
    let (broker, dispatcher, txns) = (
        state.broker.clone(),
        state.dispatcher.clone(),
        state.transactions.clone(),
    );
    let deleted = detached(async move {
        let groups = dispatcher.subscriptions_of(&topic).await?;
        if !groups.is_empty() && !q.force {
            return Err(crate::dispatch::DispatchError::TopicInUse {
                topic: topic.clone(),
                groups,
            }
            .into());
        }
        for g in &groups {
            dispatcher.delete(g).await?;
        }
        let (meta, deleting) = broker.forget_topic(&topic).await?;
        // Made while the topic was going: they could not run anyway.
        let mut subscriptions = groups;
        for g in dispatcher.subscriptions_of(&topic).await? {
            dispatcher.delete(&g).await?;
            subscriptions.push(g);
        }
        let transactions_rolled_back = txns.rollback_topic(&topic).await?;
        let messages = broker.delete_messages(&meta, &deleting).await?;
        Ok::<_, ApiError>(Deleted {
            topic,
            messages,
            subscriptions,
            transactions_rolled_back,
        })
    })
    .await?;
    Ok(Json(deleted))
}
