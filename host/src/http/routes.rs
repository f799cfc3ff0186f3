//! The API's route table: the router and the OpenAPI document are both built from it, so the
//! document cannot drift from what the server answers.

use axum::http::Method;
use axum::routing::{MethodRouter, delete, get, post, put};
use serde_json::{Value, json};

use super::{AppState, dashboard, messages, plugins, subscriptions, topics, transactions};

/// The JSON Schema of a request body, from its serde type.
pub type BodySchema = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

fn schema<T: schemars::JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// The JSON Schema of a success answer (what the serde type serializes to), with the name it
/// has under `components/schemas`.
pub type AnswerSchema = (fn() -> std::borrow::Cow<'static, str>, BodySchema);

fn answer<T: schemars::JsonSchema>() -> AnswerSchema {
    (T::schema_name, schema::<T>)
}

/// A plain publish: an envelope without `check_after_ms` (transactions only).
pub fn plain_message(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let envelope = g.subschema_for::<crate::broker::Envelope>();
    schemars::json_schema!({"allOf": [envelope, {"not": {"required": ["check_after_ms"],
        "properties": {"check_after_ms": {"type": "integer"}}}}]})
}

/// A batch of plain publishes.
fn plain_batch(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let message = plain_message(g);
    schemars::json_schema!({
        "type": "object", "additionalProperties": false, "required": ["messages"],
        "properties": {"messages": {"type": "array", "minItems": 1, "items": message}}
    })
}

/// One operation: method, path (axum's `{param}` syntax, as OpenAPI's), what it does, what its
/// JSON body holds (if it takes one: an example and the schema of its serde type), and the
/// handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub summary: &'static str,
    pub body: Option<&'static str>,
    pub schema: Option<BodySchema>,
    pub handler: MethodRouter<AppState>,
    /// Left out of the document (the dashboard's page and files).
    pub hidden: bool,
}

fn op(
    method: Method,
    path: &'static str,
    summary: &'static str,
    body: Option<(&'static str, BodySchema)>,
    handler: MethodRouter<AppState>,
) -> Route {
    Route {
        method,
        path,
        summary,
        body: body.map(|b| b.0),
        schema: body.map(|b| b.1),
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
            "Prometheus metrics: the classic text format 0.0.4 (text/plain), or OpenMetrics 1.0 when Accept prefers application/openmetrics-text",
            None,
            get(super::metrics::metrics),
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
            "Show a topic: queues, retention, low and high water and stored bytes per queue, message counts",
            None,
            get(topics::show),
        ),
        op(
            M::PUT,
            "/v1/topics/{topic}",
            "Create a topic, add queues or change its retention (201 created, 200 updated)",
            Some((
                r#"{"queues": 4, "transaction_checker": "plugin", "transactions": {"check_after_ms": 6000}, "retention": {"max_age_ms": 259200000, "max_bytes": null, "after_consumed": false}}"#,
                schema::<crate::broker::TopicSpec>,
            )),
            put(topics::put),
        ),
        op(
            M::DELETE,
            "/v1/topics/{topic}",
            "Delete a topic with its messages (409 topic_in_use while it has subscriptions, unless ?force=true deletes them too); undecided transactions are rolled back",
            None,
            delete(topics::delete),
        ),
        op(
            M::POST,
            "/v1/topics/{topic}/messages",
            "Publish one message; acknowledged once durable. Header Idempotency-Key deduplicates retries. A CloudEvent is published too: binary mode (ce-* headers, the body is the data) or structured mode (Content-Type: application/cloudevents+json); README maps its attributes",
            Some((
                r#"{"body": {"order": 42}, "key": "order-42", "tag": "paid", "sharding_key": "user-7", "properties": {"source": "web"}, "delay_ms": 0}"#,
                plain_message,
            )),
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
            "Publish a batch atomically (one group commit). A CloudEvents batch (Content-Type: application/cloudevents-batch+json) is checked whole, then each event is published as one structured-mode event is, deduplicated by source and id",
            Some((r#"{"messages": [{"body": {}}]}"#, plain_batch)),
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
            M::GET,
            "/v1/messages/{id}/trace",
            "A message's trace: for each subscription of its topic (each broadcast instance), every delivery attempt on record (time, node, instance, outcome, reason, duration, fate) and where it is now (pending, delayed, delivering, in_retry, acked, dead_lettered, filtered, expired, passed)",
            None,
            get(messages::trace),
        ),
        op(
            M::POST,
            "/v1/topics/{topic}/transactions",
            "Store a half message (invisible until commit)",
            Some((
                r#"{"body": {}, "check_after_ms": 6000}"#,
                schema::<crate::broker::Envelope>,
            )),
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
            Some((
                r#"{"message": {"body": {}}, "config": {}, "grants": {}, "version": 1, "attempt": 1, "topic": "invoke"}"#,
                schema::<super::plugins::InvokeRequest>,
            )),
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
            Some((
                r#"{"topic": "orders", "plugin": "notifier", "mode": "clustering", "ordered": false, "instances": 1, "filter": "*", "retry": {"max_attempts": 16, "backoff_ms": [10000, 30000]}, "on_exhausted": "dead_letter", "max_in_flight": 256, "max_rate": 100.0, "start": "earliest", "config": {"to": "{{email}}"}, "grants": {"email": true, "sms": false, "http": [], "publish": []}, "limits": {"timeout_ms": 5000, "memory_mb": 64}}"#,
                schema::<crate::dispatch::SubscriptionSpec>,
            )),
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
            Some((
                r#"{"to": "earliest"}"#,
                schema::<super::subscriptions::ResetRequest>,
            )),
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
            Some((
                r#"{"ids": ["message id"]}"#,
                schema::<super::subscriptions::RedriveRequest>,
            )),
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
            schema: None,
            handler,
            hidden: true,
        });
    }
    all
}

/// What a route answers on success: 201 for what creates, 200 otherwise; a PUT that may create
/// or update, and a publish that may replay an idempotency key, answer either.
fn success(method: &Method, path: &str) -> &'static [&'static str] {
    match (method.as_str(), path) {
        ("PUT", _) | ("POST", "/v1/topics/{topic}/messages") => &["200", "201"],
        ("POST", "/v1/topics/{topic}/messages/batch" | "/v1/topics/{topic}/transactions") => {
            &["201"]
        }
        _ => &["200"],
    }
}

