//! Retention (issue 23): what a subscription does when the messages ahead of its offset were
//! deleted. The range is deleted with the storage's own `truncate` while the server is stopped
//! (the real RocksDB directory, reopened), then the server runs on it again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq::config::FlushMode;
use wasmq::storage::{RocksStorage, Storage};
use wasmq_tests::TestServer;
use wasmq_tests::plugins::RECORDER;

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
