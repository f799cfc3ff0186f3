//! The hostile-plugin matrix through real subscriptions: plugins that loop, exhaust memory,
//! recurse, trap, flood the log and flood capabilities all run at once beside a well-behaved
//! subscription, whose messages must keep arriving with bounded latency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::plugins::{DEEP, HOG, PROBE, RECORDER, SPIN, TRAP};
use wasmq_tests::{TestServer, config_in};

/// Each hostile kind: plugin, the message body that sets it off, and how many are published.
const HOSTILE: &[(&str, &str, usize)] = &[
    ("spin", "{}", 6),
    ("hog", "{}", 6),
    ("deep", "{}", 6),
    ("trap", "{}", 40),
    ("probe", r#"{"do":"log","lines":100000}"#, 6),
    ("probe", r#"{"do":"flood","calls":100000}"#, 6),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_subscriptions_leave_a_healthy_one_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.plugins.timeout_ms = 300;
    config.plugins.memory_mb = 32;
    let s = TestServer::start_with(config).await;
    for (name, path) in [
        ("spin", SPIN),
        ("hog", HOG),
        ("deep", DEEP),
        ("trap", TRAP),
        ("probe", PROBE),
        ("recorder", RECORDER),
    ] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{name}: {v}");
    }
    for t in ["healthy", "audit"] {
        s.create_topic(t, 1).await;
    }
    for (i, (plugin, body, _)) in HOSTILE.iter().enumerate() {
        let topic = format!("hostile-{i}");
        s.create_topic(&topic, 2).await;
        let mut spec = json!({
            "topic": topic, "plugin": plugin, "instances": 2,
            "retry": {"max_attempts": 2, "backoff_ms": [10]},
        });
        // The spins get 2 s per call and 3 attempts: each runs out that CPU budget on every
        // attempt, one after the other, so their work lasts at least 6 s on any machine.
        // The log flood's work is its 100 000 lines: it must not be cut off by the 5 s default
        // deadline on a loaded machine (seen: half its calls timed out under the full suite).
        if body.contains("\"log\"") {
            spec["limits"] = json!({"timeout_ms": 120_000});
        }
        if *plugin == "spin" {
            spec["limits"] = json!({"timeout_ms": 2000});
            spec["retry"]["max_attempts"] = json!(3);
        }
        s.subscribe(&format!("hostile-{i}"), spec).await;
    }
    s.subscribe(
        "healthy",
        json!({
            "topic": "healthy", "plugin": "recorder",
            "config": {"audit": "audit"}, "grants": {"publish": ["audit"]},
        }),
    )
    .await;

    for (i, (_, body, n)) in HOSTILE.iter().enumerate() {
        let body: Value = serde_json::from_str(body).unwrap();
        let messages: Vec<Value> = (0..*n).map(|_| json!({"body": body})).collect();
        let (st, v) = s
            .post_json(
                &format!("/v1/topics/hostile-{i}/messages/batch"),
                &json!({"messages": messages}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    // While the hostile ones are being worked through, a steady trickle of healthy messages.
    let latencies = s.trickle_latencies("healthy", "audit", 60).await;
    let (p50, max) = (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    println!("healthy publish→handle under the hostile matrix: p50 {p50} ms, max {max} ms");
    let healthy_done = s.last_handled_at("audit").await;

    // Every hostile message ends in its dead-letter queue, with the reason it failed.
    for (i, (plugin, body, n)) in HOSTILE.iter().enumerate() {
        let group = format!("hostile-{i}");
        let expect_dead = if body.contains("log") { 0 } else { *n };
        let v = s
            .wait_until(&format!("/v1/subscriptions/{group}"), 60, |v| {
                v["counters"]["dead_lettered"].as_u64() == Some(expect_dead as u64)
                    && v["counters"]["acked"].as_u64() == Some((*n - expect_dead) as u64)
            })
            .await;
        println!("{plugin} {body}: {}", v["counters"]);
    }
    // All 60 healthy messages were handled before the last spin ran out its attempts (both
    // times from the server's clock): the trickle takes 1.5 s plus 60 small calls, the spins
    // at least 6 s however fast the machine, and a host held up by hostile plugins serves the
    // healthy one only after them. Events are ordered, nothing is timed (the isolation
    // benchmark measures latencies).
    let spins_done = s.last_dead_at("hostile-0", "").await;
    assert!(
        healthy_done < spins_done,
        "the healthy subscription was served only after the spins were done ({healthy_done} ≥ {spins_done})"
    );
    let (_, dlq) = s.get("/v1/subscriptions/hostile-0/dlq?limit=1").await;
    assert!(
        dlq["entries"][0]["reason"]
            .as_str()
            .is_some_and(|e| e.contains("timeout") || e.contains("deadline")),
        "{dlq}"
    );
    // The log flood left at most its per-call share in the bounded ring, and counted the rest.
    let (st, logs) = s.get("/v1/plugins/probe/logs?limit=1000").await;
    assert_eq!(st, StatusCode::OK, "{logs}");
    let lines = logs["lines"].as_array().unwrap();
    assert!(!lines.is_empty() && lines.len() <= 1000, "{}", lines.len());
    assert!(
        logs["dropped"].as_u64().unwrap() >= 6 * (100_000 - 100),
        "{}",
        logs["dropped"]
    );
    assert!(
        lines
            .iter()
            .all(|l| l["group"] == "hostile-4" && l["message_id"].is_string())
    );
    let (st, _) = s.get("/healthz").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_of_one_plugin_see_only_their_own_config_and_grants() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.upload_plugin("probe", PROBE).await;
    for t in ["ta", "tb", "audit-a"] {
        s.create_topic(t, 1).await;
    }
    // Same plugin, two tenants: each config carries a secret, only A may publish to its topic.
    // The probe reports by rejecting, which would drop a staged publish: A's effects apply as
    // called.
    s.subscribe(
        "a",
        json!({"topic": "ta", "plugin": "probe", "instances": 2,
               "config": {"secret": "alpha"}, "grants": {"publish": ["audit-a"]},
               "processing_guarantee": "at_least_once"}),
    )
    .await;
    s.subscribe(
        "b",
        json!({"topic": "tb", "plugin": "probe", "instances": 2,
               "config": {"secret": "beta"}}),
    )
    .await;
    for t in ["ta", "tb"] {
        for body in [
            json!({"do": "config"}),
            json!({"do": "publish", "topic": "audit-a", "body": {"from": t}}),
        ] {
            let (st, _) = s
                .post_json(&format!("/v1/topics/{t}/messages"), &json!({"body": body}))
                .await;
            assert_eq!(st, StatusCode::CREATED);
        }
    }
    // The probe reports through its reject reason, so both answers land in each DLQ.
    let mut reasons = HashMap::new();
    for g in ["a", "b"] {
        let v = s
            .wait_until(&format!("/v1/subscriptions/{g}/dlq"), 30, |v| {
                v["entries"].as_array().is_some_and(|e| e.len() == 2)
            })
            .await;
        let all: Vec<String> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["reason"].as_str().unwrap().to_string())
            .collect();
        reasons.insert(g, all.join("\n"));
    }
    assert!(
        reasons["a"].contains("alpha") && !reasons["a"].contains("beta"),
        "{}",
        reasons["a"]
    );
    assert!(
        reasons["b"].contains("beta") && !reasons["b"].contains("alpha"),
        "{}",
        reasons["b"]
    );
    // A's grant does not leak to B: B's publish was denied, A's went through.
    assert!(reasons["b"].contains("denied"), "{}", reasons["b"]);
    let audit = s.read_queue("audit-a", 0).await;
    assert_eq!(audit, vec![json!({"from": "ta"})]);
}

/// Plugin text is capped and made inert wherever it is kept or shown: a 3 MB reject reason
/// holding a forged log line and a terminal escape is stored cut (with a visible mark) and
/// escaped, and so is a log line with a newline in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_reasons_and_log_lines_are_capped_and_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("t", 1).await;
    let (st, v) = s.upload_plugin("probe", PROBE).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.subscribe("g", json!({"topic": "t", "plugin": "probe"}))
        .await;
    let forged = "\n2026-11-30T00:00:00Z ERROR wasmq::forged: FORGED admin login\u{1b}[2J";
    let reason = format!("{}{forged}", "r".repeat(3 << 20));
    for body in [
        json!({"do": "reject", "reason": reason}),
        json!({"do": "say", "text": format!("hello{forged}")}),
    ] {
        let (st, v) = s
            .post_json("/v1/topics/t/messages", &json!({"body": body}))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    s.wait_until("/v1/subscriptions/g", 30, |v| {
        v["lag"] == 0 && v["dlq"] == 1
    })
    .await;
    let (_, page) = s.get("/v1/subscriptions/g/dlq").await;
    let kept = page["entries"][0]["reason"].as_str().unwrap();
    assert!(
        kept.len() < 2048,
        "a reason of {} bytes was kept",
        kept.len()
    );
    assert!(kept.contains("bytes cut]"), "no visible mark: {kept:.80}");
    let (_, logs) = s.get("/v1/plugins/probe/logs").await;
    let line = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .find(|m| m.starts_with("hello"))
        .expect("the line was logged");
    for text in [kept, line] {
        assert!(
            !text.chars().any(char::is_control),
            "control characters kept: {text:?}"
        );
    }
    assert!(
        line.contains("\\nwasmq") || line.contains("\\n2026"),
        "{line}"
    );
    assert!(line.contains("\\u{1b}[2J"), "{line}");
}
