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

fn token(t: &str, scopes: &[&str], topics: &[&str]) -> TokenConfig {
    TokenConfig {
        token: t.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        topics: topics.iter().map(|s| s.to_string()).collect(),
    }
}

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

/// A produce token scoped to one topic decides only that topic's transactions: a commit or
/// rollback is a produce action on the transaction's topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_scoped_producer_decides_only_its_topics_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.auth.tokens = vec![
        token(ADMIN, &["admin"], &[]),
        token("producer-a", &["produce"], &["topic-a"]),
        token("producer-b", &["produce"], &["topic-b"]),
    ];
    let s = TestServer::start_with(config).await;
    use reqwest::Method as M;
    for t in ["topic-a", "topic-b"] {
        let (st, _) = call(&s, M::PUT, &format!("/v1/topics/{t}"), Some(ADMIN), None).await;
        assert_eq!(st, StatusCode::CREATED);
    }
    let begin = |topic: &'static str, tok: &'static str| {
        let s = &s;
        async move {
            let (st, v) = call(
                s,
                M::POST,
                &format!("/v1/topics/{topic}/transactions"),
                Some(tok),
                Some(json!({"body": 1})),
            )
            .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            v["txn_id"].as_str().unwrap().to_string()
        }
    };
    let b1 = begin("topic-b", "producer-b").await;
    let b2 = begin("topic-b", "producer-b").await;
    for (id, decision) in [(&b1, "commit"), (&b2, "rollback")] {
        let (st, v) = call(
            &s,
            M::POST,
            &format!("/v1/transactions/{id}/{decision}"),
            Some("producer-a"),
            Some(json!({})),
        )
        .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "{decision}: {v}"
        );
    }
    let (_, t) = call(
        &s,
        M::GET,
        &format!("/v1/transactions/{b1}"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(t["state"], "pending", "{t}");
    // Its own topic's producer decides it.
    let (st, v) = call(
        &s,
        M::POST,
        &format!("/v1/transactions/{b1}/commit"),
        Some("producer-b"),
        Some(json!({})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let a1 = begin("topic-a", "producer-a").await;
    let (st, v) = call(
        &s,
        M::POST,
        &format!("/v1/transactions/{a1}/rollback"),
        Some("producer-a"),
        Some(json!({})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

/// Plugin config may refer to secrets (`{"$secret": "NAME"}`), resolved in the host only: the
/// plugin instance sees the value, the API shows the reference; a read-only token sees config
/// and grants redacted; a reference to an unknown secret is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_resolved_in_the_host_and_config_is_redacted_for_readers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.auth.tokens = vec![token(ADMIN, &["admin"], &[]), token(READER, &["read"], &[])];
    config.secrets = wasmq::secrets::Secrets::new(
        [("GATEWAY_KEY".to_string(), "s3cr3t-value-42".to_string())].into(),
    );
    let s = TestServer::start_with(config).await;
    use reqwest::Method as M;
    let (st, _) = call(
        &s,
        M::PUT,
        "/v1/topics/t",
        Some(ADMIN),
        Some(json!({"queues": 1})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let wasm = std::fs::read(wasmq_tests::plugins::PROBE).unwrap();
    let resp = s
        .client
        .put(format!("{}/v1/plugins/probe", s.url))
        .bearer_auth(ADMIN)
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let spec = |key: Value| {
        json!({"topic": "t", "plugin": "probe", "config": {"api_key": key},
               "grants": {"publish": ["t"]}})
    };
    let (st, v) = call(
        &s,
        M::PUT,
        "/v1/subscriptions/g",
        Some(ADMIN),
        Some(spec(json!({"$secret": "MISSING"}))),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("MISSING"));
    let (st, v) = call(
        &s,
        M::PUT,
        "/v1/subscriptions/g",
        Some(ADMIN),
        Some(spec(json!({"$secret": "GATEWAY_KEY"}))),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    // The plugin reads the value (probe reports its config as its reject reason).
    let (st, _) = call(
        &s,
        M::POST,
        "/v1/topics/t/messages",
        Some(ADMIN),
        Some(json!({"body": {"do": "config"}})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let mut seen = None;
    for _ in 0..500 {
        let (_, page) = call(&s, M::GET, "/v1/subscriptions/g/dlq", Some(ADMIN), None).await;
        if let Some(r) = page["entries"][0]["reason"].as_str() {
            seen = Some(r.to_string());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        seen.unwrap().contains("s3cr3t-value-42"),
        "the instance got the value"
    );
    // Admins see the reference, never the value; readers see neither config nor grants.
    for path in ["/v1/subscriptions/g", "/v1/subscriptions"] {
        let (_, admin) = call(&s, M::GET, path, Some(ADMIN), None).await;
        let text = admin.to_string();
        assert!(
            text.contains("GATEWAY_KEY") && !text.contains("s3cr3t"),
            "{text}"
        );
        let (st, reader) = call(&s, M::GET, path, Some(READER), None).await;
        assert_eq!(st, StatusCode::OK);
        let text = reader.to_string();
        assert!(
            !text.contains("GATEWAY_KEY") && !text.contains("s3cr3t"),
            "{text}"
        );
        assert!(text.contains("[redacted]"), "{text}");
    }
    let (_, sub) = call(&s, M::GET, "/v1/subscriptions/g", Some(READER), None).await;
    assert_eq!(sub["spec"]["grants"], "[redacted]");
    assert_eq!(sub["spec"]["topic"], "t", "the rest is shown");
}
