//! wasmq beside Redis Streams and NATS JetStream, in one run on one machine: durable and relaxed
//! batch publish, one message per request, publish → consume latency at a fixed rate (p50, p99,
//! p999 on one clock), publish+consume end to end (1 and 4 consumers, an ack per message) and
//! fan-out to 4 consumers. The peers are real servers (`redis-server`, `nats-server -js`) started
//! here on 127.0.0.1 with their data in a temp dir, and so is wasmq (its release binary, in its
//! own process); their clients are Rust (redis-rs, async-nats), as wasmq's is (hyper or reqwest
//! over HTTP), all in this process.
//!
//! Durability is matched as closely as the peers allow: wasmq `sync` (fsync per group commit)
//! beside Redis `appendfsync always`; wasmq `async` beside Redis `everysec`. nats-server 2.9
//! has no `sync_interval`: JetStream acknowledges once the write reached the OS and fsyncs its
//! files every 2 minutes, so it is "relaxed" in both tables.
//!
//! `--quick` runs tiny sizes to keep the harness working in CI (it skips a peer whose server
//! binary is missing, saying so); `WASMQ_BENCH_N` sets the end-to-end message count (default
//! 1 000 000), `WASMQ_BENCH_SECS` the publish duration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::json;
use tokio::process::{Child, Command};
use wasmq::config::FlushMode;
use wasmq_tests::plugins::ECHO;

use common::BODY_BYTES;

const BATCH: usize = 100;
const PUBLISHERS: usize = 4;
/// The durability pairs every table row is run in: wasmq's flush mode, Redis's
/// `appendfsync`, and the row's label.
const MODES: [(FlushMode, &str, &str); 2] = [
    (
        FlushMode::Sync,
        "always",
        "durable: wasmq sync / Redis always / NATS*",
    ),
    (
        FlushMode::Async,
        "everysec",
        "relaxed: wasmq async / Redis everysec / NATS",
    ),
];
/// Producers that send one message per request (the single-publish rows).
const SINGLE_PRODUCERS: usize = 8;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn payload() -> Bytes {
    Bytes::from(vec![b'x'; BODY_BYTES])
}

async fn wait_for_port(port: u16) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing listens on port {port}");
}

