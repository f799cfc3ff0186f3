//! wasmq: a durable message broker whose consumers are sandboxed WebAssembly plugins.
//!
//! Components:
//! - [`config`]: `wasmq.toml`, environment overrides and defaults.
//! - [`storage`]: the storage trait, its RocksDB backend (group commit, key encodings) and its
//!   NATS JetStream backend (scale-out).
//! - [`broker`]: topics, publish validation, queue selection.
//! - [`runtime`]: wasmtime engine, limits, plugin instances and the imports they call.
//! - [`capabilities`]: email (SMTP), SMS (gateway) and allow-listed HTTP for plugins.
//! - [`dispatch`]: subscriptions and delivery (offsets, retries, DLQ, delays, broadcast).
//! - [`disk`]: the disk quota that turns a filling disk into a retryable 503.
//! - [`logs`]: plugin log lines: a bounded ring per plugin and live followers.
//! - [`metrics`]: Prometheus counters and histograms of publishing and delivery.
//! - [`txn`]: transactional (half) messages and their check-back.
//! - [`plugins`]: the plugin catalogue (versions, stored bytes and compiled artifacts).
//! - [`http`]: the JSON API.
//! - [`cli`]: the `wasmq` command line (server and client verbs).
//!
//! [`run`] serves the API on a listener until `shutdown` resolves; the binary and the tests
//! both start the server through it.

pub mod broker;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod disk;
pub mod dispatch;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod plugins;
pub mod runtime;
pub mod storage;
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
                JetStreamStorage::connect(urls, replicas)
                    .await
                    .with_context(|| {
                        format!("cannot open JetStream storage at {}", urls.join(", "))
                    })?,
            )
        }
    };
    let result = serve(listener, &config, storage.clone(), shutdown).await;
    storage.close().await;
    result
}

async fn serve(
    listener: TcpListener,
    config: &Config,
    storage: Arc<dyn Storage>,
    shutdown: impl Future<Output = ()> + Send + 'static,
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
            .with_disk_guard(disk),
    );
    let capabilities = Arc::new(Capabilities::new(config)?);
    let runtime = Arc::new(Runtime::new(
        RuntimeConfig {
            timeout_ms: config.plugins.timeout_ms,
            memory_bytes: (config.plugins.memory_mb * 1024 * 1024) as usize,
            pool_instances: config.plugins.pool_instances,
        },
        capabilities,
    )?);
    let plugins = Arc::new(Plugins::new(
        runtime,
        storage,
        config.limits.max_plugin_bytes,
    ));
    let warm = plugins.clone();
    tokio::spawn(async move { warm.warm_up().await });
    let dispatcher = Arc::new(Dispatcher::new(broker.clone(), plugins.clone()));
    dispatcher.start_all().await?;
    let transactions =
        Transactions::new(broker.clone(), plugins.clone(), config.transactions.clone()).await?;
    let checks = CancellationToken::new();
    let closing = CancellationToken::new();
    let checker = tokio::spawn(transactions.clone().run(checks.clone()));
    let app = http::app(http::AppState {
        broker,
        plugins,
        dispatcher: dispatcher.clone(),
        transactions,
        tokens: Arc::new(config.auth.tokens.clone()),
        request_timeout: std::time::Duration::from_millis(config.server.request_timeout_ms),
        closing: closing.clone(),
    });
    let shutdown = async move {
        shutdown.await;
        closing.cancel();
    };
    let served = http::serve(listener, app, &config.server, shutdown)
        .await
        .context("HTTP server failed");
    // In-flight deliveries and checks finish, and their state is stored, before storage closes.
    checks.cancel();
    let _ = checker.await;
    dispatcher.shutdown().await;
    served
}
