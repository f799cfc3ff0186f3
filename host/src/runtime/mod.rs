//! The plugin runtime: one wasmtime `Engine` (epoch interruption, pooling allocator), component
//! validation and compilation, `InstancePre` per plugin version, the one bounded instance pool
//! ([`Runtime::lease`]), the plugin threads and their fair scheduler ([`fair`]), and instances
//! with a CPU budget, a wall-clock deadline and a memory cap (the sum of all their memories)
//! per call. Traps, deadlines and memory overruns become [`InvokeError`]s; the host never
//! crashes because of a plugin.

pub mod compile;
pub mod fair;
pub mod host;
mod instance;
mod limits;
mod pool;
mod staged;

use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};

use crate::bindings::{CHECKER_EXPORT, CONSUMER_EXPORT, checker, consumer};
pub use compile::{CompileLimits, compile_worker};
pub use fair::{CallClock, Scheduler, Tenant};
pub use host::{HostState, InstanceContext, PluginLimits, Services};
use instance::classify;
pub use instance::{BATCH_QUANTUM, PluginInstance};
pub use pool::{Lease, PoolKey, PoolStats};
pub use staged::{CommitError, Staged};

/// How often the engine's epoch advances: CPU budgets are checked, and running calls yield, at
/// each tick.
pub const TICK: Duration = Duration::from_millis(10);

/// Runtime settings (from `[plugins]`).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// CPU budget of one call.
    pub timeout_ms: u64,
    /// Linear memory cap of one instance.
    pub memory_bytes: usize,
    /// Instances the pooling allocator reserves room for; 0 = allocate on demand.
    pub pool_instances: u32,
    /// Threads that run plugin calls, and calls that run wasm at once; 0 = one per core.
    pub threads: usize,
    /// How compiles are bounded.
    pub compile: CompileLimits,
    /// How long stopping a subscription waits for its running calls before cutting them off.
    pub stop_grace_ms: u64,
}

impl From<&crate::config::Config> for RuntimeConfig {
    /// The `[plugins]` section's limits, threads and compile bounds.
    fn from(config: &crate::config::Config) -> Self {
        let p = &config.plugins;
        RuntimeConfig {
            timeout_ms: p.timeout_ms,
            memory_bytes: usize::try_from(p.memory_mb.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            pool_instances: p.pool_instances,
            threads: p.threads as usize,
            compile: CompileLimits {
                cpu_ms: p.compile_timeout_ms,
                memory_bytes: p.compile_memory_mb.saturating_mul(1 << 20),
                max_compiles: p.max_compiles as usize,
                worker: p.compile_worker.clone(),
            },
            stop_grace_ms: p.stop_grace_ms,
        }
    }
}

/// The nice value of the plugin threads and compile children (the broker's own threads run at
/// the process's, usually 0).
const PLUGIN_NICE: i32 = 10;

/// The most instances that exist at once when the pooling allocator is off.
const MAX_ON_DEMAND_INSTANCES: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CompileError {
    #[error("the upload is not WebAssembly (no \\0asm header)")]
    NotWasm,
    #[error(
        "the upload is a core WebAssembly module, not a component; build for wasm32-wasip2 or run `wasm-tools component new`"
    )]
    CoreModule,
    #[error("the upload is not a valid component: {0}")]
    Invalid(String),
    #[error(
        "the component exports neither {CONSUMER_EXPORT} nor {CHECKER_EXPORT}; target the consumer-plugin, checker-plugin or plugin world of wit/wasmq.wit"
    )]
    UnknownWorld,
    #[error("the component needs imports this host does not provide: {0}")]
    UnsupportedImports(String),
    #[error("the component is too costly to compile: {0}")]
    Budget(String),
    /// The compile ran past its wall-clock bound without using up its CPU: the machine was
    /// busy, not the component too costly, so a retry compiles again (not remembered).
    #[error("compiling took too long on a busy machine; try again: {0}")]
    TookTooLong(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    #[error("the plugin ran past its CPU deadline of {0} ms")]
    Timeout(u64),
    #[error(
        "the plugin call ran past its deadline of {0} ms of wall-clock time (sleeps, waits and capability calls count)"
    )]
    WallClock(u64),
    #[error("the plugin exceeded its memory limit of {0} bytes")]
    MemoryLimit(usize),
    #[error("the plugin trapped: {0}")]
    Trap(String),
    #[error("the plugin does not export {0}")]
    MissingExport(&'static str),
    #[error("the plugin could not be instantiated: {0}")]
    Instantiate(String),
}

