//! wasmq: a durable message broker whose consumers are sandboxed WebAssembly plugins.
//!
//! Modules, in layers: each uses only modules listed before it, never one after it (so there is
//! no import cycle; `host/tests/layering.rs` checks that).
//! 1. Bottom: [`base`] (clock, name rule, time bounds),
//!    [`text`] (plugin text capped and escaped), [`secrets`] (`{"$secret": "NAME"}`), [`fds`]
//!    (descriptor budget), [`disk`] (quota), [`config`] (`wasmq.toml`, environment overrides).
//! 2. [`storage`]: the storage trait, its RocksDB backend (group commit, key encodings) and its
//!    NATS JetStream backend (scale-out); [`bindings`]: the WIT contract bound for the host.
//! 3. [`logs`] (plugin log rings and followers), [`metrics`] (counters and histograms the broker
//!    and dispatch update), [`capabilities`] (email, SMS, allow-listed HTTP, and the grants
//!    that allow them).
//! 4. [`runtime`]: wasmtime engine, instance limits, the imports plugins call, the one bounded
//!    instance pool, the plugin threads and their fair scheduler, and bounded compiles (in a
//!    child process); what it needs of the broker (kv, publish) is its [`runtime::Services`]
//!    trait.
//! 5. [`broker`]: topics, publish validation, queue selection (and `runtime::Services` for it).
//! 6. [`plugins`] (catalogue: versions, code, compiled artifacts), [`cluster`] (nodes, leases).
//! 7. [`txn`] (half messages and check-back) and [`dispatch`] (subscriptions and delivery:
//!    offsets, retries, dead letters, delays, broadcast; `dispatch::runner` split by concern).
//! 8. [`http`] (the JSON API; what is read at scrape time and the cluster view's lease names are
//!    put together here), [`cli`] (the `wasmq` verbs), and [`run`] below, which wires them.
//!
//! [`run`] serves the API on a listener until `shutdown` resolves; the binary and the tests
//! both start the server through it.

pub mod base;
pub mod bindings;
pub mod broker;
pub mod capabilities;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod disk;
pub mod dispatch;
pub mod fds;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod plugins;
pub mod runtime;
pub mod secrets;
pub mod storage;
pub mod text;
pub mod txn;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::capabilities::Capabilities;
use crate::config::{Backend, Config};
use crate::dispatch::Dispatcher;
use crate::plugins::Plugins;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::storage::{JetStreamStorage, RocksStorage, Storage};
use crate::txn::Transactions;
use tokio_util::sync::CancellationToken;

/// Opens storage, serves the API on `listener` until `shutdown` resolves, then finishes
/// in-flight requests and writes and closes storage cleanly.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_announced(listener, config, shutdown, |_| {}).await
}

/// [`run`], calling `ready` with the API's address once storage is open and subscriptions
/// started, just before requests are served: `wasmq serve` says "listening" there, so a data
/// dir another wasmq holds fails before anything claims the server is up (issue 26).
pub async fn run_announced(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr) + Send,
) -> anyhow::Result<()> {
    let config = checked(&listener, config)?;
    let storage = open_storage(&config).await?;
    let result = serve(listener, &config, storage.clone(), shutdown, ready).await;
    storage.close().await;
    result
}

/// [`run`] over a storage the caller opened (an embedder's own backend, or a wrapper around
/// one that a test uses to make reads come back short or append news get lost); closes it
/// when done. `config.storage` is not looked at: whether other nodes share the storage is
/// the storage's to say ([`Storage::shared`]).
pub async fn run_on(
    listener: TcpListener,
    config: Config,
    storage: Arc<dyn Storage>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = checked(&listener, config)?;
    let result = serve(listener, &config, storage.clone(), shutdown, |_| {}).await;
    storage.close().await;
    result
}

/// `config` checked against where it will listen, with the connection cap the process's
/// descriptors allow, and its data dir made.
fn checked(listener: &TcpListener, config: Config) -> anyhow::Result<Config> {
    let local = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false);
    if config.auth.tokens.is_empty() && !local {
        anyhow::bail!(
            "refusing to serve an open API on a non-loopback address: configure [auth] tokens \
             (or WASMQ_AUTH_TOKENS) or listen on 127.0.0.1"
        );
    }
    if config.auth.tokens.iter().any(|t| t.token.len() < 8) {
        anyhow::bail!("[auth] tokens must have at least 8 characters");
    }
    // Connections get only the descriptors storage leaves them.
    let mut config = config;
    config.server.max_connections =
        fds::connection_cap(config.server.max_connections, fds::raise_nofile())
            .map_err(anyhow::Error::msg)?;
    // The data dir holds RocksDB, and is where the disk guard looks, whatever the backend.
    std::fs::create_dir_all(&config.server.data_dir).with_context(|| {
        format!(
            "cannot create data dir {}",
            config.server.data_dir.display()
        )
    })?;
    Ok(config)
}

