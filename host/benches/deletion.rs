//! How retention deletes on RocksDB (issue 23.2): the layout wasmq uses, one column family of
//! messages where each retention cut is one `DeleteRange` (plus `DeleteFilesInRange`, and a
//! compaction of the queue once as many bytes were deleted as it still stores), beside one
//! column family per time bucket dropped whole when the bucket expires. Both run the same
//! sliding window of random 256 B messages (write a bucket, delete the oldest) and print the
//! write rate, the time spent deleting (foreground calls and compaction), the data dir's peak
//! and final size, and the time to read the first 1 000 messages from the low water after the
//! last cut, as ratios of the buckets to the ranges. `--quick`: 3 buckets of 20 000 kept over
//! 6 steps; full: 5 buckets of 200 000 over 20 steps.
//!
//! On this age-only workload the buckets win (no compaction, a lower peak). wasmq keeps the
//! ranges because its cuts are not all at bucket ends: a size limit (`max_bytes`, per queue)
//! and `after_consumed` cut at any offset, so buckets would still need a range deletion inside
//! a bucket or keep up to a bucket too much; and buckets per topic and queue would multiply
//! column families (a memtable and table files each) by the topic count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use wasmq::disk::dir_size;

const BODY: usize = 256;
/// The storage's compaction threshold (`COMPACT_AFTER_BYTES`).
const COMPACT_AFTER: u64 = 16 << 20;

/// What one layout measured.
#[derive(Default)]
struct Run {
    write_secs: f64,
    delete: Duration,
    compaction: Duration,
    peak: u64,
    last: u64,
    first_read: Duration,
    messages: u64,
}

fn key(offset: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[4..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn body(state: &mut u64) -> Vec<u8> {
    (0..BODY)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            b'a' + (*state % 26) as u8
        })
        .collect()
}

fn options() -> rocksdb::Options {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_max_background_jobs(2);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // As the storage: the WAL is written out past 64 MiB.
    o.set_max_total_wal_size(64 << 20);
    o
}

/// Writes offsets `from..from + n` into `cf` in batches of 500 (no fsync, as `async` mode).
fn write(db: &rocksdb::DB, cf: &rocksdb::ColumnFamily, from: u64, n: u64, rng: &mut u64) {
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(false);
    let mut o = from;
    while o < from + n {
        let mut batch = rocksdb::WriteBatch::default();
        for _ in 0..500.min(from + n - o) {
            batch.put_cf(cf, key(o), body(rng));
            o += 1;
        }
        db.write_opt(batch, &wo).unwrap();
    }
}

/// Reads the first 1 000 messages at or after `low` in `cf`.
fn first_read(db: &rocksdb::DB, cf: &rocksdb::ColumnFamily, low: u64) -> Duration {
    let start = Instant::now();
    let mut it = db.raw_iterator_cf(cf);
    it.seek(key(low));
    let mut n = 0;
    while it.valid() && n < 1000 {
        std::hint::black_box(it.value());
        it.next();
        n += 1;
    }
    assert_eq!(n, 1000, "messages kept from the low water");
    start.elapsed()
}

/// One column family; each cut is a `DeleteRange`, then `DeleteFilesInRange`, then a
/// compaction of the range once the deleted bytes reach what is stored (as `RocksStorage`).
fn ranges(dir: &Path, kept: u64, per: u64, steps: u64) -> Run {
    let db = rocksdb::DB::open_cf(&options(), dir, ["messages"]).unwrap();
    let cf = db.cf_handle("messages").unwrap();
    let mut run = Run::default();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let bucket_bytes = per * (BODY as u64 + 12);
    let mut deleted = 0u64;
    let mut low = 0;
    for step in 0..kept + steps {
        let t = Instant::now();
        write(&db, cf, step * per, per, &mut rng);
        run.write_secs += t.elapsed().as_secs_f64();
        run.messages += per;
        if step >= kept {
            let t = Instant::now();
            let mut batch = rocksdb::WriteBatch::default();
            batch.delete_range_cf(cf, key(low), key(low + per));
            db.write(batch).unwrap();
            db.delete_file_in_range_cf(cf, key(low), key(low + per - 1))
                .unwrap();
            run.delete += t.elapsed();
            low += per;
            deleted += bucket_bytes;
            if deleted >= COMPACT_AFTER.max(kept * bucket_bytes) {
                let t = Instant::now();
                db.compact_range_cf(cf, Some(key(0)), Some(key(u64::MAX)));
                run.compaction += t.elapsed();
                deleted = 0;
            }
        }
        run.peak = run.peak.max(dir_size(dir));
    }
    run.first_read = first_read(&db, cf, low);
    run.last = dir_size(dir);
    run
}

