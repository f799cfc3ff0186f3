//! The HTTP API: the public routes (documented at `GET /v1/openapi.json`), request parsing with
//! JSON errors.

mod auth;
mod cloudevents;
mod dashboard;
mod error;
pub mod guard;
mod messages;
mod metrics;
mod plugins;
pub mod routes;
mod serve;
pub mod streams;
mod subscriptions;
mod topics;
mod transactions;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::broker::Broker;
use crate::dispatch::Dispatcher;
use crate::plugins::Plugins;
use crate::txn::Transactions;
pub use error::ApiError;
pub use serve::serve;

/// What every handler reaches: one `Arc`, so the per-request copies axum makes (one per
/// middleware layer and one per handler) cost one reference count, not one per part (the
/// single-message publish profile spent 7% of its CPU copying and dropping the parts).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;
    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The server's parts, shared by every request through [`AppState`].
pub struct AppParts {
    pub broker: Arc<Broker>,
    pub plugins: Arc<Plugins>,
    /// Plugin log lines (rings per plugin, followers).
    pub logs: Arc<crate::logs::PluginLogs>,
    pub dispatcher: Arc<Dispatcher>,
    pub transactions: Arc<Transactions>,
    /// Bearer tokens; none = open API (loopback only).
    pub tokens: Arc<Vec<crate::config::TokenConfig>>,
    /// Past this, a request is answered 408 (a slow upload cannot hold a handler forever).
    pub request_timeout: std::time::Duration,
    /// Cancelled when the server begins to shut down: open streams end.
    pub closing: tokio_util::sync::CancellationToken,
    /// This node, its heartbeat and the cluster view.
    pub node: Arc<crate::cluster::Node>,
    /// Which hosts and browser origins may reach the API.
    pub browser: Arc<guard::BrowserPolicy>,
    /// Caps on open log-follow streams, in total and per token.
    pub streams: Arc<streams::StreamLimits>,
}

/// Runs a control change (subscription changes, a plugin upload with the restarts it causes, a
/// topic change) as a task of its own, so it runs to its end, or fails as a whole, even when
/// the request that asked for it is cut off by the request timeout or a client that went away:
/// a subscription is never left stopped while shown running.
pub(crate) async fn detached<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(change).await.map_err(ApiError::internal)?
}

/// The whole API; tests and the server both build it here.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new();
    for r in routes::routes() {
        // Two methods on one path merge into one method router.
        router = router.route(r.path, r.handler);
    }
    router
        .route_layer(axum::middleware::from_fn(guard::content_type))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), front))
        .with_state(state)
}