/// The content types of a route's success answer, with their schemas: JSON answers refer to
/// the component `answer_of` names.
fn answers_in(method: &Method, path: &str) -> Value {
    let json = || match answer_of(method, path) {
        Some((name, _)) => json!({"$ref": format!("#/components/schemas/{}", name())}),
        None => json!({}),
    };
    match path {
        "/metrics" => json!({
            "text/plain": {"schema": {"type": "string"}},
            "application/openmetrics-text": {"schema": {"type": "string"}},
        }),
        "/v1/plugins/{name}/logs" => json!({
            "application/json": {"schema": json()},
            "application/x-ndjson": {"schema": {"type": "string"}},
        }),
        _ => json!({"application/json": {"schema": json()}}),
    }
}

/// The serde type a route's handler answers with on success (`None`: not JSON).
fn answer_of(method: &Method, path: &str) -> Option<AnswerSchema> {
    use super::{ClusterAnswer, Health};
    use crate::dispatch::SubscriptionStatus;
    use crate::txn::TxnView;
    Some(match (method.as_str(), path) {
        (_, "/metrics") => return None,
        (_, "/healthz") => answer::<Health>(),
        (_, "/v1/cluster") => answer::<ClusterAnswer>(),
        (_, "/v1/openapi.json") => answer::<OpenApiDocument>(),
        ("GET", "/v1/topics") => answer::<topics::TopicList>(),
        ("DELETE", "/v1/topics/{topic}") => answer::<topics::Deleted>(),
        (_, "/v1/topics/{topic}") => answer::<topics::TopicView>(),
        ("POST", "/v1/topics/{topic}/messages") => answer::<crate::storage::Appended>(),
        ("GET", "/v1/topics/{topic}/messages") => answer::<messages::MessageList>(),
        (_, "/v1/topics/{topic}/messages/batch") => answer::<messages::BatchResponse>(),
        (_, "/v1/messages/{id}") => answer::<messages::MessageView>(),
        (_, "/v1/messages/{id}/trace") => answer::<crate::dispatch::trace::MessageTrace>(),
        (_, "/v1/topics/{topic}/transactions") => answer::<transactions::TxnBegun>(),
        (_, "/v1/transactions") => answer::<transactions::TxnList>(),
        (_, p) if p.starts_with("/v1/transactions/{id}") => answer::<TxnView>(),
        ("GET", "/v1/plugins") => answer::<plugins::PluginList>(),
        ("GET", "/v1/plugins/{name}") => answer::<plugins::PluginView>(),
        ("PUT", "/v1/plugins/{name}") => answer::<plugins::VersionView>(),
        ("DELETE", "/v1/plugins/{name}" | "/v1/subscriptions/{group}") => {
            answer::<plugins::Removed>()
        }
        (_, "/v1/plugins/{name}/invoke") => answer::<plugins::InvokeAnswer>(),
        (_, "/v1/plugins/{name}/logs") => answer::<crate::logs::LogPage>(),
        ("GET", "/v1/subscriptions") => answer::<subscriptions::SubscriptionList>(),
        (_, "/v1/subscriptions/{group}/dlq") => answer::<subscriptions::DlqPage>(),
        (_, "/v1/subscriptions/{group}/dlq/redrive") => answer::<subscriptions::Redriven>(),
        (_, p) if p.starts_with("/v1/subscriptions/{group}") => answer::<SubscriptionStatus>(),
        _ => return None,
    })
}