/// One column family per bucket of `per` messages, written out once full and dropped whole
/// when it expires.
fn buckets(dir: &Path, kept: u64, per: u64, steps: u64) -> Run {
    let mut db = rocksdb::DB::open(&options(), dir).unwrap();
    let mut run = Run::default();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let name = |b: u64| format!("bucket-{b:016x}");
    let mut low = 0;
    for step in 0..kept + steps {
        db.create_cf(name(step), &options()).unwrap();
        let t = Instant::now();
        let cf = db.cf_handle(&name(step)).unwrap();
        write(&db, cf, step * per, per, &mut rng);
        // A full bucket is written out, so its WAL can go.
        db.flush_cf(cf).unwrap();
        run.write_secs += t.elapsed().as_secs_f64();
        run.messages += per;
        if step >= kept {
            let t = Instant::now();
            db.drop_cf(&name(step - kept)).unwrap();
            run.delete += t.elapsed();
            low += per;
        }
        run.peak = run.peak.max(dir_size(dir));
    }
    run.first_read = first_read(&db, db.cf_handle(&name(steps)).unwrap(), low);
    run.last = dir_size(dir);
    run
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (kept, per, steps) = if quick {
        (3, 20_000, 6)
    } else {
        (5, 200_000, 20)
    };
    let a = ranges(tempfile::tempdir().unwrap().path(), kept, per, steps);
    let b = buckets(tempfile::tempdir().unwrap().path(), kept, per, steps);
    let mb = |v: u64| v as f64 / 1e6;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    let window = kept * per * (BODY as u64 + 12);
    println!(
        "\n## Deletion layouts on RocksDB ({kept} buckets of {per} messages of {BODY} B kept, {steps} cut)\n"
    );
    println!("| | DeleteRange in one CF (wasmq) | one CF per bucket, dropped | buckets / ranges |");
    println!("| --- | ---: | ---: | ---: |");
    let (wa, wb) = (
        a.messages as f64 / a.write_secs,
        b.messages as f64 / b.write_secs,
    );
    println!(
        "| writes | {wa:.0} msg/s | {wb:.0} msg/s | {:.2}x |",
        ratio(wb, wa)
    );
    println!(
        "| deletion calls, all cuts | {:.1} ms | {:.1} ms | {:.2}x |",
        ms(a.delete),
        ms(b.delete),
        ratio(ms(b.delete), ms(a.delete))
    );
    println!(
        "| compaction for deletion | {:.1} ms | 0 ms | |",
        ms(a.compaction)
    );
    println!(
        "| data dir peak (window {:.1} MB) | {:.1} MB | {:.1} MB | {:.2}x |",
        mb(window),
        mb(a.peak),
        mb(b.peak),
        ratio(mb(b.peak), mb(a.peak))
    );
    println!(
        "| data dir at the end | {:.1} MB | {:.1} MB | {:.2}x |",
        mb(a.last),
        mb(b.last),
        ratio(mb(b.last), mb(a.last))
    );
    println!(
        "| first 1 000 reads from the low water | {:.2} ms | {:.2} ms | {:.2}x |",
        ms(a.first_read),
        ms(b.first_read),
        ratio(ms(b.first_read), ms(a.first_read))
    );
}
