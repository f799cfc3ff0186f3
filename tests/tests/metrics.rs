//! `/metrics` against the real server: what publishing, delivery, plugin failures, dead
//! letters, broadcast instances, transactions and the storage writer show there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::json;
use wasmq_tests::plugins::{ECHO, TRAP};
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