/// `GET /v1/openapi.json` answers an OpenAPI 3.1 document.
#[derive(schemars::JsonSchema)]
#[allow(dead_code)] // only its schema is used
struct OpenApiDocument {
    /// `3.1.0`.
    openapi: String,
    info: serde_json::Map<String, Value>,
    paths: serde_json::Map<String, Value>,
    components: serde_json::Map<String, Value>,
}

/// The error answers a route may give besides the catch-alls, from what its handler and the
/// layers in front of it do: every route may meet a slow client (408), a Host that is not this
/// server's (421) and, outside the pages, a cross-site browser request (403); bodies and
/// queries are parsed (400, 413, 415), path parameters name something that may not exist
/// (404), tokens are checked (401, 403), plugin code may have to be compiled again (422, 503),
/// publishes are held back (429, 503) or refused (410, 422), and storage may be away (503).
fn errors_of(
    method: &Method,
    path: &str,
    has_query: bool,
    authenticated: bool,
) -> Vec<(&'static str, &'static str)> {
    let body = matches!(method.as_str(), "PUT" | "POST" | "DELETE");
    let page = path == "/healthz";
    let mut codes = Vec::new();
    if body || has_query || path.contains('{') {
        codes.push((
            "400",
            "the request is malformed or breaks a rule the message names",
        ));
    }
    if authenticated {
        codes.push(("401", "no token, or an unknown one"));
    }
    if authenticated || !page {
        codes.push((
            "403",
            "the token lacks this route's scope (or this topic), the call asks for a grant no subscription gives, or a browser request comes from another site",
        ));
    }
    if path.contains('{') {
        codes.push(("404", "what the path names does not exist"));
    }
    codes.push(("408", "the request was not read in time"));
    let conflicts = matches!(
        (method.as_str(), path),
        ("DELETE", "/v1/topics/{topic}" | "/v1/plugins/{name}")
            | ("PUT", "/v1/topics/{topic}" | "/v1/subscriptions/{group}")
            | (
                "POST",
                "/v1/topics/{topic}/messages"
                    | "/v1/topics/{topic}/messages/batch"
                    | "/v1/topics/{topic}/transactions"
            )
    ) || path.starts_with("/v1/transactions/{id}/");
    if conflicts {
        codes.push((
            "409",
            "the change conflicts with the current state (the code says which)",
        ));
    }
    let publish = path.starts_with("/v1/topics/{topic}/") && method == Method::POST;
    let messages = path.ends_with("/messages") || path.ends_with("/messages/batch");
    if publish && messages {
        codes.push((
            "410",
            "the message an idempotency key names was deleted by retention",
        ));
    }
    if body {
        codes.push(("413", "the body is larger than the limit"));
        codes.push(("415", "the body's content type is not one this route reads"));
    }
    codes.push(("421", "the Host header does not name this server"));
    // Routes that may compile a plugin: an upload, and what loads one from stored bytes.
    let compiles = matches!(
        (method.as_str(), path),
        (
            "PUT",
            "/v1/plugins/{name}" | "/v1/subscriptions/{group}" | "/v1/topics/{topic}"
        ) | ("POST", "/v1/plugins/{name}/invoke")
    );
    if publish && messages || compiles {
        codes.push((
            "422",
            "the idempotency key was used with other content, or the component is too costly to compile",
        ));
    }
    if publish {
        codes.push((
            "429",
            "the topic's backlog is full; retry after Retry-After seconds",
        ));
    }
    if !matches!(path, "/healthz" | "/metrics" | "/v1/openapi.json") || compiles {
        codes.push(("503", "storage is unavailable, the disk is full, a compile is busy or the server is stopping; retry after Retry-After seconds"));
    }
    codes
}

