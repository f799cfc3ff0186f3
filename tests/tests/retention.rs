//! Retention (issue 23): each topic's policy (age, size per queue, after every subscription is
//! done) enforced by the running server, and what a subscription does when the messages ahead
//! of its offset were deleted (also by the storage's own `truncate` on the real RocksDB
//! directory while the server is stopped).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq::config::FlushMode;
use wasmq::storage::{RocksStorage, Storage};
use wasmq_tests::plugins::{RECORDER, REJECT_ALL, TRAP};
use wasmq_tests::{TestServer, assert_error, config_in};

/// A server that enforces retention every 100 ms.
async fn start(dir: &std::path::Path) -> TestServer {
    let mut c = config_in(dir);
    c.retention.check_interval_ms = 100;
    TestServer::start_with(c).await
}

/// The value of an unlabelled counter in `/metrics`.
async fn counter(s: &TestServer, name: &str) -> u64 {
    let m = s.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
}

/// Waits until two more retention passes finished (the second began after this call).
async fn two_passes(s: &TestServer) {
    let start = counter(s, "wasmq_retention_passes_total").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while counter(s, "wasmq_retention_passes_total").await < start + 2 {
        assert!(std::time::Instant::now() < deadline, "no retention pass");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn put_topic(s: &TestServer, topic: &str, body: Value) -> Value {
    let (st, v) = s.put_json(&format!("/v1/topics/{topic}"), &body).await;
    assert!(st.is_success(), "{st} {v}");
    v
}

fn recorder(topic: &str, ordered: bool) -> Value {
    json!({
        "topic": topic, "plugin": "recorder", "ordered": ordered,
        "config": {"audit": format!("audit-{}", if ordered { "ordered" } else { "unordered" })},
        "grants": {"publish": ["audit-ordered", "audit-unordered", "audit-new"]},
    })
}

fn bodies(audit: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = audit.iter().map(|a| a["body"]["n"].to_string()).collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_behind_a_deleted_range_move_to_the_low_water_and_count_what_they_lost() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("orders", 1).await;
    for audit in ["audit-ordered", "audit-unordered", "audit-new"] {
        s.create_topic(audit, 1).await;
    }
    let (st, v) = s.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    for (group, ordered) in [("unordered", false), ("ordered", true)] {
        s.subscribe(group, recorder("orders", ordered)).await;
        let (st, v) = s
            .post_json(&format!("/v1/subscriptions/{group}/pause"), &json!({}))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let msgs: Vec<Value> = (0..10).map(|n| json!({"body": {"n": n}})).collect();
    s.publish_batch("orders", msgs).await;
    s.stop().await.unwrap();

    // Retention deletes offsets 0..6 while nobody consumed them.
    let storage = RocksStorage::open(&dir.path().join("rocksdb"), FlushMode::Sync).unwrap();
    assert_eq!(storage.truncate("orders", 0, 6).await.unwrap(), 6);
    storage.close().await;
    drop(storage);

    let s = TestServer::start(dir.path()).await;
    let (_, status) = s.get("/v1/subscriptions/unordered").await;
    assert_eq!(status["queues"][0]["low_water"], 6, "{status}");
    assert_eq!(status["lag"], 4, "deleted messages are not lag: {status}");
    for group in ["unordered", "ordered"] {
        let (st, v) = s
            .post_json(&format!("/v1/subscriptions/{group}/resume"), &json!({}))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    // A subscription made now starts at the oldest message kept: nothing was lost to it.
    let mut fresh = recorder("orders", false);
    fresh["config"]["audit"] = json!("audit-new");
    s.subscribe("new", fresh).await;

    for (group, audit) in [
        ("unordered", "audit-unordered"),
        ("ordered", "audit-ordered"),
        ("new", "audit-new"),
    ] {
        let seen = s.wait_audit(audit, 4, 30).await;
        assert_eq!(bodies(&seen), ["6", "7", "8", "9"], "{group}: {seen:?}");
        let v = s
            .wait_until(&format!("/v1/subscriptions/{group}"), 30, |v| {
                v["lag"] == 0 && v["queues"][0]["committed"] == 10
            })
            .await;
        let lost = if group == "new" { 0 } else { 6 };
        assert_eq!(v["counters"]["expired_unconsumed"], lost, "{group}: {v}");
        assert_eq!(v["counters"]["delivered"], 4, "{group}: {v}");
    }
    let metrics = s.metrics().await;
    for (group, lost) in [("unordered", 6), ("ordered", 6), ("new", 0)] {
        let line = format!("wasmq_messages_expired_unconsumed_total{{group=\"{group}\"}} {lost}");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_and_age_limits_trim_each_queue_and_a_paused_subscription_counts_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    // New topics keep 72 h, with no size limit and nothing deleted for being consumed.
    let v = put_topic(&s, "plain", json!({})).await;
    assert_eq!(
        v["retention"],
        json!({"max_age_ms": 259_200_000u64, "max_bytes": null, "after_consumed": false})
    );
    let v = put_topic(
        &s,
        "sized",
        json!({"queues": 1, "retention": {"max_bytes": 8192, "max_age_ms": null}}),
    )
    .await;
    assert_eq!(
        v["retention"],
        json!({"max_age_ms": null, "max_bytes": 8192, "after_consumed": false})
    );
    // Fields left out keep their value.
    let v = put_topic(&s, "sized", json!({"retention": {}})).await;
    assert_eq!(v["retention"]["max_bytes"], 8192);
    for (bad, what) in [
        (json!({"retention": {"max_age_ms": 5}}), "max_age_ms"),
        (json!({"retention": {"max_bytes": 1}}), "max_bytes"),
        (json!({"retention": {"max_bytes": u64::MAX}}), "max_bytes"),
    ] {
        let r = s.put_json("/v1/topics/sized", &bad).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_topic_spec");
        assert!(
            r.1["error"]["message"].as_str().unwrap().contains(what),
            "{}",
            r.1
        );
    }
    for bad in [
        json!({"retention": {"max_bytes": "8k"}}),
        json!({"retention": {"max_age_ms": -1}}),
        json!({"retention": {"max_age": 1000}}),
    ] {
        let r = s.put_json("/v1/topics/sized", &bad).await;
        assert_eq!(r.0, StatusCode::BAD_REQUEST, "{bad}: {}", r.1);
    }

    s.create_topic("audit-late", 1).await;
    let (st, v) = s.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let mut late = recorder("sized", false);
    late["config"]["audit"] = json!("audit-late");
    late["grants"]["publish"] = json!(["audit-late"]);
    s.subscribe("late", late).await;
    let (st, v) = s
        .post_json("/v1/subscriptions/late/pause", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let pad = "p".repeat(1000);
    let msgs: Vec<Value> = (0..50)
        .map(|n| json!({"body": {"n": n, "pad": pad}}))
        .collect();
    s.publish_batch("sized", msgs).await;
    let t = s
        .wait_until("/v1/topics/sized", 60, |t| {
            t["low_water"][0].as_u64().unwrap_or(0) > 0
        })
        .await;
    let low = t["low_water"][0].as_u64().unwrap();
    let bytes = t["stored_bytes"][0].as_u64().unwrap();
    assert!(bytes <= 8192 && bytes > 8192 - 2_500, "{t}");
    assert_eq!(t["high_water"][0], 50, "{t}");
    assert_eq!(t["stored_messages"], 50 - low, "{t}");
    two_passes(&s).await;
    let (_, again) = s.get("/v1/topics/sized").await;
    assert_eq!(
        again["low_water"][0], low,
        "a kept queue is not cut again: {again}"
    );

    let (st, v) = s
        .post_json("/v1/subscriptions/late/resume", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let v = s
        .wait_until("/v1/subscriptions/late", 60, |v| {
            v["lag"] == 0 && v["queues"][0]["committed"] == 50
        })
        .await;
    assert_eq!(v["counters"]["expired_unconsumed"], low, "{v}");
    assert_eq!(v["counters"]["acked"], 50 - low, "{v}");
    let metrics = s.metrics().await;
    let line = format!("wasmq_retention_deleted_messages_total{{topic=\"sized\"}} {low}");
    assert!(metrics.contains(&line), "{line} missing:\n{metrics}");

    // Age: everything stored more than a second ago goes, whatever its size.
    put_topic(
        &s,
        "aged",
        json!({"queues": 2, "retention": {"max_age_ms": 1000}}),
    )
    .await;
    s.publish_numbered("aged", 6).await;
    let t = s
        .wait_until("/v1/topics/aged", 60, |t| t["stored_messages"] == 0)
        .await;
    assert_eq!(t["messages"], 6, "{t}");
    assert_eq!(t["stored_bytes"], json!([0, 0]), "{t}");
    assert_eq!(t["low_water"], t["high_water"], "{t}");
    // An untouched topic with the 72 h default keeps everything.
    s.publish_numbered("plain", 3).await;
    two_passes(&s).await;
    let (_, t) = s.get("/v1/topics/plain").await;
    assert_eq!(t["stored_messages"], 3, "{t}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_consumed_deletes_only_what_every_subscription_is_done_with() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let rules = json!({"queues": 1, "retention": {"after_consumed": true, "max_age_ms": null}});
    put_topic(&s, "events", rules).await;
    s.create_topic("audit-fast", 1).await;
    for (name, path) in [
        ("recorder", RECORDER),
        ("reject-all", REJECT_ALL),
        ("trap", TRAP),
    ] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let low = |t: &Value| t["low_water"][0].as_u64().unwrap();

    // Nobody subscribed: nothing counts as consumed.
    s.publish_numbered("events", 5).await;
    two_passes(&s).await;
    let (_, t) = s.get("/v1/topics/events").await;
    assert_eq!(low(&t), 0, "{t}");

    // One acks everything, one dead-letters everything, one waits 10 minutes to retry.
    let mut fast = recorder("events", false);
    fast["config"]["audit"] = json!("audit-fast");
    fast["grants"]["publish"] = json!(["audit-fast"]);
    s.subscribe("fast", fast).await;
    s.subscribe("dead", json!({"topic": "events", "plugin": "reject-all"}))
        .await;
    s.subscribe(
        "later",
        json!({"topic": "events", "plugin": "trap",
               "retry": {"max_attempts": 3, "backoff_ms": [600_000]}}),
    )
    .await;
    s.wait_until("/v1/subscriptions/fast", 60, |v| {
        v["lag"] == 0 && v["counters"]["acked"] == 5
    })
    .await;
    s.wait_until("/v1/subscriptions/dead", 60, |v| v["dlq"] == 5)
        .await;
    s.wait_until("/v1/subscriptions/later", 60, |v| {
        v["pending_timers"] == 5 && v["lag"] == 0
    })
    .await;
    two_passes(&s).await;
    let (_, t) = s.get("/v1/topics/events").await;
    assert_eq!(
        low(&t),
        0,
        "dead letters and retry timers hold their messages: {t}"
    );

    // Without the dead letters, the retry timers still hold them; without those, they go.
    let (st, v) = s.delete("/v1/subscriptions/dead").await;
    assert!(st.is_success(), "{st} {v}");
    two_passes(&s).await;
    let (_, t) = s.get("/v1/topics/events").await;
    assert_eq!(low(&t), 0, "retry timers hold their messages: {t}");
    let (st, v) = s.delete("/v1/subscriptions/later").await;
    assert!(st.is_success(), "{st} {v}");
    s.wait_until("/v1/topics/events", 60, |t| t["low_water"][0] == 5)
        .await;

    // A paused subscription holds what it has not consumed.
    let (st, v) = s
        .post_json("/v1/subscriptions/fast/pause", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    s.publish_numbered("events", 3).await;
    two_passes(&s).await;
    let (_, t) = s.get("/v1/topics/events").await;
    assert_eq!(low(&t), 5, "{t}");
    let (st, v) = s
        .post_json("/v1/subscriptions/fast/resume", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let t = s
        .wait_until("/v1/topics/events", 60, |t| t["low_water"][0] == 8)
        .await;
    assert_eq!(t["stored_messages"], 0, "{t}");
    // Every message reached the subscription once, none was lost to retention.
    assert_eq!(s.wait_audit("audit-fast", 8, 30).await.len(), 8);
    let (_, v) = s.get("/v1/subscriptions/fast").await;
    assert_eq!(
        (v["dlq"].as_u64(), v["pending_timers"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    assert_eq!(v["counters"]["expired_unconsumed"], 0, "{v}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_removes_it_its_messages_and_with_force_its_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    put_topic(&s, "doomed", json!({"queues": 2})).await;
    s.create_topic("audit-reader", 1).await;
    let (st, v) = s.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let mut reader = recorder("doomed", false);
    reader["config"]["audit"] = json!("audit-reader");
    reader["grants"]["publish"] = json!(["audit-reader"]);
    s.subscribe("reader", reader).await;
    let msgs: Vec<Value> = (0..10)
        .map(|n| json!({"body": {"n": n}, "key": format!("k{n}")}))
        .collect();
    let first = s.publish_batch("doomed", msgs).await;
    let first_id = first["results"][0]["id"].as_str().unwrap().to_string();
    let (st, txn) = s
        .post_json(
            "/v1/topics/doomed/transactions",
            &json!({"body": {"half": 1}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{txn}");
    let txn_id = txn["txn_id"].as_str().unwrap().to_string();

    // Subscriptions hold a topic unless the delete is forced; bad queries are refused.
    let r = s.delete("/v1/topics/doomed").await;
    assert_error(&r, StatusCode::CONFLICT, "topic_in_use");
    assert!(
        r.1["error"]["message"].as_str().unwrap().contains("reader"),
        "{}",
        r.1
    );
    let r = s.delete("/v1/topics/doomed?force=maybe").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_query");
    let r = s.delete("/v1/topics/never-made").await;
    assert_error(&r, StatusCode::NOT_FOUND, "unknown_topic");

    // Producers keep publishing while the topic goes: each publish is either acknowledged
    // (and deleted with the topic) or refused as unknown, never stored after the deletion.
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (client, url) = (s.client.clone(), s.url.clone());
            tokio::spawn(async move {
                let mut acked = 0u64;
                for n in 0.. {
                    let r = client
                        .post(format!("{url}/v1/topics/doomed/messages"))
                        .json(&json!({"body": {"p": p, "n": n}}))
                        .send()
                        .await
                        .unwrap();
                    match r.status() {
                        StatusCode::CREATED => acked += 1,
                        StatusCode::NOT_FOUND => return acked,
                        other => panic!("publish answered {other}"),
                    }
                }
                acked
            })
        })
        .collect();
    // Some publishes landed before the delete.
    s.wait_until("/v1/topics/doomed", 60, |t| {
        t["messages"].as_u64().unwrap_or(0) >= 50
    })
    .await;
    let (st, gone) = s.delete("/v1/topics/doomed?force=true").await;
    assert_eq!(st, StatusCode::OK, "{gone}");
    let mut acked = 10;
    for p in producers {
        acked += p.await.unwrap();
    }
    assert_eq!(gone["messages"], acked, "{gone}");
    assert_eq!(gone["subscriptions"], json!(["reader"]), "{gone}");
    assert_eq!(gone["transactions_rolled_back"], 1, "{gone}");

    assert_error(
        &s.get("/v1/topics/doomed").await,
        StatusCode::NOT_FOUND,
        "unknown_topic",
    );
    assert_error(
        &s.get("/v1/subscriptions/reader").await,
        StatusCode::NOT_FOUND,
        "unknown_subscription",
    );
    assert_eq!(
        s.get(&format!("/v1/messages/{first_id}")).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, t) = s.get(&format!("/v1/transactions/{txn_id}")).await;
    assert_eq!(t["state"], "rolled_back", "{t}");
    let (_, topics) = s.get("/v1/topics").await;
    assert!(
        topics["topics"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["name"] != "doomed"),
        "{topics}"
    );
    s.stop().await.unwrap();

    // Nothing of the topic or its subscription is left in storage.
    let storage = RocksStorage::open(&dir.path().join("rocksdb"), FlushMode::Sync).unwrap();
    wasmq_tests::assert_nothing_left(&storage, "doomed", 2, "k1", &["reader"]).await;
    storage.close().await;
    drop(storage);

    // The name can be used again; its offsets go on from where they were (never reused).
    let s = start(dir.path()).await;
    put_topic(&s, "doomed", json!({"queues": 1})).await;
    let (st, v) = s
        .post_json(
            "/v1/topics/doomed/messages",
            &json!({"body": {"again": true}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(v["offset"].as_u64().unwrap() > 0, "{v}");
    s.stop().await.unwrap();
}

/// A retry with an Idempotency-Key whose message retention deleted is not published again: it
/// gets a clear 410, not a server error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_after_retention_deleted_its_message_is_a_clear_410() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    put_topic(
        &s,
        "brief",
        json!({"queues": 1, "retention": {"max_age_ms": 1000}}),
    )
    .await;
    let send = || {
        s.client
            .post(format!("{}/v1/topics/brief/messages", s.url))
            .header("Idempotency-Key", "order-7")
            .json(&json!({"body": {"order": 7}}))
            .send()
    };
    let first = wasmq_tests::decode(send().await.unwrap()).await;
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    s.wait_until("/v1/topics/brief", 60, |t| t["stored_messages"] == 0)
        .await;
    let again = wasmq_tests::decode(send().await.unwrap()).await;
    assert_error(&again, StatusCode::GONE, "idempotent_message_deleted");
    assert!(
        again.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains(first.1["id"].as_str().unwrap()),
        "{}",
        again.1
    );
    let (_, t) = s.get("/v1/topics/brief").await;
    assert_eq!(t["messages"], 1, "nothing was published again: {t}");
    s.stop().await.unwrap();
}

/// Issue 23.4: dead letters stay `[retention] dead_letters_max_age_ms` after they died, then
/// go, oldest first; a subscription with the default (72 h) keeps them across passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_once_their_age_passed() {
    let kept = tempfile::tempdir().unwrap();
    let s = start(kept.path()).await;
    s.create_topic("events", 1).await;
    s.upload_plugin("reject-all", REJECT_ALL).await;
    s.subscribe("dead", json!({"topic": "events", "plugin": "reject-all"}))
        .await;
    s.publish_numbered("events", 3).await;
    s.wait_until("/v1/subscriptions/dead", 60, |v| v["dlq"] == 3)
        .await;
    two_passes(&s).await;
    assert_eq!(s.get("/v1/subscriptions/dead").await.1["dlq"], 3, "kept");
    s.stop().await.unwrap();

    let short = tempfile::tempdir().unwrap();
    let mut c = config_in(short.path());
    c.retention.check_interval_ms = 100;
    c.retention.dead_letters_max_age_ms = 1000;
    let s = TestServer::start_with(c).await;
    s.create_topic("events", 1).await;
    s.upload_plugin("reject-all", REJECT_ALL).await;
    s.subscribe("dead", json!({"topic": "events", "plugin": "reject-all"}))
        .await;
    s.publish_numbered("events", 3).await;
    s.wait_until("/v1/subscriptions/dead", 60, |v| {
        v["counters"]["dead_lettered"] == 3 && v["dlq"] == 0
    })
    .await;
    let (_, v) = s.get("/v1/subscriptions/dead/dlq").await;
    assert_eq!(v["entries"], json!([]), "{v}");
    s.stop().await.unwrap();
}

/// Issue 23.4: beyond `[retention] dead_letters_max_count` the oldest dead letters go; the
/// count status and `/metrics` show is a record changed in the same step as the entries (by
/// dead-lettering, redrive and expiry), so it stays exact across a restart; a database from
/// before the count existed is counted once from its entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_beyond_their_count_go_oldest_first_and_the_count_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = config_in(dir.path());
        c.retention.check_interval_ms = 100;
        c.retention.dead_letters_max_count = 3;
        c
    };
    let s = TestServer::start_with(config()).await;
    s.create_topic("events", 1).await;
    s.upload_plugin("reject-all", REJECT_ALL).await;
    // Ordered: dead-lettered one after another, so the oldest are the first published.
    s.subscribe(
        "dead",
        json!({"topic": "events", "plugin": "reject-all", "ordered": true}),
    )
    .await;
    let msgs: Vec<Value> = (0..5).map(|n| json!({"body": {"n": n}})).collect();
    let published = s.publish_batch("events", msgs).await;
    let ids: Vec<String> = published["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    s.wait_until("/v1/subscriptions/dead", 60, |v| {
        v["counters"]["dead_lettered"] == 5 && v["dlq"] == 3
    })
    .await;
    let kept = |v: &Value| -> Vec<String> {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, page) = s.get("/v1/subscriptions/dead/dlq").await;
    assert_eq!(kept(&page), ids[2..], "the newest three are kept: {page}");
    assert!(
        s.metrics()
            .await
            .contains("wasmq_dead_letters{group=\"dead\"} 3"),
        "the gauge reads the count"
    );

    // A redrive replaces its dead letter by a timer in one step; rejected again, it is a
    // new dead letter and the oldest kept one goes.
    let (st, v) = s
        .post_json(
            "/v1/subscriptions/dead/dlq/redrive",
            &json!({"ids": [ids[2]]}),
        )
        .await;
    assert_eq!(
        (st, v["redriven"].clone()),
        (StatusCode::OK, json!(1)),
        "{v}"
    );
    s.wait_until("/v1/subscriptions/dead", 60, |v| {
        v["counters"]["dead_lettered"] == 6 && v["dlq"] == 3
    })
    .await;
    two_passes(&s).await;
    let (_, page) = s.get("/v1/subscriptions/dead/dlq").await;
    assert_eq!(
        kept(&page),
        [ids[3].clone(), ids[4].clone(), ids[2].clone()],
        "{page}"
    );
    s.stop().await.unwrap();

    // The count survives a restart; without its record (a database from before it) the
    // entries are counted once and the count is stored again.
    let s = TestServer::start_with(config()).await;
    assert_eq!(s.get("/v1/subscriptions/dead").await.1["dlq"], 3);
    s.stop().await.unwrap();
    let storage = RocksStorage::open(&dir.path().join("rocksdb"), FlushMode::Sync).unwrap();
    let (count, key) = (
        wasmq::dispatch::dlq::count_space("dead"),
        wasmq::dispatch::dlq::COUNT_KEY,
    );
    assert!(storage.get_record(&count, key).await.unwrap().is_some());
    storage
        .put_record(&count, key, None, wasmq::storage::Expect::Any)
        .await
        .unwrap();
    storage.close().await;
    drop(storage);
    let s = TestServer::start_with(config()).await;
    assert_eq!(s.get("/v1/subscriptions/dead").await.1["dlq"], 3);
    // Deleting the subscription removes its entries and the count.
    let (st, _) = s.delete("/v1/subscriptions/dead").await;
    assert!(st.is_success(), "{st}");
    s.stop().await.unwrap();
    let storage = RocksStorage::open(&dir.path().join("rocksdb"), FlushMode::Sync).unwrap();
    assert!(storage.get_record(&count, key).await.unwrap().is_none());
    let left = storage.list_records("dlq/dead", "", 10).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    storage.close().await;
}

/// Pins (one record per timer and dead letter, by queue and offset) answer what
/// `after_consumed` must keep without reading every timer; a database from before them gets
/// them built once; a pin left without its timer goes; a runner counts its timers past the
/// in-memory window from them and drops a predecessor timer a crash left behind; a reset
/// takes the timers' pins with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_hold_what_timers_and_dead_letters_need_also_in_a_database_from_before_them() {
    use wasmq::storage::Expect;
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = config_in(dir.path());
        c.retention.check_interval_ms = 100;
        c.limits.max_timers_in_memory = 100;
        c
    };
    let s = TestServer::start_with(config()).await;
    let rules = json!({"queues": 1, "retention": {"after_consumed": true, "max_age_ms": null}});
    put_topic(&s, "events", rules).await;
    for (name, path) in [("reject-all", REJECT_ALL), ("trap", TRAP)] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    // 120 retry timers (past the window of 100) and 3 dead letters.
    s.subscribe(
        "later",
        json!({"topic": "events", "plugin": "trap",
               "retry": {"max_attempts": 3, "backoff_ms": [600_000]}}),
    )
    .await;
    s.publish_numbered("events", 120).await;
    s.wait_until("/v1/subscriptions/later", 60, |v| {
        v["pending_timers"] == 120 && v["lag"] == 0
    })
    .await;
    s.subscribe(
        "dead",
        json!({"topic": "events", "plugin": "reject-all", "start": "latest"}),
    )
    .await;
    s.publish_numbered("events", 3).await;
    s.wait_until("/v1/subscriptions/dead", 60, |v| {
        v["dlq"] == 3 && v["lag"] == 0
    })
    .await;
    s.wait_until("/v1/subscriptions/later", 60, |v| {
        v["pending_timers"] == 123
    })
    .await;
    two_passes(&s).await;
    assert_eq!(s.get("/v1/topics/events").await.1["low_water"][0], 0);
    s.stop().await.unwrap();

    let storage = RocksStorage::open(&dir.path().join("rocksdb"), FlushMode::Sync).unwrap();
    let pins = |g: &str| format!("pin/{g}");
    assert_eq!(
        storage
            .list_records(&pins("later"), "", 1000)
            .await
            .unwrap()
            .len(),
        123
    );
    let dead_pins = storage.list_records(&pins("dead"), "", 1000).await.unwrap();
    assert_eq!(dead_pins.len(), 3, "{dead_pins:?}");
    assert!(
        dead_pins[0].0.starts_with("00000000/0000000000000078/d/"),
        "{dead_pins:?}"
    );
    // A database from before pins: none, and no mark that they were built.
    for g in ["later", "dead"] {
        wasmq::storage::clear_space(&storage, &pins(g), "")
            .await
            .unwrap();
        storage
            .put_record("pin-built", g, None, Expect::Any)
            .await
            .unwrap();
    }
    // A crash between storing a retry and removing the timer it replaces left both: the
    // earlier one (due 1 ms sooner) is the predecessor.
    let timers = storage.list_records("timer/later", "", 1).await.unwrap();
    let (key, record) = &timers[0];
    let mut t: Value = serde_json::from_slice(&record.value).unwrap();
    t["due"] = json!(t["due"].as_u64().unwrap() - 1);
    let parts: Vec<&str> = key.split('/').collect();
    let due = u64::from_str_radix(parts[1], 16).unwrap() - 1;
    let stale = format!("{}/{due:016x}/{}/{}", parts[0], parts[2], parts[3]);
    storage
        .put_record(
            "timer/later",
            &stale,
            Some(serde_json::to_vec(&t).unwrap()),
            Expect::Any,
        )
        .await
        .unwrap();
    storage.close().await;
    drop(storage);

    let s = TestServer::start_with(config()).await;
    // Counted from the pins built at start, the predecessor left out and removed.
    s.wait_until("/v1/subscriptions/later", 60, |v| {
        v["pending_timers"] == 123
    })
    .await;
    two_passes(&s).await;
    assert_eq!(s.get("/v1/topics/events").await.1["low_water"][0], 0);
    s.stop().await.unwrap();
    let storage = RocksStorage::open(&dir.path().join("rocksdb"), FlushMode::Sync).unwrap();
    assert!(
        storage
            .get_record("timer/later", &stale)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        storage
            .list_records("timer/later", "", 1000)
            .await
            .unwrap()
            .len(),
        123
    );
    assert_eq!(
        storage
            .list_records(&pins("later"), "", 1000)
            .await
            .unwrap()
            .len(),
        123
    );
    assert_eq!(
        storage
            .list_records(&pins("dead"), "", 1000)
            .await
            .unwrap()
            .len(),
        3
    );
    // A pin whose timer is gone (written, then the timer lost) sorts first; it must not hold.
    let orphan = "00000000/0000000000000000/t/all/0000000000000000/00000000/0000000000000000";
    storage
        .put_record(&pins("later"), orphan, Some(vec![0; 8]), Expect::Any)
        .await
        .unwrap();
    // One at the next offset (123, not yet delivered): it must not keep the queue loop from
    // delivering that message.
    let ahead = "00000000/000000000000007b/t/all/0000000000000001/00000000/000000000000007b";
    storage
        .put_record(&pins("dead"), ahead, Some(vec![0; 8]), Expect::Any)
        .await
        .unwrap();
    storage.close().await;
    drop(storage);

    let s = TestServer::start_with(config()).await;
    // Without "later"'s timers (a reset drops them) only the dead letters hold: from offset
    // 120 on. The orphan pin does not hold offset 0.
    let (st, v) = s
        .post_json("/v1/subscriptions/later/reset", &json!({"to": "latest"}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["pending_timers"], 0, "{v}");
    s.wait_until("/v1/topics/events", 60, |t| t["low_water"][0] == 120)
        .await;
    s.publish_numbered("events", 1).await;
    s.wait_until("/v1/subscriptions/dead", 60, |v| {
        v["dlq"] == 4 && v["lag"] == 0
    })
    .await;
    s.wait_until("/v1/subscriptions/later", 60, |v| v["pending_timers"] == 1)
        .await;
    // Without the dead letters, only "later"'s new retry timer holds (offset 123).
    let (st, v) = s.delete("/v1/subscriptions/dead").await;
    assert!(st.is_success(), "{st} {v}");
    s.wait_until("/v1/topics/events", 60, |t| t["low_water"][0] == 123)
        .await;
    s.stop().await.unwrap();
    let storage = RocksStorage::open(&dir.path().join("rocksdb"), FlushMode::Sync).unwrap();
    let left = storage.list_records(&pins("dead"), "", 10).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    let left = storage.list_records(&pins("later"), "", 10).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].0.starts_with("00000000/000000000000007b/t/all/"),
        "{left:?}"
    );
    storage.close().await;
}

/// Issue 25 (1 000 topics): a retention pass reads nothing per idle topic or subscription. A
/// topic's idempotency keys and a subscription's dead letters are read again only once their
/// oldest entry can have expired or this node added one (before, each pass read three records
/// per topic and subscription: an idle server with 1 000 of each spent a fifth of a core on
/// it). What is added after the passes learned "nothing left" still expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_retention_passes_read_nothing_per_topic_and_later_entries_still_expire() {
    use wasmq_tests::unreliable::Unreliable;
    const TOPICS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    c.retention.check_interval_ms = 100;
    c.retention.dead_letters_max_age_ms = 1000;
    c.limits.idempotency_window_ms = 1000;
    let rocks = RocksStorage::open(&dir.path().join("rocksdb"), FlushMode::Async).unwrap();
    // No short reads, no lost news: a pass-through that counts record reads.
    let storage = std::sync::Arc::new(Unreliable::new(std::sync::Arc::new(rocks), 0, None));
    let s = TestServer::start_on(c, storage.clone()).await;
    s.upload_plugin("reject-all", REJECT_ALL).await;
    for i in 0..TOPICS {
        s.create_topic(&format!("t{i}"), 1).await;
        s.subscribe(
            &format!("g{i}"),
            json!({"topic": format!("t{i}"), "plugin": "reject-all"}),
        )
        .await;
    }
    two_passes(&s).await;
    // Scrapes read records too: the reads counted lie between two scrapes.
    let passes_before = counter(&s, "wasmq_retention_passes_total").await;
    let reads_before = storage.record_reads();
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let reads = storage.record_reads() - reads_before;
    // The pass under way when the window closed counts too.
    let passes = counter(&s, "wasmq_retention_passes_total").await - passes_before + 1;
    // Before: three or more per topic and subscription (120 a pass).
    assert!(
        reads < passes * 10,
        "{reads} record reads in {passes} passes over {TOPICS} idle topics and subscriptions"
    );

    // An idempotency key and a dead letter added now still expire.
    let r = s
        .client
        .post(format!("{}/v1/topics/t0/messages", s.url))
        .header("idempotency-key", "order-1")
        .json(&json!({"body": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    s.publish_numbered("t1", 1).await;
    s.wait_until("/v1/subscriptions/g1", 60, |v| {
        v["counters"]["dead_lettered"] == 1 && v["dlq"] == 0
    })
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let keys = storage.list_records("idem/t0", "", 10).await.unwrap();
        let entries = storage
            .list_records("idem-expiry/t0", "", 10)
            .await
            .unwrap();
        if keys.is_empty() && entries.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idempotency key never expired: {keys:?} {entries:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s.stop().await.unwrap();
}
