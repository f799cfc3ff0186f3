//! Plugin isolation (issue 22): a misbehaving plugin costs only its own subscription. Looping
//! calls share the CPU fairly with a healthy subscription; a call that waits (a WASI sleep) is
//! stopped at its wall-clock deadline; deleting a subscription or stopping the server cuts off
//! calls in flight. Bounded by counts and events, not by how fast this machine is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::plugins::{ECHO, PROBE, SPIN};
use wasmq_tests::{TestServer, config_in, polyglot_plugin};

fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap_or(0)
}

/// The value of one series of the `/metrics` text, or 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The input, scaled to a count: 4 looping calls that each may run for a minute, beside
/// a subscription with one instance that must handle 10 000 messages. Served in turn by tokio
/// alone (each looping call holds a thread for a tick, the healthy worker waits behind all of
/// them), the healthy one managed ~12 calls/s (and ~100/s with fair slots but no spare
/// thread): 10 000 took minutes, so the looping calls hit their deadline first. With the fair
/// scheduler the healthy one is served at once and drains while all 4 loops are still in
/// their first call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_subscription_drains_while_looping_calls_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    // Deleting the looping subscription waits this long for its calls, then cuts them off.
    config.plugins.stop_grace_ms = 500;
    let s = TestServer::start_with(config).await;
    for (name, path) in [("spin", SPIN), ("echo", ECHO)] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{name}: {v}");
    }
    s.create_topic("loops", 4).await;
    s.create_topic("healthy", 1).await;
    s.subscribe(
        "loops",
        json!({"topic": "loops", "plugin": "spin", "instances": 4,
               "limits": {"timeout_ms": 60_000}}),
    )
    .await;
    s.subscribe("healthy", json!({"topic": "healthy", "plugin": "echo"}))
        .await;
    s.publish_numbered("loops", 4).await;
    // All four looping calls are running before the healthy messages arrive.
    s.wait_until("/v1/subscriptions/loops", 60, |v| {
        counter(v, "delivered") == 4
    })
    .await;
    let messages: Vec<Value> = (0..2000).map(|i| json!({"body": {"n": i}})).collect();
    for chunk in messages.chunks(500) {
        s.publish_batch("healthy", chunk.to_vec()).await;
    }
    s.wait_until("/v1/subscriptions/healthy", 55, |v| {
        counter(v, "acked") == 2000
    })
    .await;
    let (_, loops) = s.get("/v1/subscriptions/loops").await;
    assert_eq!(
        counter(&loops, "failed"),
        0,
        "the healthy subscription drained only after looping calls ran out: {loops}"
    );
    let text = s.metrics().await;
    println!(
        "plugin calls waiting for a CPU slot now: {}",
        metric(&text, "wasmq_plugin_calls_waiting ")
    );
    // Deleting the looping subscription cuts its four calls off after the grace instead of
    // waiting out their minute; its instances leave the pool.
    let resp = s
        .client
        .delete(format!("{}/v1/subscriptions/loops", s.url))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "wasmq_plugin_instances_live "),
        1.0,
        "only the healthy worker's instance is left:\n{text}"
    );
    let (st, _) = s.get("/healthz").await;
    assert_eq!(st, StatusCode::OK);
}

/// A call that sleeps is stopped at its wall-clock deadline (`timeout_ms`), in Rust and Python:
/// before, only time inside wasm counted, and a 3 s sleep under a 1 000 ms deadline acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_call_is_stopped_at_its_wall_clock_deadline() {
    let py = polyglot_plugin("hostile-py").await;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config_in(dir.path())).await;
    for (name, path) in [("probe", PROBE), ("hostile-py", py.to_str().unwrap())] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{name}: {v}");
    }
    for (group, plugin, body) in [
        ("sleep-rs", "probe", json!({"do": "sleep", "ms": 3000})),
        ("sleep-py", "hostile-py", json!({"do": "sleep", "s": 3})),
    ] {
        s.create_topic(group, 1).await;
        s.subscribe(
            group,
            json!({"topic": group, "plugin": plugin, "limits": {"timeout_ms": 1000},
                   "retry": {"max_attempts": 1}}),
        )
        .await;
        s.publish_batch(group, vec![json!({"body": body})]).await;
    }
    for group in ["sleep-rs", "sleep-py"] {
        let v = s
            .wait_until(&format!("/v1/subscriptions/{group}"), 60, |v| {
                counter(v, "dead_lettered") + counter(v, "acked") == 1
            })
            .await;
        assert_eq!(
            counter(&v, "acked"),
            0,
            "{group} slept past its deadline: {v}"
        );
        let (_, dlq) = s.get(&format!("/v1/subscriptions/{group}/dlq")).await;
        let reason = dlq["entries"][0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("wall-clock"), "{group}: {dlq}");
    }
    // The same limit holds for a direct invocation.
    let v = s
        .invoke("probe", json!({"do": "sleep", "ms": 10_000}))
        .await;
    assert_eq!(v["failure"]["kind"], "timeout", "{v}");
}

