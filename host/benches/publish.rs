//! Publish throughput: HTTP single and batch-100 publishes of 256 B messages in `sync` and
//! `async` flush modes, beside raw RocksDB batch writes measured in the same run (the ratio is
//! what matters on a shared, noisy machine). `--quick` runs each workload for a fraction of a
//! second, to keep the harness working in CI; `WASMQ_BENCH_SECS` sets the full duration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use wasmq::config::FlushMode;

mod common;

use common::BODY_BYTES;

fn raw_rocksdb(dir: &std::path::Path, sync: bool, secs: f64) -> f64 {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, dir).unwrap();
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(sync);
    let value = vec![b'x'; BODY_BYTES];
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed().as_secs_f64() < secs {
        let mut batch = rocksdb::WriteBatch::default();
        for _ in 0..100 {
            batch.put(n.to_be_bytes(), &value);
            n += 1;
        }
        db.write_opt(batch, &wo).unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs: f64 = if quick {
        0.3
    } else {
        std::env::var("WASMQ_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5.0)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw_sync = raw_rocksdb(tempfile::tempdir().unwrap().path(), true, secs);
    let raw_async = raw_rocksdb(tempfile::tempdir().unwrap().path(), false, secs);
    let mut rows = vec![
        (
            "raw RocksDB batch-100, fsync per batch".to_string(),
            raw_sync,
            raw_sync,
        ),
        (
            "raw RocksDB batch-100, no fsync".to_string(),
            raw_async,
            raw_async,
        ),
    ];
    for (flush, raw, name) in [
        (FlushMode::Sync, raw_sync, "sync"),
        (FlushMode::Async, raw_async, "async"),
    ] {
        for (batch, clients) in [(1usize, 64usize), (100, 8)] {
            let rate = rt.block_on(common::http_publish(flush, batch, clients, secs));
            let label = if batch == 1 { "single" } else { "batch-100" };
            rows.push((
                format!("HTTP {label} publish, {name}, {clients} clients"),
                rate,
                raw,
            ));
        }
    }
    println!(
        "\n{BODY_BYTES} B messages, {secs} s per workload, {} cores; client and server share the machine\n",
        common::cores()
    );
    println!("| workload | msgs/s | vs raw RocksDB (same fsync policy) |");
    println!("| --- | ---: | ---: |");
    for (name, rate, raw) in rows {
        println!("| {name} | {rate:.0} | {:.2}x |", rate / raw);
    }
}