fn have(bin: &str) -> bool {
    std::process::Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `round` (which publishes `per_round` messages) over and over on each worker's state
/// until `secs` pass; msgs/s over all workers.
async fn timed<W, F, Fut>(secs: f64, per_round: usize, workers: Vec<W>, round: F) -> f64
where
    W: Send + 'static,
    F: Fn(W) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = W> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            let (done, stop, round) = (done.clone(), stop.clone(), round.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    w = round(w).await;
                    done.fetch_add(per_round as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Microseconds since the epoch: the one clock every latency sample here is read on (wasmq's
/// latency plugin reads the host's, which is this machine's too).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Messages a latency producer sends per tick (wasmq's latency run sends batches of 10 too).
const LATENCY_ROUND: usize = 10;

/// Calls `round` with its send time (µs) every `LATENCY_ROUND / rate` s for `secs`, each call
/// spawned (a slow round does not hold back the next, as in [`common::latency`]); returns how
/// many messages were sent once every round finished.
async fn paced<F, Fut>(rate: u64, secs: u64, round: F) -> usize
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rounds = rate * secs / LATENCY_ROUND as u64;
    let mut ticker =
        tokio::time::interval(Duration::from_secs_f64(LATENCY_ROUND as f64 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::new();
    for _ in 0..rounds {
        ticker.tick().await;
        sends.push(tokio::spawn(round(now_us())));
    }
    for t in sends {
        t.await.unwrap();
    }
    rounds as usize * LATENCY_ROUND
}

/// p50, p99 and p999 of sorted µs samples, in ms.
fn percentiles(sorted: &[u64]) -> (f64, f64, f64) {
    let at = |q: f64| {
        let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
        sorted.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    (at(0.5), at(0.99), at(0.999))
}

// ---------------------------------------------------------------- Redis Streams

struct Redis {
    _child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// `fsync`: "always" or "everysec" (AOF on, no RDB snapshots).
    async fn start(fsync: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", fsync])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server");
        wait_for_port(port).await;
        Redis {
            _child: child,
            port,
            _dir: dir,
        }
    }

    async fn connect(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).unwrap();
        // redis-rs times replies out after 500 ms by default: too short under fsync=always.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    }

    /// `n` XADDs to `stream`, pipelined `BATCH` per round trip.
    async fn xadd(con: &mut redis::aio::MultiplexedConnection, stream: &str, n: usize) {
        let body = payload();
        let mut left = n;
        while left > 0 {
            let k = left.min(BATCH);
            let mut pipe = redis::pipe();
            for _ in 0..k {
                pipe.cmd("XADD")
                    .arg(stream)
                    .arg("*")
                    .arg("b")
                    .arg(body.as_ref())
                    .ignore();
            }
            pipe.query_async::<()>(&mut *con).await.unwrap();
            left -= k;
        }
    }

    /// Pipelined XADD of `BATCH` per round trip from `PUBLISHERS` connections, for `secs`.
    async fn publish_rate(&self, secs: f64) -> f64 {
        let mut cons = Vec::new();
        for _ in 0..PUBLISHERS {
            cons.push(self.connect().await);
        }
        timed(secs, BATCH, cons, |mut con| async move {
            Redis::xadd(&mut con, "rate", BATCH).await;
            con
        })
        .await
    }

    /// One XADD per round trip (no pipelining) from each of `producers` connections, for `secs`:
    /// a producer that sends one business event at a time.
    async fn publish_one_rate(&self, producers: usize, secs: f64) -> f64 {
        let mut cons = Vec::new();
        for _ in 0..producers {
            cons.push(self.connect().await);
        }
        timed(secs, 1, cons, |mut con| async move {
            Redis::xadd(&mut con, "one", 1).await;
            con
        })
        .await
    }

    /// `groups` consumer groups of `consumers` each read `n` messages (XREADGROUP COUNT 100,
    /// then one XACK for the ids read) while they are being published; msgs/s of `n`.
    async fn end_to_end(&self, n: usize, groups: usize, consumers: usize) -> f64 {
        let stream = format!("e2e-{groups}-{consumers}");
        let mut con = self.connect().await;
        for g in 0..groups {
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&stream)
                .arg(format!("g{g}"))
                .arg("0")
                .arg("MKSTREAM")
                .query_async::<()>(&mut con)
                .await
                .unwrap();
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for g in 0..groups {
            let consumed = Arc::new(AtomicU64::new(0));
            for c in 0..consumers {
                let mut con = self.connect().await;
                let (stream, consumed) = (stream.clone(), consumed.clone());
                tasks.push(tokio::spawn(async move {
                    while consumed.load(Ordering::Relaxed) < n as u64 {
                        let reply: Option<redis::streams::StreamReadReply> =
                            redis::cmd("XREADGROUP")
                                .arg("GROUP")
                                .arg(format!("g{g}"))
                                .arg(format!("c{c}"))
                                .arg("COUNT")
                                .arg(BATCH)
                                .arg("BLOCK")
                                .arg(50)
                                .arg("STREAMS")
                                .arg(&stream)
                                .arg(">")
                                .query_async(&mut con)
                                .await
                                .unwrap();
                        let ids: Vec<String> = reply
                            .into_iter()
                            .flat_map(|r| r.keys)
                            .flat_map(|k| k.ids)
                            .map(|i| i.id)
                            .collect();
                        if ids.is_empty() {
                            continue;
                        }
                        redis::cmd("XACK")
                            .arg(&stream)
                            .arg(format!("g{g}"))
                            .arg(&ids)
                            .query_async::<()>(&mut con)
                            .await
                            .unwrap();
                        consumed.fetch_add(ids.len() as u64, Ordering::Relaxed);
                    }
                }));
            }
        }
        Redis::xadd(&mut con, &stream, n).await;
        for t in tasks {
            t.await.unwrap();
        }
        n as f64 / started.elapsed().as_secs_f64()
    }
}

impl Redis {
    /// Publish → consume latency at `rate` msg/s for `secs`: rounds of 10 pipelined XADDs
    /// carrying their send time, one consumer in a group reading (XREADGROUP BLOCK, COUNT
    /// 100) and acking each read; µs samples, sorted.
    async fn latency(&self, rate: u64, secs: u64) -> Vec<u64> {
        let mut con = self.connect().await;
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("lat")
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async::<()>(&mut con)
            .await
            .unwrap();
        let expected = Arc::new(AtomicU64::new(u64::MAX));
        let mut reader = self.connect().await;
        let wanted = expected.clone();
        let consumer = tokio::spawn(async move {
            let mut samples = Vec::new();
            while (samples.len() as u64) < wanted.load(Ordering::Relaxed) {
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg("c")
                    .arg("COUNT")
                    .arg(BATCH)
                    .arg("BLOCK")
                    .arg(50)
                    .arg("STREAMS")
                    .arg("lat")
                    .arg(">")
                    .query_async(&mut reader)
                    .await
                    .unwrap();
                let now = now_us();
                let entries: Vec<redis::streams::StreamId> = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
                if entries.is_empty() {
                    continue;
                }
                for e in &entries {
                    let sent: u64 = e.get::<String>("sent").unwrap().parse().unwrap();
                    samples.push(now.saturating_sub(sent));
                }
                let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
                redis::cmd("XACK")
                    .arg("lat")
                    .arg("g")
                    .arg(&ids)
                    .query_async::<()>(&mut reader)
                    .await
                    .unwrap();
            }
            samples
        });
        let body = payload();
        let sent = paced(rate, secs, |at| {
            let (mut con, body) = (con.clone(), body.clone());
            async move {
                let mut pipe = redis::pipe();
                for _ in 0..LATENCY_ROUND {
                    pipe.cmd("XADD")
                        .arg("lat")
                        .arg("*")
                        .arg("sent")
                        .arg(at.to_string())
                        .arg("b")
                        .arg(body.as_ref())
                        .ignore();
                }
                pipe.query_async::<()>(&mut con).await.unwrap();
            }
        })
        .await;
        expected.store(sent as u64, Ordering::Relaxed);
        let mut samples = consumer.await.unwrap();
        samples.sort_unstable();
        samples
    }
}

// ---------------------------------------------------------------- NATS JetStream

struct Nats {
    server: wasmq_tests::NatsServer,
}

impl Nats {
    async fn start() -> Self {
        Nats {
            server: wasmq_tests::NatsServer::start().await,
        }
    }

    async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(&self.server.url).await.unwrap();
        async_nats::jetstream::new(client)
    }

    async fn stream(&self, name: &str) -> async_nats::jetstream::Context {
        let js = self.jetstream().await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![name.to_string()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
        js
    }

    /// Publishes `BATCH` messages, then waits for their acks; repeated.
    async fn publish(js: &async_nats::jetstream::Context, subject: &str, n: usize) {
        let body = payload();
        let mut left = n;
        while left > 0 {
            let k = left.min(BATCH);
            let mut acks = Vec::with_capacity(k);
            for _ in 0..k {
                acks.push(js.publish(subject.to_string(), body.clone()).await.unwrap());
            }
            for a in acks {
                a.await.unwrap();
            }
            left -= k;
        }
    }

    async fn publish_rate(&self, secs: f64) -> f64 {
        self.stream("rate").await;
        let mut contexts = Vec::new();
        for _ in 0..PUBLISHERS {
            contexts.push(self.jetstream().await);
        }
        timed(secs, BATCH, contexts, |js| async move {
            Nats::publish(&js, "rate", BATCH).await;
            js
        })
        .await
    }

    /// One publish, then its ack, at a time from each of `producers` connections, for `secs`.
    async fn publish_one_rate(&self, producers: usize, secs: f64) -> f64 {
        self.stream("one").await;
        let mut contexts = Vec::new();
        for _ in 0..producers {
            contexts.push(self.jetstream().await);
        }
        timed(secs, 1, contexts, |js| async move {
            Nats::publish(&js, "one", 1).await;
            js
        })
        .await
    }

    /// `groups` durable pull consumers, each drained by `consumers` tasks acking every message,
    /// while `n` messages are being published; msgs/s of `n`.
    async fn end_to_end(&self, n: usize, groups: usize, consumers: usize) -> f64 {
        use async_nats::jetstream::consumer::{AckPolicy, pull};
        let name = format!("e2e-{groups}-{consumers}");
        let js = self.stream(&name).await;
        let stream = js.get_stream(&name).await.unwrap();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for g in 0..groups {
            let consumer: pull::Stream = stream
                .create_consumer(pull::Config {
                    durable_name: Some(format!("g{g}")),
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: 10_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .messages()
                .await
                .unwrap();
            // Consumers of one group share its message stream, as competing pullers would.
            let consumed = Arc::new(AtomicU64::new(0));
            let shared = Arc::new(tokio::sync::Mutex::new(consumer));
            for _ in 0..consumers {
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
        }
        Nats::publish(&js, &name, n).await;
        for t in tasks {
            t.await.unwrap();
        }
        n as f64 / started.elapsed().as_secs_f64()
    }
}

impl Nats {
    /// Publish → consume latency at `rate` msg/s for `secs`: rounds of 10 publishes carrying
    /// their send time, then their acks; one durable pull consumer acking every message; µs
    /// samples, sorted.
    async fn latency(&self, rate: u64, secs: u64) -> Vec<u64> {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        let js = self.stream("lat").await;
        let mut messages = js
            .get_stream("lat")
            .await
            .unwrap()
            .create_consumer(pull::Config {
                durable_name: Some("g".into()),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::New,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .messages()
            .await
            .unwrap();
        let expected = Arc::new(AtomicU64::new(u64::MAX));
        let wanted = expected.clone();
        let consumer = tokio::spawn(async move {
            let mut samples = Vec::new();
            while (samples.len() as u64) < wanted.load(Ordering::Relaxed) {
                let Ok(Some(Ok(m))) =
                    tokio::time::timeout(Duration::from_millis(50), messages.next()).await
                else {
                    continue;
                };
                let now = now_us();
                let sent: u64 = std::str::from_utf8(&m.payload[..20])
                    .unwrap()
                    .parse()
                    .unwrap();
                samples.push(now.saturating_sub(sent));
                m.ack().await.unwrap();
            }
            samples
        });
        let producer = self.jetstream().await;
        let sent = paced(rate, secs, |at| {
            let js = producer.clone();
            let mut body = format!("{at:020}").into_bytes();
            body.resize(BODY_BYTES, b'x');
            let body = Bytes::from(body);
            async move {
                let mut acks = Vec::with_capacity(LATENCY_ROUND);
                for _ in 0..LATENCY_ROUND {
                    acks.push(js.publish("lat", body.clone()).await.unwrap());
                }
                for a in acks {
                    a.await.unwrap();
                }
            }
        })
        .await;
        expected.store(sent as u64, Ordering::Relaxed);
        let mut samples = consumer.await.unwrap();
        samples.sort_unstable();
        samples
    }
}

// ---------------------------------------------------------------- wasmq

/// A subscription through the no-op `echo` plugin (`instances`, clustering or broadcast) on a
/// topic with 8 queues, created before `n` messages are published in batches of 100;
/// msgs/s of `n` until every instance acked everything.
async fn wasmq_end_to_end(n: usize, instances: u32, broadcast: bool) -> f64 {
    let s = common::Server::spawn(FlushMode::Async).await;
    s.put("/v1/topics/bench", json!({"queues": 8})).await;
    s.upload("echo", ECHO).await;
    let mode = if broadcast { "broadcast" } else { "clustering" };
    s.put(
        "/v1/subscriptions/drain",
        json!({"topic": "bench", "plugin": "echo", "instances": instances, "mode": mode,
               "max_in_flight": 1024}),
    )
    .await;
    let body = json!({"body": "x".repeat(BODY_BYTES - 2)});
    let batch = Bytes::from(serde_json::to_vec(&json!({"messages": vec![body; BATCH]})).unwrap());
    let mut conns = Vec::new();
    for _ in 0..PUBLISHERS {
        conns.push(common::Conn::open(&s.url).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    let batches = n / BATCH;
    for (p, mut conn) in conns.into_iter().enumerate() {
        let batch = batch.clone();
        let mine = batches / PUBLISHERS + usize::from(p < batches % PUBLISHERS);
        tasks.push(tokio::spawn(async move {
            for _ in 0..mine {
                let (status, _) = conn
                    .post("/v1/topics/bench/messages/batch", batch.clone())
                    .await;
                assert_eq!(status, reqwest::StatusCode::CREATED);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    loop {
        let st = s.get("/v1/subscriptions/drain").await;
        if st["lag"] == 0 && st["in_flight"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = (batches * BATCH) as f64 / started.elapsed().as_secs_f64();
    s.stop().await;
    rate
}

// ---------------------------------------------------------------- report

struct Row {
    workload: String,
    wasmq: f64,
    redis: Option<f64>,
    nats: Option<f64>,
}

fn cell(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.0}"))
}

fn ratio(w: f64, p: Option<f64>) -> String {
    p.filter(|p| *p > 0.0)
        .map_or("–".into(), |p| format!("{:.2}x", w / p))
}

fn version(bin: &str) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "not installed".into())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = if quick {
        2_000
    } else {
        common::env_or("WASMQ_BENCH_N", 1_000_000)
    };
    let secs: f64 = if quick {
        0.3
    } else {
        common::env_or("WASMQ_BENCH_SECS", 5.0)
    };
    // WASMQ_BENCH_ONLY=publish,single,latency,e2e,fanout picks rows; WASMQ_BENCH_PEERS=0 runs wasmq alone
    // (both for profiling one workload).
    let only = std::env::var("WASMQ_BENCH_ONLY").unwrap_or_default();
    let wanted = |row: &str| only.is_empty() || only.split(',').any(|o| o == row);
    let peers = std::env::var("WASMQ_BENCH_PEERS").as_deref() != Ok("0");
    // WASMQ_BENCH_FLUSH=sync or async keeps only the durable or the relaxed publish rows.
    let flush_only = std::env::var("WASMQ_BENCH_FLUSH").unwrap_or_default();
    let flush_wanted =
        |f: FlushMode| flush_only.is_empty() || (flush_only == "sync") == (f == FlushMode::Sync);
    let (with_redis, with_nats) = (peers && have("redis-server"), peers && have("nats-server"));
    if !with_redis || !with_nats {
        eprintln!(
            "peers: redis-server {} nats-server {}; missing peers are skipped (bash .ci/bench installs them)",
            if with_redis { "found" } else { "missing" },
            if with_nats { "found" } else { "missing" }
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    // Publish → consume latency: WASMQ_BENCH_RATE msg/s (10 000) for WASMQ_BENCH_LAT_SECS (5).
    let latency_rate: u64 = common::env_or("WASMQ_BENCH_RATE", 10_000);
    let latency_secs: u64 = if quick {
        1
    } else {
        common::env_or("WASMQ_BENCH_LAT_SECS", 5)
    };
    let mut latencies = Vec::new();
    rt.block_on(async {
        for (flush, fsync, label) in MODES {
            if !flush_wanted(flush) {
                continue;
            }
            if wanted("publish") {
                let wasmq = common::http_publish_to(
                    common::Server::spawn(flush).await,
                    BATCH,
                    PUBLISHERS,
                    secs,
                )
                .await;
                let redis = if with_redis {
                    Some(Redis::start(fsync).await.publish_rate(secs).await)
                } else {
                    None
                };
                let nats = if with_nats {
                    Some(Nats::start().await.publish_rate(secs).await)
                } else {
                    None
                };
                rows.push(Row {
                    workload: format!("publish batch-100, {PUBLISHERS} clients ({label})"),
                    wasmq,
                    redis,
                    nats,
                });
            }
            if wanted("single") {
                let wasmq = common::http_publish_to(
                    common::Server::spawn(flush).await,
                    1,
                    SINGLE_PRODUCERS,
                    secs,
                )
                .await;
                let redis = if with_redis {
                    let r = Redis::start(fsync).await;
                    Some(r.publish_one_rate(SINGLE_PRODUCERS, secs).await)
                } else {
                    None
                };
                let nats = if with_nats {
                    let n = Nats::start().await;
                    Some(n.publish_one_rate(SINGLE_PRODUCERS, secs).await)
                } else {
                    None
                };
                rows.push(Row {
                    workload: format!(
                        "publish one message per request, {SINGLE_PRODUCERS} producers ({label})"
                    ),
                    wasmq,
                    redis,
                    nats,
                });
            }
        }
        if wanted("latency") {
            for (flush, fsync, label) in MODES {
                if !flush_wanted(flush) {
                    continue;
                }
                let s = common::Server::spawn(flush).await;
                let wasmq = common::latency(&s, latency_rate, latency_secs).await;
                s.stop().await;
                let redis = if with_redis {
                    let r = Redis::start(fsync).await;
                    Some(r.latency(latency_rate, latency_secs).await)
                } else {
                    None
                };
                let nats = if with_nats {
                    let n = Nats::start().await;
                    Some(n.latency(latency_rate, latency_secs).await)
                } else {
                    None
                };
                latencies.push((label, wasmq, redis, nats));
            }
        }
        for (groups, consumers, what) in [
            (1, 1, "publish + consume with acks, 1 consumer"),
            (1, 4, "publish + consume with acks, 4 consumers"),
            (4, 1, "fan-out: every message to 4 consumers (broadcast)"),
        ] {
            if !wanted(if groups == 1 { "e2e" } else { "fanout" }) {
                continue;
            }
            let wasmq = if groups == 1 {
                wasmq_end_to_end(n, consumers as u32, false).await
            } else {
                wasmq_end_to_end(n, groups as u32, true).await
            };
            let redis = if with_redis {
                let r = Redis::start("everysec").await;
                Some(r.end_to_end(n, groups, consumers).await)
            } else {
                None
            };
            let nats = if with_nats {
                let s = Nats::start().await;
                Some(s.end_to_end(n, groups, consumers).await)
            } else {
                None
            };
            rows.push(Row {
                workload: format!("{what}, {n} msgs (relaxed flush)"),
                wasmq,
                redis,
                nats,
            });
        }
    });
    println!(
        "\n### wasmq beside Redis Streams and NATS JetStream\n\n{BODY_BYTES} B messages, {} cores; clients, brokers and plugins share the machine. {}; {}.\n",
        common::cores(),
        version("redis-server"),
        version("nats-server")
    );
    if !rows.is_empty() {
        println!(
            "| workload (msgs/s) | wasmq | Redis Streams | NATS JetStream | wasmq/Redis | wasmq/NATS |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    }
    for r in &rows {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} |",
            r.workload,
            r.wasmq,
            cell(r.redis),
            cell(r.nats),
            ratio(r.wasmq, r.redis),
            ratio(r.wasmq, r.nats)
        );
    }
    if !latencies.is_empty() {
        println!(
            "\n#### Publish → consume latency at {latency_rate} msg/s for {latency_secs} s (rounds of {LATENCY_ROUND}; wasmq: measured in its latency plugin, 4 instances; Redis: one consumer, XREADGROUP COUNT 100; NATS: one pull consumer; one clock)\n"
        );
        println!(
            "| durability | wasmq p50 / p99 / p999 ms | Redis Streams | NATS JetStream | wasmq p99 / Redis p99 | wasmq p99 / NATS p99 |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        let show = |s: &Option<Vec<u64>>| {
            s.as_ref().map_or("–".to_string(), |s| {
                let (p50, p99, p999) = percentiles(s);
                format!("{p50:.2} / {p99:.2} / {p999:.2}")
            })
        };
        for (label, wasmq, redis, nats) in &latencies {
            let p99 = |s: &Vec<u64>| percentiles(s).1;
            let w = p99(wasmq);
            println!(
                "| {label} | {} | {} | {} | {} | {} |",
                show(&Some(wasmq.clone())),
                show(redis),
                show(nats),
                ratio(w, redis.as_ref().map(p99)),
                ratio(w, nats.as_ref().map(p99)),
            );
        }
    }
    println!(
        "\n*nats-server 2.9 has no `sync_interval`: JetStream acks after the OS write and fsyncs every 2 min, so its rows are never fsync-per-ack. End-to-end rows: wasmq runs a WASM plugin per message and acks each one (offsets committed in RocksDB); Redis acks each read batch with one XACK; NATS acks every message."
    );
}