/// The query parameters a route takes: the serde type its handler parses them into.
fn query_of(method: &Method, path: &str) -> Option<BodySchema> {
    Some(match (method.as_str(), path) {
        ("GET", "/v1/topics/{topic}/messages") => schema::<super::messages::ListQuery>,
        ("GET", "/v1/transactions") => schema::<super::transactions::ListQuery>,
        ("GET", "/v1/plugins/{name}/logs") => schema::<super::plugins::LogsQuery>,
        ("GET", "/v1/subscriptions/{group}/dlq") => schema::<super::subscriptions::DlqQuery>,
        ("DELETE", "/v1/topics/{topic}") => schema::<super::topics::DeleteQuery>,
        ("PUT", "/v1/plugins/{name}") => schema::<crate::runtime::PluginLimits>,
        _ => return None,
    })
}

/// The schema of a path parameter: names follow the topic-name rule, ids are UUIDs.
fn path_param(name: &str) -> Value {
    match name {
        "id" => json!({"type": "string", "format": "uuid",
                       "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}),
        _ => json!({"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"}),
    }
}

/// Query parameters from a query type's schema: each property one optional parameter.
fn query_params(schema: BodySchema) -> Vec<Value> {
    let mut g = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let root = schema(&mut g).to_value();
    let Some(props) = root["properties"].as_object() else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, s)| {
            let mut s = s.clone();
            // `Option<T>` reads as `T | null`; a query parameter is just absent instead.
            if let Some(types) = s["type"].as_array() {
                let kept: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
                if let [one] = kept.as_slice() {
                    s["type"] = (*one).clone();
                }
            }
            if let Some(any) = s["anyOf"].as_array().cloned() {
                let kept: Vec<Value> = any.into_iter().filter(|a| a["type"] != "null").collect();
                s = match kept.as_slice() {
                    [one] => one.clone(),
                    _ => json!({"anyOf": kept}),
                };
            }
            json!({"name": name, "in": "query", "required": false, "schema": s})
        })
        .collect()
}

