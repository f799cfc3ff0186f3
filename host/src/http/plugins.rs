//! Plugin routes: upload a component, list, show, delete, and invoke one directly.

use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ApiError, AppState, detached, parse_json, read_body};
use crate::base::now_ms;
use crate::broker::Envelope;
use crate::dispatch::spec::GrantSpec;
use crate::plugins::{PluginRecord, PluginVersion, validate_name};
use crate::runtime::host::{KvOwner, kv_space};
use crate::runtime::{FailureView, InstanceContext, OutcomeView, PluginLimits};

#[derive(Serialize, schemars::JsonSchema)]
pub struct VersionView {
    name: String,
    #[serde(flatten)]
    version: PluginVersion,
}

pub async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<PluginLimits>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<VersionView>), ApiError> {
    validate_name(&name)?;
    let Query(limits) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    // Parameters (`application/wasm; charset=binary`) and case do not change the type.
    let content_type = super::guard::content_type_essence(&headers).unwrap_or_default();
    if !matches!(
        content_type.as_str(),
        "" | "application/wasm" | "application/octet-stream"
    ) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the component as application/wasm, not {content_type}"),
        ));
    }
    let limit = state.broker.limits().max_plugin_bytes;
    let bytes = read_body(body, limit).await.map_err(|e| {
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                e.status,
                "plugin_too_large",
                format!("the plugin is larger than {limit} bytes"),
            )
        } else {
            e
        }
    })?;
    let (plugins, dispatcher, plugin) = (
        state.plugins.clone(),
        state.dispatcher.clone(),
        name.clone(),
    );
    let keep = state.broker.limits().max_plugin_versions as usize;
    let (version, created) = detached(async move {
        let (version, created) = plugins.upload(&plugin, bytes.to_vec(), limits).await?;
        if created {
            // Subscriptions that follow the latest version move to it (after draining).
            dispatcher.refresh(Some(&plugin), None).await?;
            // Then versions beyond the newest `keep` go, unless a subscription pins them.
            let pinned = dispatcher.pinned_versions(&plugin).await?;
            let pruned = plugins.prune(&plugin, keep, &pinned).await?;
            if !pruned.is_empty() {
                tracing::info!(%plugin, ?pruned, "removed old plugin versions");
            }
        }
        Ok((version, created))
    })
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(VersionView { name, version })))
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct PluginView {
    name: String,
    /// The latest version's fields.
    #[serde(flatten)]
    latest: Option<PluginVersion>,
    versions: Vec<PluginVersion>,
}

impl From<PluginRecord> for PluginView {
    fn from(r: PluginRecord) -> Self {
        PluginView {
            latest: r.latest().cloned(),
            name: r.name,
            versions: r.versions,
        }
    }
}

/// `GET /v1/plugins`.
#[derive(Serialize, schemars::JsonSchema)]
pub struct PluginList {
    plugins: Vec<PluginView>,
}

/// What a delete removed: `{"deleted": name}` (a plugin or a subscription).
#[derive(Serialize, schemars::JsonSchema)]
pub struct Removed {
    pub deleted: String,
}

pub async fn list(State(state): State<AppState>) -> Result<Json<PluginList>, ApiError> {
    let plugins: Vec<PluginView> = state
        .plugins
        .list()
        .await?
        .into_iter()
        .map(PluginView::from)
        .collect();
    Ok(Json(PluginList { plugins }))
}

pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<PluginView>, ApiError> {
    Ok(Json(state.plugins.get(&name).await?.into()))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Removed>, ApiError> {
    let user = state.dispatcher.plugin_user(&name).await?;
    state.plugins.delete(&name, user).await?;
    state.logs.remove(&name);
    for owner in [KvOwner::Plugin(&name), KvOwner::Invoke(&name)] {
        state.broker.forget_kv_usage(&kv_space(owner));
    }
    Ok(Json(Removed { deleted: name }))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    #[schemars(schema_with = "super::routes::plain_message")]
    message: Envelope,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    #[schemars(range(max = u32::MAX))]
    version: Option<u32>,
    #[serde(default)]
    #[schemars(range(max = u32::MAX))]
    attempt: Option<u32>,
    /// Capabilities to grant this call, as a subscription would.
    #[serde(default)]
    grants: GrantSpec,
}

/// `POST /v1/plugins/{name}/invoke`: the version that ran, how long the call took, and
/// either the plugin's `outcome` or the `failure` that stopped it.
#[derive(Serialize, schemars::JsonSchema)]
pub struct InvokeAnswer {
    name: String,
    version: u32,
    /// Wall-clock time of the call, fractional milliseconds.
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<OutcomeView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<FailureView>,
}

/// Runs the plugin's `handle` on one message outside any subscription: for trying a plugin.
/// A plugin failure (trap, deadline, memory) is reported in `failure`, with status 200.
pub async fn invoke(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<InvokeAnswer>, ApiError> {
    let bytes = read_body(body, state.broker.limits().max_request_bytes).await?;
    let req: InvokeRequest = parse_json(&bytes)?;
    let now = now_ms();
    let message = req
        .message
        .check(state.broker.limits(), now)?
        .into_trial_message(
            req.topic.unwrap_or_else(|| "invoke".into()),
            0,
            now,
            req.attempt.unwrap_or(1).max(1),
        );
    let grants = req
        .grants
        .to_grants()
        .map_err(|e| ApiError::bad_request("bad_grants", e))?;
    // A trial call gets no capability an admin has not granted this plugin elsewhere (in a
    // subscription, or as a topic's transaction checker): invoke is no way around the grants.
    let mut configured = Vec::new();
    for g in state.dispatcher.plugin_grants(&name).await? {
        configured.extend(g.to_grants().ok());
    }
    for t in state.broker.topics() {
        if t.transaction_checker.as_deref() == Some(name.as_str()) {
            configured.extend(t.transaction_checker_grants.to_grants().ok());
        }
    }
    if let Some(g) = grants.beyond(&configured) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "grant_not_configured",
            format!(
                "no subscription or transaction checker grants plugin {name:?} {g}; grant it there first"
            ),
        ));
    }
    let ctx = InstanceContext {
        plugin: name.clone(),
        version: 0,
        group: String::new(),
        member: "invoke".into(),
        instance_index: 0,
        instance_count: 1,
        config_json: req.config.unwrap_or_else(|| json!({})).to_string(),
        grants,
        limits: PluginLimits::default(),
        // Its own scratch namespace: trying a plugin never touches a subscription's state.
        kv_space: kv_space(KvOwner::Invoke(&name)),
        // A trial call, not a delivery: its kv writes and publishes take effect as made.
        stage_effects: false,
        services: state.broker.clone(),
    };
    let started = Instant::now();
    let (version, result) = state
        .plugins
        .invoke(&name, req.version, ctx, message)
        .await?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (outcome, failure) = match result {
        Ok(o) => (Some(OutcomeView::from(&o)), None),
        Err(e) => (None, Some(FailureView::from(&e))),
    };
    Ok(Json(InvokeAnswer {
        name,
        version: version.version,
        duration_ms: elapsed_ms,
        outcome,
        failure,
    }))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// The first `seq` wanted; without it, the newest `limit` lines.
    #[serde(default)]
    #[schemars(range(max = i64::MAX))]
    since: Option<u64>,
    #[serde(default = "default_log_limit")]
    #[schemars(range(max = u32::MAX))]
    limit: u32,
    /// Keep the response open and stream new lines as NDJSON.
    #[serde(default)]
    follow: bool,
}

fn default_log_limit() -> u32 {
    100
}

/// How often a quiet follow stream sends a blank line (so a gone client is noticed).
const FOLLOW_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// A plugin's recent log lines, or (`follow=true`) an NDJSON stream of them that stays open.
pub async fn logs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    caller: Option<axum::Extension<super::streams::Caller>>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    state.plugins.get(&name).await?;
    let logs = state.logs.clone();
    let limit = (q.limit as usize).clamp(1, crate::logs::RING_LINES);
    if q.since.is_some_and(|s| i64::try_from(s).is_err()) {
        return Err(ApiError::bad_request(
            "bad_query",
            "since is a line number: at most 9223372036854775807",
        ));
    }
    if !q.follow {
        return Ok(Json(logs.page(&name, q.since, limit)).into_response());
    }
    let caller = caller.map_or(
        super::streams::Caller {
            token: None,
            admin: true,
        },
        |c| c.0,
    );
    let slot = state.streams.open(caller).map_err(|why| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_streams", why).retry_after(5)
    })?;
    // Subscribe before reading the ring, so no line falls between the two.
    let live = logs
        .follow(&name)
        .ok_or_else(|| ApiError::internal("the log store is unavailable"))?;
    let page = logs.page(&name, q.since, limit);
    let backlog: Vec<bytes::Bytes> = page.lines.iter().filter_map(|l| ndjson(l)).collect();
    let state = FollowState {
        live,
        next: page.next,
        closing: state.closing.clone(),
        _slot: slot,
    };
    let stream = futures::stream::iter(backlog.into_iter().map(Ok::<_, std::io::Error>)).chain(
        futures::stream::unfold(state, |mut s| async move {
            let line = s.next_line().await?;
            Some((Ok(line), s))
        }),
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

struct FollowState {
    live: tokio::sync::broadcast::Receiver<std::sync::Arc<crate::logs::LogLine>>,
    /// Lines before this were sent already.
    next: u64,
    closing: tokio_util::sync::CancellationToken,
    /// This stream's place under the stream caps, freed when the stream ends.
    _slot: super::streams::StreamSlot,
}

impl FollowState {
    /// The next chunk to send; `None` ends the stream (server closing, plugin log gone).
    async fn next_line(&mut self) -> Option<bytes::Bytes> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let got = tokio::select! {
                () = self.closing.cancelled() => return None,
                got = tokio::time::timeout(FOLLOW_HEARTBEAT, self.live.recv()) => got,
            };
            match got {
                Err(_) => return Some(bytes::Bytes::from_static(b"\n")),
                Ok(Ok(line)) if line.seq < self.next => continue,
                Ok(Ok(line)) => {
                    self.next = line.seq + 1;
                    if let Some(b) = ndjson(&line) {
                        return Some(b);
                    }
                }
                Ok(Err(RecvError::Lagged(n))) => {
                    let note = json!({"skipped": n}).to_string() + "\n";
                    return Some(bytes::Bytes::from(note));
                }
                Ok(Err(RecvError::Closed)) => return None,
            }
        }
    }
}

fn ndjson(line: &crate::logs::LogLine) -> Option<bytes::Bytes> {
    let mut v = serde_json::to_vec(line).ok()?;
    v.push(b'\n');
    Some(v.into())
}