impl InvokeError {
    /// A short stable name, for metrics and API answers.
    pub fn kind(&self) -> &'static str {
        match self {
            InvokeError::Timeout(_) | InvokeError::WallClock(_) => "timeout",
            InvokeError::MemoryLimit(_) => "memory_limit",
            InvokeError::Trap(_) => "trap",
            InvokeError::MissingExport(_) => "missing_export",
            InvokeError::Instantiate(_) => "instantiate",
        }
    }
}

/// A plugin's answer, as JSON: `{"type":"ack"}`, `{"type":"retry","after_ms":N}`,
/// `{"type":"reject","reason":"..."}` (the WIT `outcome` variant).
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutcomeView {
    Ack,
    /// Deliver again after `after_ms` milliseconds (0: the subscription's backoff).
    Retry {
        after_ms: u64,
    },
    /// Never deliver again: to the dead-letter queue with this reason.
    Reject {
        reason: String,
    },
}

impl From<&crate::bindings::Outcome> for OutcomeView {
    fn from(o: &crate::bindings::Outcome) -> Self {
        use crate::bindings::Outcome;
        match o {
            Outcome::Ack => OutcomeView::Ack,
            Outcome::Retry(ms) => OutcomeView::Retry { after_ms: *ms },
            Outcome::Reject(reason) => OutcomeView::Reject {
                reason: reason.clone(),
            },
        }
    }
}

/// Why a call gave no answer: `kind` is `trap`, `timeout`, `memory` or another
/// [`InvokeError::kind`], `message` the engine's words.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct FailureView {
    pub kind: &'static str,
    pub message: String,
}

impl From<&InvokeError> for FailureView {
    fn from(e: &InvokeError) -> Self {
        FailureView {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// Counters for metrics, tests and benchmarks.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    pub compiles: Counter,
    pub artifact_loads: Counter,
    pub instantiations: Counter,
    pub calls: Counter,
}

impl RuntimeStats {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry;
        r.register(
            "wasmq_plugin_compiles",
            "Components compiled from WebAssembly bytes",
            self.compiles.clone(),
        );
        r.register(
            "wasmq_plugin_artifact_loads",
            "Compiled artifacts loaded from the local cache",
            self.artifact_loads.clone(),
        );
        r.register(
            "wasmq_plugin_instantiations",
            "Plugin instances created",
            self.instantiations.clone(),
        );
        r.register(
            "wasmq_plugin_calls",
            "Plugin export calls",
            self.calls.clone(),
        );
    }
}

/// A validated, compiled plugin version, ready to instantiate.
pub struct PluginCode {
    pre: InstancePre<HostState>,
    consumer: Option<consumer::GuestIndices>,
    checker: Option<checker::GuestIndices>,
}

impl PluginCode {
    /// The interfaces it exports, by WIT name.
    pub fn exports(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.consumer.is_some() {
            out.push(CONSUMER_EXPORT);
        }
        if self.checker.is_some() {
            out.push(CHECKER_EXPORT);
        }
        out
    }

    pub fn has_consumer(&self) -> bool {
        self.consumer.is_some()
    }

    /// Whether the component imports the kv interface (`wasmq:plugin/kv` of wit/wasmq.wit);
    /// one that does not can neither read nor write kv state.
    pub fn imports_kv(&self) -> bool {
        let component = self.pre.component();
        component
            .component_type()
            .imports(component.engine())
            .any(|(name, _)| name.split('@').next() == Some("wasmq:plugin/kv"))
    }

