//! Host capabilities with real peers: email through a real SMTP conversation, SMS through an
//! HTTP gateway, allow-listed HTTP; grants, denials, idempotency across retries and replays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::peers::{HttpPeer, SmtpServer};
use wasmq_tests::plugins::{EMAIL_NOTIFIER, PROBE, SMS_NOTIFIER};
use wasmq_tests::{TestServer, config_in};

async fn server_with_peers(
    dir: &std::path::Path,
    smtp: &SmtpServer,
    gateway: &HttpPeer,
) -> TestServer {
    let mut config = config_in(dir);
    config.smtp.host = "127.0.0.1".into();
    config.smtp.port = smtp.addr.port();
    config.smtp.from = "wasmq@example.com".into();
    config.sms.url = format!("{}/sms", gateway.url);
    config.sms.auth_header = "Bearer gateway-secret".into();
    TestServer::start_with(config).await
}

fn email_sub(grant: bool) -> Value {
    json!({
        "topic": "user-registered", "plugin": "email-notifier",
        "retry": {"max_attempts": 5, "backoff_ms": [50]},
        "config": {"to": "{{email}}", "subject": "Welcome {{name}}", "text": "Hi {{name}}, your id is {{id}}."},
        "grants": {"email": grant},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_notifier_speaks_real_smtp_once_per_message() {
    email_notifier_round_trip(EMAIL_NOTIFIER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_email_notifier_passes_the_same_checks() {
    let wasm = wasmq_tests::polyglot_plugin("email-notifier-py").await;
    email_notifier_round_trip(wasm.to_str().unwrap()).await;
}

/// The email notifier's behaviour, whichever language `wasm` was written in: real SMTP, one
/// mail per message across a transient failure and a replay, no recipient dead-letters.
async fn email_notifier_round_trip(wasm: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let s = server_with_peers(dir.path(), &smtp, &gateway).await;
    s.create_topic("user-registered", 2).await;
    s.upload_plugin("email-notifier", wasm).await;
    // The first delivery attempt meets a transient SMTP failure.
    smtp.state.fail_next.store(1, Ordering::SeqCst);
    s.subscribe("welcome-email", email_sub(true)).await;
    for (id, name, email) in [
        (1, "Ann", Some("ann@example.com")),
        (2, "Bob", Some("bob@example.com")),
        (3, "Cid", None),
    ] {
        let mut body = json!({"id": id, "name": name});
        if let Some(e) = email {
            body["email"] = e.into();
        }
        s.post_json(
            "/v1/topics/user-registered/messages",
            &json!({"body": body}),
        )
        .await;
    }
    let mails = smtp.wait_for(2, 10).await;
    let mut got: Vec<(String, String)> = mails
        .iter()
        .map(|m| (m.to[0].clone(), m.subject().unwrap().to_string()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("ann@example.com".into(), "Welcome Ann".into()),
            ("bob@example.com".into(), "Welcome Bob".into())
        ]
    );
    let ann = mails.iter().find(|m| m.to[0] == "ann@example.com").unwrap();
    assert!(ann.data.contains("Hi Ann, your id is 1."), "{}", ann.data);
    assert_eq!(ann.from, "wasmq@example.com");
    // No recipient: dead-lettered with a reason, never sent.
    let dlq = s
        .wait_until("/v1/subscriptions/welcome-email/dlq", 10, |v| {
            v["entries"].as_array().is_some_and(|e| e.len() == 1)
        })
        .await;
    assert!(
        dlq["entries"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no recipient"),
        "{dlq}"
    );
    let st = s
        .wait_until("/v1/subscriptions/welcome-email", 10, |v| {
            v["lag"] == 0 && v["in_flight"] == 0
        })
        .await;
    assert!(
        st["counters"]["retried"].as_u64().unwrap() >= 1,
        "the transient failure was not retried: {st}"
    );
    // Replaying everything redelivers both messages; neither sends a second email.
    s.post_json(
        "/v1/subscriptions/welcome-email/reset",
        &json!({"to": "earliest"}),
    )
    .await;
    s.wait_until("/v1/subscriptions/welcome-email", 10, |v| {
        v["lag"] == 0 && v["in_flight"] == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        smtp.mails().len(),
        2,
        "a redelivered message sent a second email"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_grant_nothing_is_sent_and_the_denial_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let s = server_with_peers(dir.path(), &smtp, &gateway).await;
    s.create_topic("user-registered", 1).await;
    s.upload_plugin("email-notifier", EMAIL_NOTIFIER).await;
    s.subscribe("welcome-email", email_sub(false)).await;
    s.post_json(
        "/v1/topics/user-registered/messages",
        &json!({"body": {"id": 1, "name": "Ann", "email": "ann@example.com"}}),
    )
    .await;
    let dlq = s
        .wait_until("/v1/subscriptions/welcome-email/dlq", 10, |v| {
            v["entries"].as_array().is_some_and(|e| e.len() == 1)
        })
        .await;
    assert!(
        dlq["entries"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("denied: the subscription does not grant email"),
        "{dlq}"
    );
    assert!(smtp.mails().is_empty());
    let metrics = s.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "wasmq_capability_calls_total{capability=\"email\",result=\"denied\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_notifier_posts_to_the_gateway_with_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let s = server_with_peers(dir.path(), &smtp, &gateway).await;
    s.create_topic("user-registered", 1).await;
    s.upload_plugin("sms-notifier", SMS_NOTIFIER).await;
    gateway.state.fail_next.store(1, Ordering::SeqCst);
    s.subscribe(
        "welcome-sms",
        json!({"topic": "user-registered", "plugin": "sms-notifier", "retry": {"max_attempts": 5, "backoff_ms": [50]},
               "config": {"to": "{{phone}}", "text": "Welcome {{name}}"}, "grants": {"sms": true}}),
    )
    .await;
    s.post_json(
        "/v1/topics/user-registered/messages",
        &json!({"body": {"name": "Ann", "phone": "+15550100"}}),
    )
    .await;
    s.wait_until("/v1/subscriptions/welcome-sms", 10, |v| {
        v["counters"]["acked"] == 1
    })
    .await;
    let reqs = gateway.requests();
    // One 503 (retried), then the accepted one; the config's secret, never the plugin's.
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for (path, auth, body) in &reqs {
        assert_eq!(path, "/sms");
        assert_eq!(auth.as_deref(), Some("Bearer gateway-secret"));
        assert_eq!(
            serde_json::from_str::<Value>(body).unwrap(),
            json!({"to": "+15550100", "text": "Welcome Ann"})
        );
    }
}

/// `once()` markers belong to the subscription and member that ran the side effect: three
/// broadcast instances and a second subscription each send their own SMS for one message,
/// and a retry still sends none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_markers_are_kept_per_subscription_and_broadcast_instance() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let s = server_with_peers(dir.path(), &smtp, &gateway).await;
    s.create_topic("user-registered", 1).await;
    s.upload_plugin("sms-notifier", SMS_NOTIFIER).await;
    let spec = |extra: Value| {
        let mut v = json!({"topic": "user-registered", "plugin": "sms-notifier",
            "retry": {"max_attempts": 5, "backoff_ms": [50]},
            "config": {"to": "{{phone}}", "text": "Welcome {{name}}"}, "grants": {"sms": true}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    s.subscribe(
        "everyone",
        spec(json!({"mode": "broadcast", "instances": 3})),
    )
    .await;
    s.subscribe("audit-sms", spec(json!({}))).await;
    gateway.state.fail_next.store(1, Ordering::SeqCst);
    s.post_json(
        "/v1/topics/user-registered/messages",
        &json!({"body": {"name": "Ann", "phone": "+15550100"}}),
    )
    .await;
    for group in ["everyone", "audit-sms"] {
        s.wait_until(&format!("/v1/subscriptions/{group}"), 20, |v| {
            v["lag"] == 0 && v["pending_timers"] == 0
        })
        .await;
    }
    let sent = gateway
        .requests()
        .iter()
        .filter(|(path, _, _)| path == "/sms")
        .count();
    // One 503 (retried) plus one SMS per broadcast instance and one for the other group.
    assert_eq!(sent, 1 + 3 + 1, "{:?}", gateway.requests());
}

async fn http_probe(s: &TestServer, url: &str, allowed: &[String]) -> Value {
    let (st, v) = s
        .post_json(
            "/v1/plugins/probe/invoke",
            &json!({"message": {"body": {"do": "http", "url": url}}, "grants": {"http": allowed}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    serde_json::from_str(v["outcome"]["reason"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_reaches_only_the_granted_origin() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, api) = (SmtpServer::start().await, HttpPeer::start().await);
    let other = HttpPeer::start().await;
    let s = server_with_peers(dir.path(), &smtp, &api).await;
    s.upload_plugin("probe", PROBE).await;
    let grant = vec![format!("127.0.0.1:{}", api.addr.port())];
    let port = api.addr.port();
    // Invoke grants nothing an admin has not granted the plugin in a subscription.
    let (st, v) = s
        .post_json(
            "/v1/plugins/probe/invoke",
            &json!({"message": {"body": {"do": "http", "url": format!("http://127.0.0.1:{port}/")}},
                    "grants": {"http": grant}}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("grant_not_configured")),
        "{v}"
    );
    assert!(api.requests().is_empty());
    s.create_topic("probes", 1).await;
    s.subscribe(
        "probe-http",
        json!({"topic": "probes", "plugin": "probe", "grants": {"http": grant}}),
    )
    .await;
    assert_eq!(
        http_probe(&s, &format!("http://127.0.0.1:{port}/users/1"), &grant).await["status"],
        200
    );
    for bad in [
        format!("http://127.0.0.1:{}/", other.addr.port()),
        format!("http://localhost:{port}/"),
        format!("https://127.0.0.1:{port}/"),
        format!("http://127.0.0.1:{port}@127.0.0.1:{}/", other.addr.port()),
        format!("http://user:pw@127.0.0.1:{port}/"),
        "file:///etc/passwd".to_string(),
    ] {
        let r = http_probe(&s, &bad, &grant).await;
        assert!(
            r["error"].as_str().unwrap().starts_with("denied"),
            "{bad}: {r}"
        );
    }
    // A redirect elsewhere is handed back, not followed.
    *api.state.redirect_to.lock().unwrap() = format!("{}/stolen", other.url);
    assert_eq!(
        http_probe(&s, &format!("http://127.0.0.1:{port}/redirect"), &grant).await["status"],
        302
    );
    assert!(
        other.requests().is_empty(),
        "a request reached a host that was not granted: {:?}",
        other.requests()
    );
    let (st, v) = s
        .post_json(
            "/v1/plugins/probe/invoke",
            &json!({"message": {"body": {"do": "ack"}}, "grants": {"http": ["ftp://x"]}}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_grants"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_flood_is_denied_counted_and_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let s = server_with_peers(dir.path(), &smtp, &gateway).await;
    s.upload_plugin("probe", PROBE).await;
    let (_, v) = s
        .post_json(
            "/v1/plugins/probe/invoke",
            &json!({"message": {"body": {"do": "flood", "calls": 50000}}}),
        )
        .await;
    let r: Value = serde_json::from_str(v["outcome"]["reason"].as_str().unwrap()).unwrap();
    assert_eq!(r["denied"], 50000);
    let (_, v) = s
        .post_json(
            "/v1/plugins/probe/invoke",
            &json!({"message": {"body": {"do": "log", "lines": 20000}}}),
        )
        .await;
    assert_eq!(v["outcome"]["type"], "ack");
    let (st, _) = s.get("/healthz").await;
    assert_eq!(st, StatusCode::OK);
    assert!(smtp.mails().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_scales_with_instances_against_a_slow_smtp_server() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    smtp.state.delay_ms.store(50, Ordering::SeqCst);
    let s = server_with_peers(dir.path(), &smtp, &gateway).await;
    s.create_topic("user-registered", 8).await;
    s.upload_plugin("email-notifier", EMAIL_NOTIFIER).await;
    let msgs: Vec<Value> = (0..320)
        .map(|i| json!({"body": {"id": i, "name": "N", "email": format!("u{i}@example.com")}}))
        .collect();
    s.post_json(
        "/v1/topics/user-registered/messages/batch",
        &json!({"messages": msgs}),
    )
    .await;
    // 32 instances must overlap their sends: the server holds every mail until 16 sessions
    // wait at once. One at a time, the first mail waits out the gate's limit and the count
    // below stays 1 (counted, so the machine's speed does not matter).
    smtp.state.gate.store(16, Ordering::SeqCst);
    let started = Instant::now();
    let mut spec = email_sub(true);
    spec["instances"] = 32.into();
    s.subscribe("welcome-email", spec).await;
    smtp.wait_for(320, 600).await;
    let most = smtp.state.max_in_data.load(Ordering::SeqCst);
    eprintln!(
        "320 emails through a 50 ms SMTP server with 32 instances: {:?}, {most} at once",
        started.elapsed()
    );
    assert!(
        most >= 16,
        "sending did not overlap: at most {most} at once"
    );
}
