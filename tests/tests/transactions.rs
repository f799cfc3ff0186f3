//! Transactional messages: half messages, commit and rollback, check-back through a real
//! checker plugin, unresolved transactions, and races between producer and checker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::plugins::{CHECKER, RECORDER};
use wasmq_tests::{TestServer, assert_error};

/// A topic with a checker and fast check timings, and a recorder subscription on it.
async fn setup(s: &TestServer, max_checks: u32) {
    s.create_topic("audit", 1).await;
    s.upload_plugin("recorder", RECORDER).await;
    let bytes = std::fs::read(CHECKER).unwrap();
    let r = s
        .client
        .put(format!("{}/v1/plugins/body-checker?timeout_ms=200", s.url))
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let topic = json!({"queues": 2, "transaction_checker": "body-checker",
                       "transactions": {"check_after_ms": 150, "check_interval_ms": 100, "max_checks": max_checks}});
    let (st, v) = s.put_json("/v1/topics/signups", &topic).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.subscribe(
        "email",
        json!({"topic": "signups", "plugin": "recorder", "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
}

async fn begin(s: &TestServer, body: Value, check_after_ms: Option<u64>) -> String {
    let mut env = json!({"body": body, "key": "user-1"});
    if let Some(c) = check_after_ms {
        env["check_after_ms"] = c.into();
    }
    let (st, v) = s.post_json("/v1/topics/signups/transactions", &env).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(
        v["message_id"].is_string() && v["check_after_ms"].is_u64(),
        "{v}"
    );
    v["txn_id"].as_str().unwrap().to_string()
}

async fn delivered(s: &TestServer) -> Vec<Value> {
    s.read_queue("audit", 0).await
}

async fn txn(s: &TestServer, id: &str) -> Value {
    s.get(&format!("/v1/transactions/{id}")).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_messages_are_invisible_until_commit_and_gone_after_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, 3).await;
    let a = begin(&s, json!({"user": "ann"}), Some(60_000)).await;
    let b = begin(&s, json!({"user": "bob"}), Some(60_000)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        delivered(&s).await.is_empty(),
        "a half message was delivered"
    );
    let (_, t) = s.get("/v1/topics/signups").await;
    assert_eq!(t["messages"], 0, "a half message is in the topic");
    let (st, v) = s
        .post_json(&format!("/v1/transactions/{a}/commit"), &json!({}))
        .await;
    assert_eq!(
        (st, v["state"].as_str()),
        (StatusCode::OK, Some("committed"))
    );
    // Idempotent.
    let (st, _) = s
        .post_json(&format!("/v1/transactions/{a}/commit"), &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = s
        .post_json(&format!("/v1/transactions/{b}/rollback"), &json!({}))
        .await;
    assert_eq!(
        (st, v["state"].as_str()),
        (StatusCode::OK, Some("rolled_back"))
    );
    assert_error(
        &s.post_json(&format!("/v1/transactions/{b}/commit"), &json!({}))
            .await,
        StatusCode::CONFLICT,
        "transaction_decided",
    );
    assert_error(
        &s.post_json(&format!("/v1/transactions/{a}/rollback"), &json!({}))
            .await,
        StatusCode::CONFLICT,
        "transaction_decided",
    );
    let audit = s.wait_audit("audit", 1, 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit_after = delivered(&s).await;
    assert_eq!(
        audit_after.len(),
        1,
        "delivered more than the committed message: {audit_after:?}"
    );
    assert_eq!(audit[0]["body"]["user"], "ann");
    // Same id as the half message.
    assert_eq!(audit[0]["id"], txn(&s, &a).await["message_id"]);
    assert_error(
        &s.get("/v1/transactions/nope").await,
        StatusCode::NOT_FOUND,
        "unknown_transaction",
    );
    assert_error(
        &s.post_json("/v1/transactions/nope/commit", &json!({}))
            .await,
        StatusCode::NOT_FOUND,
        "unknown_transaction",
    );
    assert_error(
        &s.post_json("/v1/topics/nope/transactions", &json!({"body": 1}))
            .await,
        StatusCode::NOT_FOUND,
        "unknown_topic",
    );
    assert_error(
        &s.post_json("/v1/topics/signups/transactions", &json!({}))
            .await,
        StatusCode::BAD_REQUEST,
        "bad_body",
    );
    assert_error(
        &s.post_json(
            "/v1/topics/signups/messages",
            &json!({"body": 1, "check_after_ms": 5}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_field",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_decides_what_the_producer_did_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, 3).await;
    let commit = begin(&s, json!("commit"), None).await;
    let rollback = begin(&s, json!("rollback"), None).await;
    let unknown = begin(&s, json!("maybe"), None).await;
    let v = s
        .wait_until(&format!("/v1/transactions/{commit}"), 10, |v| {
            v["state"] == "committed"
        })
        .await;
    assert!(
        v["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"] == "by checker"),
        "{v}"
    );
    s.wait_until(&format!("/v1/transactions/{rollback}"), 10, |v| {
        v["state"] == "rolled_back"
    })
    .await;
    let v = s
        .wait_until(&format!("/v1/transactions/{unknown}"), 10, |v| {
            v["state"] == "unresolved"
        })
        .await;
    assert_eq!(
        v["checks"], 3,
        "unknown must be asked exactly max_checks times: {v}"
    );
    let (_, list) = s.get("/v1/transactions?state=unresolved").await;
    let ids: Vec<&str> = list["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["txn_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [unknown.as_str()]);
    // Parked, not dropped, and not checked any more.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(txn(&s, &unknown).await["checks"], 3);
    let audit = s.wait_audit("audit", 1, 10).await;
    assert_eq!(audit[0]["body"], "commit");
    // An operator decides it.
    let (st, _) = s
        .post_json(&format!("/v1/transactions/{unknown}/commit"), &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let audit = s.wait_audit("audit", 2, 10).await;
    assert_eq!(audit[1]["body"], "maybe");
    // A decided transaction is never checked again.
    let checks = txn(&s, &commit).await["history"].as_array().unwrap().len();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        txn(&s, &commit).await["history"].as_array().unwrap().len(),
        checks
    );
    assert_eq!(delivered(&s).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recheck_and_misbehaving_checkers() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, 2).await;
    let trap = begin(&s, json!("trap"), None).await;
    let looping = begin(&s, json!("loop"), None).await;
    for id in [&trap, &looping] {
        let v = s
            .wait_until(&format!("/v1/transactions/{id}"), 15, |v| {
                v["state"] == "unresolved"
            })
            .await;
        assert_eq!(v["checks"], 2, "{v}");
        let last = &v["history"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|e| e["event"] == "checked: unknown")
            .unwrap()["detail"];
        assert!(
            last.as_str()
                .unwrap()
                .contains(if id == &trap { "trapped" } else { "deadline" }),
            "{v}"
        );
    }
    let (st, _) = s.get("/healthz").await;
    assert_eq!(st, StatusCode::OK);
    // Recheck: a fresh round of checks, which end unresolved again.
    let (st, v) = s
        .post_json(&format!("/v1/transactions/{trap}/recheck"), &json!({}))
        .await;
    assert_eq!(
        (st, v["state"].as_str(), v["checks"].as_u64()),
        (StatusCode::OK, Some("pending"), Some(0))
    );
    let v = s
        .wait_until(&format!("/v1/transactions/{trap}"), 15, |v| {
            v["state"] == "unresolved"
        })
        .await;
    assert_eq!(v["checks"], 2);
    let ok = begin(&s, json!("x"), Some(60_000)).await;
    assert_error(
        &s.post_json(&format!("/v1/transactions/{ok}/recheck"), &json!({}))
            .await,
        StatusCode::CONFLICT,
        "not_unresolved",
    );
    assert!(delivered(&s).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_racing_a_rollback_from_the_checker_has_one_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, 3).await;
    let mut committed = Vec::new();
    for i in 0..20u64 {
        // The checker will answer rollback at ~30 ms; the producer commits around then.
        let id = begin(&s, json!("rollback"), Some(30)).await;
        tokio::time::sleep(Duration::from_millis(20 + i % 5 * 5)).await;
        let (st, _) = s
            .post_json(&format!("/v1/transactions/{id}/commit"), &json!({}))
            .await;
        let state = s
            .wait_until(&format!("/v1/transactions/{id}"), 10, |v| {
                v["state"] != "pending"
            })
            .await["state"]
            .clone();
        match st {
            StatusCode::OK => {
                assert_eq!(state, "committed");
                committed.push(
                    txn(&s, &id).await["message_id"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            }
            StatusCode::CONFLICT => assert_eq!(state, "rolled_back"),
            other => panic!("commit answered {other}"),
        }
    }
    eprintln!(
        "{} of 20 committed by the producer, the rest rolled back by the checker",
        committed.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let audit = s.wait_audit("audit", committed.len() as u64, 10).await;
    let ids: Vec<&str> = audit.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids, committed,
        "exactly the committed transactions are delivered, once each"
    );
}

/// Issue 23.4: decided transactions keep their counts, listings and lookups across a restart
/// (which reads only the undecided ones), and go beyond `[retention] transactions_max_count`,
/// oldest first; an undecided one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decided_transactions_survive_a_restart_and_expire_beyond_their_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = wasmq_tests::config_in(dir.path());
        c.retention.transactions_max_count = 3;
        c
    };
    let s = TestServer::start_with(config()).await;
    s.create_topic("signups", 1).await;
    let mut committed = Vec::new();
    for i in 0..5 {
        let id = begin(&s, json!({"order": i}), Some(3_600_000)).await;
        let path = format!("/v1/transactions/{id}/commit");
        assert_eq!(s.post_json(&path, &json!({})).await.0, StatusCode::OK);
        committed.push(id);
    }
    let rolled = begin(&s, json!({"order": "rolled"}), Some(3_600_000)).await;
    let path = format!("/v1/transactions/{rolled}/rollback");
    assert_eq!(s.post_json(&path, &json!({})).await.0, StatusCode::OK);
    let open = begin(&s, json!({"order": "open"}), Some(3_600_000)).await;

    let ids = |v: &Value| -> Vec<String> {
        v["transactions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["txn_id"].as_str().unwrap().to_string())
            .collect()
    };
    let newest: Vec<String> = committed[2..].to_vec();
    let listed = s
        .wait_until("/v1/transactions?state=committed", 30, |v| ids(v) == newest)
        .await;
    assert_eq!(ids(&listed), newest, "the two oldest went");
    assert_eq!(
        s.get(&format!("/v1/transactions/{}", committed[0])).await.0,
        StatusCode::NOT_FOUND
    );
    let counts = |m: &str| -> Vec<String> {
        let mut lines: Vec<String> = m
            .lines()
            .filter(|l| l.starts_with("wasmq_transactions{"))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    let before = counts(&s.metrics().await);
    assert_eq!(
        before,
        [
            r#"wasmq_transactions{state="committed"} 3"#,
            r#"wasmq_transactions{state="pending"} 1"#,
            r#"wasmq_transactions{state="rolled_back"} 1"#,
            // Every state has its series, at zero too.
            r#"wasmq_transactions{state="unresolved"} 0"#,
        ]
    );
    s.stop().await.unwrap();

    let s = TestServer::start_with(config()).await;
    assert_eq!(counts(&s.metrics().await), before);
    let (_, v) = s.get("/v1/transactions").await;
    let mut all = newest.clone();
    all.extend([rolled.clone(), open.clone()]);
    assert_eq!(ids(&v), all);
    assert_eq!(
        s.get(&format!("/v1/transactions/{rolled}")).await.1["state"],
        "rolled_back"
    );
    // Deciding the open one after the restart counts it with the others.
    let path = format!("/v1/transactions/{open}/commit");
    assert_eq!(s.post_json(&path, &json!({})).await.0, StatusCode::OK);
    s.wait_until("/v1/transactions?state=committed", 30, |v| {
        ids(v).last() == Some(&open) && ids(v).len() == 3
    })
    .await;
    s.stop().await.unwrap();
}

/// The checker's kv writes follow its answer (issue 24): stored in the same step as a commit
/// or rollback decision, dropped with an `unknown` one. The checker adds one to a kv counter
/// on each check, and `count-commit-if-first` commits only when that makes it 1: after three
/// unknown checks of A it does (their increments were dropped), and for C after B it does not
/// (B's increment was stored with B's commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkers_kv_writes_are_stored_with_its_decision_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, 3).await;
    let settled = |state: &'static str| move |t: &Value| t["state"] == state;
    let a = begin(&s, json!("count-unknown"), None).await;
    s.wait_until(&format!("/v1/transactions/{a}"), 60, settled("unresolved"))
        .await;
    let b = begin(&s, json!("count-commit-if-first"), None).await;
    s.wait_until(&format!("/v1/transactions/{b}"), 60, settled("committed"))
        .await;
    let c = begin(&s, json!("count-commit-if-first"), None).await;
    let t = s
        .wait_until(&format!("/v1/transactions/{c}"), 60, |t| {
            t["state"] != "pending"
        })
        .await;
    assert_eq!(t["state"], "unresolved", "{t}");
    s.stop().await.unwrap();
}