/// The storage `config` names: RocksDB in the data dir, or the JetStream cluster.
async fn open_storage(config: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    let storage: Arc<dyn Storage> = match config.storage.backend {
        Backend::Rocksdb => {
            let dir = config.server.data_dir.join("rocksdb");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create data dir {}", dir.display()))?;
            let flush = config.server.flush;
            let open_dir = dir.clone();
            let storage = tokio::task::spawn_blocking(move || RocksStorage::open(&open_dir, flush))
                .await?
                .with_context(|| {
                    format!(
                        "cannot open the database in {} (is another wasmq using it?)",
                        dir.display()
                    )
                })?;
            Arc::new(storage)
        }
        Backend::Jetstream => {
            let urls = &config.storage.urls;
            let replicas = config.storage.replicas as usize;
            Arc::new(
                JetStreamStorage::connect_as(urls, replicas, &config.server.node_id)
                    .await
                    .with_context(|| {
                        format!("cannot open JetStream storage at {}", urls.join(", "))
                    })?,
            )
        }
    };
    Ok(storage)
}

async fn serve(
    listener: TcpListener,
    config: &Config,
    storage: Arc<dyn Storage>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr) + Send,
) -> anyhow::Result<()> {
    let samplers = CancellationToken::new();
    let disk = disk::DiskGuard::new(
        &config.server.data_dir,
        config.limits.max_disk_bytes,
        config.limits.min_free_disk_bytes,
    );
    disk.spawn_sampler(samplers.clone());
    let _stop_sampling = samplers.drop_guard();
    let broker = Arc::new(
        Broker::new(storage.clone(), config.limits.clone())
            .await?
            .with_disk_guard(disk)
            .with_secrets(config.secrets.clone()),
    );
    let capabilities = Arc::new(Capabilities::new(config)?);
    let logs = capabilities.logs.clone();
    let runtime = Arc::new(Runtime::new(RuntimeConfig::from(config), capabilities)?);
    // The plugin threads stop when serving ends, however it ends (a dropped future too), so
    // nothing they hold outlives the server: storage is closed after them.
    let _plugin_threads = StopPluginThreads(runtime.clone());
    let plugins = Arc::new(Plugins::new(
        runtime,
        storage.clone(),
        config.limits.max_plugin_bytes,
        config.server.data_dir.join("artifacts"),
    ));
    let warm = plugins.clone();
    // Ends with serving, however serving ends: it holds the storage, which closes after this.
    let warming =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move { warm.warm_up().await }));
    let (backend, shared) = (storage.backend_name(), storage.shared());
    let loading = std::time::Instant::now();
    let transactions = Transactions::new(
        broker.clone(),
        plugins.clone(),
        config.transactions.clone(),
        (&config.retention).into(),
        shared,
    )
    .await?;
    tracing::info!(
        us = loading.elapsed().as_micros() as u64,
        "transactions loaded"
    );
    let api = format!("http://{}", listener.local_addr()?);
    let node = cluster::Node::start(storage.clone(), backend, api, &config.server.node_id).await?;
    let dispatcher = Arc::new(
        if shared {
            Dispatcher::shared(broker.clone(), plugins.clone(), node.id.clone())
        } else {
            Dispatcher::new(broker.clone(), plugins.clone())
        }
        .with_dead_letter_retention(
            config.retention.dead_letters_max_age_ms,
            config.retention.dead_letters_max_count,
        )
        .with_trace_retention(config.retention.trace_max_age_ms),
    );
    let checks = CancellationToken::new();
    // Serving that ends with an error (below) stops the checks, retention and listeners too.
    let _stop_checks = checks.clone().drop_guard();
    let closing = CancellationToken::new();
    let mut tallies = None;
    let checker = if shared {
        // Every node's log view holds the lines of all nodes' plugin instances, and every
        // node's status counts what all nodes delivered.
        logs.share(node.id.clone(), storage.clone(), checks.clone());
        tallies = Some(tokio::spawn(
            dispatcher.clone().listen_tallies(checks.clone()),
        ));
        // Each node runs the subscription queues it holds leases for, and one of them the
        // check-backs; work moves when a node dies.
        tokio::spawn(coordinate(
            storage.clone(),
            node.id.clone(),
            broker.clone(),
            dispatcher.clone(),
            transactions.clone(),
            checks.clone(),
        ))
    } else {
        // Alone on its storage: dispatches everything from the start.
        let starting = std::time::Instant::now();
        dispatcher.reconcile().await?;
        tracing::info!(
            us = starting.elapsed().as_micros() as u64,
            "subscriptions started"
        );
        tokio::spawn(transactions.clone().run(checks.clone()))
    };
    let retention = tokio::spawn(dispatcher.clone().run_retention(
        std::time::Duration::from_millis(config.retention.check_interval_ms),
        checks.clone(),
    ));
    let app = http::app(http::AppState::new(http::AppParts {
        broker,
        plugins,
        logs,
        dispatcher: dispatcher.clone(),
        transactions,
        node: node.clone(),
        tokens: Arc::new(config.auth.tokens.clone()),
        request_timeout: std::time::Duration::from_millis(config.server.request_timeout_ms),
        closing: closing.clone(),
        streams: Arc::new(http::streams::StreamLimits::new(
            match config.server.max_streams {
                0 => config.server.max_connections / 4,
                n => n,
            },
            config.server.max_streams_per_token,
        )),
        browser: Arc::new(http::guard::BrowserPolicy::new(
            listener.local_addr().ok(),
            &config.server.allowed_hosts,
            &config.server.allowed_origins,
        )),
    }));
    let shutdown = async move {
        shutdown.await;
        closing.cancel();
    };
    ready(listener.local_addr()?);
    let served = http::serve(listener, app, &config.server, shutdown)
        .await
        .context("HTTP server failed");
    // In-flight deliveries and checks finish, and their state is stored, before storage closes.
    checks.cancel();
    let _ = checker.await;
    let _ = retention.await;
    if let Some(listening) = tallies {
        let _ = listening.await;
    }
    warming.abort();
    let _ = warming.await;
    dispatcher.shutdown().await;
    node.stop().await;
    served
}

