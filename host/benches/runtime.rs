//! Plugin runtime costs: `handle` with a 256 B message through the host path (budgeted,
//! limited instance, message built from a stored message) against a raw wasmtime call of the
//! same component in the same run; instantiate time; upload→ready and restart→ready; a
//! kv-and-publish plugin with its effects applied as called (at-least-once) beside staged and
//! committed with the delivery (exactly-once, issue 24).
//! `--quick` shortens every loop, to keep the harness working in CI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use wasmq::bindings;
use wasmq::capabilities::Grants;
use wasmq::plugins::Plugins;
use wasmq::runtime::Services as _;
use wasmq::runtime::{HostState, InstanceContext, Runtime, RuntimeConfig};
use wasmq::storage::{Expect, RecordWrite};
use wasmq_tests::plugins::{CHECKER, ECHO, TALLY};

fn per_call(total: std::time::Duration, n: u32) -> f64 {
    total.as_secs_f64() * 1e6 / f64::from(n)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u32 = if quick { 2_000 } else { 200_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let common::PluginHost {
            storage,
            broker,
            capabilities,
            ..
        } = common::PluginHost::new().await;
        let config = RuntimeConfig {
            timeout_ms: 5000,
            memory_bytes: 64 << 20,
            pool_instances: 64,
            threads: 0,
            compile: Default::default(),
            stop_grace_ms: 0,
        };
        let runtime = Arc::new(Runtime::new(config, capabilities.clone()).unwrap());
        let echo = std::fs::read(ECHO).unwrap();
        let (code, _) = runtime.compile(&echo).unwrap();
        let ctx = Arc::new(InstanceContext {
            plugin: "echo".into(),
            version: 1,
            group: "bench".into(),
            member: "all".into(),
            instance_index: 0,
            instance_count: 1,
            config_json: "{}".into(),
            grants: Grants::default(),
            limits: Default::default(),
            kv_space: wasmq::runtime::host::kv_space(wasmq::runtime::host::KvOwner::Subscription(
                "bench",
            )),
            stage_effects: false,
            services: broker.clone(),
        });

        // Raw wasmtime: same engine settings, no budget, no limiter, a prebuilt message.
        let mut wt_config = wasmtime::Config::new();
        wt_config.wasm_component_model(true);
        let engine = wasmtime::Engine::new(&wt_config).unwrap();
        let mut linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        bindings::Plugin::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .unwrap();
        let component = wasmtime::component::Component::new(&engine, &echo).unwrap();
        let pre = linker.instantiate_pre(&component).unwrap();
        let turns = wasmq::runtime::host::Turns {
            sched: runtime.scheduler().clone(),
            tenant: runtime.scheduler().tenant("raw"),
            clock: Default::default(),
            budget_ns: u64::MAX,
            last_yield: Instant::now(),
        };
        let mut store = wasmtime::Store::new(
            &engine,
            HostState::new(ctx.clone(), 64 << 20, capabilities, turns),
        );
        let instance = pre.instantiate_async(&mut store).await.unwrap();
        let guest = bindings::consumer::GuestIndices::new(&pre)
            .unwrap()
            .load(&mut store, &instance)
            .unwrap();
        let (id, body) = (uuid::Uuid::now_v7(), vec![b'x'; 256]);
        let msg = common::message(&id, &body);
        for _ in 0..100 {
            guest.call_handle(&mut store, &msg).await.unwrap();
        }
        let t = Instant::now();
        for _ in 0..n {
            guest.call_handle(&mut store, &msg).await.unwrap();
        }
        let raw = per_call(t.elapsed(), n);

        // Host path: budgeted, limited instance; the message is built per call as dispatch does.
        let mut inst = runtime.instantiate(&code, ctx.clone()).await.unwrap();
        for _ in 0..100 {
            inst.handle(&common::message(&id, &body)).await.unwrap();
        }
        let t = Instant::now();
        for _ in 0..n {
            inst.handle(&common::message(&id, &body)).await.unwrap();
        }
        let host = per_call(t.elapsed(), n);
        let t = Instant::now();
        for _ in 0..n {
            inst.handle(&msg).await.unwrap();
        }
        let host_prebuilt = per_call(t.elapsed(), n);

        let k = n / 100;
        let t = Instant::now();
        for _ in 0..k {
            drop(runtime.instantiate(&code, ctx.clone()).await.unwrap());
        }
        let instantiate = per_call(t.elapsed(), k);

        let artifacts = tempfile::tempdir().unwrap();
        let plugins = Plugins::new(
            runtime.clone(),
            storage.clone(),
            32 << 20,
            artifacts.path().to_path_buf(),
        );
        let checker = std::fs::read(CHECKER).unwrap();
        let t = Instant::now();
        plugins
            .upload("checker", checker.clone(), Default::default())
            .await
            .unwrap();
        let (_, code) = plugins.code("checker", None).await.unwrap();
        runtime.instantiate(&code, ctx.clone()).await.unwrap();
        let upload_ready = t.elapsed().as_secs_f64() * 1e3;

        // Restart: a fresh catalogue over the same storage loads the stored artifact.
        let restarted = Plugins::new(
            runtime.clone(),
            storage.clone(),
            32 << 20,
            artifacts.path().to_path_buf(),
        );
        let t = Instant::now();
        let (_, code) = restarted.code("checker", None).await.unwrap();
        runtime.instantiate(&code, ctx.clone()).await.unwrap();
        let restart_ready = t.elapsed().as_secs_f64() * 1e3;

        // A kv-and-publish plugin (tally: a kv read, a kv write and a publish per message), each
        // message finished as dispatch finishes it. At-least-once: every effect is a durable
        // write when called. Exactly-once: they are staged and written in one commit with the
        // delivery's completion marker.
        broker
            .put_topic("derived", Default::default())
            .await
            .unwrap();
        let (tally, _) = runtime.compile(&std::fs::read(TALLY).unwrap()).unwrap();
        let kv_n: u32 = if quick { 500 } else { 20_000 };
        let mut kv_rates = Vec::new();
        for stage in [false, true] {
            let ctx = Arc::new(InstanceContext {
                plugin: "tally".into(),
                config_json: r#"{"derived":"derived"}"#.into(),
                grants: Grants {
                    publish: vec!["derived".into()],
                    ..Grants::default()
                },
                kv_space: format!("kvsub/bench-{stage}"),
                stage_effects: stage,
                ..(*ctx).clone()
            });
            let mut inst = runtime.instantiate(&tally, ctx).await.unwrap();
            let body = br#"{"counter":"c"}"#;
            let t = Instant::now();
            for i in 0..kv_n {
                let mut staged = None;
                inst.handle_batch(
                    common::message(&uuid::Uuid::now_v7(), body),
                    || None,
                    |r, _, s| {
                        assert!(matches!(r, Ok(bindings::Outcome::Ack)), "{r:?}");
                        staged = Some(s);
                        true
                    },
                )
                .await;
                let staged = staged.unwrap();
                if stage {
                    let marker = RecordWrite {
                        space: "done/bench".into(),
                        key: format!("all/00000000/{i:016x}"),
                        value: Some(Vec::new()),
                        expect: Expect::Absent,
                    };
                    broker
                        .commit(staged.to_commit(vec![marker]))
                        .await
                        .unwrap();
                }
            }
            kv_rates.push(f64::from(kv_n) / t.elapsed().as_secs_f64());
        }

        println!(
            "\n256 B message, {n} calls; {} cores\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("| measure | value |");
        println!("| --- | ---: |");
        println!("| raw wasmtime `handle` call | {raw:.2} µs |");
        println!(
            "| wasmq host path `handle` call | {host:.2} µs ({:.2}x raw) |",
            host / raw
        );
        println!(
            "| wasmq host path, message prebuilt like raw | {host_prebuilt:.2} µs ({:.2}x raw) |",
            host_prebuilt / raw
        );
        println!("| instantiate (pooling allocator) | {instantiate:.1} µs |");
        println!(
            "| upload→ready, {} KB plugin (compile, store, instantiate) | {upload_ready:.1} ms |",
            checker.len() / 1024
        );
        println!("| restart→ready, same plugin from the stored artifact | {restart_ready:.1} ms |");
        println!(
            "| kv-and-publish plugin, effects applied as called (at-least-once) | {:.0} msg/s |",
            kv_rates[0]
        );
        println!(
            "| kv-and-publish plugin, effects committed with the delivery (exactly-once) | {:.0} msg/s ({:.2}x at-least-once; goal ≥ 0.8) |",
            kv_rates[1],
            kv_rates[1] / kv_rates[0]
        );
        storage.close().await;
    });
}
