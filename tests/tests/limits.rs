//! Limits where input enters, against the real server: header size, slow headers and bodies,
//! the connection cap, and the disk quota. Each answers with its own status, never a hang.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use wasmq_tests::{TestServer, assert_error, config_in};

/// A client that opens a new connection per request, so its own idle connections hold no slot.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Reads until the server closes the connection (or `limit` passes); returns what it sent.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_slow_clients_and_the_connection_cap_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.server.max_header_bytes = 4096;
    config.server.max_headers = 16;
    config.server.header_timeout_ms = 1000;
    config.server.request_timeout_ms = 800;
    config.server.max_connections = 4;
    let s = TestServer::start_with(config).await;
    s.create_topic("t", 1).await;
    // The harness's own pooled connection times out like any idle one.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let client = fresh_client();

    // Headers over the byte limit, or too many of them: 431.
    let resp = client
        .get(format!("{}/healthz", s.url))
        .header("x-big", "a".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let mut req = client.get(format!("{}/healthz", s.url));
    for i in 0..20 {
        req = req.header(format!("x-h{i}"), "1");
    }
    assert_eq!(
        req.send().await.unwrap().status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    // Headers that never finish: the connection is closed after the header timeout.
    let started = Instant::now();
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .await
        .unwrap();
    // The server closes it (the read ends), at the header timeout (1 s) and not before. The
    // upper bound is ten times that, only there to tell the timeout from none at all: a
    // loaded machine may run the timer late.
    let answer = read_to_close(&mut slow, Duration::from_secs(60)).await;
    assert!(answer.is_some(), "a slow-header client was never cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "cut off after {took:?}"
    );

    // A body that trickles: 408 with a JSON error once the request timeout passes.
    let mut trickle = TcpStream::connect(s.addr).await.unwrap();
    trickle
        .write_all(
            b"POST /v1/topics/t/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"body\":",
        )
        .await
        .unwrap();
    let answer = read_to_close(&mut trickle, Duration::from_secs(60))
        .await
        .expect("a trickling body was never answered");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");

    // Four idle connections fill the cap: the fifth is answered 503 with Retry-After.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(s.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let refused = wasmq_tests::decode(resp).await;
    assert_error(
        &refused,
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
    );
    // Closing them frees the slots at once.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = client.get(format!("{}/healthz", s.url)).send().await;
        if resp.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "slots were never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Idle connections that are not closed expire by the header timeout and free their slots.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(s.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resp = client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(idle);
}

async fn publish_batch(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    size: usize,
) -> reqwest::Response {
    let body = "x".repeat(size);
    let messages: Vec<Value> = (0..n).map(|_| json!({"body": body})).collect();
    client
        .post(format!("{url}/v1/topics/t/messages/batch"))
        .json(&json!({"messages": messages}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_producers_with_503_and_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.limits.max_disk_bytes = 4 * 1024 * 1024;
    let s = TestServer::start_with(config).await;
    s.create_topic("t", 1).await;
    let mut acked = 0usize;
    let mut refused = None;
    for _ in 0..400 {
        let resp = publish_batch(&s.client, &s.url, 50, 4000).await;
        if resp.status() == StatusCode::CREATED {
            acked += 50;
            continue;
        }
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        refused = Some((retry, wasmq_tests::decode(resp).await));
        break;
    }
    let (retry, refused) = refused.expect("the disk quota never applied");
    assert_error(&refused, StatusCode::SERVICE_UNAVAILABLE, "disk_full");
    assert_eq!(retry.as_deref(), Some("5"));
    assert!(acked >= 500, "refused too early, after {acked} messages");
    // However fast the machine, the quota is passed by one request at most: accepted writes
    // count at once, not at the next sample of the data directory.
    assert!(
        acked * 4000 <= 4 * 1024 * 1024 + 50 * 4000,
        "{acked} messages of 4000 B accepted under a 4 MiB quota"
    );
    // Every kind of produce is held: single, transactional.
    let (st, v) = s
        .post_json("/v1/topics/t/messages", &json!({"body": 1}))
        .await;
    assert_error(&(st, v), StatusCode::SERVICE_UNAVAILABLE, "disk_full");
    let (st, v) = s
        .post_json("/v1/topics/t/transactions", &json!({"body": 1}))
        .await;
    assert_error(&(st, v), StatusCode::SERVICE_UNAVAILABLE, "disk_full");
    // Reads go on, and everything acknowledged is there.
    assert_eq!(s.read_queue("t", 0).await.len(), acked);
    s.stop().await.unwrap();

    // With more room (a raised quota) after a restart, publishing resumes where it stopped.
    let mut config = config_in(dir.path());
    config.limits.max_disk_bytes = 64 * 1024 * 1024;
    let s = TestServer::start_with(config).await;
    let resp = publish_batch(&s.client, &s.url, 1, 10).await;
    let (st, v) = wasmq_tests::decode(resp).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["results"][0]["offset"], acked as u64);

    // A floor of free space no disk has holds producers from the first publish.
    s.stop().await.unwrap();
    let mut config = config_in(dir.path());
    config.limits.min_free_disk_bytes = u64::MAX;
    let s = TestServer::start_with(config).await;
    let (st, v) = s
        .post_json("/v1/topics/t/messages", &json!({"body": 1}))
        .await;
    assert_error(
        &(st, v.clone()),
        StatusCode::SERVICE_UNAVAILABLE,
        "disk_full",
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("min_free_disk_bytes"),
        "{v}"
    );
}

/// Opens a log-follow stream of the probe plugin on a connection of its own.
async fn follow(s: &TestServer) -> reqwest::Response {
    fresh_client()
        .get(format!("{}/v1/plugins/probe/logs?follow=true", s.url))
        .send()
        .await
        .unwrap()
}

/// Log-follow streams cannot take the connections requests need: with `max_connections` 8,
/// eight follows once left an admin's publish a 503. Streams are capped in total (a quarter of
/// the connections by default) and per token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_follow_streams_are_capped_apart_from_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.server.max_connections = 8;
    let s = TestServer::start_with(config).await;
    s.create_topic("t", 1).await;
    let (st, v) = s.upload_plugin("probe", wasmq_tests::plugins::PROBE).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let mut open = Vec::new();
    let mut refused = None;
    for _ in 0..8 {
        let resp = follow(&s).await;
        if resp.status() == StatusCode::OK {
            open.push(resp);
        } else {
            refused = Some(wasmq_tests::decode(resp).await);
            break;
        }
    }
    assert_eq!(open.len(), 2, "a quarter of 8 connections");
    assert_error(
        &refused.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_streams",
    );
    // Requests still get connections.
    for i in 0..4 {
        let resp = fresh_client()
            .post(format!("{}/v1/topics/t/messages", s.url))
            .json(&json!({"body": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
    // A closed stream frees its place.
    drop(open.pop());
    let reopened = async {
        loop {
            let resp = follow(&s).await;
            if resp.status() == StatusCode::OK {
                return resp;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _again = tokio::time::timeout(Duration::from_secs(30), reopened)
        .await
        .expect("a closed stream's place was never freed");
}
