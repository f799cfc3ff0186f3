//! Regression tests for faults found by outside checks (issue 19), each rebuilt from the input
//! that showed it, against the real server and real plugins: broadcast dead letters that
//! replaced each other, ordered retries that came early after pause/resume and restart, a reset
//! to a time that skipped messages, a delayed message that stalled its ordered queue, a stop
//! that ignored cancellation under `max_rate`, durations that wrapped around, and a control call
//! cut off by its timeout that left a subscription stopped but shown running. No test depends on
//! the machine's speed: each waits for events and bounds counts, with generous limits only
//! against hangs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::peers::{HttpPeer, SmtpServer};
use wasmq_tests::plugins::{EMAIL_NOTIFIER, RECORDER};
use wasmq_tests::{TestServer, assert_error, config_in};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn setup(s: &TestServer, topic: &str, queues: u32) {
    s.create_topic(topic, queues).await;
    s.create_topic("audit", 1).await;
    let (st, v) = s.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}

fn recorder(topic: &str, extra: Value) -> Value {
    let mut spec = json!({
        "topic": topic, "plugin": "recorder",
        "config": {"audit": "audit"}, "grants": {"publish": ["audit"]},
        "retry": {"max_attempts": 3, "backoff_ms": [20]},
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

async fn publish(s: &TestServer, topic: &str, msg: Value) -> Value {
    let (st, v) = s
        .post_json(&format!("/v1/topics/{topic}/messages"), &msg)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    v
}

/// Item 2: three broadcast instances dead-letter the same six messages, often in the same
/// millisecond: every instance keeps its own entry (18, not 8), each shows its instance, and
/// redrive brings all 18 back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_dead_letters_keep_one_entry_per_instance() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, "prices", 1).await;
    s.subscribe(
        "fanout",
        recorder("prices", json!({"mode": "broadcast", "instances": 3})),
    )
    .await;
    let (st, batch) = s
        .post_json(
            "/v1/topics/prices/messages/batch",
            &json!({"messages": (0..6).map(|i| json!({"body": {"n": i, "reject": true}})).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{batch}");
    let st = s
        .wait_until("/v1/subscriptions/fanout", 30, |v| {
            v["counters"]["dead_lettered"] == 18 && v["lag"] == 0
        })
        .await;
    assert_eq!(
        st["dlq"], 18,
        "every instance's dead letter is stored: {st}"
    );
    let (_, page) = s.get("/v1/subscriptions/fanout/dlq?limit=100").await;
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 18, "{page}");
    let mut per_instance: HashMap<u64, HashSet<String>> = HashMap::new();
    for e in entries {
        let instance = e["instance"].as_u64().expect("the instance is shown");
        per_instance
            .entry(instance)
            .or_default()
            .insert(e["message_id"].as_str().unwrap().to_string());
    }
    let sent: HashSet<String> = batch["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(per_instance.len(), 3, "{per_instance:?}");
    for ids in per_instance.values() {
        assert_eq!(*ids, sent, "each instance dead-lettered each message once");
    }
    let (st, r) = s
        .post_json("/v1/subscriptions/fanout/dlq/redrive", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["redriven"], 18);
    // Rejected again by each instance: 18 new entries, none lost (the counters count from the
    // subscription's creation, across the restart a redrive makes).
    s.wait_until("/v1/subscriptions/fanout", 30, |v| {
        v["counters"]["dead_lettered"] == 36 && v["dlq"] == 18 && v["pending_timers"] == 0
    })
    .await;
}

/// Item 3: an ordered subscription whose plugin answers `retry` with a 5 s backoff does not get
/// the message again before the backoff ends, across pause/resume and across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_retries_wait_their_backoff_across_pause_resume_and_restart() {
    const BACKOFF: u64 = 5000;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, "t", 1).await;
    s.subscribe(
        "ordered",
        recorder(
            "t",
            json!({"ordered": true, "retry": {"max_attempts": 5, "backoff_ms": [BACKOFF]}}),
        ),
    )
    .await;
    // Before the publish: the first attempt comes after this, so the retry no earlier than
    // this plus the backoff.
    let t0 = now_ms();
    publish(&s, "t", json!({"body": {"fail_attempts": 1}})).await;
    let st = s
        .wait_until("/v1/subscriptions/ordered", 10, |v| {
            v["queues"][0]["blocked_attempts"] == 1
        })
        .await;
    let retry_at = st["queues"][0]["retry_at"]
        .as_u64()
        .expect("retry time shown");
    assert!(retry_at >= t0 + BACKOFF, "{st}");
    s.post_json("/v1/subscriptions/ordered/pause", &json!({}))
        .await;
    s.post_json("/v1/subscriptions/ordered/resume", &json!({}))
        .await;
    s.stop().await.unwrap();
    let s = TestServer::start(dir.path()).await;
    let (_, st) = s.get("/v1/subscriptions/ordered").await;
    assert_eq!(st["queues"][0]["retry_at"], retry_at, "stored: {st}");
    let audit = s.wait_audit("audit", 1, 30).await;
    let handled = audit[0]["handled_at"].as_u64().unwrap();
    assert_eq!(audit[0]["attempt"], 2);
    assert!(
        handled >= retry_at,
        "retried {} ms early",
        retry_at.saturating_sub(handled)
    );
    // A clustering subscription's retry is a stored timer: it waits the same, as before.
    s.subscribe(
        "clustering",
        recorder(
            "t",
            json!({"start": "latest", "retry": {"max_attempts": 5, "backoff_ms": [BACKOFF]}}),
        ),
    )
    .await;
    let t1 = now_ms();
    publish(
        &s,
        "t",
        json!({"body": {"fail_attempts": 1, "second": true}}),
    )
    .await;
    s.wait_until("/v1/subscriptions/clustering", 10, |v| {
        v["pending_timers"] == 1
    })
    .await;
    s.post_json("/v1/subscriptions/clustering/pause", &json!({}))
        .await;
    s.post_json("/v1/subscriptions/clustering/resume", &json!({}))
        .await;
    let audit = s.wait_audit("audit", 3, 30).await;
    let second: Vec<&Value> = audit
        .iter()
        .filter(|a| a["body"]["second"] == true && a["attempt"] == 2)
        .collect();
    assert!(!second.is_empty(), "{audit:?}");
    for a in second {
        assert!(a["handled_at"].as_u64().unwrap() >= t1 + BACKOFF, "{a}");
    }
}

/// Item 4: one queue holds a plain message born at T, then a transaction begun before T and
/// committed after it. A reset to T replays both: offsets are found by the time the broker
/// stored each message (monotonic per queue), not by birth time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_a_time_replays_every_message_stored_since() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, "t", 1).await;
    s.subscribe("g", recorder("t", json!({}))).await;
    let (st, txn) = s
        .post_json("/v1/topics/t/transactions", &json!({"body": {"n": "txn"}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{txn}");
    // The plain message is born after the transaction began (store times are in ms).
    tokio::time::sleep(Duration::from_millis(51)).await;
    let plain = publish(&s, "t", json!({"body": {"n": "plain"}})).await;
    let (_, m) = s
        .get(&format!("/v1/messages/{}", plain["id"].as_str().unwrap()))
        .await;
    let born = m["born_at"].as_u64().unwrap();
    assert!(m["stored_at"].as_u64().unwrap() >= born, "{m}");
    let (st, c) = s
        .post_json(
            &format!(
                "/v1/transactions/{}/commit",
                txn["txn_id"].as_str().unwrap()
            ),
            &json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    s.wait_audit("audit", 2, 10).await;
    // Born before the plain message, stored after it.
    let (_, page) = s.get("/v1/topics/t/messages?queue=0&from=0&limit=10").await;
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert!(msgs[1]["born_at"].as_u64().unwrap() < born, "{page}");
    assert!(msgs[1]["stored_at"].as_u64() >= msgs[0]["stored_at"].as_u64());
    let (st, r) = s
        .post_json("/v1/subscriptions/g/reset", &json!({"to": born}))
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(
        r["queues"][0]["committed"], 0,
        "the plain message is replayed: {r}"
    );
    let audit = s.wait_audit("audit", 4, 10).await;
    let replayed: Vec<&Value> = audit[2..].iter().map(|a| &a["body"]["n"]).collect();
    assert_eq!(replayed, [&json!("plain"), &json!("txn")]);
}

/// Item 5: on a one-queue topic with an ordered subscription, a message of key A delayed by
/// 8 s does not hold up five messages of key B that are due now; A arrives when due, never
/// early, and B keeps its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_does_not_stall_its_ordered_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, "t", 1).await;
    s.subscribe("ordered", recorder("t", json!({"ordered": true})))
        .await;
    let a = publish(
        &s,
        "t",
        json!({"body": {"k": "A"}, "sharding_key": "A", "delay_ms": 8000}),
    )
    .await;
    let (_, am) = s
        .get(&format!("/v1/messages/{}", a["id"].as_str().unwrap()))
        .await;
    let a_due = am["deliver_at"].as_u64().unwrap();
    for i in 0..5 {
        publish(
            &s,
            "t",
            json!({"body": {"k": "B", "i": i}, "sharding_key": "B"}),
        )
        .await;
    }
    let audit = s.wait_audit("audit", 5, 30).await;
    let order: Vec<Value> = audit.iter().map(|a| a["body"].clone()).collect();
    assert_eq!(
        order,
        (0..5)
            .map(|i| json!({"k": "B", "i": i}))
            .collect::<Vec<_>>(),
        "B first, in order"
    );
    let (_, st) = s.get("/v1/subscriptions/ordered").await;
    assert_eq!(st["pending_timers"], 1, "A waits as a timer: {st}");
    let audit = s.wait_audit("audit", 6, 30).await;
    assert_eq!(audit[5]["body"]["k"], "A");
    assert!(audit[5]["handled_at"].as_u64().unwrap() >= a_due);
    s.wait_until("/v1/subscriptions/ordered", 10, |v| {
        v["lag"] == 0 && v["pending_timers"] == 0
    })
    .await;
}

/// Item 6: a stop with a rate-limited backlog does not hand out the backlog first. At 50
/// messages per second, 3 000 messages would take a minute; the stop returns, and what was
/// handed out after it is at most what was in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_under_max_rate_does_not_drain_the_backlog_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, "t", 2).await;
    s.subscribe(
        "slow",
        recorder("t", json!({"max_rate": 50.0, "max_in_flight": 8})),
    )
    .await;
    for chunk in 0..3 {
        let (st, v) = s
            .post_json(
                "/v1/topics/t/messages/batch",
                &json!({"messages": (0..1000).map(|i| json!({"body": {"n": chunk * 1000 + i}})).collect::<Vec<_>>()}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    s.wait_audit("audit", 5, 30).await;
    let (_, t) = s.get("/v1/topics/audit").await;
    let before = t["messages"].as_u64().unwrap();
    // A stop that drains the backlog at 50/s would take a minute.
    tokio::time::timeout(Duration::from_secs(30), s.stop())
        .await
        .expect("the stop waited for the backlog")
        .unwrap();
    let s = TestServer::start(dir.path()).await;
    s.post_json("/v1/subscriptions/slow/pause", &json!({}))
        .await;
    let (_, t) = s.get("/v1/topics/audit").await;
    let after = t["messages"].as_u64().unwrap();
    assert!(
        after - before <= 100,
        "{} messages handed out after the stop",
        after - before
    );
    let (_, st) = s.get("/v1/subscriptions/slow").await;
    assert_eq!(
        st["lag"].as_u64().unwrap() + after,
        3000,
        "nothing skipped: {st}"
    );
}

/// Item 7: every duration a client sets is bounded with a clear 400, not wrapped around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_past_their_bounds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    setup(&s, "t", 1).await;
    let max = u64::MAX;
    let (st, v) = s
        .post_json(
            "/v1/topics/t/transactions",
            &json!({"body": "x", "check_after_ms": max}),
        )
        .await;
    assert_error(&(st, v.clone()), StatusCode::BAD_REQUEST, "bad_duration");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("check_after_ms")
    );
    for timings in [
        json!({"check_interval_ms": max, "max_checks": 5}),
        json!({"check_after_ms": max}),
        json!({"check_interval_ms": 0}),
        json!({"max_checks": 0}),
        json!({"max_checks": u32::MAX}),
    ] {
        let (st, v) = s
            .put_json("/v1/topics/t", &json!({"transactions": timings}))
            .await;
        assert_error(&(st, v), StatusCode::BAD_REQUEST, "bad_topic_spec");
    }
    // At the bound: accepted; the first check is 30 days away, not now.
    let (st, v) = s
        .post_json(
            "/v1/topics/t/transactions",
            &json!({"body": "x", "check_after_ms": 30u64 * 24 * 3600 * 1000}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (_, t) = s
        .get(&format!(
            "/v1/transactions/{}",
            v["txn_id"].as_str().unwrap()
        ))
        .await;
    assert!(
        t["next_check_at"].as_u64().unwrap() > now_ms() + 29 * 24 * 3600 * 1000,
        "{t}"
    );
    for (field, value) in [
        ("max_rate", json!(1e-300)),
        ("max_rate", json!(1e300)),
        ("max_in_flight", json!(u32::MAX)),
        ("limits", json!({"timeout_ms": max})),
        ("limits", json!({"memory_mb": max})),
        ("retry", json!({"backoff_ms": [max]})),
    ] {
        let mut spec = recorder("t", json!({}));
        spec[field] = value;
        let (st, v) = s.put_json("/v1/subscriptions/g", &spec).await;
        assert_error(
            &(st, v.clone()),
            StatusCode::BAD_REQUEST,
            "invalid_subscription",
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    let resp = s
        .client
        .put(format!("{}/v1/plugins/recorder2?timeout_ms={max}", s.url))
        .header("content-type", "application/wasm")
        .body(std::fs::read(RECORDER).unwrap())
        .send()
        .await
        .unwrap();
    let (st, v) = wasmq_tests::decode(resp).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
}

/// Item 8: a pause cut off by the request timeout (the plugin's calls are slow) still pauses;
/// a resume then delivers everything; and pausing another subscription meanwhile does not wait
/// on this one's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_call_cut_off_by_its_timeout_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let mut config = config_in(dir.path());
    config.smtp.host = "127.0.0.1".into();
    config.smtp.port = smtp.addr.port();
    config.smtp.from = "wasmq@example.com".into();
    config.sms.url = format!("{}/sms", gateway.url);
    config.server.request_timeout_ms = 1000;
    let s = TestServer::start_with(config).await;
    setup(&s, "users", 1).await;
    s.upload_plugin("email-notifier", EMAIL_NOTIFIER).await;
    s.subscribe("other", recorder("users", json!({}))).await;
    s.subscribe(
        "mail",
        json!({
            "topic": "users", "plugin": "email-notifier",
            "config": {"to": "{{email}}", "subject": "Hi {{name}}", "text": "Welcome"},
            "grants": {"email": true},
        }),
    )
    .await;
    // Each mail takes 3 s: a pause waits for the one being sent, past the 1 s timeout.
    smtp.state
        .delay_ms
        .store(3000, std::sync::atomic::Ordering::SeqCst);
    for i in 0..40 {
        publish(
            &s,
            "users",
            json!({"body": {"email": format!("u{i}@example.com"), "name": format!("u{i}")}}),
        )
        .await;
    }
    s.wait_until("/v1/subscriptions/mail", 10, |v| v["in_flight"] != 0)
        .await;
    let (client, url) = (s.client.clone(), s.url.clone());
    let mail_pause = tokio::spawn(async move {
        let r = client
            .post(format!("{url}/v1/subscriptions/mail/pause"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        r.status()
    });
    // Let the mail pause begin (a later start only makes the check below weaker, not wrong).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The other subscription's pause answers while the mail pause still waits on its call.
    let (st, v) = s
        .post_json("/v1/subscriptions/other/pause", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "paused");
    assert!(
        !mail_pause.is_finished(),
        "the mail pause was not waiting on its call (the test did not test anything)"
    );
    let status = mail_pause.await.unwrap();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    // Cut off, the pause still completes: shown paused, not running and stuck.
    let st = s
        .wait_until("/v1/subscriptions/mail", 15, |v| {
            v["state"] == "paused" && v["in_flight"].as_u64().unwrap_or(0) == 0
        })
        .await;
    assert!(st["lag"].as_u64().unwrap() > 0, "{st}");
    smtp.state
        .delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let (st, v) = s
        .post_json("/v1/subscriptions/mail/resume", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    s.wait_until("/v1/subscriptions/mail", 30, |v| {
        v["state"] == "running" && v["lag"] == 0 && v["in_flight"] == 0
    })
    .await;
    let mails = smtp.wait_for(40, 30).await;
    let to: HashSet<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    assert_eq!(to.len(), 40, "every user mailed");
}
