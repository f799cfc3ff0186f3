//! Message trace (issue 26): `GET /v1/messages/{id}/trace` and `wasmq message trace ID` show,
//! for each subscription of a message's topic (each broadcast instance), every delivery attempt
//! with its time, node, instance, outcome, reason, duration and fate, and where the message is
//! now. Trace records are written in batches, so the tests wait for them by polling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::plugins::{ECHO, RECORDER, REJECT_ALL};
use wasmq_tests::{TestServer, assert_error, config_in};

/// The trace entry of `group` (and broadcast `member`).
fn entry<'a>(trace: &'a Value, group: &str, member: &str) -> &'a Value {
    trace["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["group"] == group && s["member"] == member)
        .unwrap_or_else(|| panic!("no {group}/{member} in {trace}"))
}

fn outcomes(e: &Value) -> Vec<String> {
    e["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}:{}",
                a["outcome"].as_str().unwrap(),
                a["fate"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_shows_every_attempt_and_where_the_message_is_for_each_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config_in(dir.path())).await;
    for (name, path) in [
        ("recorder", RECORDER),
        ("echo", ECHO),
        ("reject-all", REJECT_ALL),
    ] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    s.create_topic("orders", 2).await;
    s.create_topic("audit", 1).await;
    // Retried once, then acked; a broadcast pair; a rejecter; one that only takes tag "x"; one
    // paused before anything arrives.
    s.subscribe(
        "retrying",
        json!({"topic": "orders", "plugin": "recorder",
               "config": {"audit": "audit", "fail_attempts": 1},
               "grants": {"publish": ["audit"]}, "retry": {"backoff_ms": [10]}}),
    )
    .await;
    s.subscribe(
        "everyone",
        json!({"topic": "orders", "plugin": "echo", "mode": "broadcast", "instances": 2}),
    )
    .await;
    s.subscribe(
        "refuser",
        json!({"topic": "orders", "plugin": "reject-all"}),
    )
    .await;
    s.subscribe(
        "picky",
        json!({"topic": "orders", "plugin": "echo", "filter": "x"}),
    )
    .await;
    s.subscribe("later", json!({"topic": "orders", "plugin": "echo"}))
        .await;
    let (st, v) = s
        .post_json("/v1/subscriptions/later/pause", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, published) = s
        .post_json(
            "/v1/topics/orders/messages",
            &json!({"body": {"n": 1}, "tag": "y"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{published}");
    let id = published["id"].as_str().unwrap().to_string();
    let path = format!("/v1/messages/{id}/trace");
    let trace = s
        .wait_until(&path, 60, |t| {
            t["subscriptions"].as_array().is_some_and(|subs| {
                let settled = |g: &str, m: &str, state: &str| {
                    subs.iter()
                        .any(|e| e["group"] == g && e["member"] == m && e["state"] == state)
                };
                settled("retrying", "all", "acked")
                    && settled("everyone", "i0000", "acked")
                    && settled("everyone", "i0001", "acked")
                    && settled("refuser", "all", "dead_lettered")
            })
        })
        .await;
    assert_eq!(trace["id"], id.as_str());
    assert_eq!(trace["topic"], "orders");
    assert_eq!(trace["stored"], true);
    assert_eq!(trace["queue"], published["queue"]);
    assert_eq!(trace["offset"], published["offset"]);
    let retrying = entry(&trace, "retrying", "all");
    assert_eq!(
        outcomes(retrying),
        ["retry:retry", "ack:done"],
        "{retrying}"
    );
    let attempts = retrying["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[1]["attempt"], 2);
    assert!(
        attempts[0]["next_attempt_at"].as_u64().unwrap()
            >= attempts[0]["started_at"].as_u64().unwrap()
    );
    assert!(
        attempts[1]["started_at"].as_u64().unwrap() >= attempts[0]["started_at"].as_u64().unwrap()
    );
    assert_eq!(attempts[0]["node"], "local");
    assert!(attempts[0]["duration_ms"].as_f64().unwrap() >= 0.0);
    for member in ["i0000", "i0001"] {
        let e = entry(&trace, "everyone", member);
        assert_eq!(outcomes(e), ["ack:done"], "{e}");
        assert_eq!(e["instance"], member[1..].parse::<u32>().unwrap());
        assert_eq!(e["attempts"][0]["instance"], e["instance"], "{e}");
    }
    let refuser = entry(&trace, "refuser", "all");
    assert_eq!(outcomes(refuser), ["reject:dead_lettered"], "{refuser}");
    assert!(
        refuser["attempts"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("reject-all rejects"),
        "{refuser}"
    );
    // Delivered to nobody: not its tag, and a paused subscription.
    let picky = entry(&trace, "picky", "all");
    assert_eq!(
        (&picky["state"], picky["attempts"].as_array().unwrap().len()),
        (&json!("filtered"), 0)
    );
    assert_eq!(entry(&trace, "later", "all")["state"], "pending");

    // A delayed message is "delayed" until it is due, with the time it is due.
    let (_, delayed) = s
        .post_json(
            "/v1/topics/orders/messages",
            &json!({"body": {}, "tag": "x", "delay_ms": 3_600_000}),
        )
        .await;
    let delayed_path = format!("/v1/messages/{}/trace", delayed["id"].as_str().unwrap());
    let t = s
        .wait_until(&delayed_path, 60, |t| {
            t["subscriptions"].as_array().is_some_and(|subs| {
                subs.iter()
                    .any(|e| e["group"] == "picky" && e["state"] == "delayed")
            })
        })
        .await;
    assert!(
        entry(&t, "picky", "all")["next_attempt_at"]
            .as_u64()
            .unwrap()
            > attempts[1]["started_at"].as_u64().unwrap()
    );

    // Unknown and malformed ids.
    assert_error(
        &s.get("/v1/messages/0193a5c0-7f1e-7cc2-9b1d-2f6e4f1a9c3d/trace")
            .await,
        StatusCode::NOT_FOUND,
        "unknown_message",
    );
    assert_error(
        &s.get("/v1/messages/nope/trace").await,
        StatusCode::BAD_REQUEST,
        "bad_id",
    );
    s.stop().await.unwrap();
}

/// Trace records go `[retention] trace_max_age_ms` after their message was created, as one
/// range: never sooner, and a younger message's records stay; the messages themselves stay
/// (their topic keeps them 72 h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_records_go_once_their_message_is_older_than_the_trace_age() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    c.retention.check_interval_ms = 100;
    c.retention.trace_max_age_ms = 3000;
    let s = TestServer::start_with(c).await;
    let (st, v) = s.upload_plugin("echo", ECHO).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.create_topic("orders", 1).await;
    s.subscribe("work", json!({"topic": "orders", "plugin": "echo"}))
        .await;
    let id = |v: Value| v["results"][0]["id"].as_str().unwrap().to_string();
    let attempts = |v: &Value| {
        entry(v, "work", "all")["attempts"]
            .as_array()
            .unwrap()
            .len()
    };
    let old_sent = Instant::now();
    let old = id(s.publish_batch("orders", vec![json!({"body": 1})]).await);
    s.wait_until(&format!("/v1/messages/{old}/trace"), 30, |v| {
        attempts(v) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let young_sent = Instant::now();
    let young = id(s.publish_batch("orders", vec![json!({"body": 2})]).await);
    s.wait_until(&format!("/v1/messages/{young}/trace"), 30, |v| {
        attempts(v) == 1
    })
    .await;
    let v = s
        .wait_until(&format!("/v1/messages/{old}/trace"), 30, |v| {
            attempts(v) == 0
        })
        .await;
    assert!(
        old_sent.elapsed() >= Duration::from_millis(2900),
        "gone {:?} after it was sent",
        old_sent.elapsed()
    );
    assert_eq!(v["stored"], true, "the message itself stays: {v}");
    let (_, v) = s.get(&format!("/v1/messages/{young}/trace")).await;
    // Younger than the age for as long as this says (an upper bound of its age).
    if young_sent.elapsed() < Duration::from_millis(2900) {
        assert_eq!(attempts(&v), 1, "the younger message's record stays: {v}");
    }
    s.stop().await.unwrap();
}

/// A clean stop writes the attempt records still queued when it began (the runners' last ones
/// too), so no message handled before it shows `passed` (an offset past it with no attempt on
/// record) afterwards; and the data dir opens again at once in the same process: the trace
/// writer, which holds the storage, used to outlive `run` and keep RocksDB's lock (the
/// endurance bench's restart then failed with "lock hold by current process"). Stopped while
/// 1 000 messages (a batch's most) are being delivered, three times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_writes_the_queued_attempt_records_and_frees_the_data_dir() {
    const ROUNDS: usize = 3;
    const PER_ROUND: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path()).await;
    let (st, v) = s.upload_plugin("echo", ECHO).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.create_topic("orders", 2).await;
    s.subscribe("sink", json!({"topic": "orders", "plugin": "echo"}))
        .await;
    let mut ids = Vec::new();
    for round in 0..ROUNDS {
        let messages = (0..PER_ROUND)
            .map(|i| json!({"body": {"round": round, "n": i}}))
            .collect();
        let published = s.publish_batch("orders", messages).await;
        ids.extend(
            published["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string()),
        );
        // Stopped at once: deliveries are under way, their records queued or in flight.
        s.stop().await.unwrap();
        s = TestServer::start(dir.path()).await;
    }
    s.wait_until("/v1/subscriptions/sink", 120, |v| {
        v["lag"] == 0 && v["in_flight"] == 0
    })
    .await;
    // Once more: the last server's records are written by its clean stop too, not looked
    // for while its trace writer may still hold them.
    s.stop().await.unwrap();
    s = TestServer::start(dir.path()).await;
    let mut unrecorded = Vec::new();
    for id in &ids {
        let (st, trace) = s.get(&format!("/v1/messages/{id}/trace")).await;
        assert_eq!(st, StatusCode::OK, "{trace}");
        let e = entry(&trace, "sink", "all");
        if e["state"] != "acked" || e["attempts"].as_array().is_none_or(|a| a.is_empty()) {
            unrecorded.push(e.clone());
        }
    }
    assert!(
        unrecorded.is_empty(),
        "{} of {} messages without their attempt record after clean stops, e.g. {}",
        unrecorded.len(),
        ids.len(),
        unrecorded[0]
    );
    s.stop().await.unwrap();
}
