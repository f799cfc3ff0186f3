//! Plugin isolation (issue 22): a healthy subscription's drain rate, its publish→handle
//! latency and `/healthz` latency, alone and beside k hostile subscriptions of each kind (spin:
//! loops to its deadline; sleep: waits to its deadline; allocate: grows memory to its cap;
//! compile: k uploads of components that are very costly to compile, one after another), as
//! ratios to alone in the same run. Goal on 2 cores: drain ≥ 1/(k+1) of alone, p99 ≤ 50 ms,
//! `/healthz` p99 ≤ 100 ms. `--quick`: k = 0 and 1, spin and sleep, small counts. (The latency
//! plugin reports in batches of 500 per instance: runs need a few thousand messages.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use wasmq::config::FlushMode;
use wasmq_tests::plugins::{ECHO, HOG, LATENCY, PROBE, SPIN};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Spin,
    Sleep,
    Allocate,
    Compile,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Spin => "spin",
            Kind::Sleep => "sleep",
            Kind::Allocate => "allocate",
            Kind::Compile => "compile",
        }
    }
}

struct Run {
    drain: f64,
    p50_ms: f64,
    p99_ms: f64,
    healthz_p99_ms: f64,
}

fn pct_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

/// Starts `k` hostile subscriptions of `kind` (each with work for far longer than the run),
/// then measures the healthy subscription.
async fn run(kind: Kind, k: usize, drain_n: usize, rate: u64, secs: u64) -> Run {
    let s = common::Server::start_with(FlushMode::Async, |c| {
        c.plugins.stop_grace_ms = 0;
        c.plugins.compile_worker = Some(env!("CARGO_BIN_EXE_wasmq").into());
        c.plugins.compile_timeout_ms = 30_000;
    })
    .await;
    s.upload("echo", ECHO).await;
    // The latency plugin too, before any storm: compiles queue for `max_compiles` turns, and
    // beside 8 costly ones its upload waited past the request timeout (408; the compile goes
    // on and a retry gets it). This bench measures the subscriptions beside a storm, not it.
    for (name, path) in [
        ("spin", SPIN),
        ("probe", PROBE),
        ("hog", HOG),
        ("latency", LATENCY),
    ] {
        s.upload(name, path).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut storms = Vec::new();
    for i in 0..k {
        if kind == Kind::Compile {
            let (http, url, stop) = (s.http.clone(), s.url.clone(), stop.clone());
            storms.push(tokio::spawn(async move {
                let mut salt = (i as u32) << 16;
                while !stop.load(Ordering::Relaxed) {
                    salt += 1;
                    let _ = http
                        .put(format!("{url}/v1/plugins/storm{i}"))
                        .header("content-type", "application/wasm")
                        .body(wasmq_tests::costly_component(salt))
                        .send()
                        .await;
                }
            }));
            continue;
        }
        let (plugin, body) = match kind {
            Kind::Spin => ("spin", json!({})),
            Kind::Sleep => ("probe", json!({"do": "sleep", "ms": 60_000})),
            _ => ("hog", json!({})),
        };
        s.put(&format!("/v1/topics/hostile{i}"), json!({"queues": 1}))
            .await;
        s.put(
            &format!("/v1/subscriptions/hostile{i}"),
            json!({"topic": format!("hostile{i}"), "plugin": plugin,
                   "limits": {"timeout_ms": 400, "memory_mb": 32},
                   "retry": {"max_attempts": 1}}),
        )
        .await;
        let r = s
            .http
            .post(format!("{}/v1/topics/hostile{i}/messages/batch", s.url))
            .json(&json!({"messages": vec![json!({"body": body}); 1000]}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    // Let the hostile work start before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Drain: a backlog through a fresh subscription of the no-op plugin.
    s.put("/v1/topics/healthy", json!({"queues": 4})).await;
    let body = json!({"body": "x".repeat(254)});
    for chunk in 0..drain_n.div_ceil(100) {
        let n = (drain_n - chunk * 100).min(100);
        let r = s
            .http
            .post(format!("{}/v1/topics/healthy/messages/batch", s.url))
            .json(&json!({"messages": vec![body.clone(); n]}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let started = Instant::now();
    s.put(
        "/v1/subscriptions/healthy",
        json!({"topic": "healthy", "plugin": "echo", "max_in_flight": 256}),
    )
    .await;
    loop {
        let st = s.get("/v1/subscriptions/healthy").await;
        if st["lag"] == 0 && st["in_flight"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = drain_n as f64 / started.elapsed().as_secs_f64();

    // Latency at a fixed rate, with /healthz probed alongside.
    let probing = Arc::new(AtomicBool::new(true));
    let prober = {
        let (http, url, probing) = (s.http.clone(), s.url.clone(), probing.clone());
        tokio::spawn(async move {
            let mut took = Vec::new();
            while probing.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = http.get(format!("{url}/healthz")).send().await;
                if r.is_ok() {
                    took.push(t.elapsed().as_micros() as u64);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            took.sort_unstable();
            took
        })
    };
    let lat = common::latency(&s, rate, secs).await;
    probing.store(false, Ordering::Relaxed);
    let healthz = prober.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in storms {
        t.abort();
    }
    s.stop().await;
    Run {
        drain,
        p50_ms: pct_ms(&lat, 0.5),
        p99_ms: pct_ms(&lat, 0.99),
        healthz_p99_ms: pct_ms(&healthz, 0.99),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--kind spin` (repeatable) runs only those kinds.
    let only: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--kind")
        .map(|w| w[1].as_str())
        .collect();
    // `--kind NAME` picks among every kind, also with `--quick`.
    let (kinds, ks, drain_n, rate, secs): (&[Kind], &[usize], usize, u64, u64) = if quick {
        let kinds: &[Kind] = if only.is_empty() {
            &[Kind::Spin, Kind::Sleep]
        } else {
            &[Kind::Spin, Kind::Sleep, Kind::Allocate, Kind::Compile]
        };
        (kinds, &[1, 4], 20_000, 2_000, 1)
    } else {
        (
            &[Kind::Spin, Kind::Sleep, Kind::Allocate, Kind::Compile],
            &[1, 4, 8],
            200_000,
            1_000,
            4,
        )
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The baseline is the better of two runs alone: one slow run would flatter every ratio.
    let alone = [0, 1]
        .map(|_| rt.block_on(run(Kind::Spin, 0, drain_n, rate, secs)))
        .into_iter()
        .max_by(|a, b| a.drain.total_cmp(&b.drain))
        .unwrap();
    println!(
        "\nA healthy subscription (no-op plugin) beside k hostile ones, {} cores; drain of {drain_n} \
         messages, latency at {rate} msg/s for {secs} s\n",
        common::cores()
    );
    println!(
        "| hostile | k | drain msgs/s | drain vs alone (goal ≥ 1/(k+1)) | handle p50 | handle p99 (goal ≤ 50 ms) | /healthz p99 (goal ≤ 100 ms) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| none | 0 | {:.0} | 1.00x | {:.2} ms | {:.2} ms | {:.2} ms |",
        alone.drain, alone.p50_ms, alone.p99_ms, alone.healthz_p99_ms
    );
    for &kind in kinds {
        if !only.is_empty() && !only.contains(&kind.name()) {
            continue;
        }
        for &k in ks {
            let r = rt.block_on(run(kind, k, drain_n, rate, secs));
            println!(
                "| {} | {k} | {:.0} | {:.2}x (≥ {:.2}) | {:.2} ms | {:.2} ms | {:.2} ms |",
                kind.name(),
                r.drain,
                r.drain / alone.drain,
                1.0 / (k as f64 + 1.0),
                r.p50_ms,
                r.p99_ms,
                r.healthz_p99_ms
            );
        }
    }
}
