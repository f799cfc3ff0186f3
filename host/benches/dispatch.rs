//! End-to-end dispatch: publish→ack throughput through a no-op plugin with 1 and 4 instances,
//! publish→handle latency (p50/p99/p999, measured inside the plugin) at a fixed rate, 1 vs 1000
//! topics with a subscription each, and the plugin lifecycle (upload→first call, restart→ready
//! with N plugins).
//! `--quick` shrinks everything to keep the harness working in CI; `WASMQ_BENCH_N` sets the
//! message count, `WASMQ_BENCH_RATE` and `WASMQ_BENCH_SECS` the latency run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use wasmq::config::FlushMode;
use wasmq_tests::plugins::ECHO;

/// Publishes `n` 256 B messages, then times a subscription with `instances` draining them.
async fn throughput(n: usize, instances: u32) -> (f64, f64) {
    let s = common::Server::start(FlushMode::Async).await;
    s.put("/v1/topics/bench", json!({"queues": 8})).await;
    s.upload("echo", ECHO).await;
    let body = json!({"body": "x".repeat(254)});
    let batch = json!({"messages": vec![body; 100]});
    let url = format!("{}/v1/topics/bench/messages/batch", s.url);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for chunk in 0..4 {
        let (http, url, batch) = (s.http.clone(), url.clone(), batch.clone());
        let per = n / 400;
        tasks.push(tokio::spawn(async move {
            for _ in 0..per + usize::from(chunk < (n / 100) % 4) {
                let r = http.post(&url).json(&batch).send().await.unwrap();
                assert_eq!(r.status(), reqwest::StatusCode::CREATED);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let publish_rate = n as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    s.put(
        "/v1/subscriptions/drain",
        json!({"topic": "bench", "plugin": "echo", "instances": instances, "max_in_flight": 1024}),
    )
    .await;
    loop {
        let st = s.get("/v1/subscriptions/drain").await;
        if st["lag"] == 0 && st["in_flight"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    s.stop().await;
    (publish_rate, rate)
}

/// Publish→handle latency at `rate` msg/s for `secs` on a fresh server (see
/// [`common::latency`]), in µs, sorted.
async fn latency(rate: u64, secs: u64, flush: FlushMode) -> Vec<u64> {
    let s = common::Server::start(flush).await;
    let samples = common::latency(&s, rate, secs).await;
    s.stop().await;
    samples
}

/// Waits until every subscription in `groups` has nothing left to do.
async fn drained(s: &common::Server, groups: &[String]) {
    for g in groups {
        loop {
            let st = s.get(&format!("/v1/subscriptions/{g}")).await;
            if st["lag"] == 0 && st["in_flight"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// `total` messages spread over `topics` topics (one queue each), each topic with its own
/// subscription through the no-op plugin; msgs/s from the first publish to the last ack.
async fn many_topics(topics: usize, total: usize) -> f64 {
    let s = common::Server::start_with(FlushMode::Async, |c| {
        c.plugins.pool_instances = (topics as u32 + 64).max(256);
    })
    .await;
    s.upload("echo", ECHO).await;
    let mut groups = Vec::new();
    for t in 0..topics {
        s.put(&format!("/v1/topics/t{t}"), json!({"queues": 1}))
            .await;
        s.put(
            &format!("/v1/subscriptions/g{t}"),
            json!({"topic": format!("t{t}"), "plugin": "echo"}),
        )
        .await;
        groups.push(format!("g{t}"));
    }
    let body = json!({"body": "x".repeat(254)});
    let per_topic = (total / topics).max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (http, url) = (s.http.clone(), s.url.clone());
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for t in (w..topics).step_by(4) {
                let mut left = per_topic;
                while left > 0 {
                    let k = left.min(100);
                    let r = http
                        .post(format!("{url}/v1/topics/t{t}/messages/batch"))
                        .json(&json!({"messages": vec![body.clone(); k]}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
                    left -= k;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drained(&s, &groups).await;
    let rate = (per_topic * topics) as f64 / started.elapsed().as_secs_f64();
    s.stop().await;
    rate
}

/// The same component made distinct (a custom section with `i`), so each upload compiles.
fn variant(bytes: &[u8], i: usize) -> Vec<u8> {
    let name = b"wasmq-bench";
    let data = i.to_le_bytes();
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.push((1 + name.len() + data.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&data);
    out
}

/// Uploads `n` distinct plugins, each with a subscription; returns (mean upload→first
/// handled message, restart→every subscription handled a new message), in ms.
async fn lifecycle(n: usize) -> (f64, f64) {
    let s = common::Server::start(FlushMode::Async).await;
    let echo = std::fs::read(ECHO).unwrap();
    let mut groups = Vec::new();
    let mut upload_total = 0.0;
    for i in 0..n {
        s.put(&format!("/v1/topics/l{i}"), json!({"queues": 1}))
            .await;
        let t = Instant::now();
        let r = s
            .http
            .put(format!("{}/v1/plugins/p{i}", s.url))
            .header("content-type", "application/wasm")
            .body(variant(&echo, i))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "upload p{i}: {}", r.status());
        s.put(
            &format!("/v1/subscriptions/l{i}"),
            json!({"topic": format!("l{i}"), "plugin": format!("p{i}")}),
        )
        .await;
        publish_one(&s, &format!("l{i}")).await;
        drained(&s, &[format!("l{i}")]).await;
        upload_total += t.elapsed().as_secs_f64() * 1e3;
        groups.push(format!("l{i}"));
    }
    let dir = s.stop_keep_dir().await;
    let t = Instant::now();
    let s = common::Server::start_in(dir, FlushMode::Async, |_| {}).await;
    for i in 0..n {
        publish_one(&s, &format!("l{i}")).await;
    }
    drained(&s, &groups).await;
    let restart = t.elapsed().as_secs_f64() * 1e3;
    s.stop().await;
    (upload_total / n as f64, restart)
}

async fn publish_one(s: &common::Server, topic: &str) {
    let r = s
        .http
        .post(format!("{}/v1/topics/{topic}/messages", s.url))
        .json(&json!({"body": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = if quick {
        4_000
    } else {
        common::env_or("WASMQ_BENCH_N", 200_000)
    };
    let (rate, secs) = if quick {
        (2_000, 1)
    } else {
        (
            common::env_or("WASMQ_BENCH_RATE", 10_000),
            common::env_or("WASMQ_BENCH_SECS", 30),
        )
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let skip = matches!(
        std::env::var("WASMQ_BENCH_ONLY").as_deref(),
        Ok("latency" | "topics")
    );
    let (pub1, one) = if skip {
        (0.0, 0.0)
    } else {
        rt.block_on(throughput(n, 1))
    };
    let (pub4, four) = if skip {
        (0.0, 0.0)
    } else {
        rt.block_on(throughput(n, 4))
    };
    // Sync is the promise; async beside it shows what the fsync adds.
    // WASMQ_BENCH_ONLY=topics runs the many-topics rows alone (for profiling them).
    let topics_only = std::env::var("WASMQ_BENCH_ONLY").as_deref() == Ok("topics");
    let (lat, lat_async) = if topics_only {
        (vec![0], vec![0])
    } else {
        (
            rt.block_on(latency(rate, secs, FlushMode::Sync)),
            rt.block_on(latency(rate, secs, FlushMode::Async)),
        )
    };
    let (topics_total, lifecycle_n) = if quick { (2_000, 3) } else { (100_000, 20) };
    let one_topic = rt.block_on(many_topics(1, topics_total));
    let thousand = rt.block_on(many_topics(if quick { 50 } else { 1000 }, topics_total));
    let (upload_ms, restart_ms) = if topics_only {
        (0.0, 0.0)
    } else {
        rt.block_on(lifecycle(lifecycle_n))
    };
    println!(
        "\n{n} messages of 256 B, {} cores; client, broker and plugins share the machine\n",
        common::cores()
    );
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!(
        "| publish (batch-100, async flush), before draining | {:.0} msgs/s |",
        (pub1 + pub4) / 2.0
    );
    println!("| drain through a no-op plugin, 1 instance (ack per message) | {one:.0} msgs/s |");
    println!(
        "| drain through a no-op plugin, 4 instances | {four:.0} msgs/s ({:.2}x 1 instance) |",
        four / one
    );
    for (name, lat) in [("sync", &lat), ("async", &lat_async)] {
        println!(
            "| publish→handle latency at {rate} msg/s for {secs} s, {name} flush ({} samples) | p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms |",
            lat.len(),
            pct(lat, 0.5),
            pct(lat, 0.99),
            pct(lat, 0.999)
        );
    }
    println!("| {topics_total} msgs over 1 topic (1 subscription) | {one_topic:.0} msgs/s |");
    println!(
        "| {topics_total} msgs over {} topics (a subscription each) | {thousand:.0} msgs/s ({:.2}x 1 topic) |",
        if quick { 50 } else { 1000 },
        thousand / one_topic
    );
    println!(
        "| upload→first message handled (compile, store, subscribe), mean of {lifecycle_n} | {upload_ms:.1} ms |"
    );
    println!(
        "| restart→every one of {lifecycle_n} subscriptions handled a new message | {restart_ms:.1} ms |"
    );
}