/// Stops the runtime's plugin threads when dropped ([`Runtime::shutdown`]).
struct StopPluginThreads(Arc<Runtime>);

impl Drop for StopPluginThreads {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// How long the check-back lease lasts unless renewed; a dead node's checks move after it.
const CHECKS_LEASE: std::time::Duration = std::time::Duration::from_secs(3);
/// How often a node looks for changes made on other nodes and for work to take over.
const RECONCILE: std::time::Duration = std::time::Duration::from_secs(1);

/// On a shared backend, every second: refreshes the topic cache, takes and gives up
/// subscription queues ([`Dispatcher::reconcile`]), and runs the transaction check-backs while
/// holding their lease, stopping them as soon as it is lost (before another node can take it);
/// the holder also finishes writes a dead node left half done ([`Storage::recover`]).
async fn coordinate(
    storage: Arc<dyn Storage>,
    node: String,
    broker: Arc<Broker>,
    dispatcher: Arc<Dispatcher>,
    transactions: Arc<Transactions>,
    stop: CancellationToken,
) {
    const KEY: &str = "transactions";
    /// Every fifth round (seconds) the check-back holder looks for half-done writes.
    const RECOVER_EVERY: u64 = 5;
    let mut rounds = 0u64;
    let mut checking: Option<Checking> = None;
    loop {
        if let Err(e) = broker.refresh_topics().await {
            tracing::warn!(error = %e, "cannot refresh topics");
        }
        if let Err(e) = dispatcher.reconcile().await {
            tracing::warn!(error = %e, "cannot reconcile subscriptions");
        }
        dispatcher.announce_tallies().await;
        match checking.take() {
            Some(c) if c.lease.held() => {
                if let Err(e) = transactions.reload().await {
                    tracing::warn!(error = %e, "cannot reload transactions");
                }
                // Half-done guarded appends (a commit whose messages a dead node never wrote).
                rounds += 1;
                if rounds.is_multiple_of(RECOVER_EVERY) {
                    match storage.recover(storage.recovery_age()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(n, "finished writes a dead node left half done"),
                        Err(e) => tracing::warn!(error = %e, "cannot recover half-done writes"),
                    }
                }
                checking = Some(c);
            }
            Some(c) => {
                c.stop().await;
                tracing::warn!(%node, "check-back lease lost; this node stopped checking");
            }
            None => match cluster::try_acquire(storage.as_ref(), KEY, &node, CHECKS_LEASE).await {
                Ok(Some(revision)) => {
                    let lease = cluster::HeldLease::adopt(
                        storage.clone(),
                        KEY,
                        &node,
                        revision,
                        CHECKS_LEASE,
                    );
                    let token = stop.child_token();
                    // Fencing: checks stop the moment the lease is lost.
                    tokio::spawn(cluster::fence(vec![lease.on_lost()], token.clone()));
                    let task = tokio::spawn(transactions.clone().run(token.clone()));
                    tracing::info!(%node, "this node runs transaction check-backs");
                    checking = Some(Checking { lease, token, task });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot take the check-back lease"),
            },
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(RECONCILE) => {}
        }
    }
    if let Some(c) = checking {
        c.stop().await;
    }
}

/// Check-backs this node runs under their lease.
struct Checking {
    lease: cluster::HeldLease,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Checking {
    /// Stops the checks (the one in progress finishes), then gives the lease up.
    async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
        self.lease.release().await;
    }
}