    pub fn has_checker(&self) -> bool {
        self.checker.is_some()
    }
}

pub struct Runtime {
    capabilities: Arc<crate::capabilities::Capabilities>,
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    stats: RuntimeStats,
    ticker_stop: Arc<AtomicBool>,
    pool: pool::Pool,
    sched: Arc<Scheduler>,
    /// Plugin calls run on these threads, apart from the HTTP API's.
    executor: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
    executor_handle: tokio::runtime::Handle,
    /// Turns for compiles (`compile.max_compiles`).
    compiles: tokio::sync::Semaphore,
    compile_limits: CompileLimits,
    /// Instances the engine's pooling allocator holds (0: it allocates on demand), as a
    /// compile worker must configure its engine alike.
    pooled_instances: u32,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        // Dropping a tokio runtime blocks, which an async caller may not do.
        let executor = self
            .executor
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(executor) = executor {
            executor.shutdown_background();
        }
    }
}

fn engine_config(config: &RuntimeConfig, pooling: bool) -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true);
    c.epoch_interruption(true);
    c.max_wasm_stack(1024 * 1024);
    c.async_stack_size(4 * 1024 * 1024);
    if pooling {
        let n = config.pool_instances.max(1);
        let mut p = PoolingAllocationConfig::default();
        p.total_component_instances(n);
        // Components from Python or JS toolchains have many core instances and tables.
        p.total_core_instances(n.saturating_mul(8));
        p.total_memories(n.saturating_mul(2));
        p.total_tables(n.saturating_mul(4));
        p.total_stacks(n);
        p.max_core_instances_per_component(64);
        p.max_memories_per_component(8);
        p.max_tables_per_component(16);
        p.max_memory_size(config.memory_bytes);
        p.max_component_instance_size(1 << 20);
        p.max_core_instance_size(1 << 20);
        p.table_elements(100_000);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
        // Small reservations keep the pool's virtual footprint proportional to the memory cap.
        c.memory_reservation(
            (config.memory_bytes as u64)
                .next_power_of_two()
                .max(1 << 24),
        );
        c.memory_guard_size(1 << 16);
    }
    c
}

