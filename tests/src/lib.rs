//! Helpers shared by the end-to-end tests: a real server on 127.0.0.1:0 over a temp dir, started
//! through the same `wasmq::run` the binary uses, and a JSON client for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wasmq::config::Config;

/// Real SMTP and HTTP peers (they live with the examples, which use them as downstreams).
pub use wasmq_examples::peers;

/// Paths of the plugins compiled from plugins/ by this crate's build script.
pub mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
}

pub mod unreliable;

/// A Python or JavaScript plugin of plugins/ (e.g. "email-notifier-py"), built by the code of
/// `wasmq plugin build` (which installs componentize-py / componentize-js when missing) into the
/// shared plugin target dir; rebuilt only when its inputs changed.
pub async fn polyglot_plugin(name: &str) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(name);
    let target = Path::new(plugins::TARGET_DIR).join("polyglot").join(name);
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        wasmq::cli::scaffold::build_plugin_in(&root, Some(&target))
            .unwrap_or_else(|e| panic!("building plugins/{name}: {e:#}"))
    })
    .await
    .expect("the build task panicked")
}

/// A server running inside the test process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Sends the logs of servers running inside the test process through the test harness's
/// output capture, so a failing test prints what its servers logged (a passing one prints
/// nothing unless run with `--nocapture`). `WASMQ_LOG` filters as it does for `wasmq serve`
/// (default `warn`). Installed once per test binary.
fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("WASMQ_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // Fails only when the binary installed its own subscriber: that one is kept.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Polls `{url}/healthz` of a server running in this process until it answers 2xx, or until
/// its task `handle` ends: then the panic carries `run`'s error (a data dir that would not
/// open, say), not a timeout's guess. Every millisecond (the benches time restarts through
/// it); two minutes only catch a start that hangs (one takes milliseconds). The tests' and
/// the benches' in-process servers start through it.
pub async fn wait_healthy(
    client: &reqwest::Client,
    url: &str,
    handle: &mut JoinHandle<anyhow::Result<()>>,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            !left.is_zero(),
            "the server at {url} neither answered nor ended in two minutes"
        );
        // Bounded too: the listener is bound before `run` starts, so a start that hangs takes
        // the connection and never answers.
        if let Ok(r) = client
            .get(format!("{url}/healthz"))
            .timeout(left)
            .send()
            .await
            && r.status().is_success()
        {
            return;
        }
        if handle.is_finished() {
            match handle.await {
                Ok(Err(e)) => panic!("the server at {url} did not start: {e:#}"),
                ended => panic!("the server at {url} ended before it answered: {ended:?}"),
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// A config whose data lives in `dir`.
pub fn config_in(dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.data_dir = dir.to_path_buf();
    c
}

impl TestServer {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(config_in(dir)).await
    }

    pub async fn start_with(config: Config) -> Self {
        Self::start_served(|listener, stop| tokio::spawn(wasmq::run(listener, config, stop))).await
    }

    /// A server over `storage` (see [`wasmq::run_on`]), e.g. an [`unreliable::Unreliable`].
    pub async fn start_on(
        config: Config,
        storage: std::sync::Arc<dyn wasmq::storage::Storage>,
    ) -> Self {
        Self::start_served(|listener, stop| {
            tokio::spawn(wasmq::run_on(listener, config, storage, stop))
        })
        .await
    }

    async fn start_served<S>(serve: S) -> Self
    where
        S: FnOnce(
            tokio::net::TcpListener,
            futures::future::BoxFuture<'static, ()>,
        ) -> JoinHandle<anyhow::Result<()>>,
    {
        capture_logs();
        wasmq::capabilities::install_tls_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let mut handle = serve(
            listener,
            Box::pin(async move {
                let _ = rx.await;
            }),
        );
        let (url, client) = (format!("http://{addr}"), reqwest::Client::new());
        wait_healthy(&client, &url, &mut handle).await;
        TestServer {
            addr,
            url,
            client,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Graceful stop: in-flight requests finish, storage closes; returns `run`'s result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => h.await?,
            None => Ok(()),
        }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        decode(
            self.client
                .get(format!("{}{path}", self.url))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        decode(
            self.client
                .delete(format!("{}{path}", self.url))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        decode(
            self.client
                .put(format!("{}{path}", self.url))
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        decode(
            self.client
                .post(format!("{}{path}", self.url))
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Sends raw bytes, for malformed and oversized bodies.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        decode(
            self.client
                .post(format!("{}{path}", self.url))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Publishes `{"n": 0..n}` bodies to `topic` in one batch and checks they were stored.
    pub async fn publish_numbered(&self, topic: &str, n: usize) {
        let messages: Vec<Value> = (0..n)
            .map(|i| serde_json::json!({"body": {"n": i}}))
            .collect();
        self.publish_batch(topic, messages).await;
    }

    /// Publishes `messages` (envelopes) to `topic` in one batch and checks they were stored.
    pub async fn publish_batch(&self, topic: &str, messages: Vec<Value>) -> Value {
        let (status, body) = self
            .post_json(
                &format!("/v1/topics/{topic}/messages/batch"),
                &serde_json::json!({ "messages": messages }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Creates a topic and checks it was created.
    pub async fn create_topic(&self, name: &str, queues: u32) {
        let (status, body) = self
            .put_json(
                &format!("/v1/topics/{name}"),
                &serde_json::json!({"queues": queues}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Status and JSON body; a non-JSON body is a test failure (every answer must be JSON).
pub async fn decode(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("non-JSON answer ({status}): {text:?}: {e}"));
    (status, value)
}

/// Asserts an error answer has the given status and code, and a message.
pub fn assert_error(resp: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(resp.0, status, "{}", resp.1);
    assert_eq!(resp.1["error"]["code"], code, "{}", resp.1);
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        resp.1
    );
}

/// A real `nats-server` with JetStream on 127.0.0.1 (a free port, a temp store dir), killed on
/// drop. `nats-server` comes from Debian (`.ci/setup` installs it); messages up to 8 MB.
pub struct NatsServer {
    pub child: tokio::process::Child,
    pub url: String,
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsServer {
    pub async fn start() -> Self {
        Self::start_with(free_port(), "").await
    }

    /// Starts one server on `port`, with `extra` configuration (cluster settings).
    async fn start_with(port: u16, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{ store_dir: {:?} }}\n{extra}",
                dir.path().join("js").display().to_string()
            ),
        )
        .unwrap();
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = tokio::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server (apt-get install nats-server; .ci/setup does)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            port,
            _dir: dir,
        }
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// A JetStream cluster of `n` nats-servers on 127.0.0.1 (R3 streams need 3), ready once it
/// has elected a meta leader.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start(n: usize) -> Self {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut servers = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .filter(|(p, _)| p != port)
                .map(|(_, r)| format!("nats-route://127.0.0.1:{r}"))
                .collect();
            let extra = format!(
                "server_name: n{i}\ncluster {{ name: wasmq-test\n listen: 127.0.0.1:{route}\n routes: [{}] }}\n",
                routes.join(", ")
            );
            servers.push(NatsServer::start_with(*port, &extra).await);
        }
        let cluster = NatsCluster { servers };
        // JetStream answers once the meta group has a leader.
        let addrs: Vec<async_nats::ServerAddr> =
            cluster.urls().iter().map(|u| u.parse().unwrap()).collect();
        let client = async_nats::connect(addrs).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while js.get_stream("wasmq-probe-none").await.is_err_and(|e| {
            !matches!(
                e.kind(),
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(_)
            )
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "the JetStream cluster elected no leader"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url.clone()).collect()
    }
}

/// The owner of each live queue lease of subscription `group`, by queue, in a `/v1/cluster`
/// answer.
pub fn queue_owners(view: &Value, group: &str) -> std::collections::BTreeMap<u64, String> {
    view["leases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["subscription"] == group && l["expired"] == false)
        .filter_map(|l| Some((l["queue"].as_u64()?, l["owner"].as_str()?.to_string())))
        .collect()
}

/// The real `wasmq` binary running as a child process (for crash and CLI tests).
pub struct ChildServer {
    pub child: tokio::process::Child,
    pub url: String,
}

impl ChildServer {
    /// Starts `bin serve --listen 127.0.0.1:0 --data-dir dir` and waits for its address line.
    pub async fn start(bin: &Path, dir: &Path, extra: &[&str]) -> Self {
        let mut command = tokio::process::Command::new(bin);
        command.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]);
        Self::spawn(command, dir, extra).await
    }

    /// As [`ChildServer::start`], under an open-files limit (soft and hard) of `nofile`, as a
    /// service manager may impose (systemd's default soft limit is 1024).
    pub async fn start_with_nofile(bin: &Path, dir: &Path, extra: &[&str], nofile: u64) -> Self {
        let mut command = tokio::process::Command::new("sh");
        command
            .args(["-c", r#"ulimit -n "$0" && exec "$@""#])
            .arg(nofile.to_string())
            .arg(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]);
        Self::spawn(command, dir, extra).await
    }

    async fn spawn(mut command: tokio::process::Command, dir: &Path, extra: &[&str]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        wasmq::capabilities::install_tls_provider();
        let mut child = command
            .arg(dir)
            .args(extra)
            .env("WASMQ_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
            .await
            .expect("server did not print its address in time")
            .unwrap()
            .expect("server exited before printing its address");
        let url = line.rsplit(' ').next().unwrap().to_string();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "unexpected first line {line:?}"
        );
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ChildServer { child, url }
    }

    /// SIGKILL: no shutdown path runs.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// Sends a signal (e.g. SIGTERM) and waits for the exit status.
    pub async fn signal_and_wait(mut self, signal: i32) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait())
            .await
            .unwrap()
            .unwrap()
    }
}

impl TestServer {
    /// Uploads a plugin file; returns status and answer.
    pub async fn upload_plugin(&self, name: &str, path: &str) -> (StatusCode, Value) {
        let bytes = std::fs::read(path).unwrap();
        self.upload_bytes(name, bytes).await
    }

    pub async fn upload_bytes(&self, name: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        upload_bytes_to(&self.client, &self.url, name, bytes).await
    }

    /// Runs a plugin's `handle` on a message with this JSON body through the invoke API.
    pub async fn invoke(&self, plugin: &str, body: Value) -> Value {
        let (status, v) = self
            .post_json(
                &format!("/v1/plugins/{plugin}/invoke"),
                &serde_json::json!({"message": {"body": body}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }
}

impl TestServer {
    /// Every message body of one queue of a topic, in offset order.
    pub async fn read_queue(&self, topic: &str, queue: u32) -> Vec<Value> {
        read_queue(&self.client, &self.url, topic, queue).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let resp = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    }

    /// Creates a subscription and checks it was created.
    pub async fn subscribe(&self, group: &str, spec: Value) -> Value {
        let (status, v) = self
            .put_json(&format!("/v1/subscriptions/{group}"), &spec)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    /// Polls `GET path` until `done` holds for the answer; panics after `secs`.
    pub async fn wait_until(&self, path: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let (_, v) = self.get(path).await;
            if done(&v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting on {path}: {v}\n{}",
                self.diagnosis().await
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// What a timed-out wait prints besides the answer it waited on: the status of every
    /// subscription (per queue: committed offset, high water, in flight, node) and, on shared
    /// storage, the cluster view with its leases.
    pub async fn diagnosis(&self) -> String {
        let (_, subscriptions) = self.get("/v1/subscriptions").await;
        let mut out = format!("subscriptions: {subscriptions}");
        let (st, cluster) = self.get("/v1/cluster").await;
        if st == StatusCode::OK {
            out.push_str(&format!("\ncluster: {cluster}"));
        }
        out
    }

    /// Waits until the audit topic (one queue) holds at least `n` records, then returns them.
    pub async fn wait_audit(&self, topic: &str, n: u64, secs: u64) -> Vec<Value> {
        self.wait_until(&format!("/v1/topics/{topic}"), secs, |t| {
            t["messages"].as_u64().unwrap_or(0) >= n
        })
        .await;
        self.read_queue(topic, 0).await
    }

    /// When the last of the audit records in `audit` was handled (ms since the epoch, the
    /// server's clock).
    pub async fn last_handled_at(&self, audit: &str) -> u64 {
        self.read_queue(audit, 0)
            .await
            .iter()
            .filter_map(|a| a["handled_at"].as_u64())
            .max()
            .unwrap()
    }

    /// When the last dead letter of `group` whose reason contains `reason` died (ms since the
    /// epoch, the server's clock).
    pub async fn last_dead_at(&self, group: &str, reason: &str) -> u64 {
        let (st, dlq) = self
            .get(&format!("/v1/subscriptions/{group}/dlq?limit=1000"))
            .await;
        assert_eq!(st, StatusCode::OK, "{dlq}");
        dlq["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"].as_str().is_some_and(|r| r.contains(reason)))
            .filter_map(|e| e["dead_at"].as_u64())
            .max()
            .unwrap_or_else(|| panic!("no dead letter of {group} says {reason:?}: {dlq}"))
    }

    /// Publishes `n` bodies `{"sent_at": <ms>}` to `topic`, 25 ms apart, and waits until the
    /// recorder subscription on it has recorded all of them in `audit`: the publish→handle
    /// latencies in ms, sorted (how a well-behaved subscription fares beside others).
    pub async fn trickle_latencies(&self, topic: &str, audit: &str, n: u64) -> Vec<u64> {
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        for _ in 0..n {
            let (st, v) = self
                .post_json(
                    &format!("/v1/topics/{topic}/messages"),
                    &serde_json::json!({"body": {"sent_at": now_ms()}}),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let mut latencies: Vec<u64> = self
            .wait_audit(audit, n, 60)
            .await
            .iter()
            .map(|a| a["handled_at"].as_u64().unwrap() - a["body"]["sent_at"].as_u64().unwrap())
            .collect();
        latencies.sort_unstable();
        latencies
    }
}

/// Uploads a component as plugin `name` to the server at `url`; status and answer.
pub async fn upload_bytes_to(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    bytes: Vec<u8>,
) -> (StatusCode, Value) {
    decode(
        client
            .put(format!("{url}/v1/plugins/{name}"))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Uploads the plugin file at `path` as `name` to the server at `url`; status and answer.
pub async fn upload_plugin_to(url: &str, name: &str, path: &str) -> (StatusCode, Value) {
    let bytes = std::fs::read(path).unwrap();
    upload_bytes_to(&reqwest::Client::new(), url, name, bytes).await
}

/// Every message body of one queue of a topic on the server at `url`, in offset order.
pub async fn read_queue(
    client: &reqwest::Client,
    url: &str,
    topic: &str,
    queue: u32,
) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let path = format!(
            "{url}/v1/topics/{topic}/messages?queue={queue}&from={}&limit=1000",
            out.len()
        );
        let (status, page) = decode(client.get(path).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let msgs = page["messages"].as_array().unwrap();
        if msgs.is_empty() {
            return out;
        }
        out.extend(msgs.iter().map(|m| m["body"].clone()));
    }
}

/// A component whose one core module has a start function with 4 000 `i64` locals, all
/// rewritten inside 200 nested loops (~100 kB): cheap to validate, very costly for the
/// compiler's SSA construction and register allocation (every loop header carries every local):
/// 414 CPU-seconds on the 2-core machine of issue 22, whose input (a start function with 2 000
/// locals) took 115. `salt` makes distinct bytes.
pub fn costly_component(salt: u32) -> Vec<u8> {
    use wasm_encoder::{
        BlockType, CodeSection, Component, Function, FunctionSection, Instruction, Module,
        ModuleSection, StartSection, TypeSection, ValType,
    };
    const LOCALS: u32 = 4000;
    const DEPTH: u32 = 200;
    let mut types = TypeSection::new();
    types.ty().function([], []);
    let mut funcs = FunctionSection::new();
    funcs.function(0);
    let mut f = Function::new([(LOCALS, ValType::I64)]);
    f.instruction(&Instruction::I64Const(i64::from(salt)));
    f.instruction(&Instruction::LocalSet(0));
    for _ in 0..DEPTH {
        f.instruction(&Instruction::Loop(BlockType::Empty));
    }
    for n in 0..10_000u32 {
        f.instruction(&Instruction::LocalGet(n.wrapping_mul(7) % LOCALS));
        f.instruction(&Instruction::LocalGet((n.wrapping_mul(13) + 1) % LOCALS));
        f.instruction(&Instruction::I64Add);
        f.instruction(&Instruction::LocalSet((n.wrapping_mul(17) + 3) % LOCALS));
    }
    for d in 0..DEPTH {
        f.instruction(&Instruction::LocalGet(d));
        f.instruction(&Instruction::I64Eqz);
        f.instruction(&Instruction::BrIf(0));
        f.instruction(&Instruction::End);
    }
    f.instruction(&Instruction::End);
    let mut code = CodeSection::new();
    code.function(&f);
    let mut module = Module::new();
    module.section(&types);
    module.section(&funcs);
    module.section(&StartSection { function_index: 0 });
    module.section(&code);
    let mut component = Component::new();
    component.section(&ModuleSection(&module));
    component.finish()
}

/// Asserts `storage` holds nothing of the deleted `topic` (its `queues` queues empty, no
/// message under business key `key`, no idempotency records) and nothing of the deleted
/// subscriptions `groups`: records, offsets, timers, dead letters and their count, delivery
/// counters, completion markers, kv.
pub async fn assert_nothing_left(
    storage: &dyn wasmq::storage::Storage,
    topic: &str,
    queues: u32,
    key: &str,
    groups: &[&str],
) {
    for q in 0..queues {
        let e = storage.extent(topic, q).await.unwrap();
        assert_eq!(
            (e.low_water, e.bytes),
            (e.high_water, 0),
            "queue {q}: {e:?}"
        );
        assert!(storage.read(topic, q, 0, 10).await.unwrap().is_empty());
    }
    assert!(
        storage
            .messages_by_key(topic, key, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let mut records = vec![("topic".to_string(), topic.to_string())];
    let mut spaces = vec![format!("idem/{topic}")];
    for g in groups {
        records.push(("sub".into(), g.to_string()));
        records.push((wasmq::dispatch::dlq::COUNT_SPACE.into(), g.to_string()));
        records.push((
            wasmq::dispatch::dlq::count_space(g),
            wasmq::dispatch::dlq::COUNT_KEY.into(),
        ));
        records.push(("pin-built".into(), g.to_string()));
        for space in ["cursor", "timer", "dlq", "pin", "counts", "done", "kvsub"] {
            spaces.push(format!("{space}/{g}"));
        }
    }
    for (space, key) in records {
        let r = storage.get_record(&space, &key).await.unwrap();
        assert!(r.is_none(), "{space}/{key} is left");
    }
    for space in spaces {
        let left = storage.list_records(&space, "", 10).await.unwrap();
        assert!(left.is_empty(), "{space} holds {left:?}");
    }
}
