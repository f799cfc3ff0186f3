//! Bearer tokens and scopes against the real server: 401 without a valid token, 403 without
//! the scope, produce tokens limited to their topics; an open API only on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq::config::TokenConfig;
use wasmq_tests::{TestServer, config_in};

const ADMIN: &str = "admin-token-123";
const PRODUCER: &str = "orders-producer";
const READER: &str = "dashboard-reader";

async fn call(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = s.client.request(method, format!("{}{path}", s.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    wasmq_tests::decode(req.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    let token = |t: &str, scopes: &[&str], topics: &[&str]| TokenConfig {
        token: t.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        topics: topics.iter().map(|s| s.to_string()).collect(),
    };
    config.auth.tokens = vec![
        token(ADMIN, &["admin"], &[]),
        token(PRODUCER, &["produce"], &["orders"]),
        token(READER, &["read"], &[]),
    ];
    let s = TestServer::start_with(config).await;
    use reqwest::Method as M;
    let q1 = json!({"queues": 1});
    let msg = json!({"body": {"n": 1}});
    // Liveness needs no token; everything else does.
    assert_eq!(
        call(&s, M::GET, "/healthz", None, None).await.0,
        StatusCode::OK
    );
    let (st, v) = call(&s, M::GET, "/v1/topics", None, None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    assert_eq!(
        call(&s, M::GET, "/v1/topics", Some("nope-nope-nope"), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // Admin does everything.
    assert_eq!(
        call(
            &s,
            M::PUT,
            "/v1/topics/orders",
            Some(ADMIN),
            Some(q1.clone())
        )
        .await
        .0,
        StatusCode::CREATED
    );
    assert_eq!(
        call(
            &s,
            M::PUT,
            "/v1/topics/other",
            Some(ADMIN),
            Some(q1.clone())
        )
        .await
        .0,
        StatusCode::CREATED
    );
    // The producer publishes to its topic only, and cannot read or administer.
    assert_eq!(
        call(
            &s,
            M::POST,
            "/v1/topics/orders/messages",
            Some(PRODUCER),
            Some(msg.clone())
        )
        .await
        .0,
        StatusCode::CREATED
    );
    let (st, v) = call(
        &s,
        M::POST,
        "/v1/topics/other/messages",
        Some(PRODUCER),
        Some(msg.clone()),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    assert_eq!(
        call(&s, M::GET, "/v1/topics", Some(PRODUCER), None).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&s, M::PUT, "/v1/topics/x", Some(PRODUCER), Some(q1.clone()))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (st, t) = call(
        &s,
        M::POST,
        "/v1/topics/orders/transactions",
        Some(PRODUCER),
        Some(msg.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let txn = t["txn_id"].as_str().unwrap();
    assert_eq!(
        call(
            &s,
            M::POST,
            &format!("/v1/transactions/{txn}/commit"),
            Some(PRODUCER),
            None
        )
        .await
        .0,
        StatusCode::OK
    );
    // The reader reads, and nothing else.
    let (st, t) = call(&s, M::GET, "/v1/topics/orders", Some(READER), None).await;
    assert_eq!((st, t["messages"].as_u64()), (StatusCode::OK, Some(2)));
    let metrics = s
        .client
        .get(format!("{}/metrics", s.url))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let metrics = s
        .client
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(
            &s,
            M::POST,
            "/v1/topics/orders/messages",
            Some(READER),
            Some(msg)
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&s, M::DELETE, "/v1/plugins/x", Some(READER), None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
}
