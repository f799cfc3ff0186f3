//! The HTTP API of topics and messages against a real server and a real RocksDB in a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::{TestServer, assert_error, config_in};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_create_show_list_update() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("orders", 3).await;
    let (st, t) = s.get("/v1/topics/orders").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(t["queues"], 3);
    assert_eq!(t["high_water"], json!([0, 0, 0]));
    // Queues can grow; PUT again is an update (200), not a create.
    let (st, t) = s.put_json("/v1/topics/orders", &json!({"queues": 5})).await;
    assert_eq!((st, t["queues"].clone()), (StatusCode::OK, json!(5)));
    assert_error(
        &s.put_json("/v1/topics/orders", &json!({"queues": 2})).await,
        StatusCode::CONFLICT,
        "queues_shrink",
    );
    // An empty body creates a topic with the default queue count.
    let r = s
        .client
        .put(format!("{}/v1/topics/plain", s.url))
        .send()
        .await
        .unwrap();
    let (st, t) = wasmq_tests::decode(r).await;
    assert_eq!((st, t["queues"].clone()), (StatusCode::CREATED, json!(4)));
    let (_, list) = s.get("/v1/topics").await;
    let names: Vec<&str> = list["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders", "plain"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_look_up_by_id_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("users", 4).await;
    let (st, a) = s
        .post_json(
            "/v1/topics/users/messages",
            &json!({"body": {"name": "Ann", "email": "ann@example.com"}, "key": "u1", "tag": "created",
                    "sharding_key": "u1", "properties": {"source": "web"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{a}");
    let id = a["id"].as_str().unwrap();
    let (st, m) = s.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        m["body"],
        json!({"name": "Ann", "email": "ann@example.com"})
    );
    assert_eq!(
        (m["topic"].as_str(), m["key"].as_str(), m["tag"].as_str()),
        (Some("users"), Some("u1"), Some("created"))
    );
    assert_eq!(m["properties"]["source"], "web");
    assert_eq!(
        (m["queue"].clone(), m["offset"].clone()),
        (a["queue"].clone(), a["offset"].clone())
    );
    // Binary bodies come back byte for byte.
    let (st, b) = s
        .post_json(
            "/v1/topics/users/messages",
            &json!({"body_base64": "AP8Q", "key": "u1"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, m) = s
        .get(&format!("/v1/messages/{}", b["id"].as_str().unwrap()))
        .await;
    assert_eq!(m["body_base64"], "AP8Q");
    assert!(m.get("body").is_none());
    let (_, found) = s.get("/v1/topics/users/messages?key=u1").await;
    let ids: HashSet<&str> = found["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, HashSet::from([id, b["id"].as_str().unwrap()]));
    let (_, none) = s.get("/v1/topics/users/messages?key=nobody").await;
    assert_eq!(none["messages"], json!([]));
    assert_error(
        &s.get("/v1/messages/0190b2a4-0000-7000-8000-000000000000")
            .await,
        StatusCode::NOT_FOUND,
        "unknown_message",
    );
    assert_error(
        &s.get("/v1/messages/not-an-id").await,
        StatusCode::BAD_REQUEST,
        "bad_id",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_choice_sharding_key_and_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("t", 4).await;
    let mut by_key: HashMap<String, HashSet<u64>> = HashMap::new();
    for i in 0..40 {
        let key = format!("user-{}", i % 5);
        let (_, a) = s
            .post_json(
                "/v1/topics/t/messages",
                &json!({"body": i, "sharding_key": key}),
            )
            .await;
        by_key
            .entry(key)
            .or_default()
            .insert(a["queue"].as_u64().unwrap());
    }
    assert!(
        by_key.values().all(|qs| qs.len() == 1),
        "a sharding key moved between queues: {by_key:?}"
    );
    let mut counts = [0; 4];
    for i in 0..40 {
        let (_, a) = s
            .post_json("/v1/topics/t/messages", &json!({"body": i}))
            .await;
        counts[a["queue"].as_u64().unwrap() as usize] += 1;
    }
    assert_eq!(counts, [10; 4], "round-robin should spread evenly");
    // Reading a queue from an offset returns that queue's messages in order.
    let (_, q) = s.get("/v1/topics/t/messages?queue=1&from=2&limit=3").await;
    let offsets: Vec<u64> = q["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_one_atomic_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("b", 1).await;
    let msgs: Vec<Value> = (0..100)
        .map(|i| json!({"body": {"n": i}, "key": format!("k{i}")}))
        .collect();
    let (st, r) = s
        .post_json("/v1/topics/b/messages/batch", &json!({"messages": msgs}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{r}");
    let offsets: Vec<u64> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (0..100).collect::<Vec<_>>());
    // One bad message rejects the whole batch and names it; nothing of it is stored.
    let bad = json!({"messages": [{"body": 1}, {"body_base64": "%%%"}]});
    let resp = s.post_json("/v1/topics/b/messages/batch", &bad).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "bad_base64");
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("message 1")
    );
    let (_, t) = s.get("/v1/topics/b").await;
    assert_eq!(t["high_water"], json!([100]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.limits.max_message_bytes = 1024;
    config.limits.max_request_bytes = 8192;
    config.limits.max_batch = 10;
    config.limits.max_queues = 16;
    let s = TestServer::start_with(config).await;
    s.create_topic("t", 2).await;
    let p = "/v1/topics/t/messages";
    assert_error(
        &s.post_raw(p, b"{\"body\": ".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "bad_json",
    );
    assert_error(
        &s.post_raw(p, b"[1,2]".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "bad_json",
    );
    assert_error(
        &s.post_json(p, &json!({"body": 1, "surprise": true})).await,
        StatusCode::BAD_REQUEST,
        "bad_json",
    );
    assert_error(
        &s.post_json(p, &json!({"key": "k"})).await,
        StatusCode::BAD_REQUEST,
        "bad_body",
    );
    assert_error(
        &s.post_json(p, &json!({"body_base64": "not base64!"})).await,
        StatusCode::BAD_REQUEST,
        "bad_base64",
    );
    assert_error(
        &s.post_json(p, &json!({"body": "x".repeat(2000)})).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "message_too_large",
    );
    assert_error(
        &s.post_raw(p, vec![b' '; 9000]).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
    );
    assert_error(
        &s.post_json(p, &json!({"body": 1, "delay_ms": 40u64 * 24 * 3600 * 1000}))
            .await,
        StatusCode::BAD_REQUEST,
        "bad_delay",
    );
    assert_error(
        &s.post_json("/v1/topics/nope/messages", &json!({"body": 1}))
            .await,
        StatusCode::NOT_FOUND,
        "unknown_topic",
    );
    assert_error(
        &s.post_json("/v1/topics/bad%20name/messages", &json!({"body": 1}))
            .await,
        StatusCode::BAD_REQUEST,
        "bad_topic_name",
    );
    assert_error(
        &s.put_json("/v1/topics/.dot", &json!({})).await,
        StatusCode::BAD_REQUEST,
        "bad_topic_name",
    );
    assert_error(
        &s.put_json("/v1/topics/many", &json!({"queues": 17})).await,
        StatusCode::BAD_REQUEST,
        "too_many_queues",
    );
    assert_error(
        &s.put_json("/v1/topics/zero", &json!({"queues": 0})).await,
        StatusCode::BAD_REQUEST,
        "too_many_queues",
    );
    assert_error(
        &s.put_json("/v1/topics/neg", &json!({"queues": -1})).await,
        StatusCode::BAD_REQUEST,
        "bad_json",
    );
    assert_error(
        &s.get("/v1/topics/nope").await,
        StatusCode::NOT_FOUND,
        "unknown_topic",
    );
    let b = "/v1/topics/t/messages/batch";
    assert_error(
        &s.post_json(b, &json!({"messages": []})).await,
        StatusCode::BAD_REQUEST,
        "empty_batch",
    );
    let eleven: Vec<Value> = (0..11).map(|i| json!({"body": i})).collect();
    assert_error(
        &s.post_json(b, &json!({"messages": eleven})).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "batch_too_large",
    );
    // Without key or queue: queue 0 from its start.
    let (st, v) = s.get("/v1/topics/t/messages").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["messages"].is_array(), "{v}");
    assert_error(
        &s.get("/v1/topics/t/messages?queue=9").await,
        StatusCode::NOT_FOUND,
        "unknown_queue",
    );
    assert_error(
        &s.get("/v1/topics/t/messages?queue=x").await,
        StatusCode::BAD_REQUEST,
        "bad_query",
    );
    assert_error(
        &s.get("/v1/nowhere").await,
        StatusCode::NOT_FOUND,
        "no_route",
    );
    let r = s
        .client
        .patch(format!("{}/v1/topics/t", s.url))
        .send()
        .await
        .unwrap();
    assert_error(
        &wasmq_tests::decode(r).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    // None of the above stored anything, and the server still works.
    let (_, t) = s.get("/v1/topics/t").await;
    assert_eq!(t["messages"], 0);
    let (st, _) = s.post_json(p, &json!({"body": "fine"})).await;
    assert_eq!(st, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_distinct_gap_free_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("one", 1).await;
    let mut tasks = Vec::new();
    for p in 0..8 {
        let (client, url) = (s.client.clone(), s.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for i in 0..150 {
                let r = client
                    .post(format!("{url}/v1/topics/one/messages"))
                    .json(&json!({"body": {"p": p, "i": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
                offsets.push(r.json::<Value>().await.unwrap()["offset"].as_u64().unwrap());
            }
            offsets
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let offsets = t.await.unwrap();
        // Each publisher's own messages are in its publish order.
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        all.extend(offsets);
    }
    all.sort_unstable();
    assert_eq!(all, (0..1200).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_everything_and_offsets_continue() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("log", 4).await;
    let mut sent: Vec<(String, Value, String)> = Vec::new(); // id, body, key
    for chunk in 0..100 {
        let msgs: Vec<Value> = (0..100)
            .map(|i| {
                let n = chunk * 100 + i;
                json!({"body": {"n": n}, "key": format!("k{}", n % 250)})
            })
            .collect();
        let (st, r) = s
            .post_json(
                "/v1/topics/log/messages/batch",
                &json!({"messages": msgs.clone()}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED);
        for (m, a) in msgs.iter().zip(r["results"].as_array().unwrap()) {
            sent.push((
                a["id"].as_str().unwrap().to_string(),
                m["body"].clone(),
                m["key"].as_str().unwrap().to_string(),
            ));
        }
    }
    let (_, before) = s.get("/v1/topics/log").await;
    assert_eq!(before["messages"], 10_000);
    s.stop().await.unwrap();

    let s = TestServer::start(dir.path()).await;
    let (_, after) = s.get("/v1/topics/log").await;
    assert_eq!(after["high_water"], before["high_water"]);
    for (id, body, _) in sent.iter().step_by(7) {
        let (st, m) = s.get(&format!("/v1/messages/{id}")).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(&m["body"], body);
    }
    let (_, by_key) = s.get("/v1/topics/log/messages?key=k17&limit=1000").await;
    let want: HashSet<&str> = sent
        .iter()
        .filter(|(_, _, k)| k == "k17")
        .map(|(id, _, _)| id.as_str())
        .collect();
    let got: HashSet<&str> = by_key["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, want);
    // Offsets continue where they stopped: no gap, no reuse.
    let hw: Vec<u64> = after["high_water"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    for _ in 0..8 {
        let (_, a) = s
            .post_json("/v1/topics/log/messages", &json!({"body": "after"}))
            .await;
        let q = a["queue"].as_u64().unwrap() as usize;
        assert!(a["offset"].as_u64().unwrap() >= hw[q]);
    }
    let (_, t) = s.get("/v1/topics/log").await;
    let hw2: Vec<u64> = t["high_water"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(hw2.iter().sum::<u64>(), 10_008);
    for q in 0..4u32 {
        let (_, page) = s
            .get(&format!(
                "/v1/topics/log/messages?queue={q}&from={}&limit=10",
                hw[q as usize]
            ))
            .await;
        let offs: Vec<u64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offs, (hw[q as usize]..hw2[q as usize]).collect::<Vec<_>>());
    }
    s.stop().await.unwrap();
}

async fn publish_with_key(
    s: &TestServer,
    key: &str,
    body: Value,
) -> (StatusCode, Option<String>, Value) {
    let r = s
        .client
        .post(format!("{}/v1/topics/t/messages", s.url))
        .header("idempotency-key", key)
        .json(&json!({"body": body}))
        .send()
        .await
        .unwrap();
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_string());
    let (st, v) = wasmq_tests::decode(r).await;
    (st, replayed, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_deduplicate_retries_durably_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.limits.idempotency_window_ms = 1500;
    let s = TestServer::start_with(config.clone()).await;
    s.create_topic("t", 2).await;
    let (st, replayed, first) = publish_with_key(&s, "order-17", json!({"n": 1})).await;
    assert_eq!((st, replayed), (StatusCode::CREATED, None));
    // A producer retry gets the original answer.
    let (st, replayed, again) = publish_with_key(&s, "order-17", json!({"n": 1})).await;
    assert_eq!((st, replayed.as_deref()), (StatusCode::OK, Some("true")));
    assert_eq!(again, first);
    // The same key with another message is a client error, not a silent drop.
    let (st, replayed, v) = publish_with_key(&s, "order-17", json!({"n": 2})).await;
    assert_eq!(replayed, None);
    assert_error(
        &(st, v),
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );
    // Concurrent retries: one message, one id.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url) = (s.client.clone(), s.url.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{url}/v1/topics/t/messages"))
                .header("idempotency-key", "race")
                .json(&json!({"body": 2}))
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(
        ids.len(),
        1,
        "concurrent publishes with one key stored {} messages",
        ids.len()
    );
    let (_, t) = s.get("/v1/topics/t").await;
    assert_eq!(t["messages"], 2);
    // Durable: a restart remembers the key.
    s.stop().await.unwrap();
    let s = TestServer::start_with(config).await;
    let (st, _, again) = publish_with_key(&s, "order-17", json!({"n": 1})).await;
    assert_eq!((st, again), (StatusCode::OK, first.clone()));
    // After the window, the key is new again.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (st, _, later) = publish_with_key(&s, "order-17", json!({"n": 1})).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_ne!(later["id"], first["id"]);
    let (st, _, v) = publish_with_key(&s, &"k".repeat(300), json!(1)).await;
    assert_error(&(st, v), StatusCode::BAD_REQUEST, "bad_idempotency_key");
}

/// A publish's answer (checked to be `status`) and the message it names, as the API shows it.
async fn answered_and_stored(
    s: &TestServer,
    r: reqwest::Response,
    status: StatusCode,
) -> (Value, Value) {
    assert_eq!(r.status(), status);
    let answer: Value = r.json().await.unwrap();
    let (_, m) = s
        .get(&format!("/v1/messages/{}", answer["id"].as_str().unwrap()))
        .await;
    (answer, m)
}

/// Issue 26: CloudEvents' HTTP binding on publish. Binary mode (`ce-*` headers, the body is the
/// data in its own media type) and structured mode (`application/cloudevents+json`) become
/// messages: data → body, attributes and extensions → `ce_*` properties (percent-decoded from
/// headers), id → key, type → tag (when it is one), partitionkey → sharding key; a repeated
/// source + id is stored once; bad events get a 400 naming what is wrong; a plugin sees it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_binary_and_structured_modes_map_onto_messages() {
    use wasmq_tests::plugins::RECORDER;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("orders", 4).await;
    s.create_topic("audit", 1).await;
    s.upload_plugin("recorder", RECORDER).await;
    s.subscribe(
        "seen",
        json!({"topic": "orders", "plugin": "recorder", "config": {"audit": "audit"},
               "grants": {"publish": ["audit"]}}),
    )
    .await;
    let url = format!("{}/v1/topics/orders/messages", s.url);
    let binary = |id: &str, content_type: &str, body: &'static [u8]| {
        s.client
            .post(&url)
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/shop/eu")
            .header("ce-type", "com.example.order.created")
            .header("ce-subject", "order 7")
            .header("ce-time", "2026-12-01T10:00:00Z")
            .header("ce-partitionkey", "user-7")
            .header("ce-region", "caf%C3%A9%20%25")
            .header("content-type", content_type)
            .body(body)
    };

    // Binary mode, JSON data.
    let order = br#"{"order":7,"total":12.5}"#;
    let sent = binary("order-1", "application/json", order).send().await;
    let (first, m) = answered_and_stored(&s, sent.unwrap(), StatusCode::CREATED).await;
    assert_eq!(m["body"], json!({"order": 7, "total": 12.5}), "{m}");
    assert_eq!(m["key"], "order-1");
    assert_eq!(m["tag"], "com.example.order.created");
    assert_eq!(m["sharding_key"], "user-7");
    let props = &m["properties"];
    for (name, value) in [
        ("ce_specversion", "1.0"),
        ("ce_id", "order-1"),
        ("ce_source", "/shop/eu"),
        ("ce_type", "com.example.order.created"),
        ("ce_subject", "order 7"),
        ("ce_datacontenttype", "application/json"),
        ("ce_partitionkey", "user-7"),
        ("ce_region", "café %"),
    ] {
        assert_eq!(props[name], value, "{name}: {props}");
    }
    assert!(
        props["ce_time"]
            .as_str()
            .unwrap()
            .starts_with("2026-12-01T10:00:00"),
        "{props}"
    );
    // The same source and id again: stored once, the first answer comes back.
    let r = binary("order-1", "application/json", order)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    // ... and with other data it is refused, not stored.
    let r = binary("order-1", "application/json", br#"{"order":8}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "idempotency_key_reused", "{v}");
    // Binary mode, text data: a binary body, byte for byte, in any media type.
    let sent = binary("order-2", "text/plain; charset=utf-8", b"hello")
        .send()
        .await;
    let (_, m) = answered_and_stored(&s, sent.unwrap(), StatusCode::CREATED).await;
    assert_eq!(m["body_base64"], "aGVsbG8=", "{m}");
    assert_eq!(
        m["properties"]["ce_datacontenttype"],
        "text/plain; charset=utf-8"
    );

    // Structured mode: JSON data, data_base64, no data; a type that is no tag stays a property.
    let structured = |event: Value| {
        s.client
            .post(&url)
            .header(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )
            .body(event.to_string())
            .send()
    };
    let sent = structured(
        json!({"specversion": "1.0", "id": "e-3", "source": "https://shop.example/",
        "type": "order paid", "data": {"paid": true}, "tenant": "acme"}),
    )
    .await;
    let (_, m) = answered_and_stored(&s, sent.unwrap(), StatusCode::CREATED).await;
    assert_eq!(m["body"], json!({"paid": true}), "{m}");
    assert!(m.get("tag").is_none(), "{m}");
    assert_eq!(m["properties"]["ce_type"], "order paid");
    assert_eq!(m["properties"]["ce_tenant"], "acme");
    // JSON data is kept as sent, byte for byte (a number no f64 holds, an exponent), integer
    // and boolean extensions become text, and string data of a text type is a text body.
    let raw = r#"{"specversion":"1.0","id":"e-6","source":"/s","type":"t","count":7,"flag":true,
                  "data":{"cents":123456789012345678901234567890,"rate":1e2}}"#;
    let r = s
        .client
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let shown = s
        .client
        .get(format!("{}/v1/messages/{id}", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        shown.contains(r#""body":{"cents":123456789012345678901234567890,"rate":1e2}"#),
        "{shown}"
    );
    assert!(
        shown.contains(r#""ce_count":"7""#) && shown.contains(r#""ce_flag":"true""#),
        "{shown}"
    );
    let sent = structured(
        json!({"specversion": "1.0", "id": "e-7", "source": "/s", "type": "t",
        "datacontenttype": "text/plain", "data": "plain words"}),
    )
    .await;
    let (_, m) = answered_and_stored(&s, sent.unwrap(), StatusCode::CREATED).await;
    assert_eq!(m["body_base64"], "cGxhaW4gd29yZHM=", "{m}");
    let sent = structured(
        json!({"specversion": "1.0", "id": "e-4", "source": "/s", "type": "t",
        "data_base64": "AP8Q"}),
    )
    .await;
    let (_, m) = answered_and_stored(&s, sent.unwrap(), StatusCode::CREATED).await;
    assert_eq!(m["body_base64"], "AP8Q", "{m}");
    let r = structured(json!({"specversion": "1.0", "id": "e-5", "source": "/s", "type": "t"}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Bad events: a 400 that says what is wrong; nothing stored.
    let (_, before) = s.get("/v1/topics/orders").await;
    let missing_id = s
        .client
        .post(&url)
        .header("ce-specversion", "1.0")
        .header("ce-source", "/s")
        .header("ce-type", "t")
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    let wrong_version = s
        .client
        .post(&url)
        .header("ce-specversion", "7.0")
        .header("ce-id", "x")
        .header("ce-source", "/s")
        .header("ce-type", "t")
        .header("content-type", "application/json")
        .body("1")
        .send()
        .await
        .unwrap();
    let bad_json = structured(json!("not an event")).await.unwrap();
    let bad_time = structured(
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "time": "yesterday"}),
    )
    .await
    .unwrap();
    let empty_id = structured(json!({"specversion": "1.0", "id": "", "source": "/s", "type": "t"}))
        .await
        .unwrap();
    let bad_name = structured(
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "Tenant": "x"}),
    )
    .await
    .unwrap();
    let object_attribute = structured(
        json!({"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "ext": {"a": 1}}),
    )
    .await
    .unwrap();
    let both_data = structured(json!({"specversion": "1.0", "id": "e", "source": "/s",
        "type": "t", "data": 1, "data_base64": "AA=="}))
    .await
    .unwrap();
    for (what, r) in [
        ("no id", missing_id),
        ("specversion 7.0", wrong_version),
        ("not an object", bad_json),
        ("bad time", bad_time),
        ("empty id", empty_id),
        ("upper-case attribute name", bad_name),
        ("object attribute", object_attribute),
        ("data and data_base64", both_data),
    ] {
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{what}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "bad_cloudevent", "{what}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (_, after) = s.get("/v1/topics/orders").await;
    assert_eq!(after["messages"], before["messages"]);
    // A text/plain body without ce- headers is still refused (no cross-site form may publish).
    let r = s
        .client
        .post(&url)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // The plugin sees the attributes as properties, the type as the tag.
    let audit = s.wait_audit("audit", 5, 30).await;
    let record = audit
        .iter()
        .find(|r| r["business_key"] == "order-1")
        .unwrap_or_else(|| panic!("{audit:?}"));
    assert_eq!(record["tag"], "com.example.order.created");
    assert_eq!(record["properties"]["ce_source"], "/shop/eu");
    assert_eq!(record["properties"]["ce_region"], "café %");
    assert_eq!(record["body"], json!({"order": 7, "total": 12.5}));
}

/// CloudEvents' batch mode (`application/cloudevents-batch+json` on the batch route): every
/// event is mapped as in structured mode and stored in order; a retried batch stores each
/// event once (source + id); a bad event stores nothing and names its index; the single
/// publish route says where a batch goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_batch_mode_stores_each_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.create_topic("orders", 1).await;
    let send = |path: &str, body: Value| {
        s.client
            .post(format!("{}/v1/topics/orders/{path}", s.url))
            .header("content-type", "application/cloudevents-batch+json")
            .body(body.to_string())
            .send()
    };
    let event = |id: &str, data: Value| {
        json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "order.created",
               "partitionkey": "user-7", "data": data})
    };
    let batch = json!([
        event("b-1", json!({"n": 1})),
        event("b-2", json!({"n": 2})),
        {"specversion": "1.0", "id": "b-3", "source": "/shop", "type": "order.created",
         "data_base64": "AAE="},
    ]);
    let r = send("messages/batch", batch.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let first: Value = r.json().await.unwrap();
    let results = first["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{first}");
    let offsets: Vec<u64> = results
        .iter()
        .map(|a| a["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [0, 1, 2], "{first}");
    // Retried: the same ids come back and nothing more is stored.
    let r = send("messages/batch", batch).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again, first);
    let stored = s.read_queue("orders", 0).await;
    assert_eq!(
        stored,
        [json!({"n": 1}), json!({"n": 2}), Value::Null],
        "{stored:?}"
    );
    let (_, m) = s
        .get(&format!(
            "/v1/messages/{}",
            results[0]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        (
            &m["key"],
            &m["tag"],
            &m["sharding_key"],
            &m["properties"]["ce_source"]
        ),
        (
            &json!("b-1"),
            &json!("order.created"),
            &json!("user-7"),
            &json!("/shop")
        ),
        "{m}"
    );
    assert_eq!(m["body"], json!({"n": 1}), "{m}");

    // A bad event anywhere: 400 naming it, and none of the batch is stored.
    for (bad, says) in [
        (
            json!([event("c-1", json!(1)), {"specversion": "1.0", "id": "c-2", "type": "t"}]),
            "event 1",
        ),
        (json!([event("c-3", json!(1)), "not an event"]), "event 1"),
        (json!([]), "no event"),
        (json!({"not": "an array"}), "JSON array"),
    ] {
        let r = send("messages/batch", bad).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "bad_cloudevent", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    // An event too large for a message fails the batch before any event is stored.
    let big = "x".repeat(5 << 20);
    let r = send(
        "messages/batch",
        json!([event("d-1", json!(1)), event("d-2", json!(big))]),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("event 1"),
        "{v}"
    );
    assert_eq!(s.read_queue("orders", 0).await.len(), 3);
    // One event's route points to the batch route.
    let r = send("messages", json!([event("e-1", json!(1))]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/messages/batch"),
        "{v}"
    );
}
