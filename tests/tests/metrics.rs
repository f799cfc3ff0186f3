//! `/metrics` against the real server: what publishing, delivery, plugin failures, dead
//! letters, broadcast instances, transactions and the storage writer show there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::json;
use wasmq_tests::plugins::{ECHO, PROBE, TRAP};
use wasmq_tests::{TestServer, config_in};

/// The value of one series, given as `name{labels}` exactly as the server writes it.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_publishing_delivery_failures_lag_and_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.plugins.timeout_ms = 500;
    let s = TestServer::start_with(config).await;
    s.upload_plugin("echo", ECHO).await;
    s.upload_plugin("trap", TRAP).await;
    for (t, q) in [("orders", 2), ("bad", 1), ("prices", 2)] {
        s.create_topic(t, q).await;
    }
    s.subscribe(
        "ok",
        json!({"topic": "orders", "plugin": "echo", "instances": 2}),
    )
    .await;
    s.subscribe(
        "failing",
        json!({"topic": "bad", "plugin": "trap", "retry": {"max_attempts": 2, "backoff_ms": [10]}}),
    )
    .await;
    s.subscribe(
        "cache",
        json!({"topic": "prices", "plugin": "echo", "mode": "broadcast", "instances": 3}),
    )
    .await;
    s.publish_numbered("orders", 10).await;
    for _ in 0..2 {
        let (st, _) = s
            .post_json("/v1/topics/orders/messages", &json!({"body": "x"}))
            .await;
        assert_eq!(st, StatusCode::CREATED);
    }
    s.post_json("/v1/topics/bad/messages", &json!({"body": 1}))
        .await;
    s.post_json("/v1/topics/prices/messages", &json!({"body": 1}))
        .await;
    let (st, _) = s
        .post_json("/v1/topics/orders/transactions", &json!({"body": "half"}))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    s.wait_until("/v1/subscriptions/failing", 30, |v| v["dlq"] == 1)
        .await;
    s.wait_until("/v1/subscriptions/ok", 30, |v| v["lag"] == 0)
        .await;
    s.wait_until("/v1/subscriptions/cache", 30, |v| v["lag"] == 0)
        .await;

    let text = s.metrics().await;
    let v =
        |series: &str| value(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
    assert_eq!(v(r#"wasmq_published_messages_total{topic="orders"}"#), 12.0);
    assert_eq!(
        v(r#"wasmq_published_bytes_total{topic="orders"}"#),
        10.0 * 7.0 + 2.0 * 3.0
    );
    assert_eq!(
        v(r#"wasmq_publish_duration_seconds_count{kind="batch"}"#),
        1.0
    );
    assert!(v(r#"wasmq_publish_duration_seconds_count{kind="single"}"#) >= 4.0);
    assert_eq!(
        v(r#"wasmq_deliveries_total{group="ok",outcome="ack"}"#),
        12.0
    );
    assert_eq!(
        v(r#"wasmq_deliveries_total{group="failing",outcome="trap"}"#),
        2.0
    );
    assert_eq!(
        v(r#"wasmq_deliveries_total{group="cache",outcome="ack"}"#),
        3.0
    );
    assert_eq!(
        v(r#"wasmq_plugin_invocation_seconds_count{group="ok"}"#),
        12.0
    );
    assert_eq!(v(r#"wasmq_dispatch_delay_seconds_count{group="ok"}"#), 12.0);
    for q in 0..2 {
        assert_eq!(
            v(&format!(
                r#"wasmq_subscription_lag{{group="ok",topic="orders",queue="{q}",instance=""}}"#
            )),
            0.0
        );
    }
    for i in 0..3 {
        assert_eq!(
            v(&format!(
                r#"wasmq_subscription_lag{{group="cache",topic="prices",queue="1",instance="{i}"}}"#
            )),
            0.0
        );
    }
    assert_eq!(v(r#"wasmq_dead_letters{group="failing"}"#), 1.0);
    assert_eq!(v(r#"wasmq_timers_pending{group="ok"}"#), 0.0);
    assert_eq!(v(r#"wasmq_transactions{state="pending"}"#), 1.0);
    assert!(v("wasmq_storage_group_commit_ops_count") >= 1.0);
    assert!(v("wasmq_storage_commit_seconds_count") >= 1.0);
    assert!(v("wasmq_storage_compaction_pending_bytes") >= 0.0);
    assert!(v("wasmq_storage_compactions_running") >= 0.0);
    assert!(v("wasmq_data_dir_bytes") > 0.0);

    // A paused subscription's lag shows as it grows.
    let (st, _) = s.post_json("/v1/subscriptions/ok/pause", &json!({})).await;
    assert_eq!(st, StatusCode::OK);
    for _ in 0..3 {
        s.post_json(
            "/v1/topics/orders/messages",
            &json!({"body": "y", "sharding_key": "k"}),
        )
        .await;
    }
    let text = s.metrics().await;
    let lag: f64 = (0..2)
        .map(|q| {
            value(
                &text,
                &format!(
                    r#"wasmq_subscription_lag{{group="ok",topic="orders",queue="{q}",instance=""}}"#
                ),
            )
            .unwrap()
        })
        .sum();
    assert_eq!(lag, 3.0);
}

/// `/metrics` with `accept` as the `Accept` header (none if `None`): content type and text.
async fn scrape(s: &TestServer, accept: Option<&str>) -> (String, String) {
    let mut req = s.client.get(format!("{}/metrics", s.url));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    (ct, resp.text().await.unwrap())
}

/// The sample names of a Prometheus text (each series' name without labels).
fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// The `wasmq_…` names the README's Metrics paragraph promises.
fn promised_by_readme() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("- **Metrics**")
        .expect("README has a Metrics paragraph");
    let para = &readme[start..];
    let end = ["\n- **", "\n\n"]
        .iter()
        .filter_map(|e| para.find(e))
        .min()
        .unwrap_or(para.len());
    let para = &para[..end];
    let mut names: Vec<String> = para
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("wasmq_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 20, "{names:?}");
    names
}

/// `promtool` from Debian's prometheus package (`.ci/setup` puts it under ~/.cache/wasmq/tools).
fn promtool() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_default();
    let cached = std::path::Path::new(&home).join(".cache/wasmq/tools/promtool");
    if cached.exists() {
        return cached;
    }
    "promtool".into()
}

/// Issue 26: the classic text format when asked (and by default, as Prometheus' client
/// libraries do), OpenMetrics when `Accept` prefers it; `promtool check metrics` finds nothing
/// to say of the classic format (it said "no help text" of the OpenMetrics counters before); every series the README promises exists before its first event, at zero; a deleted
/// topic's and subscription's series go with them; a denied publish is counted like a denied
/// email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_text_formats_pass_promtool_and_every_promised_series_starts_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.upload_plugin("echo", ECHO).await;
    s.create_topic("orders", 2).await;
    s.subscribe("ok", json!({"topic": "orders", "plugin": "echo"}))
        .await;

    // Negotiation (RFC 9110 quality values), Prometheus 2.x's own scrape header first.
    let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let prometheus3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
    for (accept, openmetrics) in [
        (Some(prometheus), true),
        (Some(prometheus3), true),
        (Some("application/openmetrics-text"), true),
        (Some("text/plain;version=0.0.4"), false),
        (
            Some("text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.1"),
            false,
        ),
        (Some("*/*"), false),
        (Some("application/json"), false),
        (Some("not a media type"), false),
        (None, false),
    ] {
        let (ct, text) = scrape(&s, accept).await;
        assert_eq!(
            ct.starts_with("application/openmetrics-text"),
            openmetrics,
            "{accept:?}: {ct}"
        );
        assert_eq!(text.ends_with("# EOF\n"), openmetrics, "{accept:?}");
        if !openmetrics {
            assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        }
    }

    // Before any publish or delivery: every promised series is there, per topic and group.
    let (_, text) = scrape(&s, None).await;
    let names = sample_names(&text);
    for promised in promised_by_readme() {
        assert!(
            ["", "_bucket", "_count", "_sum"]
                .iter()
                .any(|suffix| names.contains(&format!("{promised}{suffix}"))),
            "{promised} (README) missing before its first event:\n{text}"
        );
    }
    for series in [
        r#"wasmq_published_messages_total{topic="orders"}"#,
        r#"wasmq_published_bytes_total{topic="orders"}"#,
        r#"wasmq_retention_deleted_messages_total{topic="orders"}"#,
        r#"wasmq_deliveries_total{group="ok",outcome="ack"}"#,
        r#"wasmq_deliveries_total{group="ok",outcome="oom"}"#,
        r#"wasmq_messages_expired_unconsumed_total{group="ok"}"#,
        r#"wasmq_plugin_invocation_seconds_count{group="ok"}"#,
        r#"wasmq_dispatch_delay_seconds_count{group="ok"}"#,
        r#"wasmq_publish_duration_seconds_count{kind="idempotent"}"#,
        r#"wasmq_capability_calls_total{capability="publish",result="denied"}"#,
        r#"wasmq_transactions{state="unresolved"}"#,
    ] {
        assert_eq!(value(&text, series), Some(0.0), "{series}:\n{text}");
    }

    // OpenMetrics names a counter's family without `_total` (its samples carry it); promtool
    // reads only the classic format (it says "no help text" of every OpenMetrics counter).
    let (_, open_metrics) = scrape(&s, Some(prometheus)).await;
    assert!(
        open_metrics.contains("# TYPE wasmq_deliveries counter\n"),
        "{open_metrics}"
    );
    assert!(
        open_metrics.contains("\nwasmq_deliveries_total{"),
        "{open_metrics}"
    );
    // The classic format: promtool has nothing to say, no error and no lint warning.
    {
        let (_, text) = scrape(&s, None).await;
        assert!(
            text.contains("# TYPE wasmq_deliveries_total counter\n"),
            "{text}"
        );
        let mut child = std::process::Command::new(promtool())
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian's prometheus package; .ci/setup installs it)");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && said.trim().is_empty(), "{said}");
    }

    // A denied publish and a granted one are counted under `publish`.
    s.upload_plugin("probe", PROBE).await;
    s.create_topic("audit", 1).await;
    // invoke may grant only what a subscription already grants the plugin.
    s.subscribe(
        "probe-audit",
        json!({"topic": "audit", "plugin": "probe", "grants": {"publish": ["audit"]}}),
    )
    .await;
    for grants in [json!({}), json!({"publish": ["audit"]})] {
        let (st, v) = s
            .post_json(
                "/v1/plugins/probe/invoke",
                &json!({"message": {"body": {"do": "publish", "topic": "audit", "body": 1}},
                        "grants": grants}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let text = s.metrics().await;
    for result in ["denied", "ok"] {
        let series =
            format!(r#"wasmq_capability_calls_total{{capability="publish",result="{result}"}}"#);
        assert_eq!(value(&text, &series), Some(1.0), "{series}:\n{text}");
    }

    // Deleting drops the series; the same names made again count from zero.
    s.publish_numbered("orders", 3).await;
    s.wait_until("/v1/subscriptions/ok", 30, |v| v["lag"] == 0)
        .await;
    let text = s.metrics().await;
    assert_eq!(
        value(&text, r#"wasmq_deliveries_total{group="ok",outcome="ack"}"#),
        Some(3.0)
    );
    assert_eq!(s.delete("/v1/subscriptions/ok").await.0, StatusCode::OK);
    assert_eq!(s.delete("/v1/topics/orders").await.0, StatusCode::OK);
    let text = s.metrics().await;
    assert!(!text.contains(r#"topic="orders""#), "{text}");
    assert!(!text.contains(r#"group="ok""#), "{text}");
    s.create_topic("orders", 2).await;
    s.subscribe("ok", json!({"topic": "orders", "plugin": "echo"}))
        .await;
    let text = s.metrics().await;
    assert_eq!(
        value(&text, r#"wasmq_published_messages_total{topic="orders"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&text, r#"wasmq_deliveries_total{group="ok",outcome="ack"}"#),
        Some(0.0)
    );
}
