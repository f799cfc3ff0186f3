//! What each plugin language costs, in one run: the scaffold plugin of `wasmq plugin new` (parse
//! a JSON body, log a line, ack) in Rust, Python and JavaScript, built by `plugin build`'s code;
//! component size, compile time on upload, artifact load time on restart, instantiate time,
//! the smallest memory cap it runs in, first call and per-message call cost with a 256 B body.
//! `--quick` shortens the loops, to keep the harness working in CI. `WASMQ_BENCH_PLUGINS=a.wasm,b.wasm`
//! adds columns for other consumer components (any plugin that acks a JSON body).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use wasmq::capabilities::Grants;
use wasmq::cli::scaffold;
use wasmq::runtime::{InstanceContext, PluginLimits, Runtime, RuntimeConfig};

const LANGS: [(&str, &str); 3] = [("rust", "Rust"), ("python", "Python"), ("js", "JavaScript")];

struct Row {
    size: usize,
    compile_ms: f64,
    load_ms: f64,
    instantiate_ms: f64,
    min_memory_mb: Option<u64>,
    first_call_us: f64,
    call_us: f64,
}

/// A JSON body of exactly 256 bytes.
fn body() -> Vec<u8> {
    let pad = 256 - r#"{"pad":""}"#.len();
    format!(r#"{{"pad":"{}"}}"#, "x".repeat(pad)).into_bytes()
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let shared = Path::new(wasmq_tests::plugins::TARGET_DIR);
    let mut names: Vec<String> = LANGS.iter().map(|(_, l)| l.to_string()).collect();
    let mut components = Vec::new();
    for (lang, _) in LANGS {
        let dir = scaffold::new_plugin("bench-plugin", &work.path().join(lang), lang).unwrap();
        // Rust shares cargo's plugin target dir (its dependencies are built there already).
        let target = match lang {
            "rust" => shared.to_path_buf(),
            _ => shared.join(format!("bench-{lang}")),
        };
        let wasm = scaffold::build_plugin_in(&dir, Some(&target))
            .unwrap_or_else(|e| panic!("building the {lang} scaffold: {e:#}"));
        components.push(std::fs::read(wasm).unwrap());
    }
    for path in std::env::var("WASMQ_BENCH_PLUGINS")
        .unwrap_or_default()
        .split(',')
    {
        if !path.is_empty() {
            components.push(std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}")));
            names.push(path.rsplit('/').next().unwrap_or(path).to_string());
        }
    }
    let rows = rt.block_on(async {
        let common::PluginHost {
            storage,
            broker,
            capabilities,
            ..
        } = common::PluginHost::new().await;
        let defaults = wasmq::config::PluginsConfig::default();
        let runtime = Runtime::new(
            RuntimeConfig {
                timeout_ms: defaults.timeout_ms,
                memory_bytes: (defaults.memory_mb << 20) as usize,
                pool_instances: 64,
                threads: 0,
                compile: Default::default(),
                stop_grace_ms: 0,
            },
            capabilities,
        )
        .unwrap();
        let context = |memory_mb: Option<u64>| {
            Arc::new(InstanceContext {
                plugin: "bench-plugin".into(),
                version: 1,
                group: "bench".into(),
                member: "all".into(),
                instance_index: 0,
                instance_count: 1,
                config_json: "{}".into(),
                grants: Grants::default(),
                limits: PluginLimits {
                    memory_mb,
                    ..Default::default()
                },
                kv_space: wasmq::runtime::host::kv_space(
                    wasmq::runtime::host::KvOwner::Subscription("bench"),
                ),
                stage_effects: false,
                services: broker.clone(),
            })
        };
        let body = body();
        let mut rows = Vec::new();
        for bytes in &components {
            let t = Instant::now();
            let (code, artifact) = runtime.compile(bytes).unwrap();
            let compile_ms = ms(t);
            let t = Instant::now();
            drop(runtime.load_artifact(&artifact).unwrap());
            let load_ms = ms(t);

            let k = if quick { 5 } else { 50 };
            let t = Instant::now();
            for _ in 0..k {
                drop(runtime.instantiate(&code, context(None)).await.unwrap());
            }
            let instantiate_ms = ms(t) / f64::from(k);

            let mut min_memory_mb = None;
            for mb in [2, 4, 8, 16, 24, 32, 48, 64] {
                let Ok(mut inst) = runtime.instantiate(&code, context(Some(mb))).await else {
                    continue;
                };
                if inst
                    .handle(&common::message(&uuid::Uuid::now_v7(), &body))
                    .await
                    .is_ok()
                {
                    min_memory_mb = Some(mb);
                    break;
                }
            }

            let mut inst = runtime.instantiate(&code, context(None)).await.unwrap();
            let t = Instant::now();
            inst.handle(&common::message(&uuid::Uuid::now_v7(), &body))
                .await
                .unwrap();
            let first_call_us = t.elapsed().as_secs_f64() * 1e6;
            let n: u32 = if quick { 200 } else { 20_000 };
            for _ in 0..n / 10 {
                inst.handle(&common::message(&uuid::Uuid::now_v7(), &body))
                    .await
                    .unwrap();
            }
            let t = Instant::now();
            for _ in 0..n {
                inst.handle(&common::message(&uuid::Uuid::now_v7(), &body))
                    .await
                    .unwrap();
            }
            let call_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
            rows.push(Row {
                size: bytes.len(),
                compile_ms,
                load_ms,
                instantiate_ms,
                min_memory_mb,
                first_call_us,
                call_us,
            });
        }
        storage.close().await;
        rows
    });

    println!(
        "\nThe `wasmq plugin new` scaffold per language (parse a 256 B JSON body, log, ack); {} cores\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| measure | {} |", names.join(" | "));
    println!("| --- |{}", " ---: |".repeat(names.len()));
    let rust = &rows[0];
    let line = |name: &str, f: &dyn Fn(&Row) -> f64, unit: &str, digits: usize| {
        let cells: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let v = f(r);
                if i == 0 {
                    format!("{v:.digits$} {unit}")
                } else {
                    format!(
                        "{v:.digits$} {unit} ({:.0}x)",
                        v / f(rust).max(f64::MIN_POSITIVE)
                    )
                }
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    line(
        "component size",
        &|r| r.size as f64 / (1 << 20) as f64,
        "MB",
        2,
    );
    line("compile on upload", &|r| r.compile_ms, "ms", 0);
    line("load compiled artifact (restart)", &|r| r.load_ms, "ms", 1);
    line(
        "instantiate (pooling allocator)",
        &|r| r.instantiate_ms,
        "ms",
        2,
    );
    line("first call", &|r| r.first_call_us, "µs", 0);
    line("call, 256 B message", &|r| r.call_us, "µs", 1);
    let mem: Vec<String> = rows
        .iter()
        .map(|r| {
            r.min_memory_mb
                .map_or("> 64 MB".into(), |m| format!("{m} MB"))
        })
        .collect();
    println!("| smallest memory_mb it runs in | {} |", mem.join(" | "));
}
