//! Bounded compilation: at most `max_compiles` compiles run at once, and each runs in a child
//! process (the server's own binary, `wasmq compile-worker`) under a CPU-time and a data-size
//! limit, killed if it outlives them. Cranelift cannot be stopped half-way inside a process, so a
//! component built to make it work for minutes (issue 22: a start function with 2 000 locals,
//! 115 CPU-seconds and +374 MB) would otherwise keep a core and the memory after its client gave
//! up. Without a binary to run (the in-process test server), compiles run on a blocking thread,
//! bounded in number only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use super::{CompileError, PluginCode, Runtime, RuntimeConfig, engine_config};

/// How compiles are bounded (from `[plugins]`).
#[derive(Debug, Clone)]
pub struct CompileLimits {
    /// CPU time one compile may use (ms; rounded up to whole seconds for the child's limit).
    pub cpu_ms: u64,
    /// Heap one compile may use (bytes).
    pub memory_bytes: u64,
    /// Compiles that run at once; more wait.
    pub max_compiles: usize,
    /// The binary whose `compile-worker` verb compiles in a child process; `None` compiles in
    /// this process.
    pub worker: Option<PathBuf>,
}

impl Default for CompileLimits {
    fn default() -> Self {
        Self {
            cpu_ms: 60_000,
            memory_bytes: 2 << 30,
            max_compiles: 2,
            worker: None,
        }
    }
}

/// Exit code of `compile-worker` when the bytes do not compile (its stderr says why).
pub const WORKER_INVALID: i32 = 3;

/// Checks the preamble: magic, then a 16-bit version and a 16-bit layer (0 = core module,
/// 1 = component).
pub(super) fn check_preamble(bytes: &[u8]) -> Result<(), CompileError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(CompileError::NotWasm);
    }
    if bytes[6..8] == [0, 0] {
        return Err(CompileError::CoreModule);
    }
    Ok(())
}

impl Runtime {
    /// Validates and compiles a component within [`CompileLimits`]: waits for one of
    /// `max_compiles` turns, then compiles in a child process (or a blocking thread). Returns
    /// the code and its serialised artifact. Errors: the component's ([`CompileError`]), or
    /// [`CompileError::Budget`] when the compile ran out of CPU time or memory.
    pub async fn compile_bounded(
        self: &Arc<Self>,
        bytes: Vec<u8>,
    ) -> Result<(Arc<PluginCode>, Vec<u8>), CompileError> {
        check_preamble(&bytes)?;
        let _turn = self
            .compiles
            .acquire()
            .await
            .map_err(|_| CompileError::Invalid("the compiler is shutting down".into()))?;
        let Some(worker) = self.compile_limits.worker.clone() else {
            let runtime = self.clone();
            return tokio::task::spawn_blocking(move || runtime.compile(&bytes))
                .await
                .map_err(|e| CompileError::Invalid(format!("compiler task failed: {e}")))?;
        };
        self.stats.compiles.inc();
        let artifact = self.compile_in_child(&worker, bytes).await?;
        let runtime = self.clone();
        let code = tokio::task::spawn_blocking(move || {
            runtime.deserialize(&artifact).map(|c| (c, artifact))
        })
        .await
        .map_err(|e| CompileError::Invalid(format!("loader task failed: {e}")))??;
        Ok(code)
    }

