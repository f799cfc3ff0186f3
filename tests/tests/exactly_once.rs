//! Exactly-once processing (issue 24): a plugin's kv writes and publishes are stored together
//! with its delivery's completion, so retries and traps after them repeat nothing, and
//! concurrent deliveries over one kv key lose no update. The tally plugin increments one kv
//! counter per message and publishes the new value, then asks for a retry or traps at random:
//! the derived values must be exactly 1..n, one per input. Bound by counts, not by time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::plugins::TALLY;
use wasmq_tests::{TestServer, config_in};

fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap_or(0)
}

/// Publishes `n` messages counting on `counter` to `topic`; returns their ids.
async fn publish_counting(s: &TestServer, topic: &str, counter: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let messages: Vec<Value> = (0..n)
        .map(|_| json!({"body": {"counter": counter}}))
        .collect();
    for chunk in messages.chunks(200) {
        let v = s.publish_batch(topic, chunk.to_vec()).await;
        ids.extend(
            v["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string()),
        );
    }
    ids
}

/// A server with the tally plugin, an input topic of 4 queues and a derived topic of 1.
async fn tally_server(dir: &std::path::Path) -> TestServer {
    let s = TestServer::start_with(config_in(dir)).await;
    let (st, v) = s.upload_plugin("tally", TALLY).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.create_topic("in", 4).await;
    s.create_topic("derived", 1).await;
    s
}

/// Two instances with 32 messages in flight increment one kv key, 400 times, with a retry or a
/// trap after the increment and the publish on about one call in four. Before issue 24 each
/// retry kept its increment and its derived message (values skipped, messages repeated), and
/// two calls reading the same value both stored value + 1 (a lost update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_over_one_kv_key_lose_no_update_and_repeat_no_effect() {
    let dir = tempfile::tempdir().unwrap();
    let s = tally_server(dir.path()).await;
    s.subscribe(
        "tally",
        json!({"topic": "in", "plugin": "tally", "instances": 2, "max_in_flight": 32,
               "config": {"derived": "derived", "retry_percent": 20, "trap_percent": 5},
               "grants": {"publish": ["derived"]},
               "retry": {"max_attempts": 100, "backoff_ms": [1]}}),
    )
    .await;
    const N: usize = 400;
    let ids = publish_counting(&s, "in", "c", N).await;
    let status = s
        .wait_until("/v1/subscriptions/tally", 300, |v| {
            counter(v, "acked") == N as u64
        })
        .await;
    assert!(
        counter(&status, "retried") > 0,
        "some calls retried after their effects: {status}"
    );
    assert_eq!(counter(&status, "dead_lettered"), 0, "{status}");
    let derived = s.read_queue("derived", 0).await;
    let mut values: Vec<u64> = derived
        .iter()
        .map(|d| d["value"].as_u64().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (1..=N as u64).collect::<Vec<_>>(),
        "one derived message per input, the counter counting each input once"
    );
    let inputs: HashSet<&str> = derived
        .iter()
        .map(|d| d["input"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ids.iter().map(String::as_str).collect());
    s.stop().await.unwrap();
}

/// The same plugin under `processing_guarantee: at_least_once` keeps what a retried call did:
/// its derived topic holds more messages than there were inputs. (What the test above would
/// see if effects were not staged: it can fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_keeps_the_effects_of_retried_calls() {
    let dir = tempfile::tempdir().unwrap();
    let s = tally_server(dir.path()).await;
    s.subscribe(
        "tally",
        json!({"topic": "in", "plugin": "tally", "processing_guarantee": "at_least_once",
               "config": {"derived": "derived", "retry_percent": 30},
               "grants": {"publish": ["derived"]},
               "retry": {"max_attempts": 100, "backoff_ms": [1]}}),
    )
    .await;
    const N: usize = 100;
    publish_counting(&s, "in", "c", N).await;
    let status = s
        .wait_until("/v1/subscriptions/tally", 300, |v| {
            counter(v, "acked") == N as u64
        })
        .await;
    let retried = counter(&status, "retried");
    assert!(retried > 0, "{status}");
    let derived = s.read_queue("derived", 0).await;
    assert_eq!(
        derived.len() as u64,
        N as u64 + retried,
        "every call published, retried or not"
    );
    s.stop().await.unwrap();
}

/// A spec shows its guarantee; an unknown one is refused, naming the ones there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_shows_its_processing_guarantee() {
    let dir = tempfile::tempdir().unwrap();
    let s = tally_server(dir.path()).await;
    let created = s
        .subscribe(
            "t",
            json!({"topic": "in", "plugin": "tally", "config": {"derived": "derived"},
                   "grants": {"publish": ["derived"]}}),
        )
        .await;
    assert_eq!(
        created["spec"]["processing_guarantee"], "exactly_once",
        "{created}"
    );
    let (st, v) = s
        .put_json(
            "/v1/subscriptions/u",
            &json!({"topic": "in", "plugin": "tally", "processing_guarantee": "twice"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "bad_json", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expected `exactly_once` or `at_least_once`"),
        "{v}"
    );
    s.stop().await.unwrap();
}
