//! The API's route table: the router and the OpenAPI document are both built from it, so the
//! document cannot drift from what the server answers.

use axum::http::Method;
use axum::routing::{MethodRouter, delete, get, post, put};
use serde_json::{Value, json};

use super::{AppState, dashboard, messages, plugins, subscriptions, topics, transactions};

/// One operation: method, path (axum's `{param}` syntax, as OpenAPI's), what it does, what its
/// JSON body holds (if it takes one), and the handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub summary: &'static str,
    pub body: Option<&'static str>,
    pub handler: MethodRouter<AppState>,
    /// Left out of the document (the dashboard's page and files).
    pub hidden: bool,
}

fn op(
    method: Method,
    path: &'static str,
    summary: &'static str,
    body: Option<&'static str>,
    handler: MethodRouter<AppState>,
) -> Route {
    Route {
        method,
        path,
        summary,
        body,
        handler,
        hidden: false,
    }
}

pub fn routes() -> Vec<Route> {
    use Method as M;
    let mut all = vec![
        op(M::GET, "/healthz", "Liveness", None, get(super::healthz)),
        op(
            M::GET,
            "/v1/cluster",
            "Nodes on this storage (heartbeats), leases and their owners, which node dispatches, backend health",
            None,
            get(super::cluster),
        ),
        op(
            M::GET,
            "/metrics",
            "Prometheus metrics (OpenMetrics text)",
            None,
            get(super::metrics),
        ),
        op(
            M::GET,
            "/v1/openapi.json",
            "This document",
            None,
            get(openapi),
        ),
        op(M::GET, "/v1/topics", "List topics", None, get(topics::list)),
        op(
            M::GET,
            "/v1/topics/{topic}",
            "Show a topic: queues, high water per queue, message count",
            None,
            get(topics::show),
        ),
        op(
            M::PUT,
            "/v1/topics/{topic}",
            "Create a topic or add queues (201 created, 200 updated)",
            Some(
                r#"{"queues": 4, "transaction_checker": "plugin", "transactions": {"check_after_ms": 6000}}"#,
            ),
            put(topics::put),
        ),
        op(
            M::POST,
            "/v1/topics/{topic}/messages",
            "Publish one message; acknowledged once durable. Header Idempotency-Key deduplicates retries",
            Some(
                r#"{"body": {}, "body_base64": "", "key": "", "tag": "", "sharding_key": "", "properties": {}, "delay_ms": 0, "deliver_at": 0}"#,
            ),
            post(messages::publish),
        ),
        op(
            M::GET,
            "/v1/topics/{topic}/messages",
            "Messages by business key (?key=) or a queue from an offset (?queue=&from=&limit=)",
            None,
            get(messages::list),
        ),
        op(
            M::POST,
            "/v1/topics/{topic}/messages/batch",
            "Publish a batch atomically (one group commit)",
            Some(r#"{"messages": [{"body": {}}]}"#),
            post(messages::publish_batch),
        ),
        op(
            M::GET,
            "/v1/messages/{id}",
            "A message by id",
            None,
            get(messages::by_id),
        ),
        op(
            M::POST,
            "/v1/topics/{topic}/transactions",
            "Store a half message (invisible until commit)",
            Some(r#"{"body": {}, "check_after_ms": 6000}"#),
            post(transactions::begin),
        ),
        op(
            M::GET,
            "/v1/transactions",
            "List transactions (?state=pending|committed|rolled_back|unresolved&limit=)",
            None,
            get(transactions::list),
        ),
        op(
            M::GET,
            "/v1/transactions/{id}",
            "Show a transaction: state, checks, history",
            None,
            get(transactions::show),
        ),
        op(
            M::POST,
            "/v1/transactions/{id}/commit",
            "Commit: the message becomes visible",
            None,
            post(transactions::commit),
        ),
        op(
            M::POST,
            "/v1/transactions/{id}/rollback",
            "Roll back: the half message is dropped",
            None,
            post(transactions::rollback),
        ),
        op(
            M::POST,
            "/v1/transactions/{id}/recheck",
            "Give an unresolved transaction another round of checks",
            None,
            post(transactions::recheck),
        ),
        op(
            M::GET,
            "/v1/plugins",
            "List plugins with their versions",
            None,
            get(plugins::list),
        ),
        op(
            M::GET,
            "/v1/plugins/{name}",
            "Show a plugin",
            None,
            get(plugins::show),
        ),
        op(
            M::PUT,
            "/v1/plugins/{name}",
            "Upload a component (application/wasm) as the next version (?timeout_ms=&memory_mb=)",
            None,
            put(plugins::upload),
        ),
        op(
            M::DELETE,
            "/v1/plugins/{name}",
            "Delete a plugin no subscription uses",
            None,
            delete(plugins::delete),
        ),
        op(
            M::POST,
            "/v1/plugins/{name}/invoke",
            "Run the plugin's handle once, outside any subscription",
            Some(
                r#"{"message": {"body": {}}, "config": {}, "grants": {}, "version": 1, "attempt": 1, "topic": "invoke"}"#,
            ),
            post(plugins::invoke),
        ),
        op(
            M::GET,
            "/v1/plugins/{name}/logs",
            "Recent log lines (?limit=&since=); ?follow=true streams NDJSON",
            None,
            get(plugins::logs),
        ),
        op(
            M::GET,
            "/v1/subscriptions",
            "List subscriptions with status",
            None,
            get(subscriptions::list),
        ),
        op(
            M::GET,
            "/v1/subscriptions/{group}",
            "Show a subscription: state, lag per queue (per instance for broadcast), timers, DLQ size, counters",
            None,
            get(subscriptions::show),
        ),
        op(
            M::PUT,
            "/v1/subscriptions/{group}",
            "Create or update a subscription",
            Some(
                r#"{"topic": "", "plugin": "", "plugin_version": 1, "mode": "clustering|broadcast", "ordered": false, "instances": 1, "filter": "*", "retry": {"max_attempts": 16, "backoff_ms": [10000]}, "on_exhausted": "dead_letter|block", "max_in_flight": 256, "max_rate": 100.0, "start": "earliest|latest|<ms>", "config": {}, "grants": {"email": false, "sms": false, "http": [], "publish": []}, "limits": {"timeout_ms": 5000, "memory_mb": 64}}"#,
            ),
            put(subscriptions::put),
        ),
        op(
            M::DELETE,
            "/v1/subscriptions/{group}",
            "Delete a subscription",
            None,
            delete(subscriptions::delete),
        ),
        op(
            M::POST,
            "/v1/subscriptions/{group}/pause",
            "Pause delivery",
            None,
            post(subscriptions::pause),
        ),
        op(
            M::POST,
            "/v1/subscriptions/{group}/resume",
            "Resume delivery",
            None,
            post(subscriptions::resume),
        ),
        op(
            M::POST,
            "/v1/subscriptions/{group}/reset",
            "Move the offsets",
            Some(r#"{"to": "earliest|latest|<ms>"}"#),
            post(subscriptions::reset),
        ),
        op(
            M::GET,
            "/v1/subscriptions/{group}/dlq",
            "Dead letters, paged (?limit=&after=)",
            None,
            get(subscriptions::dlq),
        ),
        op(
            M::POST,
            "/v1/subscriptions/{group}/dlq/redrive",
            "Redrive dead letters (some ids, or all)",
            Some(r#"{"ids": ["message id"]}"#),
            post(subscriptions::redrive),
        ),
    ];
    for (path, handler) in [
        ("/", get(dashboard::index)),
        ("/ui/{file}", get(dashboard::file)),
    ] {
        all.push(Route {
            method: Method::GET,
            path,
            summary: "The web dashboard",
            body: None,
            handler,
            hidden: true,
        });
    }
    all
}

/// The OpenAPI 3.1 document of every route in the table.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for r in routes().into_iter().filter(|r| !r.hidden) {
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let scope = super::auth::scope_name(&r.method, r.path);
        let mut operation = json!({
            "summary": r.summary,
            "operationId": format!("{} {}", r.method, r.path),
            "parameters": params,
            "responses": {
                "200": {"description": "success (201 for creations)", "content": {"application/json": {}}},
                "4XX": {"$ref": "#/components/responses/Error"},
                "5XX": {"$ref": "#/components/responses/Error"},
            },
            "x-wasmq-scope": scope,
        });
        if scope != "none" {
            operation["security"] = json!([{"bearer": [scope]}]);
        }
        if let Some(example) = r.body {
            let example: Value = serde_json::from_str(example).unwrap_or(Value::Null);
            operation["requestBody"] = json!({
                "content": {"application/json": {"schema": {"type": "object"}, "example": example}}
            });
        }
        let item = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        item[r.method.as_str().to_ascii_lowercase()] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "wasmq", "version": env!("CARGO_PKG_VERSION"),
                 "description": "A durable message broker whose consumers are sandboxed WebAssembly plugins."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "Tokens from [auth] tokens with scopes admin, produce (listed topics) and read; none configured = open API on loopback"}},
            "responses": {"Error": {"description": "an error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}},
        },
    })
}

async fn openapi() -> axum::Json<Value> {
    axum::Json(document())
}