    async fn compile_in_child(
        &self,
        worker: &std::path::Path,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, CompileError> {
        let limits = &self.compile_limits;
        let cpu_secs = limits.cpu_ms.div_ceil(1000).max(1);
        let mut child = tokio::process::Command::new(worker)
            .arg("compile-worker")
            .arg("--cpu-seconds")
            .arg(cpu_secs.to_string())
            .arg("--memory-bytes")
            .arg(limits.memory_bytes.to_string())
            .arg("--instance-memory-bytes")
            .arg(self.config.memory_bytes.to_string())
            .arg("--pool-instances")
            .arg(self.pooled_instances.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                CompileError::Invalid(format!("cannot start the compiler process: {e}"))
            })?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| CompileError::Invalid("the compiler process has no stdin".into()))?;
        let feed = tokio::spawn(async move {
            // A child that dies early closes the pipe; its exit status says why.
            let _ = stdin.write_all(&bytes).await;
        });
        // CPU time is the child's own limit; this wall-clock bound catches a child that waits.
        let wall = Duration::from_secs(cpu_secs.saturating_mul(4).saturating_add(10));
        let output = match tokio::time::timeout(wall, child.wait_with_output()).await {
            Ok(r) => r.map_err(|e| CompileError::Invalid(format!("the compiler process: {e}")))?,
            // Dropping the future kills the child (`kill_on_drop`).
            Err(_) => {
                return Err(CompileError::TookTooLong(format!(
                    "compiling took longer than {} s of wall-clock time",
                    wall.as_secs()
                )));
            }
        };
        feed.abort();
        if output.status.success() {
            return Ok(output.stdout);
        }
        let said = String::from_utf8_lossy(&output.stderr);
        let said = crate::text::from_plugin(said.trim(), 2 * crate::text::MAX_REASON_BYTES);
        if output.status.code() == Some(WORKER_INVALID) {
            return Err(CompileError::Invalid(said));
        }
        use std::os::unix::process::ExitStatusExt as _;
        Err(match output.status.signal() {
            // The CPU limit's soft (SIGXCPU) or hard (SIGKILL) end.
            Some(24) | Some(9) => CompileError::Budget(format!(
                "compiling used more than its {cpu_secs} CPU-seconds ([plugins] compile_timeout_ms)"
            )),
            // An allocation refused at the data limit aborts the child.
            Some(6) => CompileError::Budget(format!(
                "compiling needed more than {} MiB of memory ([plugins] compile_memory_mb)",
                limits.memory_bytes >> 20
            )),
            _ => CompileError::Invalid(format!(
                "the compiler process failed ({}): {said}",
                output.status
            )),
        })
    }
}

/// `wasmq compile-worker`: compiles the component on stdin under the given limits with an engine
/// configured as the server's, and writes the serialised artifact to stdout. Exits
/// [`WORKER_INVALID`] with the reason on stderr when the bytes do not compile.
pub fn compile_worker(
    cpu_seconds: u64,
    memory_bytes: u64,
    instance_memory_bytes: usize,
    pool_instances: u32,
) -> i32 {
    use rustix::process::{Resource, Rlimit, setrlimit};
    use std::io::{Read as _, Write as _};
    let cpu = Rlimit {
        current: Some(cpu_seconds),
        maximum: Some(cpu_seconds.saturating_add(1)),
    };
    // RLIMIT_DATA counts heap and writable mappings, not the address space the engine reserves
    // (never written) for instance memories.
    let data = Rlimit {
        current: Some(memory_bytes),
        maximum: Some(memory_bytes),
    };
    for (what, resource, limit) in [("CPU", Resource::Cpu, cpu), ("data", Resource::Data, data)] {
        if let Err(e) = setrlimit(resource, limit) {
            eprintln!("cannot set the {what} limit: {e}");
            return 1;
        }
    }
    // With the plugin threads, below the broker's own: a compile is plugin work and must not
    // take the cores the API, storage and dispatch need (issue 22: a healthy drain beside one
    // compile storm at 0.41x of alone, the child at the broker's nice 0). Not lower: a busy
    // broker would starve uploads past their wall-clock bound. Threads the compiler starts
    // inherit it.
    if let Err(e) = rustix::process::setpriority_process(None, super::PLUGIN_NICE) {
        eprintln!("cannot lower the compiler's priority: {e}");
    }
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("cannot read the component: {e}");
        return 1;
    }
    let config = RuntimeConfig {
        timeout_ms: 1,
        memory_bytes: instance_memory_bytes,
        pool_instances,
        threads: 1,
        compile: CompileLimits::default(),
        stop_grace_ms: 0,
    };
    // The same settings as the server's engine (its artifacts must load there), but instances
    // allocated on demand: this process runs none, and the pool's slots would count against
    // the data limit.
    let mut engine_config = engine_config(&config, pool_instances > 0);
    engine_config.allocation_strategy(wasmtime::InstanceAllocationStrategy::OnDemand);
    let engine = match wasmtime::Engine::new(&engine_config) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot configure the compiler: {e:#}");
            return 1;
        }
    };
    let artifact = wasmtime::component::Component::new(&engine, &bytes).and_then(|c| c.serialize());
    match artifact {
        Ok(a) => match std::io::stdout().lock().write_all(&a) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("cannot write the artifact: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("{e:#}");
            WORKER_INVALID
        }
    }
}
