//! End-to-end dispatch: publish→ack throughput through a no-op plugin with 1 and 4 instances,
//! and publish→handle latency (p50/p99/p999, measured inside the plugin) at a fixed rate.
//! `--quick` shrinks everything to keep the harness working in CI; `WASMQ_BENCH_N` sets the
//! message count, `WASMQ_BENCH_RATE` and `WASMQ_BENCH_SECS` the latency run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use wasmq::config::FlushMode;
use wasmq_tests::plugins::{ECHO, LATENCY};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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

/// Publishes at `rate` msg/s for `secs` (batches of 10 every `10/rate` s), each stamped with
/// its send time; returns the latencies the plugin measured, in µs, sorted.
async fn latency(rate: u64, secs: u64) -> Vec<u64> {
    let flush = if std::env::var("WASMQ_BENCH_FLUSH").as_deref() == Ok("async") {
        FlushMode::Async
    } else {
        FlushMode::Sync
    };
    let s = common::Server::start(flush).await;
    s.put("/v1/topics/lat", json!({"queues": 4})).await;
    s.put("/v1/topics/report", json!({"queues": 1})).await;
    s.upload("latency", LATENCY).await;
    let every = 500usize;
    s.put(
        "/v1/subscriptions/lat",
        json!({"topic": "lat", "plugin": "latency", "instances": 4, "start": "latest",
               "config": {"report": "report", "every": every}, "grants": {"publish": ["report"]}}),
    )
    .await;
    let url = format!("{}/v1/topics/lat/messages/batch", s.url);
    let batches = rate * secs / 10;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(10.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::new();
    for _ in 0..batches {
        ticker.tick().await;
        let sent_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros()
            .to_string();
        let msg = json!({"body": "x".repeat(254), "properties": {"sent_us": sent_us}});
        let (http, url) = (s.http.clone(), url.clone());
        sends.push(tokio::spawn(async move {
            let r = http
                .post(&url)
                .json(&json!({"messages": vec![msg; 10]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::CREATED);
        }));
    }
    for t in sends {
        t.await.unwrap();
    }
    // Each instance reports in batches; wait for whole batches of everything that was sent.
    let expected = (batches * 10) as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut samples: Vec<u64> = Vec::new();
    while Instant::now() < deadline {
        samples.clear();
        let mut from = 0;
        loop {
            let page = s
                .get(&format!(
                    "/v1/topics/report/messages?queue=0&from={from}&limit=1000"
                ))
                .await;
            let msgs = page["messages"].as_array().unwrap().clone();
            if msgs.is_empty() {
                break;
            }
            from += msgs.len();
            for m in msgs {
                samples.extend(
                    m["body"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v: &Value| v.as_u64().unwrap()),
                );
            }
        }
        if samples.len() + 4 * every > expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
    samples.sort_unstable();
    samples
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
        env_or("WASMQ_BENCH_N", 200_000)
    };
    let (rate, secs) = if quick {
        (2_000, 1)
    } else {
        (
            env_or("WASMQ_BENCH_RATE", 10_000),
            env_or("WASMQ_BENCH_SECS", 30),
        )
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let skip = std::env::var("WASMQ_BENCH_ONLY").as_deref() == Ok("latency");
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
    let lat = rt.block_on(latency(rate, secs));
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
    println!(
        "| publish→handle latency at {rate} msg/s for {secs} s, sync flush ({} samples) | p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms |",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 0.999)
    );
}
