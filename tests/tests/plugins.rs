//! Plugin upload, the sandbox and its limits, with real components compiled from plugins/.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::plugins::{
    CHECKER, DEEP, ECHO, FUTURE_IMPORT, HOG, PROBE, PROFILE_STORE, RECORDER, REJECT_ALL, SNOOP,
    SPIN, TRAP,
};
use wasmq_tests::{TestServer, assert_error, config_in};

/// What the probe plugin reported through its reject reason.
fn report(v: &Value) -> Value {
    assert_eq!(v["outcome"]["type"], "reject", "{v}");
    serde_json::from_str(v["outcome"]["reason"].as_str().unwrap()).unwrap()
}

async fn metric(s: &TestServer, name: &str) -> u64 {
    let text = s.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
        .unwrap_or_else(|| panic!("{name} not in metrics:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_versions_and_invoke() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let (st, v) = s.upload_plugin("echo", ECHO).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["name"].as_str(), v["version"].as_u64()),
        (Some("echo"), Some(1))
    );
    assert_eq!(v["exports"], json!(["wasmq:plugin/consumer@0.1.0"]));
    assert_eq!(v["digest"].as_str().unwrap().len(), 64);
    // The same bytes again: nothing new.
    let (st, again) = s.upload_plugin("echo", ECHO).await;
    assert_eq!((st, again["version"].as_u64()), (StatusCode::OK, Some(1)));
    // Different bytes: version 2; both kept.
    let (st, v2) = s.upload_plugin("echo", REJECT_ALL).await;
    assert_eq!((st, v2["version"].as_u64()), (StatusCode::CREATED, Some(2)));
    let (_, shown) = s.get("/v1/plugins/echo").await;
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2);
    // Latest rejects, version 1 still acks.
    assert_eq!(
        s.invoke("echo", json!("hi")).await["outcome"]["type"],
        "reject"
    );
    let (_, v1) = s
        .post_json(
            "/v1/plugins/echo/invoke",
            &json!({"message": {"body": "hi"}, "version": 1}),
        )
        .await;
    assert_eq!(v1["outcome"]["type"], "ack", "{v1}");
    let (st, c) = s.upload_plugin("txn-checker", CHECKER).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(c["exports"], json!(["wasmq:plugin/checker@0.1.0"]));
    assert_error(
        &s.post_json(
            "/v1/plugins/txn-checker/invoke",
            &json!({"message": {"body": "commit"}}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "missing_export",
    );
    let (_, list) = s.get("/v1/plugins").await;
    assert_eq!(list["plugins"].as_array().unwrap().len(), 2);
    let r = s
        .client
        .delete(format!("{}/v1/plugins/echo", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_error(
        &s.get("/v1/plugins/echo").await,
        StatusCode::NOT_FOUND,
        "unknown_plugin",
    );
    assert_error(
        &s.post_json("/v1/plugins/echo/invoke", &json!({"message": {"body": 1}}))
            .await,
        StatusCode::NOT_FOUND,
        "unknown_plugin",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_get_a_clear_400() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.limits.max_plugin_bytes = 150_000;
    let s = TestServer::start_with(config).await;
    assert_error(
        &s.upload_bytes("p", b"hello, not wasm".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "not_wasm",
    );
    assert_error(
        &s.upload_bytes("p", b"\0asm\x01\0\0\0".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "core_module",
    );
    let mut junk = b"\0asm\x0d\0\x01\0".to_vec();
    junk.extend_from_slice(&[0xff; 32]);
    assert_error(
        &s.upload_bytes("p", junk).await,
        StatusCode::BAD_REQUEST,
        "invalid_component",
    );
    // A valid component that exports nothing wasmq knows.
    let empty = b"\0asm\x0d\0\x01\0".to_vec();
    let r = s.upload_bytes("p", empty).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "unknown_world");
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("consumer")
    );
    let r = s.upload_plugin("p", FUTURE_IMPORT).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "unsupported_imports");
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("teleport"),
        "{}",
        r.1
    );
    // probe is ~220 KB, over this server's 150 KB limit.
    assert_error(
        &s.upload_plugin("p", PROBE).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "plugin_too_large",
    );
    // Refused unread: the server says it closes the connection, so the pooled client does
    // not reuse it (the next calls on `s.client` would otherwise race the close).
    let r = s
        .client
        .put(format!("{}/v1/plugins/p", s.url))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["connection"], "close");
    assert_error(
        &wasmq_tests::decode(r).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    // Parameters and case do not change the media type (the guard and the handler agree).
    let r = s
        .client
        .put(format!("{}/v1/plugins/echo", s.url))
        .header("content-type", "Application/WASM; charset=binary")
        .body(std::fs::read(ECHO).unwrap())
        .send()
        .await
        .unwrap();
    // Read to its end: the connection stays open for the next request.
    assert!(r.headers().get("connection").is_none(), "{:?}", r.headers());
    let (status, v) = wasmq_tests::decode(r).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(s.delete("/v1/plugins/echo").await.0, StatusCode::OK);
    // Refused unread too, back to back on the pooled client.
    for _ in 0..3 {
        assert_error(
            &s.upload_plugin(".bad", ECHO).await,
            StatusCode::BAD_REQUEST,
            "bad_plugin_name",
        );
    }
    // A body that was read keeps the connection open.
    let r = s
        .client
        .post(format!("{}/v1/plugins/nope/invoke", s.url))
        .json(&json!({"message": {"body": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.headers().get("connection").is_none());
    let (_, list) = s.get("/v1/plugins").await;
    assert_eq!(list["plugins"], json!([]), "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_config_identity_kv_and_denials() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.upload_plugin("probe", PROBE).await;
    s.upload_plugin("other", PROBE).await;
    let (_, r) = s
        .post_json(
            "/v1/plugins/probe/invoke",
            &json!({"message": {"body": {"do": "config"}}, "config": {"greeting": "hi"}}),
        )
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(report(&r)["config"].as_str().unwrap()).unwrap(),
        json!({"greeting": "hi"})
    );
    let id = report(&s.invoke("probe", json!({"do": "identity"})).await);
    assert_eq!(
        (
            id["plugin"].as_str(),
            id["version"].as_u64(),
            id["count"].as_u64()
        ),
        (Some("probe"), Some(1), Some(1))
    );
    // kv persists across calls and is private to the plugin.
    assert_eq!(
        s.invoke(
            "probe",
            json!({"do": "kv-set", "key": "user/1", "value": "Ann"})
        )
        .await["outcome"]["type"],
        "ack"
    );
    s.invoke(
        "probe",
        json!({"do": "kv-set", "key": "user/2", "value": "Bob"}),
    )
    .await;
    assert_eq!(
        report(
            &s.invoke("probe", json!({"do": "kv-get", "key": "user/1"}))
                .await
        )["value"],
        "Ann"
    );
    assert_eq!(
        report(
            &s.invoke("probe", json!({"do": "kv-list", "prefix": "user/"}))
                .await
        )["keys"],
        json!(["user/1", "user/2"])
    );
    assert_eq!(
        report(
            &s.invoke("other", json!({"do": "kv-get", "key": "user/1"}))
                .await
        )["value"],
        Value::Null
    );
    s.invoke("probe", json!({"do": "kv-delete", "key": "user/1"}))
        .await;
    assert_eq!(
        report(
            &s.invoke("probe", json!({"do": "kv-get", "key": "user/1"}))
                .await
        )["value"],
        Value::Null
    );
    let bad_key = report(
        &s.invoke("probe", json!({"do": "kv-set", "key": "", "value": "x"}))
            .await,
    );
    assert!(
        bad_key["error"].as_str().unwrap().starts_with("invalid"),
        "{bad_key}"
    );
    // Nothing is granted outside a subscription: every capability answers `denied`, no trap.
    s.create_topic("audit", 1).await;
    for cmd in [
        json!({"do": "publish", "topic": "audit", "body": {"x": 1}}),
        json!({"do": "email"}),
        json!({"do": "sms"}),
        json!({"do": "http", "url": "http://127.0.0.1:1/"}),
    ] {
        let r = report(&s.invoke("probe", cmd.clone()).await);
        assert!(
            r["error"].as_str().unwrap().starts_with("denied"),
            "{cmd}: {r}"
        );
    }
    let (_, audit) = s.get("/v1/topics/audit").await;
    assert_eq!(audit["messages"], 0);
    // Outcomes come back as the plugin said.
    assert_eq!(
        s.invoke("probe", json!({"do": "retry", "after_ms": 250}))
            .await["outcome"],
        json!({"type": "retry", "after_ms": 250})
    );
    // The same instance serves consecutive calls (its static counter grows).
    let a = report(&s.invoke("probe", json!({"do": "calls"})).await)["calls"]
        .as_u64()
        .unwrap();
    let b = report(&s.invoke("probe", json!({"do": "calls"})).await)["calls"]
        .as_u64()
        .unwrap();
    assert_eq!(b, a + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_has_no_files_env_or_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.upload_plugin("snoop", SNOOP).await;
    // A real listener the plugin would reach if it had sockets.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let r = report(
        &s.invoke(
            "snoop",
            json!({"file": secret.display().to_string(), "socket": target}),
        )
        .await,
    );
    assert!(r["file"].as_str().unwrap().starts_with("error"), "{r}");
    assert!(r["dir"].as_str().unwrap().starts_with("error"), "{r}");
    assert_eq!(r["env"], json!([]), "{r}");
    assert!(r["socket"].as_str().unwrap().starts_with("error"), "{r}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the plugin opened a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_stopped_and_the_host_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.plugins.timeout_ms = 500;
    config.plugins.memory_mb = 32;
    let s = TestServer::start_with(config).await;
    // An upload with limits in the query: the answer.
    let upload = |path: &'static str, name_and_query: &'static str| {
        let (client, url) = (s.client.clone(), s.url.clone());
        async move {
            let resp = client
                .put(format!("{url}/v1/plugins/{name_and_query}"))
                .header("content-type", "application/wasm")
                .body(std::fs::read(path).unwrap())
                .send()
                .await
                .unwrap();
            wasmq_tests::decode(resp).await
        }
    };
    for (name, path) in [
        ("echo", ECHO),
        ("spin", SPIN),
        ("hog", HOG),
        ("deep", DEEP),
        ("trap", TRAP),
    ] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{name}: {v}");
    }
    // The looping plugin is stopped at the configured deadline (500 ms of CPU), not before.
    let started = Instant::now();
    let r = s.invoke("spin", json!(1)).await;
    let spin_time = started.elapsed();
    assert_eq!(r["failure"]["kind"], "timeout", "{r}");
    assert!(
        r["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline of 500 ms"),
        "{r}"
    );
    assert!(
        spin_time >= Duration::from_millis(450),
        "stopped after {spin_time:?}"
    );
    // While a looping plugin runs (here given 8 s), the well-behaved one keeps answering: five
    // calls finish before the loop is stopped (an order of events, whatever the machine's
    // speed; held up behind the loop, they would finish after it).
    let (st, v) = upload(SPIN, "spin-long?timeout_ms=8000").await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let spinning = {
        let (client, url) = (s.client.clone(), s.url.clone());
        tokio::spawn(async move {
            let r: Value = client
                .post(format!("{url}/v1/plugins/spin-long/invoke"))
                .json(&json!({"message": {"body": 1}}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        assert_eq!(s.invoke("echo", json!(1)).await["outcome"]["type"], "ack");
    }
    assert!(
        !spinning.is_finished(),
        "echo finished only after the loop was stopped"
    );
    let r = spinning.await.unwrap();
    assert_eq!(r["failure"]["kind"], "timeout", "{r}");

    let r = s.invoke("hog", json!(1)).await;
    assert_eq!(r["failure"]["kind"], "memory_limit", "{r}");
    assert!(
        r["failure"]["message"]
            .as_str()
            .unwrap()
            .contains(&(32u64 << 20).to_string()),
        "{r}"
    );
    // Limits can be set per plugin at upload: tighter memory and a shorter deadline.
    let (st, v) = upload(HOG, "hog?memory_mb=8").await;
    assert_eq!(
        (st, v["version"].as_u64(), v["limits"]["memory_mb"].as_u64()),
        (StatusCode::CREATED, Some(2), Some(8)),
        "{v}"
    );
    let r = s.invoke("hog", json!(1)).await;
    assert!(
        r["failure"]["message"]
            .as_str()
            .unwrap()
            .contains(&(8u64 << 20).to_string()),
        "{r}"
    );
    let (st, v) = upload(SPIN, "spin?timeout_ms=100").await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let r = s.invoke("spin", json!(1)).await;
    assert_eq!(r["failure"]["kind"], "timeout", "{r}");
    assert!(
        r["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline of 100 ms"),
        "per-plugin deadline ignored: {r}"
    );
    assert_error(
        &upload(SPIN, "spin?memory_mb=64").await,
        StatusCode::BAD_REQUEST,
        "bad_limits",
    );
    assert_error(
        &upload(SPIN, "spin?timeout_ms=soon").await,
        StatusCode::BAD_REQUEST,
        "bad_query",
    );
    let r = s.invoke("deep", json!(1)).await;
    assert_eq!(r["failure"]["kind"], "trap", "{r}");
    // A trapped instance is replaced: the next call traps the same way, not worse.
    for _ in 0..2 {
        let r = s.invoke("trap", json!(1)).await;
        assert_eq!(r["failure"]["kind"], "trap", "{r}");
    }
    assert_eq!(s.invoke("echo", json!(2)).await["outcome"]["type"], "ack");
    let (st, _) = s.get("/healthz").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loads_the_stored_artifact_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.upload_plugin("echo", ECHO).await;
    s.upload_plugin("probe", PROBE).await;
    assert_eq!(metric(&s, "wasmq_plugin_compiles").await, 2);
    s.stop().await.unwrap();

    let s = TestServer::start(dir.path()).await;
    assert_eq!(s.invoke("echo", json!(1)).await["outcome"]["type"], "ack");
    assert_eq!(
        report(&s.invoke("probe", json!({"do": "identity"})).await)["plugin"],
        "probe"
    );
    assert_eq!(
        metric(&s, "wasmq_plugin_compiles").await,
        0,
        "a restart must not recompile"
    );
    assert_eq!(metric(&s, "wasmq_plugin_artifact_loads").await, 2);
    s.stop().await.unwrap();

    // The artifacts are this node's cache: a damaged one is compiled again, a lost one too.
    let cached: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path().join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cached.len(), 2, "{cached:?}");
    std::fs::write(&cached[0], b"not an artifact").unwrap();
    std::fs::remove_file(&cached[1]).unwrap();
    let s = TestServer::start(dir.path()).await;
    assert_eq!(s.invoke("echo", json!(1)).await["outcome"]["type"], "ack");
    assert_eq!(
        report(&s.invoke("probe", json!({"do": "identity"})).await)["plugin"],
        "probe"
    );
    assert_eq!(metric(&s, "wasmq_plugin_compiles").await, 2);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_logs_are_kept_paged_followed_and_capped_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.upload_plugin("probe", PROBE).await;
    let (st, v) = s.get("/v1/plugins/probe/logs").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["lines"], json!([]));
    wasmq_tests::assert_error(
        &s.get("/v1/plugins/nope/logs").await,
        StatusCode::NOT_FOUND,
        "unknown_plugin",
    );
    wasmq_tests::assert_error(
        &s.get("/v1/plugins/probe/logs?limit=many").await,
        StatusCode::BAD_REQUEST,
        "bad_query",
    );

    // A follower connected first sees the lines as they are logged.
    let mut follow = s
        .client
        .get(format!("{}/v1/plugins/probe/logs?follow=true", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        follow.headers()["content-type"],
        "application/x-ndjson",
        "{:?}",
        follow.headers()
    );
    let r = s.invoke("probe", json!({"do": "log", "lines": 3})).await;
    assert_eq!(r["outcome"]["type"], "ack", "{r}");
    let mut got = String::new();
    while got.lines().filter(|l| !l.is_empty()).count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(30), follow.chunk())
            .await
            .expect("no log line arrived")
            .unwrap()
            .unwrap();
        got.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let lines: Vec<Value> = got
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["message"].clone())
            .collect::<Vec<_>>(),
        vec![
            json!("log line 0"),
            json!("log line 1"),
            json!("log line 2")
        ]
    );
    assert_eq!(lines[0]["level"], "info");
    assert_eq!(lines[0]["plugin"], "probe");
    assert!(lines[0]["message_id"].is_string(), "{}", lines[0]);
    drop(follow);

    // One call may log 100 lines; the rest are counted, not kept.
    let r = s.invoke("probe", json!({"do": "log", "lines": 5000})).await;
    assert_eq!(r["outcome"]["type"], "ack", "{r}");
    let (_, v) = s.get("/v1/plugins/probe/logs?limit=1000").await;
    let kept = v["lines"].as_array().unwrap();
    assert_eq!(kept.len(), 3 + 100);
    assert_eq!(v["dropped"], 4900);
    assert!(
        kept[102]["message"]
            .as_str()
            .unwrap()
            .contains("log limit of 100 lines per call reached"),
        "{}",
        kept[102]
    );
    // Paging: from a seq on, with the next seq to ask for.
    let (_, page) = s.get("/v1/plugins/probe/logs?since=1&limit=2").await;
    assert_eq!(page["lines"][0]["seq"], 1);
    assert_eq!(page["lines"][1]["message"], "log line 2");
    assert_eq!(page["next"], 3);
}

/// The one instance pool (issue 21) is bounded by `pool_instances`: invocations with 40
/// distinct configs all run, each leaving an idle instance that the next one evicts (least
/// recently used first), and a subscription still gets its instances afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_pool_is_bounded_and_idle_instances_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.plugins.pool_instances = 8;
    let s = TestServer::start_with(config).await;
    s.upload_plugin("probe", PROBE).await;
    let call = |i: usize| {
        let (client, url) = (s.client.clone(), s.url.clone());
        async move {
            let r = client
                .post(format!("{url}/v1/plugins/probe/invoke"))
                .json(&json!({"message": {"body": {"do": "ack"}}, "config": {"tenant": i}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["outcome"]["type"], "ack", "{v}");
        }
    };
    let gauge = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in metrics:\n{text}"))
            .parse()
            .unwrap()
    };
    let before = metric(&s, "wasmq_plugin_instantiations").await;
    for i in 0..40 {
        call(i).await;
    }
    assert_eq!(
        metric(&s, "wasmq_plugin_instantiations").await - before,
        40,
        "each config gets its own instance"
    );
    let text = s.metrics().await;
    assert_eq!(gauge(&text, "wasmq_plugin_instances_live"), 8, "{text}");
    assert_eq!(metric(&s, "wasmq_plugin_instance_evictions").await, 32);
    // The most recent configs are still idle and serve without a new instance.
    let mid = metric(&s, "wasmq_plugin_instantiations").await;
    call(39).await;
    call(33).await;
    assert_eq!(metric(&s, "wasmq_plugin_instantiations").await, mid);
    // A subscription's two instances take room from idle ones.
    s.create_topic("t", 2).await;
    s.subscribe(
        "g",
        json!({"topic": "t", "plugin": "probe", "instances": 2}),
    )
    .await;
    let messages: Vec<Value> = (0..10).map(|_| json!({"body": {"do": "ack"}})).collect();
    s.publish_batch("t", messages).await;
    s.wait_until("/v1/subscriptions/g", 60, |v| {
        v["counters"]["acked"].as_u64() == Some(10)
    })
    .await;
    let text = s.metrics().await;
    assert!(gauge(&text, "wasmq_plugin_instances_live") <= 8, "{text}");
}

/// Old versions go after an upload beyond `[limits] max_plugin_versions`, with their bytes,
/// unless a subscription pins them; bytes another version still uses stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_beyond_the_limit_are_pruned_unless_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    c.limits.max_plugin_versions = 2;
    let s = TestServer::start_with(c).await;
    s.create_topic("t", 1).await;
    let mut digests = Vec::new();
    for (i, path) in [ECHO, TRAP, REJECT_ALL, CHECKER, TRAP].iter().enumerate() {
        let (st, v) = s.upload_plugin("p", path).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["version"], i + 1, "{v}");
        digests.push(v["digest"].as_str().unwrap().to_string());
        if i == 0 {
            // Version 1 is pinned by a subscription.
            s.subscribe(
                "pinned",
                json!({"topic": "t", "plugin": "p", "plugin_version": 1}),
            )
            .await;
        }
    }
    let (_, p) = s.get("/v1/plugins/p").await;
    let versions: Vec<u64> = p["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 4, 5], "{p}");
    // The pinned version still runs.
    s.publish_numbered("t", 1).await;
    s.wait_until("/v1/subscriptions/pinned", 60, |v| {
        v["counters"]["acked"] == 1
    })
    .await;
    s.stop().await.unwrap();
    let storage = wasmq::storage::RocksStorage::open(
        &dir.path().join("rocksdb"),
        wasmq::config::FlushMode::Sync,
    )
    .unwrap();
    use wasmq::storage::Storage as _;
    // v2's bytes are the same as v5's and stay; v3's are gone.
    for (digest, kept) in [
        (&digests[0], true),
        (&digests[1], true),
        (&digests[2], false),
        (&digests[3], true),
    ] {
        let blob = storage.get_blob(&format!("wasm/{digest}")).await.unwrap();
        assert_eq!(blob.is_some(), kept, "{digest}");
    }
    storage.close().await;
}

/// Ordered runs under exactly-once are only for plugins that cannot touch kv
/// (`PluginCode::imports_kv`): the answer comes from the component's own imports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whether_a_plugin_imports_kv_is_read_from_its_component() {
    use std::sync::Arc;
    use wasmq::runtime::{Runtime, RuntimeConfig};
    wasmq::capabilities::install_tls_provider();
    let config = wasmq::config::Config::default();
    let caps = Arc::new(wasmq::capabilities::Capabilities::new(&config).unwrap());
    let runtime = Runtime::new(RuntimeConfig::from(&config), caps).unwrap();
    for (path, imports_kv) in [(ECHO, false), (RECORDER, false), (PROFILE_STORE, true)] {
        let (code, _) = runtime.compile(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(code.imports_kv(), imports_kv, "{path}");
    }
}