impl Runtime {
    pub fn new(
        config: RuntimeConfig,
        capabilities: Arc<crate::capabilities::Capabilities>,
    ) -> anyhow::Result<Self> {
        let (engine, pooled_instances) = match config.pool_instances {
            0 => (Engine::new(&engine_config(&config, false))?, 0),
            n => match Engine::new(&engine_config(&config, true)) {
                Ok(e) => (e, n),
                Err(e) => {
                    tracing::warn!(error = %e, "pooling allocator unavailable; allocating instances on demand");
                    (Engine::new(&engine_config(&config, false))?, 0)
                }
            },
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        crate::bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )?;
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        };
        // One thread more than calls may run wasm at once: while every slot runs a call, a
        // thread is still free to take a woken worker (a healthy subscription's next message)
        // at once, so it can ask the scheduler for a slot and preempt; otherwise it would wait
        // in tokio's queues behind the running calls' tasks (measured: ~100 calls/s beside 4
        // loops, one per epoch tick).
        let executor = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads + 1)
            .thread_name("wasmq-plugin")
            // Below the broker's own threads (API, dispatch, storage writer) at the OS level:
            // looping plugins cannot hold the cores those need (on Linux the nice value is per
            // thread, and `None` is the calling one).
            .on_thread_start(|| {
                if let Err(e) = rustix::process::setpriority_process(None, PLUGIN_NICE) {
                    tracing::debug!(error = %e, "cannot lower the plugin threads' priority");
                }
            })
            .enable_all()
            .build()?;
        let executor_handle = executor.handle().clone();
        let weak = engine.weak();
        let sched = Arc::new(Scheduler::new(threads, move || {
            if let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
            }
        }));
        let max_live = match config.pool_instances {
            0 => MAX_ON_DEMAND_INSTANCES,
            n => n as usize,
        };
        let compile_limits = config.compile.clone();
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (weak, stop, weak_sched) = (engine.weak(), ticker_stop.clone(), Arc::downgrade(&sched));
        std::thread::Builder::new()
            .name("wasmq-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                    if let Some(sched) = weak_sched.upgrade() {
                        sched.tick();
                    }
                }
            })?;
        Ok(Self {
            capabilities,
            engine,
            linker,
            config,
            stats: RuntimeStats::default(),
            ticker_stop,
            pool: pool::Pool::new(max_live),
            sched,
            executor: std::sync::Mutex::new(Some(executor)),
            executor_handle,
            compiles: tokio::sync::Semaphore::new(compile_limits.max_compiles.max(1)),
            compile_limits,
            pooled_instances,
        })
    }

    /// Runs `fut` on the plugin threads (where every plugin call should run, apart from the
    /// threads that serve the API).
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.executor_handle.spawn(fut)
    }

    /// Stops the plugin threads and drops every task on them and every idle instance, and
    /// returns once they are gone (at most 10 s): what they held (the broker, its storage) is
    /// released before the server closes storage or the process exits. The server calls it
    /// when it stops (or its future is dropped); plugin calls fail afterwards. Blocks the
    /// calling thread, though not through tokio (a helper thread waits for the executor).
    pub fn shutdown(&self) {
        let executor = self
            .executor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(executor) = executor {
            let stopper = std::thread::Builder::new()
                .name("wasmq-plugin-stop".into())
                .spawn(move || executor.shutdown_timeout(Duration::from_secs(10)));
            match stopper {
                Ok(t) => {
                    let _ = t.join();
                }
                Err(e) => tracing::warn!(error = %e, "cannot stop the plugin threads in order"),
            }
        }
        self.pool.forget(|_| true);
    }

    /// The plugin threads' executor (to spawn long-lived plugin workers on).
    pub fn executor(&self) -> &tokio::runtime::Handle {
        &self.executor_handle
    }

    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.sched
    }

    pub fn capabilities(&self) -> &Arc<crate::capabilities::Capabilities> {
        &self.capabilities
    }

    pub fn stats(&self) -> &RuntimeStats {
        &self.stats
    }

    /// Registers the runtime's counters, its instance pool's and its scheduler's.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.stats.register(registry);
        let pool = self.pool_stats();
        registry.register(
            "wasmq_plugin_instances_live",
            "Plugin instances that exist (leased and idle), at most [plugins] pool_instances",
            pool.live.clone(),
        );
        registry.register(
            "wasmq_plugin_instances_idle",
            "Plugin instances kept idle for their next call",
            pool.idle.clone(),
        );
        registry.register(
            "wasmq_plugin_instance_evictions",
            "Idle instances dropped to make room for another caller's",
            pool.evictions.clone(),
        );
        registry.register(
            "wasmq_plugin_instance_waits",
            "Callers that waited for room in the full instance pool",
            pool.waits.clone(),
        );
        let waiting = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        waiting.set(self.sched.waiting() as i64);
        registry.register(
            "wasmq_plugin_calls_waiting",
            "Plugin calls waiting for a CPU slot now",
            waiting,
        );
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Identifies this engine's compiled-code format; artifacts are cached under it.
    pub fn engine_key(&self) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("wasmtime-{:016x}", h.finish())
    }

    /// Validates and compiles a component (CPU-heavy: call off the async executor). Returns the
    /// code and its serialised artifact.
    pub fn compile(&self, bytes: &[u8]) -> Result<(Arc<PluginCode>, Vec<u8>), CompileError> {
        compile::check_preamble(bytes)?;
        self.stats.compiles.inc();
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        let code = self.prepare(component.clone())?;
        let artifact = component
            .serialize()
            .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        Ok((code, artifact))
    }

    /// Loads an artifact made by [`Runtime::compile`] of an engine with the same `engine_key`.
    pub fn load_artifact(&self, artifact: &[u8]) -> Result<Arc<PluginCode>, CompileError> {
        let code = self.deserialize(artifact)?;
        self.stats.artifact_loads.inc();
        Ok(code)
    }

    fn deserialize(&self, artifact: &[u8]) -> Result<Arc<PluginCode>, CompileError> {
        // SAFETY: artifacts are made only by this engine configuration, in this process
        // (`compile`) or in a `compile-worker` child of this same binary given the same
        // settings, and kept in this node's own data directory (keyed by `engine_key`), never
        // taken from a client or from shared storage; wasmtime also checks the embedded
        // compatibility header.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(&self.engine, artifact) }
            .map_err(|e| CompileError::Invalid(format!("stored artifact: {e:#}")))?;
        self.prepare(component)
    }

    fn prepare(&self, component: Component) -> Result<Arc<PluginCode>, CompileError> {
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| CompileError::UnsupportedImports(format!("{e:#}")))?;
        let consumer = consumer::GuestIndices::new(&pre).ok();
        let checker = checker::GuestIndices::new(&pre).ok();
        if consumer.is_none() && checker.is_none() {
            return Err(CompileError::UnknownWorld);
        }
        Ok(Arc::new(PluginCode {
            pre,
            consumer,
            checker,
        }))
    }

    /// Creates a long-lived instance of `code` for this context.
    pub async fn instantiate(
        &self,
        code: &Arc<PluginCode>,
        ctx: Arc<InstanceContext>,
    ) -> Result<PluginInstance, InvokeError> {
        // Memory can be lowered per plugin, not raised: pool slots are sized by the default.
        let memory_bytes = ctx.limits.memory_mb.map_or(self.config.memory_bytes, |mb| {
            usize::try_from(mb.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX)
                .min(self.config.memory_bytes)
        });
        let timeout_ms = ctx
            .limits
            .timeout_ms
            .unwrap_or(self.config.timeout_ms)
            .max(1);
        let tenant = self.sched.tenant(&ctx.group);
        let clock = Arc::new(CallClock::default());
        let mut store = Store::new(
            &self.engine,
            HostState::new(
                ctx,
                memory_bytes,
                self.capabilities.clone(),
                host::Turns {
                    sched: self.sched.clone(),
                    tenant: tenant.clone(),
                    clock: clock.clone(),
                    budget_ns: timeout_ms.saturating_mul(1_000_000),
                    last_yield: std::time::Instant::now(),
                },
            ),
        );
        store.limiter(|s| &mut s.limiter);
        // The CPU budget is checked at each epoch tick (or a preemption's bump). A running call
        // yields each tick, so other tasks of its thread run, and sooner when a tenant that
        // used less CPU waits for a slot; host waits (SMTP, HTTP, sleeps) use no CPU budget,
        // but count against the wall-clock deadline.
        store.epoch_deadline_callback(|mut ctx| {
            let turns = &mut ctx.data_mut().turns;
            if turns.clock.used_ns() > turns.budget_ns {
                return Err(host::DeadlineExceeded.into());
            }
            let now = std::time::Instant::now();
            if now.saturating_duration_since(turns.last_yield) >= TICK
                || turns.sched.should_yield(&turns.tenant)
            {
                turns.last_yield = now;
                return Ok(UpdateDeadline::Yield(1));
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        self.stats.instantiations.inc();
        let instantiated = tokio::time::timeout(
            Duration::from_millis(timeout_ms),
            self.sched
                .run(&tenant, &clock, code.pre.instantiate_async(&mut store)),
        )
        .await;
        let instance = match instantiated {
            Err(_) => return Err(InvokeError::WallClock(timeout_ms)),
            Ok(r) => r.map_err(|e| {
                classify(e, timeout_ms)
                    .unwrap_or_else(|e| InvokeError::Instantiate(format!("{e:#}")))
            })?,
        };
        let consumer = match &code.consumer {
            Some(ix) => Some(
                ix.load(&mut store, &instance)
                    .map_err(|e| InvokeError::Instantiate(format!("{e:#}")))?,
            ),
            None => None,
        };
        let checker = match &code.checker {
            Some(ix) => Some(
                ix.load(&mut store, &instance)
                    .map_err(|e| InvokeError::Instantiate(format!("{e:#}")))?,
            ),
            None => None,
        };
        Ok(PluginInstance {
            store,
            consumer,
            checker,
            broken: false,
            timeout_ms,
            calls: self.stats.calls.clone(),
            sched: self.sched.clone(),
            tenant,
            clock,
        })
    }
}