/// The OpenAPI 3.1 document of every route in the table; request bodies and query parameters
/// are described by the JSON Schemas of the serde types the handlers parse (schemars). `open`:
/// this server has no tokens, so no operation asks for one.
pub fn document(open: bool) -> Value {
    let mut paths = serde_json::Map::new();
    let mut schemas = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "#/components/schemas/".into())
        .into_generator();
    // Answers are described as their types serialize (fields with a default are always
    // there), which is not how the same types deserialize as requests: their schemas are
    // generated apart and inline, so the two never share a component.
    let mut answer_schemas = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let mut answers = serde_json::Map::new();
    for r in routes().into_iter().filter(|r| !r.hidden) {
        let mut params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": path_param(name)}))
            .collect();
        let query = query_of(&r.method, r.path);
        if let Some(q) = query {
            params.extend(query_params(q));
        }
        let scope = super::auth::scope_name(&r.method, r.path);
        let mut responses = serde_json::Map::new();
        for code in success(&r.method, r.path) {
            let description = if *code == "201" { "created" } else { "success" };
            responses.insert(
                (*code).to_string(),
                json!({"description": description, "content": answers_in(&r.method, r.path)}),
            );
        }
        if let Some((name, schema)) = answer_of(&r.method, r.path) {
            answers.entry(name().into_owned()).or_insert_with(|| {
                let mut answer = schema(&mut answer_schemas).to_value();
                if !open {
                    redactable(&mut answer);
                }
                answer
            });
        }
        let authenticated = scope != "none" && !open;
        for (code, description) in errors_of(&r.method, r.path, query.is_some(), authenticated) {
            responses.insert(
                code.to_string(),
                json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
            );
        }
        responses.insert(
            "4XX".into(),
            json!({"$ref": "#/components/responses/Error"}),
        );
        responses.insert(
            "5XX".into(),
            json!({"$ref": "#/components/responses/Error"}),
        );
        let mut operation = json!({
            "summary": r.summary,
            "operationId": format!("{} {}", r.method, r.path),
            "parameters": params,
            "responses": responses,
            "x-wasmq-scope": scope,
        });
        if authenticated {
            operation["security"] = json!([{"bearer": [scope]}]);
        }
        if r.method == Method::PUT && r.path == "/v1/plugins/{name}" {
            operation["requestBody"] = json!({"required": true, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
        }
        if let (Some(example), Some(schema)) = (r.body, r.schema) {
            let example: Value = serde_json::from_str(example).unwrap_or(Value::Null);
            let schema = schema(&mut schemas).to_value();
            // Changes that have a meaning without a body (defaults) take an empty one.
            let optional = matches!(
                r.path,
                "/v1/topics/{topic}"
                    | "/v1/subscriptions/{group}/reset"
                    | "/v1/subscriptions/{group}/dlq/redrive"
            );
            operation["requestBody"] = json!({
                "required": !optional,
                "content": {"application/json": {"schema": schema, "example": example}}
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
            "schemas": component_schemas(schemas, answers),
        },
    })
}

/// With tokens, a token without the admin scope reads plugin config and grants as
/// `"[redacted]"` (see `auth`): every such property of an answer may be that string instead.
fn redactable(schema: &mut Value) {
    match schema {
        Value::Object(m) => {
            if let Some(Value::Object(props)) = m.get_mut("properties") {
                for (name, prop) in props.iter_mut() {
                    if super::auth::REDACTED_FIELDS.contains(&name.as_str()) {
                        let full = std::mem::take(prop);
                        *prop = json!({"anyOf": [full, {"const": super::auth::REDACTED}]});
                    }
                }
            }
            m.values_mut().for_each(redactable);
        }
        Value::Array(a) => a.iter_mut().for_each(redactable),
        _ => {}
    }
}

/// The request bodies' schemas, the success answers' schemas, and the error every 4xx and
/// 5xx answers with.
fn component_schemas(
    mut schemas: schemars::SchemaGenerator,
    answers: serde_json::Map<String, Value>,
) -> Value {
    let mut all = schemas.take_definitions(true);
    for (name, schema) in answers {
        // A request type of the same name would be shadowed; the route table test keeps
        // the two sets of names apart.
        all.entry(name).or_insert(schema);
    }
    // `deliver_at` is at most 30 days ahead of the server's clock: the bound moves, and the
    // document is made per request (a day of slack for clocks and slow clients).
    if let Some(at) = all
        .get_mut("Envelope")
        .and_then(|e| e.pointer_mut("/properties/deliver_at"))
    {
        let latest = crate::base::now_ms()
            .saturating_add(crate::base::MAX_DELAY_MS)
            .saturating_sub(24 * 3600 * 1000);
        at["maximum"] = json!(latest);
    }
    all.insert(
        "Error".into(),
        json!({"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}),
    );
    Value::Object(all)
}

async fn openapi(axum::extract::State(state): axum::extract::State<AppState>) -> axum::Json<Value> {
    axum::Json(document(state.tokens.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example in the document is a request the server accepts (it once showed
    /// `"mode": "clustering|broadcast"`), and every body has a real schema.
    #[test]
    fn every_example_parses_as_its_request_type() {
        for r in routes() {
            let Some(example) = r.body else { continue };
            let parsed = match r.path {
                "/v1/topics/{topic}" => {
                    serde_json::from_str::<crate::broker::TopicSpec>(example).map(drop)
                }
                "/v1/topics/{topic}/messages" | "/v1/topics/{topic}/transactions" => {
                    serde_json::from_str::<crate::broker::Envelope>(example).map(drop)
                }
                "/v1/topics/{topic}/messages/batch" => {
                    serde_json::from_str::<super::super::messages::BatchRequest>(example).map(drop)
                }
                "/v1/plugins/{name}/invoke" => {
                    serde_json::from_str::<super::super::plugins::InvokeRequest>(example).map(drop)
                }
                "/v1/subscriptions/{group}" => {
                    let spec: crate::dispatch::SubscriptionSpec =
                        serde_json::from_str(example).expect("a subscription spec");
                    assert_eq!(spec.validate().err(), None);
                    Ok(())
                }
                "/v1/subscriptions/{group}/reset" => {
                    serde_json::from_str::<super::super::subscriptions::ResetRequest>(example)
                        .map(drop)
                }
                "/v1/subscriptions/{group}/dlq/redrive" => {
                    serde_json::from_str::<super::super::subscriptions::RedriveRequest>(example)
                        .map(drop)
                }
                other => panic!("no request type known for {other}"),
            };
            assert!(parsed.is_ok(), "{} {}: {parsed:?}", r.method, r.path);
        }
        let doc = document(false);
        let sub = &doc["paths"]["/v1/subscriptions/{group}"]["put"];
        assert!(sub["responses"]["201"].is_object() && sub["responses"]["200"].is_object());
        let schema = &sub["requestBody"]["content"]["application/json"]["schema"];
        let name = schema["$ref"].as_str().unwrap().rsplit('/').next().unwrap();
        let spec = &doc["components"]["schemas"][name];
        assert_eq!(
            spec["properties"]["mode"]["$ref"]
                .as_str()
                .map(|r| r.ends_with("Mode")),
            Some(true),
            "{spec}"
        );
        assert!(
            spec["required"]
                .as_array()
                .unwrap()
                .contains(&json!("topic"))
        );
        assert_eq!(
            doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["text/plain", "application/openmetrics-text"]
        );
    }

    /// Every JSON success answer names a component that exists and describes an object, and
    /// no answer's name shadows a request type's.
    #[test]
    fn every_answer_has_a_schema_of_its_own() {
        let mut requests = schemars::generate::SchemaSettings::draft2020_12()
            .with(|s| s.definitions_path = "#/components/schemas/".into())
            .into_generator();
        for r in routes() {
            if let Some(s) = r.schema {
                s(&mut requests);
            }
            if let Some(q) = query_of(&r.method, r.path) {
                q(&mut requests);
            }
        }
        let requests = requests.take_definitions(true);
        let doc = document(false);
        let mut checked = 0;
        for r in routes().into_iter().filter(|r| !r.hidden) {
            let op = &doc["paths"][r.path][r.method.as_str().to_ascii_lowercase()];
            if r.path == "/metrics" {
                continue;
            }
            let (name, _) = answer_of(&r.method, r.path)
                .unwrap_or_else(|| panic!("{} {} has no answer type", r.method, r.path));
            let name = name();
            assert!(
                !requests.contains_key(name.as_ref()),
                "{name} is a request type too"
            );
            for code in success(&r.method, r.path) {
                let schema = &op["responses"][*code]["content"]["application/json"]["schema"];
                assert_eq!(schema["$ref"], format!("#/components/schemas/{name}"));
            }
            let component = &doc["components"]["schemas"][name.as_ref()];
            assert_eq!(component["type"], "object", "{name}: {component}");
            assert!(component["properties"].is_object(), "{name}: {component}");
            checked += 1;
        }
        assert!(checked >= 30, "{checked}");
        // Specific error codes are listed where they happen.
        let publish = &doc["paths"]["/v1/topics/{topic}/messages"]["post"]["responses"];
        for code in [
            "400", "401", "403", "404", "409", "410", "413", "415", "422", "429", "503",
        ] {
            assert!(publish[code].is_object(), "publish lacks {code}");
        }
        assert!(doc["paths"]["/healthz"]["get"]["responses"]["404"].is_null());
        let invoke = &doc["paths"]["/v1/plugins/{name}/invoke"]["post"]["responses"];
        for code in ["403", "422", "503"] {
            assert!(invoke[code].is_object(), "invoke lacks {code}");
        }
    }
}
