//! Endurance (issue 23): random 256 B messages published and consumed through a subscription on a
//! topic with a short age retention. Prints the data directory's size (peak and at each checkpoint,
//! beside what the retention window holds), the process's peak RSS, the time from start to a
//! healthy, dispatching server and the time of a `/metrics` scrape, after 0, N/5 and N messages and
//! after M decided transactions (each once RocksDB's compactions settled; the lower quartile of 40
//! restarts each, of 101 scrapes), as ratios to an empty server with the same topic and
//! subscription measured at the same checkpoint, interleaved with the loaded one (so both see the
//! same machine: a start is 12-19 ms of fixed work, and that moved by a third between checkpoints
//! minutes apart). Trace records are kept as long as the messages. Goal: the data dir bounded by
//! what the retention allows, every ratio ≤ 1.2.
//! `--quick`: 100 000 messages, 2 s retention, 2 000 transactions; full: 5 000 000, 30 s, 100 000
//! (`WASMQ_BENCH_N`, `WASMQ_BENCH_TXNS` set the counts).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmq::config::FlushMode;
use wasmq::disk::dir_size;
use wasmq_tests::plugins::ECHO;

/// This process's peak resident memory (server and load generator together), bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A JSON string body of 256 bytes (quotes included) of random letters: LZ4 cannot shrink it.
fn random_body(state: &mut u64) -> Value {
    let s: String = (0..254)
        .map(|_| {
            // xorshift64
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (b'a' + (*state % 26) as u8) as char
        })
        .collect();
    Value::String(s)
}

const TOPIC: &str = "stream";
/// `[retention] trace_max_age_ms` of the servers: the topic's age retention.
static TRACE_MAX_AGE_MS: AtomicU64 = AtomicU64::new(0);
const GROUP: &str = "sink";

