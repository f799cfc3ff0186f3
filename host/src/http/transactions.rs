//! Transaction routes: begin (half message), commit, rollback, recheck, show, list.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::{ApiError, AppState, parse_json, read_body};
use crate::broker::Envelope;
use crate::txn::{TxnState, TxnView};

/// `POST /v1/topics/{topic}/transactions`: the half message is stored.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct TxnBegun {
    txn_id: String,
    /// The id the message has once committed.
    message_id: crate::storage::MessageId,
    /// When the transaction checker is first asked, in ms from now.
    check_after_ms: u64,
    /// Always `pending`.
    state: TxnState,
}

/// Same body as a publish, plus an optional `check_after_ms`.
pub async fn begin(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<TxnBegun>), ApiError> {
    super::messages::admit(&state, &topic).await?;
    let bytes = read_body(body, state.broker.limits().max_request_bytes).await?;
    let envelope: Envelope = parse_json(&bytes)?;
    let t = state.transactions.begin(&topic, envelope).await?;
    let check_after_ms = t.next_check_at.saturating_sub(t.created_at);
    Ok((
        StatusCode::CREATED,
        Json(TxnBegun {
            txn_id: t.txn_id,
            message_id: t.message_id,
            check_after_ms,
            state: t.state,
        }),
    ))
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TxnView>, ApiError> {
    Ok(Json(state.transactions.get(&id).await?.view()))
}

pub async fn commit(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TxnView>, ApiError> {
    Ok(Json(
        state.transactions.commit(&id, "producer").await?.view(),
    ))
}

pub async fn rollback(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TxnView>, ApiError> {
    Ok(Json(
        state.transactions.rollback(&id, "producer").await?.view(),
    ))
}

pub async fn recheck(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TxnView>, ApiError> {
    Ok(Json(state.transactions.recheck(&id).await?.view()))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<TxnState>,
    #[schemars(range(max = u32::MAX))]
    limit: Option<u32>,
}

/// `?state=pending|committed|rolled_back|unresolved`
/// `GET /v1/transactions`.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct TxnList {
    transactions: Vec<TxnView>,
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<TxnList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let limit = q.limit.map_or(1000, |l| l as usize).clamp(1, 10_000);
    let transactions = state
        .transactions
        .list(q.state, limit)
        .await?
        .iter()
        .map(|t| t.view())
        .collect();
    Ok(Json(TxnList { transactions }))
}
