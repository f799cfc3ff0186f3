//! The producer client libraries (issue 26) against the real server: Rust (`host/client`),
//! Python (`host/client/python`) and JavaScript (`host/client/js`) each publish (JSON, bytes,
//! every envelope field), repeat an idempotency key, publish a batch, begin/commit/roll back
//! transactions, get typed errors, and retry a 429 after its `Retry-After`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use wasmq_client::{Client, Error, Message, Retry};
use wasmq_tests::plugins::ECHO;
use wasmq_tests::{TestServer, config_in};

/// A server with, for each `prefix`, the topics `{prefix}-orders`, `{prefix}-txn` and
/// `{prefix}-slow`, the last consumed by a subscription of the same name at one message per
/// ~17 minutes; `max_backlog` 2 makes it push back after a few publishes.
async fn server(dir: &std::path::Path, prefixes: &[&str]) -> TestServer {
    let mut config = config_in(dir);
    config.limits.max_backlog = 2;
    let s = TestServer::start_with(config).await;
    s.upload_plugin("echo", ECHO).await;
    for p in prefixes {
        for t in ["orders", "txn", "slow"] {
            s.create_topic(&format!("{p}-{t}"), 2).await;
        }
        s.subscribe(
            &format!("{p}-slow"),
            json!({"topic": format!("{p}-slow"), "plugin": "echo", "max_rate": 0.001}),
        )
        .await;
        // The rate limiter's first token goes to a message now: from then on the
        // subscription takes nothing for ~17 minutes, so the backlog only grows.
        s.publish_numbered(&format!("{p}-slow"), 1).await;
        s.wait_until(&format!("/v1/subscriptions/{p}-slow"), 30, |v| {
            v["counters"]["acked"] == 1
        })
        .await;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_publishes_decides_and_retries_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), &["rs"]).await;
    let client = Client::new(&s.url).unwrap();

    // Publish: JSON with every field, bytes; read back through the API.
    let a = client
        .publish(
            "rs-orders",
            &Message::json(&json!({"order": 1}))
                .unwrap()
                .key("o-1")
                .tag("created")
                .sharding_key("u-1")
                .property("via", "rust")
                .delay_ms(1),
        )
        .await
        .unwrap();
    let (_, m) = s.get(&format!("/v1/messages/{}", a.id)).await;
    assert_eq!(
        (
            &m["body"],
            &m["key"],
            &m["tag"],
            &m["sharding_key"],
            &m["properties"]
        ),
        (
            &json!({"order": 1}),
            &json!("o-1"),
            &json!("created"),
            &json!("u-1"),
            &json!({"via": "rust"})
        )
    );
    let b = client
        .publish("rs-orders", &Message::bytes([0u8, 255, 16]))
        .await
        .unwrap();
    assert_eq!(
        s.get(&format!("/v1/messages/{}", b.id)).await.1["body_base64"],
        "AP8Q"
    );

    // Idempotency: the repeat is replayed; the same key with another message is refused.
    let keyed = |n: u32| {
        Message::json(&json!({"order": n}))
            .unwrap()
            .idempotency_key("rs-k")
    };
    let first = client.publish("rs-orders", &keyed(2)).await.unwrap();
    let again = client.publish("rs-orders", &keyed(2)).await.unwrap();
    assert_eq!(
        (again.id.as_str(), again.replayed, first.replayed),
        (first.id.as_str(), true, false)
    );
    let reused = client.publish("rs-orders", &keyed(3)).await.unwrap_err();
    assert_eq!(
        (reused.status(), reused.code()),
        (Some(422), Some("idempotency_key_reused"))
    );

    // A batch: atomic, answers in order.
    let batch = client
        .publish_batch(
            "rs-orders",
            &[
                Message::json(&1).unwrap(),
                Message::json(&2).unwrap().key("b-2"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(batch.len(), 2);
    let (_, t) = s.get("/v1/topics/rs-orders").await;
    assert_eq!(t["messages"], 5, "{t}");

    // Typed errors: unknown topic, bad field, no server, no scheme.
    let e = client
        .publish("rs-nope", &Message::json(&1).unwrap())
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(404), Some("unknown_topic")));
    let e = client
        .publish("rs-orders", &Message::json(&1).unwrap().tag("a|b"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    let down = Client::builder("http://127.0.0.1:1")
        .retry(Retry {
            max_attempts: 2,
            backoff: Duration::from_millis(10),
            ..Retry::default()
        })
        .build()
        .unwrap();
    assert!(matches!(
        down.publish("t", &Message::json(&1).unwrap()).await,
        Err(Error::Transport(_))
    ));
    assert!(matches!(
        Client::new("127.0.0.1:7700"),
        Err(Error::Invalid(_))
    ));

    // Transactions: commit is idempotent and makes the message visible; the opposite decision
    // is a 409.
    let txn = client
        .begin(
            "rs-txn",
            &Message::json(&json!({"order": 9})).unwrap(),
            Some(60_000),
        )
        .await
        .unwrap();
    assert_eq!(txn.check_after_ms, 60_000);
    assert_eq!(client.commit(&txn.txn_id).await.unwrap().state, "committed");
    assert_eq!(client.commit(&txn.txn_id).await.unwrap().state, "committed");
    assert_eq!(
        s.get(&format!("/v1/messages/{}", txn.message_id)).await.1["body"],
        json!({"order": 9})
    );
    let other = client
        .begin("rs-txn", &Message::json(&10).unwrap(), None)
        .await
        .unwrap();
    assert_eq!(
        client.rollback(&other.txn_id).await.unwrap().state,
        "rolled_back"
    );
    let e = client.commit(&other.txn_id).await.unwrap_err();
    assert_eq!(e.status(), Some(409));

    // 429 while the slow subscription is behind: without retries the error carries
    // Retry-After; with them, the send after the first refusal's wait succeeds once the
    // on_retry hook has deleted the subscription.
    let once = Client::builder(&s.url)
        .retry(Retry {
            max_attempts: 1,
            ..Retry::default()
        })
        .build()
        .unwrap();
    let mut refused = None;
    for _ in 0..100 {
        if let Err(e) = once
            .publish("rs-slow", &Message::json(&"fill").unwrap())
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("max_backlog 2 never pushed back in 100 publishes");
    assert!(refused.is_overloaded(), "{refused}");
    assert!(
        matches!(&refused, Error::Api { code, retry_after: Some(d), .. }
        if code == "backlog_full" && *d == Duration::from_secs(1))
    );
    // (status, attempt) of each retry.
    type Retries = Arc<Mutex<Vec<(Option<u16>, u32)>>>;
    let seen: Retries = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let hook_seen = seen.clone();
    let patient = Client::builder(&s.url)
        .retry(Retry {
            max_attempts: 30,
            max_wait: Duration::from_secs(1),
            ..Retry::default()
        })
        .on_retry(move |e, attempt| {
            hook_seen.lock().unwrap().push((e.status(), attempt));
            let _ = tx.send(());
        })
        .build()
        .unwrap();
    let late = tokio::spawn(async move {
        patient
            .publish("rs-slow", &Message::json(&json!({"late": true})).unwrap())
            .await
    });
    rx.recv().await.unwrap();
    assert_eq!(
        s.delete("/v1/subscriptions/rs-slow").await.0,
        reqwest::StatusCode::OK
    );
    let late = late.await.unwrap().unwrap();
    assert_eq!(seen.lock().unwrap()[0], (Some(429), 1));
    assert_eq!(
        s.get(&format!("/v1/messages/{}", late.id)).await.1["body"],
        json!({"late": true})
    );
}

/// Runs a client's own checks (`against_server.*`) against a real server; they print what
/// passed and exit non-zero on the first failure.
async fn run_script(program: &str, script: &str, prefix: &str) {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), &[prefix]).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/client");
    let out = tokio::process::Command::new(program)
        .arg(root.join(script))
        .env("WASMQ_URL", &s.url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script}:\n{said}");
    assert!(said.contains("client: ok"), "{said}");
    let (_, t) = s.get(&format!("/v1/topics/{prefix}-orders")).await;
    assert_eq!(t["messages"], 5, "{t}");
    let (_, v): (_, Value) = s.get(&format!("/v1/topics/{prefix}-txn")).await;
    assert_eq!(v["messages"], 1, "only the committed one: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_publishes_decides_and_retries_against_a_real_server() {
    run_script("python3", "python/against_server.py", "py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_publishes_decides_and_retries_against_a_real_server() {
    run_script("node", "js/against_server.mjs", "js").await;
}
