//! Scale-out on NATS JetStream beside the embedded RocksDB backend, in one run: batch-100
//! publish throughput (4 clients spread over the wasmq nodes, a topic nobody reads) and
//! end-to-end throughput through the no-op plugin (a subscription already placed on the nodes;
//! publish, and time from the first publish until lag 0), for RocksDB `sync`, and JetStream R1
//! (one nats-server) and R3 (three) under 1, 2 and 3 wasmq nodes, all on this machine; and
//! raw JetStream end to end on the same servers (issue 25 goal 6: wasmq ≥ 0.8× of it).
//! `--quick` shrinks it for CI; `WASMQ_BENCH_N` sets the message count; `WASMQ_BENCH_TRACE=0`
//! runs wasmq without message trace (`[retention] trace_max_age_ms = 0`), to see what it costs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use wasmq::config::{Backend, FlushMode};
use wasmq_tests::plugins::ECHO;
use wasmq_tests::{NatsCluster, NatsServer};

/// Publishes `n` messages to `topic` in batches of 100 from 4 clients spread over `nodes`; msg/s.
async fn publish(nodes: &[common::Server], topic: &str, n: usize) -> f64 {
    let body = json!({"body": "x".repeat(common::BODY_BYTES - 2)});
    let batch = json!({"messages": vec![body; 100]});
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..4 {
        let node = &nodes[client % nodes.len()];
        let (http, batch) = (node.http.clone(), batch.clone());
        let url = format!("{}/v1/topics/{topic}/messages/batch", node.url);
        let per = n / 400 + usize::from(client < (n / 100) % 4);
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let r = http.post(&url).json(&batch).send().await.unwrap();
                let status = r.status();
                assert_eq!(
                    status,
                    reqwest::StatusCode::CREATED,
                    "{}",
                    r.text().await.unwrap()
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// One configuration: (publish msg/s, drain msg/s).
async fn run(urls: Option<(Vec<String>, u32)>, nodes: usize, n: usize) -> (f64, f64) {
    let mut servers = Vec::new();
    for _ in 0..nodes {
        let urls = urls.clone();
        servers.push(
            common::Server::start_with(FlushMode::Sync, move |c| {
                if std::env::var("WASMQ_BENCH_TRACE").is_ok_and(|v| v == "0") {
                    c.retention.trace_max_age_ms = 0;
                }
                if let Some((urls, replicas)) = urls {
                    c.storage.backend = Backend::Jetstream;
                    c.storage.urls = urls;
                    c.storage.replicas = replicas;
                }
            })
            .await,
        );
    }
    let first = &servers[0];
    first.put("/v1/topics/bench", json!({"queues": 8})).await;
    first.put("/v1/topics/e2e", json!({"queues": 8})).await;
    first.upload("echo", ECHO).await;
    let publish_rate = publish(&servers, "bench", n).await;
    first
        .put(
            "/v1/subscriptions/drain",
            json!({"topic": "e2e", "plugin": "echo", "instances": 4, "max_in_flight": 1024}),
        )
        .await;
    if urls.is_some() {
        // Every queue placed on its node (one lease each) before the clock starts.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = first.get("/v1/cluster").await;
            let placed = v["leases"].as_array().map_or(0, |l| {
                l.iter()
                    .filter(|l| l["subscription"] == "drain" && l["expired"] == false)
                    .count()
            });
            let up = v["nodes"]
                .as_array()
                .map_or(0, |n| n.iter().filter(|n| n["up"] == true).count());
            if placed == 8 && up == nodes {
                break;
            }
            assert!(Instant::now() < deadline, "queues never placed: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    publish(&servers, "e2e", n).await;
    loop {
        let st = first.get("/v1/subscriptions/drain").await;
        if st["lag"] == 0 && st["in_flight"] == 0 {
            break;
        }
        // Each status read costs the servers a few record reads and listings, which the raw
        // JetStream row does not pay: asked every 100 ms while much is left, every 10 ms near
        // the end (so the end is seen within 10 ms).
        let left = st["lag"].as_u64().unwrap_or(0);
        let pause = if left > n as u64 / 10 { 100 } else { 10 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let e2e_rate = n as f64 / started.elapsed().as_secs_f64();
    for s in servers {
        s.stop().await;
    }
    (publish_rate, e2e_rate)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = std::env::var("WASMQ_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2_000 } else { 50_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rows = Vec::new();
        rows.push((
            "RocksDB (sync), 1 node".to_string(),
            run(None, 1, n).await,
            None,
        ));
        let r1 = NatsServer::start().await;
        let r3 = NatsCluster::start(3).await;
        // WASMQ_BENCH_REPLICAS=1 or 3 and WASMQ_BENCH_NODES=k narrow a run to those rows.
        let only_replicas: Option<u32> = std::env::var("WASMQ_BENCH_REPLICAS")
            .ok()
            .and_then(|v| v.parse().ok());
        let max_nodes: usize = std::env::var("WASMQ_BENCH_NODES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        for (name, urls, replicas) in [("R1", vec![r1.url.clone()], 1), ("R3", r3.urls(), 3)] {
            if only_replicas.is_some_and(|r| r != replicas) {
                continue;
            }
            let raw = raw_end_to_end(&urls, replicas as usize, n).await;
            purge(&urls).await;
            for nodes in 1..=max_nodes {
                let r = run(Some((urls.clone(), replicas)), nodes, n).await;
                rows.push((
                    format!(
                        "JetStream {name}, {nodes} wasmq node{}",
                        if nodes > 1 { "s" } else { "" }
                    ),
                    r,
                    Some(raw),
                ));
                // The next row starts from empty streams.
                purge(&urls).await;
            }
        }
        let base = rows[0].1;
        println!(
            "\n{n} messages of {} B, batch-100 publish from 4 clients; end to end: publish to a subscribed topic and drain through a no-op plugin (4 instances per node) until lag 0; {} cores\n",
            common::BODY_BYTES,
            common::cores()
        );
        println!(
            "| backend | publish msg/s | vs RocksDB | end-to-end msg/s | vs RocksDB | raw JetStream end to end msg/s | vs raw |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (name, (p, d), raw) in rows {
            let (raw, vs_raw) = match raw {
                Some(r) => (format!("{r:.0}"), format!("{:.2}x", d / r)),
                None => ("–".into(), "–".into()),
            };
            println!(
                "| {name} | {p:.0} | {:.2}x | {d:.0} | {:.2}x | {raw} | {vs_raw} |",
                p / base.0,
                d / base.1
            );
        }
    });
}

/// Raw JetStream on the same servers, for the end-to-end column's second ratio: one stream
/// of `replicas` with 8 subjects, published as wasmq's rows are (4 clients, 100 appends in
/// flight each, then their acks), while 4 tasks drain one durable pull consumer and ack each
/// message; msg/s from the first publish until every message was acked.
async fn raw_end_to_end(urls: &[String], replicas: usize, n: usize) -> f64 {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures::StreamExt as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let connect = || async {
        let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
        async_nats::jetstream::new(async_nats::connect(addrs).await.unwrap())
    };
    let js = connect().await;
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "RAW".into(),
            subjects: vec!["raw.*".into()],
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .unwrap();
    let messages = stream
        .create_consumer(pull::Config {
            durable_name: Some("drain".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let started = Instant::now();
    let consumed = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(tokio::sync::Mutex::new(messages));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (shared, consumed) = (shared.clone(), consumed.clone());
        tasks.push(tokio::spawn(async move {
            while consumed.load(Ordering::Relaxed) < n as u64 {
                let next = {
                    let mut s = shared.lock().await;
                    tokio::time::timeout(Duration::from_millis(50), s.next()).await
                };
                let Ok(Some(Ok(m))) = next else { continue };
                m.ack().await.unwrap();
                consumed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let body = bytes::Bytes::from(vec![b'x'; common::BODY_BYTES]);
    for client in 0..4 {
        let js = connect().await;
        let body = body.clone();
        let per = n / 400 + usize::from(client < (n / 100) % 4);
        tasks.push(tokio::spawn(async move {
            for round in 0..per {
                let mut acks = Vec::with_capacity(100);
                for i in 0..100 {
                    let subject = format!("raw.{}", (round * 100 + i) % 8);
                    acks.push(js.publish(subject, body.clone()).await.unwrap());
                }
                for a in acks {
                    a.await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Deletes every stream, so rows do not read each other's messages and state.
async fn purge(urls: &[String]) {
    use futures::TryStreamExt as _;
    let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
    let js = async_nats::jetstream::new(async_nats::connect(addrs).await.unwrap());
    let names: Vec<String> = js.stream_names().try_collect().await.unwrap();
    for name in names {
        js.delete_stream(&name).await.unwrap();
    }
}