/// What runs in front of every route, in this order, as one layer (as five layers it cost
/// five boxed futures and service clones per request):
/// 1. the body is tracked, so an answer given before it was read closes the connection
///    ([`TrackedBody`]);
/// 2. every error leaves as JSON ([`json_errors`]), and every answer says `nosniff`;
/// 3. the request timeout bounds the rest ([`AppParts::request_timeout`]; a streamed
///    response body, a log follow, is not cut by it);
/// 4. host and cross-site checks ([`guard::check`]), then 5. the token ([`auth::check`]).
async fn front(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let (req, read) = TrackedBody::wrap(req);
    let checked = guard::check(&state, req, |req| {
        auth::check(&state, req, move |req| next.run(req))
    });
    let resp = match tokio::time::timeout(state.request_timeout, checked).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "no response within {} ms (was the body sent too slowly?)",
                state.request_timeout.as_millis()
            ),
        )
        .into_response(),
    };
    let mut resp = json_errors(resp).await;
    resp.headers_mut().insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    if read.is_some_and(|r| !r.load(std::sync::atomic::Ordering::Acquire)) {
        // A request answered before its body was read (a refused upload, a 401) leaves bytes
        // on the connection, so the server closes it; saying `Connection: close` lets clients
        // know not to reuse it rather than race the close.
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// A request body that records when it was read to its end (polled until it had no frame
/// left), passing everything else through. It replaces a stream adapter around the body
/// (a boxed stream, a chained future and a filter per request).
struct TrackedBody {
    inner: Body,
    read: Arc<std::sync::atomic::AtomicBool>,
}

impl TrackedBody {
    /// Wraps `req`'s body when it has one (a `Content-Length` other than 0, or chunked);
    /// the flag turns true once a handler read all of it.
    fn wrap(
        req: axum::extract::Request,
    ) -> (
        axum::extract::Request,
        Option<Arc<std::sync::atomic::AtomicBool>>,
    ) {
        let headers = req.headers();
        let has_body = match headers.get(axum::http::header::CONTENT_LENGTH) {
            Some(len) => len.as_bytes() != b"0",
            None => headers.contains_key(axum::http::header::TRANSFER_ENCODING),
        };
        if !has_body {
            return (req, None);
        }
        let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (parts, inner) = req.into_parts();
        let body = Body::new(TrackedBody {
            inner,
            read: read.clone(),
        });
        (axum::extract::Request::from_parts(parts, body), Some(read))
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.read.store(true, std::sync::atomic::Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Extractor rejections (a path that is not UTF-8, say) answer in plain text; every error
/// leaves this server as `{"error":{"code","message"}}`.
async fn json_errors(resp: axum::response::Response) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let status = resp.status();
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

/// `GET /healthz`: the server answers, and which version it runs.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Health {
    /// Always `"ok"`: an answer at all is the signal.
    pub status: &'static str,
    pub version: &'static str,
}

/// Liveness: `{"status": "ok", "version": the server's version}`.
pub(crate) async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// `GET /v1/cluster`: this node, the backend and whether it answers, every node's heartbeat
/// and every lease (both empty when the backend does not answer), and what this node runs.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct ClusterAnswer {
    pub node: String,
    /// `rocksdb` or `jetstream`.
    pub backend: &'static str,
    pub nodes: Vec<crate::cluster::NodeView>,
    pub leases: Vec<crate::cluster::LeaseView>,
    pub backend_healthy: bool,
    /// Why the backend did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_error: Option<String>,
    /// This node runs subscriptions (on shared storage: holds at least one lease).
    pub dispatching: bool,
    pub leases_held: usize,
}

/// The nodes sharing this broker's storage (heartbeats), the leases and their owners, which
/// node dispatches, and whether the backend answers.
pub(crate) async fn cluster(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<ClusterAnswer> {
    use crate::dispatch::share::{UnitKey, parse_key};
    let (nodes, leases, backend_error) = match state.node.view().await {
        Ok(mut v) => {
            for l in &mut v.leases {
                if let Some((group, unit)) = parse_key(&l.lease) {
                    l.subscription = Some(group.to_string());
                    match unit {
                        UnitKey::Queue(q) => l.queue = Some(q),
                        UnitKey::Instance(i) => l.instance = Some(i),
                    }
                }
            }
            (v.nodes, v.leases, None)
        }
        Err(e) => (Vec::new(), Vec::new(), Some(e.to_string())),
    };
    axum::Json(ClusterAnswer {
        node: state.node.id.clone(),
        backend: state.node.backend,
        nodes,
        leases,
        backend_healthy: backend_error.is_none(),
        backend_error,
        dispatching: state.dispatcher.dispatching().await,
        leases_held: state.dispatcher.leases_held().await,
    })
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "no_route",
        "no such route; GET /v1/openapi.json lists the API",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Reads a request body up to `limit` bytes; more is a 413, not a dropped connection.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("request body is larger than {limit} bytes"),
            )
        } else {
            ApiError::bad_request("bad_body", format!("cannot read request body: {e}"))
        }
    })
}

/// Parses JSON with a message that points at the problem.
/// Parses a JSON request body. A whole number written with a fraction (`722.0`) is that
/// number, as JSON Schema's `integer` says; such bodies take a second, slower pass.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).or_else(|first| {
        let mut v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|_| ApiError::bad_request("bad_json", format!("invalid JSON: {first}")))?;
        if !whole_floats_to_integers(&mut v) {
            return Err(ApiError::bad_request(
                "bad_json",
                format!("invalid JSON: {first}"),
            ));
        }
        serde_json::from_value(v)
            .map_err(|e| ApiError::bad_request("bad_json", format!("invalid JSON: {e}")))
    })
}

/// Rewrites floats with no fraction that fit an integer (`722.0`) as integers; false if there
/// were none (the first error stands).
fn whole_floats_to_integers(v: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) else {
                return false;
            };
            let whole = if (0.0..u64::MAX as f64).contains(&f) {
                Some(Value::from(f as u64))
            } else if (i64::MIN as f64..0.0).contains(&f) {
                Some(Value::from(f as i64))
            } else {
                None
            };
            whole.map(|w| *v = w).is_some()
        }
        Value::Array(a) => a
            .iter_mut()
            .fold(false, |any, x| whole_floats_to_integers(x) | any),
        Value::Object(m) => m
            .values_mut()
            .fold(false, |any, x| whole_floats_to_integers(x) | any),
        _ => false,
    }
}
