//! What the benchmarks share: a real server on 127.0.0.1:0 over a temp dir, and the broker and
//! capabilities that plugin instances run against in the runtime benches.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use wasmq::config::{Config, FlushMode};
use wasmq_tests::plugins::LATENCY;

/// The allocator the `wasmq` binary ships with (`host/src/main.rs`): the server runs in this
/// process, so the benches measure it with the same one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every workload's message size (a JSON string body of this many bytes, quotes included).
pub const BODY_BYTES: usize = 256;

pub struct Server {
    pub url: String,
    pub http: reqwest::Client,
    running: Running,
    dir: tempfile::TempDir,
}

/// Where a bench's server runs.
enum Running {
    /// In this process ([`Server::start_in`]): its stop signal and its task.
    InProcess {
        stop: tokio::sync::oneshot::Sender<()>,
        handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
    /// The real binary in its own process ([`Server::spawn`]).
    Process(wasmq_tests::ChildServer),
}

impl Server {
    pub async fn start(flush: FlushMode) -> Self {
        Self::start_with(flush, |_| {}).await
    }

    /// A server with its config adjusted by `tune` (data dir and flush are set here).
    pub async fn start_with(flush: FlushMode, tune: impl FnOnce(&mut Config)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), flush, tune).await
    }

    /// A server over `dir` (kept by the server; [`Server::stop_keep_dir`] hands it back for a restart).
    pub async fn start_in(
        dir: tempfile::TempDir,
        flush: FlushMode,
        tune: impl FnOnce(&mut Config),
    ) -> Self {
        wasmq::capabilities::install_tls_provider();
        // As the binary does first thing.
        wasmq::base::without_huge_pages();
        let mut config = Config::default();
        tune(&mut config);
        config.server.data_dir = dir.path().to_path_buf();
        config.server.flush = flush;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut handle = tokio::spawn(wasmq::run(listener, config, async move {
            let _ = rx.await;
        }));
        let http = reqwest::Client::new();
        wasmq_tests::wait_healthy(&http, &url, &mut handle).await;
        Server {
            url,
            http,
            running: Running::InProcess { stop: tx, handle },
            dir,
        }
    }

    /// The real `wasmq` binary in its own process on 127.0.0.1, over a temp dir, as the peer
    /// brokers run: the bench's clients then have their own runtime and do not share the
    /// server's tokio workers (in one process a client task competed with the server's
    /// tasks on their two workers, which made every hand-off to another thread look dearer
    /// than it is beside an outside client). Stopped with SIGKILL.
    pub async fn spawn(flush: FlushMode) -> Self {
        use clap::ValueEnum as _;
        let dir = tempfile::tempdir().unwrap();
        let flush = flush.to_possible_value().unwrap();
        let child = wasmq_tests::ChildServer::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_wasmq")),
            dir.path(),
            &["--flush", flush.get_name()],
        )
        .await;
        Server {
            url: child.url.clone(),
            http: reqwest::Client::new(),
            running: Running::Process(child),
            dir,
        }
    }

    pub async fn put(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let r = self
            .http
            .put(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn upload(&self, name: &str, path: &str) {
        let bytes = std::fs::read(path).unwrap();
        let r = self
            .http
            .put(format!("{}/v1/plugins/{name}", self.url))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "upload {name}: {}", r.status());
    }

    /// Where this server keeps its data.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub async fn stop(self) {
        self.stop_keep_dir().await;
    }

    /// Stops the server (in this process cleanly, its own process with SIGKILL) and hands back
    /// the data dir, for a restart.
    pub async fn stop_keep_dir(self) -> tempfile::TempDir {
        match self.running {
            Running::InProcess { stop, handle } => {
                let _ = stop.send(());
                handle.await.unwrap().unwrap();
            }
            Running::Process(child) => child.kill().await,
        }
        self.dir
    }
}

/// The environment variable `name` parsed as a `T`, or `default` when unset or unparsable
/// (`WASMQ_BENCH_N` and the like narrow a bench run).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// One HTTP/1.1 keep-alive connection, as a producer that sends one request after another
/// holds it: the benches' client. A bare hyper connection, not reqwest's pooled client (which
/// parses and IDNA-checks the URL and looks up its pool on every request: up to a quarter of
/// the CPU of a one-message-per-request run on two cores shared with the server), so the
/// producer side costs about what redis-rs and async-nats cost the peers.
pub struct Conn {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    authority: String,
}