/// Publishes `n` messages in batches of 500 from 4 clients.
async fn publish(s: &common::Server, n: u64) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..4u64 {
        let (http, url, next) = (s.http.clone(), s.url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (c + 1);
            loop {
                let from = next.fetch_add(500, Ordering::Relaxed);
                if from >= n {
                    return;
                }
                let count = (n - from).min(500);
                let msgs: Vec<Value> = (0..count)
                    .map(|_| json!({"body": random_body(&mut rng)}))
                    .collect();
                let r = http
                    .post(format!("{url}/v1/topics/{TOPIC}/messages/batch"))
                    .json(&json!({"messages": msgs}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), reqwest::StatusCode::CREATED);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until the subscription has committed past `total` messages.
async fn consumed(s: &common::Server, total: u64) {
    loop {
        let v = s.get(&format!("/v1/subscriptions/{GROUP}")).await;
        let committed: u64 = v["queues"]
            .as_array()
            .map(|q| q.iter().filter_map(|q| q["committed"].as_u64()).sum())
            .unwrap_or(0);
        if committed >= total {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The time of one `/metrics` scrape, ms, and the answer's size, bytes.
async fn scrape(s: &common::Server) -> (f64, usize) {
    let started = Instant::now();
    let bytes = metrics_text(&s.http, &s.url).await.len();
    (started.elapsed().as_secs_f64() * 1000.0, bytes)
}

/// The lower quartile of [`SCRAPES`] `/metrics` scrapes of the loaded server and of the empty one
/// (started for them from `empty`, and stopped again), interleaved, which goes first alternating,
/// ms (a scrape takes well under a millisecond, and on two cores shared with compaction and the
/// consumer its median moved by half of that between runs of the same code, its fastest by a
/// third between the two servers of one run), and the size of the loaded server's last answer,
/// bytes (a series that appears once, such as a first deletion's counter, makes a scrape longer
/// without growing with history; more bytes per message would).
async fn metrics_ms(
    s: &common::Server,
    empty: tempfile::TempDir,
    tune: fn(&mut wasmq::config::Config),
) -> (tempfile::TempDir, f64, f64, usize) {
    let (e, _) = start_timed(empty, tune).await;
    let (mut times, mut empty_times, mut bytes) = (Vec::new(), Vec::new(), 0);
    for i in 0..SCRAPES {
        if i % 2 == 0 {
            empty_times.push(scrape(&e).await.0);
        }
        let took;
        (took, bytes) = scrape(s).await;
        times.push(took);
        if i % 2 == 1 {
            empty_times.push(scrape(&e).await.0);
        }
    }
    (
        e.stop_keep_dir().await,
        lower_quartile(times),
        lower_quartile(empty_times),
        bytes,
    )
}

/// How many `/metrics` scrapes each checkpoint times, of each server (a scrape is under a
/// millisecond: the lower quartile of 31 still moved by a fifth between identical servers).
const SCRAPES: usize = 101;

/// Starts the loaded server and the empty one (from its stopped data dir `empty`)
/// [`RESTARTS`] times each, alternately (which goes first alternates too), each start with the
/// other server stopped (a running neighbour's retention and compaction would slow only the
/// starts beside it); of each, the lower quartile of the times until it answered and
/// dispatched the subscription, ms. A start is 12-19 ms of fixed work (TLS roots, the wasmtime
/// pool, the RocksDB open, each with fsyncs and thread starts): the best of 25 of two identical
/// empty servers differed by a fifth (a rare fast start decides it), the median carries the
/// slow starts' noise. Returns the loaded server started again, and the empty one's dir.
async fn restart(
    s: common::Server,
    mut empty: tempfile::TempDir,
    tune: fn(&mut wasmq::config::Config),
) -> (common::Server, tempfile::TempDir, f64, f64) {
    let (mut times, mut empty_times) = (Vec::new(), Vec::new());
    let mut loaded = s.stop_keep_dir().await;
    for i in 0..restarts() {
        for empty_first in [i % 2 == 0, i % 2 == 1] {
            let (server, took);
            if empty_first {
                (server, took) = start_timed(empty, tune).await;
                empty_times.push(took);
                empty = server.stop_keep_dir().await;
            } else {
                (server, took) = start_timed(loaded, tune).await;
                times.push(took);
                loaded = server.stop_keep_dir().await;
            }
        }
    }
    let (s, _) = start_timed(loaded, tune).await;
    (s, empty, lower_quartile(times), lower_quartile(empty_times))
}

/// The value a quarter of the way up `times`.
fn lower_quartile(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 4).copied().unwrap_or(f64::NAN)
}

/// How many restarts each checkpoint times (see [`restart`]).
const RESTARTS: usize = 40;

/// [`RESTARTS`], or `WASMQ_BENCH_RESTARTS` (to profile restarts).
fn restarts() -> usize {
    common::env_or("WASMQ_BENCH_RESTARTS", RESTARTS)
}

/// Starts a server on `dir`; the time until it answers and dispatches the subscription, ms.
async fn start_timed(
    dir: tempfile::TempDir,
    tune: fn(&mut wasmq::config::Config),
) -> (common::Server, f64) {
    let started = Instant::now();
    let s = common::Server::start_in(dir, FlushMode::Async, tune).await;
    loop {
        let r = s
            .http
            .get(format!("{}/v1/subscriptions/{GROUP}", s.url))
            .send()
            .await;
        if let Ok(r) = r
            && let Ok(v) = r.json::<Value>().await
            && v["state"] == "running"
            && v["in_flight"].is_number()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the server did not come back"
        );
        // 1 ms: a restart takes 15-20 ms, so polling every 5 ms made its time move in steps of
        // a third of itself (13, 18, 23 ms), which the ratios showed as a slower start.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (s, started.elapsed().as_secs_f64() * 1000.0)
}

/// The data dir's largest sample while publishing, and where its bytes were then
/// (`wasmq_storage_bytes`: column family, part, bytes).
#[derive(Default)]
struct PeakParts {
    dir_bytes: u64,
    parts: Vec<(String, String, f64)>,
}

/// The `wasmq_storage_bytes` series of a `/metrics` answer: column family, part, bytes.
fn storage_parts(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("wasmq_storage_bytes{family=\"")?;
            let (family, rest) = rest.split_once("\",part=\"")?;
            let (part, value) = rest.split_once("\"} ")?;
            Some((family.to_string(), part.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The server's `/metrics` answer.
async fn metrics_text(http: &reqwest::Client, url: &str) -> String {
    http.get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

struct Checkpoint {
    label: String,
    dir_bytes: u64,
    /// How long compaction took to settle before the restarts.
    settle_ms: f64,
    restart_ms: f64,
    /// The empty server's restart, measured interleaved with this one.
    empty_restart_ms: f64,
    metrics_ms: f64,
    /// The empty server's scrape, measured interleaved with this one.
    empty_metrics_ms: f64,
    metrics_bytes: usize,
}

/// Waits until RocksDB has no compaction running or pending (`/metrics`), at most
/// [`SETTLE_MAX`]; returns how long that took, ms. A stop cancels the compactions the phase
/// before left and the next open starts them again, so without this the restarts could
/// each share the two cores with the last phase's compaction debt, which is not a cost of the
/// data's history. (In the full runs of 2026-12-02 it was settled at every checkpoint
/// already: the restart ratios' spread between runs does not come from compaction debt.)
async fn settled(s: &common::Server) -> f64 {
    let started = Instant::now();
    while started.elapsed() < SETTLE_MAX {
        let text = metrics_text(&s.http, &s.url).await;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        };
        if value("wasmq_storage_compactions_running") == 0.0
            && value("wasmq_storage_compaction_pending_bytes") == 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed().as_secs_f64() * 1000.0
}

/// The longest [`settled`] waits (then the checkpoint is taken as it is).
const SETTLE_MAX: Duration = Duration::from_secs(120);

/// The data dir's size now, then, once compaction settled, restarts and `/metrics` timings of
/// the restarted server, each interleaved with the same of the empty server (its data dir
/// `empty`: it runs only for them).
async fn checkpoint(
    s: common::Server,
    empty: tempfile::TempDir,
    label: String,
    tune: fn(&mut wasmq::config::Config),
) -> (common::Server, tempfile::TempDir, Checkpoint) {
    let dir_bytes = dir_size(s.data_dir());
    let settle_ms = settled(&s).await;
    let (s, empty, restart_ms, empty_restart_ms) = restart(s, empty, tune).await;
    let (empty, metrics_ms, empty_metrics_ms, metrics_bytes) = metrics_ms(&s, empty, tune).await;
    let point = Checkpoint {
        label,
        dir_bytes,
        settle_ms,
        restart_ms,
        empty_restart_ms,
        metrics_ms,
        empty_metrics_ms,
        metrics_bytes,
    };
    (s, empty, point)
}

/// A server with the bench's topic and subscription, nothing published.
async fn server_with_subscription(
    tune: fn(&mut wasmq::config::Config),
    retention_ms: u64,
) -> common::Server {
    let s = common::Server::start_with(FlushMode::Async, tune).await;
    s.upload("echo", ECHO).await;
    s.put(
        &format!("/v1/topics/{TOPIC}"),
        json!({"queues": 4, "retention": {"max_age_ms": retention_ms}}),
    )
    .await;
    s.put(
        &format!("/v1/subscriptions/{GROUP}"),
        json!({"topic": TOPIC, "plugin": "echo"}),
    )
    .await;
    s
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // RUST_LOG=wasmq=info shows where a restart spends its time.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let (n, retention_ms, txns): (u64, u64, u64) = if quick {
        (100_000, 2_000, 2_000)
    } else {
        (5_000_000, 30_000, 100_000)
    };
    // WASMQ_BENCH_N and WASMQ_BENCH_TXNS narrow a run to one phase.
    let (n, txns) = (
        common::env_or("WASMQ_BENCH_N", n),
        common::env_or("WASMQ_BENCH_TXNS", txns),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Trace records are kept as long as the messages, so the data dir shows what the
        // message retention allows (with the 72 h default they are most of what is left).
        fn tune(c: &mut wasmq::config::Config) {
            c.retention.check_interval_ms = 500;
            c.retention.trace_max_age_ms = TRACE_MAX_AGE_MS.load(Ordering::Relaxed);
        }
        TRACE_MAX_AGE_MS.store(retention_ms, Ordering::Relaxed);
        let s = server_with_subscription(tune, retention_ms).await;
        // The baseline: restarted and scraped beside the loaded server at every checkpoint.
        let empty = server_with_subscription(tune, retention_ms)
            .await
            .stop_keep_dir()
            .await;
        let data = s.data_dir().to_path_buf();
        let peak_dir = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // The loaded server's URL while publishing: the sampler then also keeps where the bytes
        // were at the largest sample (`wasmq_storage_bytes`).
        let publishing = Arc::new(std::sync::Mutex::new(None::<String>));
        let parts = Arc::new(std::sync::Mutex::new(PeakParts::default()));
        let sampler = {
            let (peak_dir, stop, data) = (peak_dir.clone(), stop.clone(), data.clone());
            let (publishing, parts, http) = (publishing.clone(), parts.clone(), s.http.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let d = data.clone();
                    let size = tokio::task::spawn_blocking(move || dir_size(&d))
                        .await
                        .unwrap();
                    peak_dir.fetch_max(size, Ordering::Relaxed);
                    let url = publishing.lock().unwrap().clone();
                    if let Some(url) = url
                        && size > parts.lock().unwrap().dir_bytes
                    {
                        let found = storage_parts(&metrics_text(&http, &url).await);
                        *parts.lock().unwrap() = PeakParts {
                            dir_bytes: size,
                            parts: found,
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let (mut s, mut empty, first) = checkpoint(s, empty, "empty".into(), tune).await;
        let mut points = vec![first];
        let started = Instant::now();
        let mut published = 0;
        for target in [n / 5, n] {
            *publishing.lock().unwrap() = Some(s.url.clone());
            publish(&s, target - published).await;
            published = target;
            consumed(&s, published).await;
            *publishing.lock().unwrap() = None;
            let point;
            (s, empty, point) = checkpoint(s, empty, format!("{published} messages"), tune).await;
            points.push(point);
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        for i in 0..txns {
            let v = s
                .http
                .post(format!("{}/v1/topics/{TOPIC}/transactions", s.url))
                .json(&json!({"body": {"txn": i}}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap();
            let id = v["txn_id"].as_str().unwrap();
            let r = s
                .http
                .post(format!("{}/v1/transactions/{id}/commit", s.url))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        consumed(&s, n + txns).await;
        let point;
        (s, empty, point) = checkpoint(s, empty, format!("+{txns} decided transactions"), tune).await;
        points.push(point);
        // Once the retention window has passed with no new messages, what is left.
        tokio::time::sleep(Duration::from_millis(retention_ms + 2_000)).await;
        let settled = dir_size(&data);
        stop.store(true, Ordering::Relaxed);
        sampler.await.unwrap();
        let topic = s.get(&format!("/v1/topics/{TOPIC}")).await;
        s.stop().await;
        drop(empty);

        let window_bytes = rate * retention_ms as f64 / 1000.0 * 256.0;
        println!(
            "\nEndurance: {n} random 256 B messages published and consumed at {rate:.0} msg/s \
             through a topic with a {} s age retention (trace records kept as long), then {txns} \
             decided transactions; {} cores; each checkpoint once RocksDB's compactions settled (at most {} s); restart: the lower quartile of {}; /metrics: the lower quartile of {}; each beside an empty server with the same topic and subscription, interleaved at the same checkpoint (each start with the other server stopped)\n",
            retention_ms / 1000,
            common::cores(),
            SETTLE_MAX.as_secs(),
            restarts(),
            SCRAPES
        );
        println!(
            "| after | data dir | compaction settled in | restart to dispatching | empty server | vs empty | /metrics | empty server | vs empty | /metrics size |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for p in &points {
            println!(
                "| {} | {:.1} MB | {:.1} s | {:.1} ms | {:.1} ms | {:.2}x | {:.2} ms | {:.2} ms | {:.2}x | {} B |",
                p.label,
                p.dir_bytes as f64 / 1e6,
                p.settle_ms / 1000.0,
                p.restart_ms,
                p.empty_restart_ms,
                p.restart_ms / p.empty_restart_ms,
                p.metrics_ms,
                p.empty_metrics_ms,
                p.metrics_ms / p.empty_metrics_ms,
                p.metrics_bytes
            );
        }
        println!(
            "\ndata dir peak {:.1} MB, {:.1} MB once the window passed with no new messages \
             ({} messages still stored); message bytes one retention window holds at this rate: \
             {:.1} MB; peak RSS (both servers and the load generator) {:.0} MB",
            peak_dir.load(Ordering::Relaxed) as f64 / 1e6,
            settled as f64 / 1e6,
            topic["stored_messages"],
            window_bytes / 1e6,
            peak_rss() as f64 / 1e6
        );
        let parts = parts.lock().unwrap();
        // Memtables are in memory (their writes are in the WAL, on disk): listed apart.
        let (in_memory, on_disk): (Vec<_>, Vec<_>) =
            parts.parts.iter().partition(|(_, part, _)| part == "memtables");
        let list = |parts: &[&(String, String, f64)]| {
            parts
                .iter()
                .filter(|(_, _, b)| *b >= 0.1e6)
                .map(|(family, part, b)| format!("{family} {part} {:.1}", b / 1e6))
                .collect::<Vec<_>>()
        };
        let listed: f64 = on_disk.iter().map(|(_, _, b)| b).sum();
        let mut disk = list(&on_disk);
        disk.push(format!(
            "the rest (WAL, info logs, table files a compaction is writing or has not deleted yet) {:.1}",
            (parts.dir_bytes as f64 - listed) / 1e6
        ));
        println!(
            "\nthe data dir's largest sample while publishing, {:.1} MB, by column family and part \
             (MB): {}; in memory then: {}",
            parts.dir_bytes as f64 / 1e6,
            disk.join(", "),
            list(&in_memory).join(", ")
        );
    });
}
