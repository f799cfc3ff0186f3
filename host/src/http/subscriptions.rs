//! Subscription routes: create or update, show, list, delete, pause, resume, reset, and the
//! dead-letter queue (browse, redrive).

use super::plugins::Removed;
use super::{ApiError, AppState, detached, parse_json, read_body};
use crate::dispatch::{DeadLetterView, Start, SubscriptionSpec, SubscriptionStatus};
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

const MAX_SPEC_BODY: usize = 256 * 1024;

pub async fn put(
    State(state): State<AppState>,
    Path(group): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<SubscriptionStatus>), ApiError> {
    let bytes = read_body(body, MAX_SPEC_BODY).await?;
    let spec: SubscriptionSpec = parse_json(&bytes)?;
    let d = state.dispatcher.clone();
    let (status, created) = detached(async move { Ok(d.put(&group, spec).await?) }).await?;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(status),
    ))
}

pub async fn show(
    State(state): State<AppState>,
    Path(group): Path<String>,
) -> Result<Json<SubscriptionStatus>, ApiError> {
    Ok(Json(state.dispatcher.status(&group).await?))
}

/// `GET /v1/subscriptions`.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct SubscriptionList {
    subscriptions: Vec<SubscriptionStatus>,
}

pub async fn list(State(state): State<AppState>) -> Result<Json<SubscriptionList>, ApiError> {
    Ok(Json(SubscriptionList {
        subscriptions: state.dispatcher.list().await?,
    }))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(group): Path<String>,
) -> Result<Json<Removed>, ApiError> {
    let d = state.dispatcher.clone();
    let name = group.clone();
    detached(async move { Ok(d.delete(&name).await?) }).await?;
    Ok(Json(Removed { deleted: group }))
}

pub async fn pause(
    State(state): State<AppState>,
    Path(group): Path<String>,
) -> Result<Json<SubscriptionStatus>, ApiError> {
    let d = state.dispatcher.clone();
    Ok(Json(
        detached(async move { Ok(d.pause(&group).await?) }).await?,
    ))
}

pub async fn resume(
    State(state): State<AppState>,
    Path(group): Path<String>,
) -> Result<Json<SubscriptionStatus>, ApiError> {
    let d = state.dispatcher.clone();
    Ok(Json(
        detached(async move { Ok(d.resume(&group).await?) }).await?,
    ))
}

#[derive(Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    #[serde(default)]
    to: Start,
}

/// `{"to": "earliest" | "latest" | <ms since the epoch>}`; an empty body means earliest.
pub async fn reset(
    State(state): State<AppState>,
    Path(group): Path<String>,
    body: Body,
) -> Result<Json<SubscriptionStatus>, ApiError> {
    let bytes = read_body(body, MAX_SPEC_BODY).await?;
    let req: ResetRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        ResetRequest::default()
    } else {
        parse_json(&bytes)?
    };
    let d = state.dispatcher.clone();
    Ok(Json(
        detached(async move { Ok(d.reset(&group, req.to).await?) }).await?,
    ))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    after: Option<String>,
    #[schemars(range(max = u32::MAX))]
    limit: Option<u32>,
}

/// A page of dead letters, oldest first.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct DlqPage {
    entries: Vec<DeadLetterView>,
    /// `after` for the next page; null on the last page.
    next: Option<String>,
}

/// Oldest first; pass the last entry's `key` as `after` for the next page.
pub async fn dlq(
    State(state): State<AppState>,
    Path(group): Path<String>,
    query: Result<Query<DlqQuery>, QueryRejection>,
) -> Result<Json<DlqPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let limit = q.limit.map_or(100, |l| l as usize).clamp(1, 1000);
    let entries = state
        .dispatcher
        .dlq(&group, q.after.as_deref(), limit)
        .await?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.key()))
        .flatten();
    let views: Vec<DeadLetterView> = entries
        .into_iter()
        .map(|e| DeadLetterView {
            key: e.key(),
            instance: e.instance(),
            entry: e,
        })
        .collect();
    Ok(Json(DlqPage {
        entries: views,
        next,
    }))
}

#[derive(Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    ids: Option<Vec<String>>,
}

/// How many dead letters a redrive published again.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Redriven {
    redriven: usize,
}

/// `{"ids": [...]}` redrives those messages; an empty body redrives all.
pub async fn redrive(
    State(state): State<AppState>,
    Path(group): Path<String>,
    body: Body,
) -> Result<Json<Redriven>, ApiError> {
    let bytes = read_body(body, MAX_SPEC_BODY).await?;
    let req: RedriveRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        RedriveRequest::default()
    } else {
        parse_json(&bytes)?
    };
    let d = state.dispatcher.clone();
    let n = detached(async move { Ok(d.redrive(&group, req.ids.as_deref()).await?) }).await?;
    Ok(Json(Redriven { redriven: n }))
}