impl Conn {
    /// Connects to the server at `url` (`http://host:port`).
    pub async fn open(url: &str) -> Self {
        let authority = url.trim_start_matches("http://").to_string();
        let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn { send, authority }
    }

    /// POSTs `body` as JSON to `path`; the status and the whole answer.
    pub async fn post(
        &mut self,
        path: &str,
        body: bytes::Bytes,
    ) -> (reqwest::StatusCode, bytes::Bytes) {
        use http_body_util::BodyExt as _;
        self.send.ready().await.unwrap();
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(body))
            .unwrap();
        let resp = self.send.send_request(req).await.unwrap();
        let status = resp.status();
        let answer = resp.into_body().collect().await.unwrap().to_bytes();
        (status, answer)
    }
}

/// Publishes 256 B messages over HTTP from `clients` producers (one [`Conn`] each) for `secs`;
/// returns messages/s. `batch` 1 posts single messages, more posts batches.
pub async fn http_publish(flush: FlushMode, batch: usize, clients: usize, secs: f64) -> f64 {
    http_publish_to(Server::start(flush).await, batch, clients, secs).await
}

/// As [`http_publish`], to `server`.
pub async fn http_publish_to(server: Server, batch: usize, clients: usize, secs: f64) -> f64 {
    server.put("/v1/topics/bench", json!({"queues": 4})).await;
    // A JSON string body of exactly BODY_BYTES bytes, quotes included.
    let one = json!({"body": "x".repeat(BODY_BYTES - 2)});
    let (path, payload) = if batch == 1 {
        ("/v1/topics/bench/messages", one)
    } else {
        let msgs: Vec<Value> = (0..batch).map(|_| one.clone()).collect();
        ("/v1/topics/bench/messages/batch", json!({"messages": msgs}))
    };
    let payload = bytes::Bytes::from(serde_json::to_vec(&payload).unwrap());
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Conn::open(&server.url).await);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut conn in conns {
        let (payload, done, stop) = (payload.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, _) = conn.post(path, payload.clone()).await;
                assert_eq!(status, reqwest::StatusCode::CREATED);
                done.fetch_add(batch as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    server.stop().await;
    rate
}

/// A broker over RocksDB (async flush) in a temp dir and default capabilities: what the
/// runtime benches' plugin instances need for their context.
pub struct PluginHost {
    _dir: tempfile::TempDir,
    pub storage: Arc<dyn wasmq::storage::Storage>,
    pub broker: Arc<wasmq::broker::Broker>,
    pub capabilities: Arc<wasmq::capabilities::Capabilities>,
}

impl PluginHost {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn wasmq::storage::Storage> =
            Arc::new(wasmq::storage::RocksStorage::open(dir.path(), FlushMode::Async).unwrap());
        let broker = Arc::new(
            wasmq::broker::Broker::new(storage.clone(), wasmq::config::LimitsConfig::default())
                .await
                .unwrap(),
        );
        let capabilities =
            Arc::new(wasmq::capabilities::Capabilities::new(&Config::default()).unwrap());
        Self {
            _dir: dir,
            storage,
            broker,
            capabilities,
        }
    }
}

/// A message for a plugin call, built per call the way dispatch builds it from a stored message
/// (id rendered, body copied).
pub fn message(id: &uuid::Uuid, body: &[u8]) -> wasmq::bindings::Message {
    wasmq::bindings::Message {
        id: id.to_string(),
        topic: "bench".into(),
        queue: 0,
        offset: 0,
        key: Some("k".into()),
        tag: None,
        sharding_key: None,
        properties: vec![],
        body: body.to_vec(),
        born_at: 0,
        attempt: 1,
    }
}

/// Publishes to topic `lat` of `s` at `rate` msg/s for `secs` (batches of 10 every `10/rate`
/// s), each stamped with its send time, through the latency plugin (4 instances); returns the
/// latencies the plugin measured, in µs, sorted.
pub async fn latency(s: &Server, rate: u64, secs: u64) -> Vec<u64> {
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
    samples.sort_unstable();
    samples
}
