//! The web dashboard end to end in headless Chromium (`tests/dashboard/e2e.mjs`, driven by
//! playwright-core): it shows a paused subscription's backlog, a click on Resume lets the lag
//! drop, a click redrives a dead letter, a click commits an undecided transaction; as a
//! console it creates a topic and a subscription, browses messages, resets offsets to a time,
//! uploads a plugin and reads a plugin's log. The server state is checked here afterwards. `bash .ci/setup-browser` installs Chromium and
//! playwright-core (`.ci/run` does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::json;
use wasmq_tests::plugins::{PROBE, RECORDER, REJECT_ALL};
use wasmq_tests::{TestServer, config_in};

fn node_modules() -> PathBuf {
    std::env::var_os("WASMQ_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/wasmq/node/node_modules")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_lag_and_redrives_and_commits_by_clicking() {
    let modules = node_modules();
    assert!(
        modules.join("playwright-core").is_dir()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Chromium and playwright-core: run `bash .ci/setup-browser`"
    );
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config_in(dir.path())).await;
    // The page and its assets are served by the host itself.
    let page = s.client.get(format!("{}/", s.url)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("<title>wasmq</title>"));
    let js = s
        .client
        .get(format!("{}/ui/app.js", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    wasmq_tests::assert_error(
        &s.get("/ui/nope.js").await,
        StatusCode::NOT_FOUND,
        "no_asset",
    );

    s.upload_plugin("recorder", RECORDER).await;
    s.upload_plugin("reject-all", REJECT_ALL).await;
    for (t, q) in [("orders", 2), ("audit", 1), ("bad", 1)] {
        s.create_topic(t, q).await;
    }
    s.subscribe(
        "slow",
        json!({"topic": "orders", "plugin": "recorder",
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    let (st, _) = s
        .post_json("/v1/subscriptions/slow/pause", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    s.publish_numbered("orders", 50).await;
    s.subscribe("rejects", json!({"topic": "bad", "plugin": "reject-all"}))
        .await;
    s.post_json("/v1/topics/bad/messages", &json!({"body": "no"}))
        .await;
    s.wait_until("/v1/subscriptions/rejects", 30, |v| v["dlq"] == 1)
        .await;
    let (_, dlq) = s.get("/v1/subscriptions/rejects/dlq").await;
    let dead_before = dlq["entries"][0]["key"].clone();
    assert!(dead_before.is_string(), "{dlq}");
    let (st, txn) = s
        .post_json(
            "/v1/topics/audit/transactions",
            &json!({"body": "half", "check_after_ms": 3_600_000}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{txn}");

    // For the console steps: messages to browse (JSON, and text sent as bytes) and a plugin
    // that logged a line.
    s.create_topic("notes", 1).await;
    s.publish_batch(
        "notes",
        vec![
            json!({"body": {"note": 1}, "key": "note-1"}),
            json!({"body_base64": "aGVsbG8gdGV4dA==", "key": "note-2"}),
        ],
    )
    .await;
    s.upload_plugin("probe", PROBE).await;
    s.invoke(
        "probe",
        json!({"do": "say", "text": "from the console test"}),
    )
    .await;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboard/e2e.mjs");
    // WASMQ_DASHBOARD_SHOT keeps the screenshot somewhere to look at.
    let shot = std::env::var_os("WASMQ_DASHBOARD_SHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("dashboard.png"));
    let node = s.get("/v1/cluster").await.1["node"]
        .as_str()
        .unwrap()
        .to_string();
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .arg(format!("{}/", s.url))
        .env("WASMQ_NODE_ID", &node)
        .env("WASMQ_NODE_MODULES", &modules)
        .env("WASMQ_SCREENSHOT", &shot)
        .env("WASMQ_PROBE", PROBE)
        .output()
        .await
        .expect("cannot run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("step: lag dropped to 0 after resume")
            && stdout.contains("step: the answering node shown")
            && stdout.contains("step: message traced")
            && stdout.contains("step: plugin log read"),
        "{stdout}"
    );

    // What the clicks did, seen from the API: resumed, then reset to a time before every
    // message, so each of the 50 was handled twice (the recorder audits each handling; the
    // committed transaction is the audit topic's 101st message).
    s.wait_until("/v1/topics/audit", 30, |v| v["messages"] == 101)
        .await;
    let (_, slow) = s.get("/v1/subscriptions/slow").await;
    assert_eq!(slow["state"], "running");
    let (st, made) = s.get("/v1/subscriptions/made-sub").await;
    assert_eq!(
        (st, &made["spec"]["topic"]),
        (StatusCode::OK, &json!("made-here"))
    );
    let (_, topic) = s.get("/v1/topics/made-here").await;
    assert_eq!(topic["queues"], 2);
    let (_, uploaded) = s.get("/v1/plugins/uploaded").await;
    assert_eq!(uploaded["version"], 1, "{uploaded}");
    // Redriven, delivered again, rejected again: one dead letter, a new one.
    let dlq = s
        .wait_until("/v1/subscriptions/rejects/dlq", 30, |v| {
            v["entries"].as_array().is_some_and(|e| e.len() == 1)
                && v["entries"][0]["key"] != dead_before
        })
        .await;
    assert_eq!(dlq["entries"][0]["attempts"], 1, "{dlq}");
    let id = txn["txn_id"].as_str().unwrap();
    let (_, t) = s.get(&format!("/v1/transactions/{id}")).await;
    assert_eq!(t["state"], "committed", "{t}");
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 0));
}