/// Publishes one command to the probe subscription `group` (whose topic has the same name) and
/// waits for its outcome: `None` if acked, else the JSON the probe reported (its reject
/// reason, read from the dead-letter queue).
async fn ask(s: &TestServer, group: &str, body: Value) -> Option<Value> {
    let (_, before) = s.get(&format!("/v1/subscriptions/{group}")).await;
    let done = counter(&before, "acked") + counter(&before, "dead_lettered");
    s.publish_batch(group, vec![json!({ "body": body })]).await;
    let after = s
        .wait_until(&format!("/v1/subscriptions/{group}"), 60, |v| {
            counter(v, "acked") + counter(v, "dead_lettered") > done
        })
        .await;
    if counter(&after, "dead_lettered") == counter(&before, "dead_lettered") {
        return None;
    }
    let (_, dlq) = s
        .get(&format!("/v1/subscriptions/{group}/dlq?limit=1000"))
        .await;
    let reasons: Vec<&str> = dlq["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    // The newest dead letter is the one this command made.
    let newest = dlq["entries"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|e| e["offset"].as_u64())
        .unwrap();
    let reason = newest["reason"].as_str().unwrap();
    let reported = reason.strip_prefix("rejected: ").unwrap_or(reason);
    Some(serde_json::from_str(reported).unwrap_or_else(|e| panic!("{e}: {reasons:?}")))
}

async fn probe_subscription(s: &TestServer, group: &str, scope: &str) {
    let (st, v) = s
        .put_json(&format!("/v1/topics/{group}"), &json!({"queues": 1}))
        .await;
    assert!(st.is_success(), "{v}");
    s.subscribe(
        group,
        json!({"topic": group, "plugin": "probe", "kv_scope": scope}),
    )
    .await;
}

/// kv is a namespace per subscription (issue 22): before, g2 read g1's value, a re-uploaded
/// plugin read the old state, and kv had no size bound. Now a subscription sees only its own
/// state unless it asks for the plugin's shared one, state goes with its subscription or
/// plugin, and a namespace holds at most `[limits] max_kv_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_state_belongs_to_its_subscription_unless_shared() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.limits.max_kv_bytes = 64 * 1024;
    let s = TestServer::start_with(config).await;
    let (st, v) = s.upload_plugin("probe", PROBE).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    for (g, scope) in [
        ("g1", "subscription"),
        ("g2", "subscription"),
        ("p1", "plugin"),
        ("p2", "plugin"),
    ] {
        probe_subscription(&s, g, scope).await;
    }
    let set = |v: &str| json!({"do": "kv-set", "key": "k", "value": v});
    let get = json!({"do": "kv-get", "key": "k"});
    assert_eq!(ask(&s, "g1", set("g1's")).await, None);
    assert_eq!(
        ask(&s, "g2", get.clone()).await,
        Some(json!({"value": null}))
    );
    assert_eq!(
        ask(&s, "g1", get.clone()).await,
        Some(json!({"value": "g1's"}))
    );
    // Shared on request: p2 reads what p1 wrote; neither sees g1's.
    assert_eq!(
        ask(&s, "p2", get.clone()).await,
        Some(json!({"value": null}))
    );
    assert_eq!(ask(&s, "p1", set("shared")).await, None);
    assert_eq!(
        ask(&s, "p2", get.clone()).await,
        Some(json!({"value": "shared"}))
    );
    // The namespace's size bound: 60 kB fit, 60 kB more do not, and the refusal says why.
    let big = "x".repeat(60_000);
    let w = |k: &str| json!({"do": "kv-set", "key": k, "value": big});
    assert_eq!(ask(&s, "g1", w("a")).await, None);
    let refused = ask(&s, "g1", w("b")).await.unwrap();
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_kv_bytes")),
        "{refused}"
    );
    // Freed room is usable again; another subscription's namespace is not affected.
    assert_eq!(
        ask(&s, "g1", json!({"do": "kv-delete", "key": "a"})).await,
        None
    );
    assert_eq!(ask(&s, "g1", w("b")).await, None);
    assert_eq!(ask(&s, "g2", w("a")).await, None);
    // A deleted subscription's state goes with it: the same group created again starts empty.
    let del = |path: String| {
        let client = s.client.clone();
        let url = format!("{}{path}", s.url);
        async move {
            let r = client.delete(url).send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        }
    };
    del("/v1/subscriptions/g1".into()).await;
    s.subscribe(
        "g1",
        json!({"topic": "g1", "plugin": "probe", "start": "latest"}),
    )
    .await;
    assert_eq!(
        ask(&s, "g1", get.clone()).await,
        Some(json!({"value": null}))
    );
    // A deleted plugin's shared state goes with it: uploaded again, it starts empty.
    for g in ["g1", "g2", "p1", "p2"] {
        del(format!("/v1/subscriptions/{g}")).await;
    }
    del("/v1/plugins/probe".into()).await;
    let (st, v) = s.upload_plugin("probe", PROBE).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.subscribe(
        "p1",
        json!({"topic": "p1", "plugin": "probe", "kv_scope": "plugin", "start": "latest"}),
    )
    .await;
    assert_eq!(ask(&s, "p1", get).await, Some(json!({"value": null})));
}
