//! The RocksDB backend against the conformance suite, and its group commit.

use super::*;
use crate::storage::conformance::msg;

async fn conformance(flush: FlushMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let open = move || {
        let path = path.clone();
        Box::pin(
            async move { Arc::new(RocksStorage::open(&path, flush).unwrap()) as Arc<dyn Storage> },
        ) as std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Storage>> + Send>>
    };
    crate::storage::conformance::run_all(&open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    conformance(FlushMode::Sync).await;
}

/// `flush = "async"` (acknowledged after the WAL write, no fsync) keeps every promise of the
/// suite too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite_with_async_flush() {
    conformance(FlushMode::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_commits_and_get_dense_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(RocksStorage::open(dir.path(), FlushMode::Sync).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut offs = Vec::new();
            for _ in 0..50 {
                offs.push(s.append("t", vec![msg(0, None, "x")]).await.unwrap()[0].offset);
            }
            offs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (0..800).collect::<Vec<u64>>());
    let commits = s.stats().commits.load(Ordering::Relaxed);
    assert!(
        commits < 800,
        "group commit shared no fsync: {commits} commits"
    );
}

/// Age: the cut is the first offset stored at or after `now - max_age_ms`, found by store time;
/// stored bytes count every message, go down by exactly the range a truncation deletes, and a
/// database written before the markers existed sums them at open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_cut_follows_store_times_and_bytes_follow_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    let first = s
        .append("aged", (0..3).map(|_| msg(0, None, "a")).collect())
        .await
        .unwrap();
    let t_first = s.read("aged", 0, 0, 1).await.unwrap()[0].stored_at;
    // The next group commit gets a later store time.
    while crate::base::now_ms() <= t_first {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.append("aged", (0..2).map(|_| msg(0, None, "b")).collect())
        .await
        .unwrap();
    let t_second = s.read("aged", 0, 3, 1).await.unwrap()[0].stored_at;
    assert!(t_second > t_first);
    assert_eq!(first.len(), 3);
    let age = |max_age_ms| QueueLimits {
        max_age_ms: Some(max_age_ms),
        max_bytes: None,
    };
    let cut = |now| s.retention_cut("aged", 0, age(1_000), now);
    assert_eq!(cut(t_first + 1_000).await.unwrap(), 0);
    assert_eq!(cut(t_first + 1_001).await.unwrap(), 3);
    assert_eq!(cut(t_second + 1_000).await.unwrap(), 3);
    assert_eq!(cut(t_second + 1_001).await.unwrap(), 5);
    // A limit longer than the clock has run cuts nothing (no underflow).
    assert_eq!(
        s.retention_cut("aged", 0, age(u64::MAX), t_second)
            .await
            .unwrap(),
        0
    );

    let all = s.extent("aged", 0).await.unwrap().bytes;
    let sizes: Vec<u64> = {
        let db = s.db.get().unwrap();
        (0..5)
            .map(|o| {
                db.get_cf(cf(&db, CF_MESSAGES).unwrap(), keys::message("aged", 0, o))
                    .unwrap()
                    .unwrap()
                    .len() as u64
            })
            .collect()
    };
    assert_eq!(all, sizes.iter().sum::<u64>());
    assert_eq!(s.truncate("aged", 0, 3).await.unwrap(), 3);
    assert_eq!(
        s.extent("aged", 0).await.unwrap().bytes,
        sizes[3] + sizes[4]
    );

    // Drop the marker, as a database from before it would be: open sums the queue again,
    // also when a later queue of the topic has a marker.
    s.append("aged", vec![msg(3, None, "c")]).await.unwrap();
    {
        let db = s.db.get().unwrap();
        db.delete(keys::queue_bytes("aged", 0)).unwrap();
    }
    s.close().await;
    drop(s);
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    assert_eq!(
        s.extent("aged", 0).await.unwrap().bytes,
        sizes[3] + sizes[4]
    );
}

/// After a truncation, compactions of the id and key indexes drop the entries of the deleted
/// range (and only those): no delete per message, and nothing of it left on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_drops_index_entries_below_the_low_water() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    let sent: Vec<_> = (0..10)
        .map(|i| msg(0, Some(&format!("k{i}")), "x"))
        .collect();
    s.append("indexed", sent).await.unwrap();
    s.append("kept", vec![msg(0, Some("k0"), "y")])
        .await
        .unwrap();
    assert_eq!(s.truncate("indexed", 0, 4).await.unwrap(), 4);
    let db = s.db.get().unwrap();
    let entries = |name: &str| -> Vec<(String, u32, u64)> {
        let handle = cf(&db, name).unwrap();
        db.flush_cf(handle).unwrap();
        db.compact_range_cf(handle, None::<&[u8]>, None::<&[u8]>);
        db.iterator_cf(handle, IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.unwrap();
                if name == CF_IDS {
                    keys::parse_message(&v).unwrap()
                } else {
                    keys::parse_business_key(&k).unwrap()
                }
            })
            .collect()
    };
    for name in [CF_IDS, CF_KEYS] {
        let mut left = entries(name);
        left.sort();
        let mut want: Vec<_> = (4..10).map(|o| ("indexed".to_string(), 0, o)).collect();
        want.push(("kept".to_string(), 0, 0));
        assert_eq!(left, want, "{name}");
    }
    drop(db);
    s.close().await;
}

/// Dropping the table files inside a truncated range never takes the first kept message with
/// it (RocksDB's file range includes its end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncation_keeps_the_message_at_its_new_low_water() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    s.append("solo", (0..10).map(|_| msg(0, None, "x")).collect())
        .await
        .unwrap();
    {
        // One table file holding offsets 0..=9, below level 0.
        let db = s.db.get().unwrap();
        let messages = cf(&db, CF_MESSAGES).unwrap();
        db.flush_cf(messages).unwrap();
        db.compact_range_cf(messages, None::<&[u8]>, None::<&[u8]>);
    }
    assert_eq!(s.truncate("solo", 0, 9).await.unwrap(), 9);
    let left = s.read("solo", 0, 0, 10).await.unwrap();
    assert_eq!(left.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![9]);
    s.close().await;
}

/// RocksDB's own info log starts a file per open and by default keeps 1 000 old ones: the
/// data dir grew by ~110 KB with every restart. Capped at INFO_LOG_FILES.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_a_bounded_number_of_info_logs() {
    const RESTARTS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..RESTARTS {
        let s = RocksStorage::open(dir.path(), FlushMode::Async).unwrap();
        s.append("t", vec![msg(0, None, "x")]).await.unwrap();
        s.close().await;
    }
    let logs = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("LOG")
        })
        .count();
    assert!(
        (1..=INFO_LOG_FILES).contains(&logs),
        "{logs} info log files after {RESTARTS} restarts"
    );
    let s = RocksStorage::open(dir.path(), FlushMode::Async).unwrap();
    assert_eq!(s.read("t", 0, 0, 100).await.unwrap().len(), RESTARTS);
    s.close().await;
}

/// Recovery at open never steps through what retention deleted: messages below a low water stay
/// in table files until compaction meets them, and a scan that lands among them reseeks once
/// per range deletion (a third of an open after 100 000 retained-then-deleted transactions).
/// Counted by RocksDB's perf context, not timed. Also: the high waters it finds around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_steps_over_no_deleted_range() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    for (topic, queue) in [("a", 0), ("a", 1), ("b", 0), ("c", 0)] {
        let batch = (0..N).map(|_| msg(queue, None, "x")).collect();
        s.append(topic, batch).await.unwrap();
    }
    let db = s.db.get().unwrap();
    // One table file holding every message: no truncation below can drop it whole.
    db.flush_cf(cf(&db, CF_MESSAGES).unwrap()).unwrap();
    // 100 range deletions in the first queue (as retention checks every few seconds make),
    // the second topic emptied (as a topic deletion does); the rest is kept.
    for before in 1..=N / 2 {
        s.truncate("a", 0, before).await.unwrap();
    }
    s.truncate("b", 0, N).await.unwrap();
    let (high, _) = {
        rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::EnableCount);
        let mut perf = rocksdb::perf::PerfContext::default();
        perf.reset();
        let low = recover_low_water(&db).unwrap();
        let found = recover_high_water(&db, &low).unwrap();
        let seeks = perf.metric(rocksdb::perf::PerfMetric::SeekChildSeekCount);
        let skipped = perf.metric(rocksdb::perf::PerfMetric::InternalKeySkippedCount)
            + perf.metric(rocksdb::perf::PerfMetric::InternalDeleteSkippedCount);
        rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
        // A few seeks per queue and per range; stepping through the deleted ones would be
        // at least one reseek for each of the 101 range deletions.
        assert!(seeks < 60, "{seeks} child seeks");
        assert!(skipped < 20, "{skipped} internal keys skipped");
        found
    };
    for (topic, queue) in [("a", 0), ("a", 1), ("b", 0), ("c", 0)] {
        assert_eq!(queue_value(&high, topic, queue), N, "{topic}/{queue}");
    }
    drop(db);
    s.close().await;
    drop(s);
    // And through a reopen: offsets go on from the high waters, not from the low waters.
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    for (topic, queue) in [("a", 0), ("b", 0), ("c", 0)] {
        let a = s.append(topic, vec![msg(queue, None, "y")]).await.unwrap();
        assert_eq!(a[0].offset, N, "{topic}/{queue}");
    }
    s.close().await;
}

/// `wasmq_storage_bytes` says where the data dir's bytes are: a flushed batch of messages is in
/// the messages family's table files, and what is not flushed yet in its memtables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_bytes_by_family_and_part() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    let value = |s: &RocksStorage, family: &str, part: &str| -> i64 {
        let mut registry = prometheus_client::registry::Registry::default();
        s.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series = format!("wasmq_storage_bytes{{family=\"{family}\",part=\"{part}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {text}"))
    };
    assert_eq!(value(&s, "messages", "tables"), 0);
    s.append(
        "t",
        (0..100).map(|_| msg(0, None, &"x".repeat(1000))).collect(),
    )
    .await
    .unwrap();
    assert!(value(&s, "messages", "memtables") > 100_000);
    let db = s.db.get().unwrap();
    db.flush_cf(cf(&db, CF_MESSAGES).unwrap()).unwrap();
    let tables = value(&s, "messages", "tables");
    assert!(tables > 1_000, "{tables} bytes of table files");
    // A value of at least min_blob_size goes to a blob file when its family is flushed.
    assert_eq!(value(&s, "blobs", "blobs"), 0);
    s.put_blob("artifact", Some(vec![7; 8192])).await.unwrap();
    db.flush_cf(cf(&db, CF_BLOBS).unwrap()).unwrap();
    let blobs = value(&s, "blobs", "blobs");
    assert!(blobs >= 8192, "{blobs} bytes of blob files");
    // The writer's markers' family is listed too.
    value(&s, "default", "tables");
    drop(db);
    s.close().await;
}

/// A queue whose oldest message is known to be younger than its age limit is not read again
/// (a retention pass over many idle topics reads nothing per queue); it is once that message
/// can have aged, or when the low water moved past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_age_cut_reads_a_queue_again_only_once_its_oldest_message_can_have_aged() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    s.append("idle", (0..2).map(|_| msg(0, None, "a")).collect())
        .await
        .unwrap();
    let t1 = s.read("idle", 0, 0, 1).await.unwrap()[0].stored_at;
    while crate::base::now_ms() <= t1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.append("idle", vec![msg(0, None, "b")]).await.unwrap();
    let t2 = s.read("idle", 0, 2, 1).await.unwrap()[0].stored_at;
    let limits = QueueLimits {
        max_age_ms: Some(1_000),
        max_bytes: None,
    };
    let scans = || s.stats().retention_scans.load(Ordering::Relaxed);
    let cut = |now| s.retention_cut("idle", 0, limits, now);
    assert_eq!(cut(t1 + 500).await.unwrap(), 0);
    assert_eq!(scans(), 1, "the first cut reads the queue");
    assert_eq!(cut(t1 + 999).await.unwrap(), 0);
    assert_eq!(
        cut(t1 + 1_000).await.unwrap(),
        0,
        "stored at the limit: kept"
    );
    assert_eq!(scans(), 1, "the oldest message is known to be young");
    assert_eq!(cut(t1 + 1_001).await.unwrap(), 2);
    assert_eq!(scans(), 2, "it can have aged: read again");
    assert_eq!(s.truncate("idle", 0, 2).await.unwrap(), 2);
    assert_eq!(cut(t2 + 1_000).await.unwrap(), 2);
    assert_eq!(scans(), 2, "the search found the new oldest message");
    assert_eq!(cut(t2 + 1_001).await.unwrap(), 3);
    assert_eq!(scans(), 3);
    // A size limit passed always reads: sizes are summed from the low water.
    let by_size = QueueLimits {
        max_age_ms: Some(1_000),
        max_bytes: Some(1),
    };
    assert_eq!(s.retention_cut("idle", 0, by_size, t2).await.unwrap(), 3);
    assert_eq!(scans(), 4);
    // Truncating one queue keeps what is remembered of the topic's other queues.
    s.append(
        "two",
        vec![msg(0, None, "a"), msg(0, None, "b"), msg(1, None, "c")],
    )
    .await
    .unwrap();
    let t3 = s.read("two", 1, 0, 1).await.unwrap()[0].stored_at;
    assert_eq!(s.retention_cut("two", 1, limits, t3).await.unwrap(), 0);
    assert_eq!(s.retention_cut("two", 0, limits, t3).await.unwrap(), 0);
    assert_eq!(scans(), 6);
    assert_eq!(s.truncate("two", 0, 1).await.unwrap(), 1);
    assert_eq!(s.retention_cut("two", 1, limits, t3).await.unwrap(), 0);
    assert_eq!(scans(), 6, "queue 1's oldest message is still known");
}

/// A record or a runner-sized read of what is in the memtables or the block cache is served on
/// the calling thread; after a reopen (nothing in memory) the same reads go to a blocking
/// thread, return the same data, and the next ones are served from the block cache again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_what_is_in_memory_stay_on_the_calling_thread() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    let batch = (0..300).map(|i| msg(0, None, &format!("m{i}"))).collect();
    s.append("t", batch).await.unwrap();
    s.put_record("sp", "k", Some(b"v".to_vec()), Expect::Any)
        .await
        .unwrap();
    let disk = |s: &RocksStorage| s.disk_reads.load(Ordering::Relaxed);
    let check = |msgs: Vec<StoredMessage>, from: u64, n: usize| {
        assert_eq!(msgs.len(), n);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.offset, from + i as u64);
            assert_eq!(m.message.body, format!("m{}", m.offset).into_bytes());
        }
    };
    check(s.read("t", 0, 10, 256).await.unwrap(), 10, 256);
    assert_eq!(s.get_record("sp", "k").await.unwrap().unwrap().value, b"v");
    assert_eq!(s.get_record("sp", "none").await.unwrap(), None);
    assert_eq!(disk(&s), 0, "served from the memtable");
    // Past the inline bounds (messages, then bytes): a blocking thread, whatever is in memory.
    check(s.read("t", 0, 0, 300).await.unwrap(), 0, 300);
    assert_eq!(disk(&s), 1);
    let big = "b".repeat(4096);
    s.append("big", (0..100).map(|_| msg(0, None, &big)).collect())
        .await
        .unwrap();
    assert_eq!(s.read("big", 0, 0, 50).await.unwrap().len(), 50);
    assert_eq!(disk(&s), 1, "200 KiB is read inline");
    let all = s.read("big", 0, 0, 100).await.unwrap();
    assert_eq!(all.len(), 100);
    assert!(all.iter().all(|m| m.message.body == big.as_bytes()));
    assert_eq!(disk(&s), 2, "400 KiB is not");
    s.close().await;
    drop(s);

    // Reopened: the memtables were flushed and the block cache is empty.
    let s = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    check(s.read("t", 0, 10, 256).await.unwrap(), 10, 256);
    assert_eq!(s.get_record("sp", "k").await.unwrap().unwrap().value, b"v");
    let after_open = disk(&s);
    assert!(after_open >= 1, "read from table files: {after_open}");
    check(s.read("t", 0, 10, 256).await.unwrap(), 10, 256);
    assert_eq!(s.get_record("sp", "k").await.unwrap().unwrap().value, b"v");
    assert_eq!(disk(&s), after_open, "the blocks read are cached now");
    s.close().await;
}

/// `close` releases the data dir whoever still holds the storage (a trace writer, a warm-up, a
/// heartbeat that had not finished yet): the endurance bench's in-process restart failed with
/// "lock hold by current process" when one of them outlived `run`. The handle left answers
/// `Closed`, and what it had written is there for the next open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_releases_the_data_dir_while_a_handle_is_still_held() {
    let dir = tempfile::tempdir().unwrap();
    let first = Arc::new(RocksStorage::open(dir.path(), FlushMode::Async).unwrap());
    first.append("t", vec![msg(0, None, "kept")]).await.unwrap();
    let still_held = first.clone();
    first.close().await;
    let second = RocksStorage::open(dir.path(), FlushMode::Async)
        .expect("the dir opens again while the first storage's handle is still held");
    let read = second.read("t", 0, 0, 10).await.unwrap();
    assert_eq!(read.len(), 1);
    assert!(matches!(
        still_held.read("t", 0, 0, 10).await,
        Err(StorageError::Closed)
    ));
    assert!(matches!(
        still_held.append("t", vec![msg(0, None, "late")]).await,
        Err(StorageError::Closed)
    ));
    // A second close of the closed storage neither waits nor touches the new one.
    still_held.close().await;
    assert_eq!(second.read("t", 0, 0, 10).await.unwrap().len(), 1);
    second.close().await;
}

/// A read still running on a blocking thread when `close` is called (its caller gone: a
/// request cut off, a runner stopped mid-read) holds the database: `close` waits for it, then
/// releases the data dir, rather than returning with the dir still locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_a_read_in_flight_then_releases_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = Arc::new(RocksStorage::open(dir.path(), FlushMode::Async).unwrap());
    first.append("t", vec![msg(0, None, "kept")]).await.unwrap();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (reading, read_started) = tokio::sync::oneshot::channel::<()>();
    let read = {
        let s = first.clone();
        tokio::spawn(async move {
            s.blocking(move |_db| {
                let _ = reading.send(());
                let _ = held.recv();
                Ok(())
            })
            .await
        })
    };
    read_started.await.unwrap();
    let closing = {
        let s = first.clone();
        tokio::spawn(async move { s.close().await })
    };
    // Until close has taken the database out: from then on it waits for the read.
    while !first.db.closed.load(Ordering::Acquire) {
        tokio::task::yield_now().await;
    }
    assert!(
        !closing.is_finished(),
        "close returned while a read held the database"
    );
    release.send(()).unwrap();
    closing.await.unwrap();
    // Opened as soon as close returned (the read's task may not have been polled again yet).
    let second = RocksStorage::open(dir.path(), FlushMode::Async)
        .expect("the dir opens once close returned");
    read.await.unwrap().unwrap();
    assert_eq!(second.read("t", 0, 0, 10).await.unwrap().len(), 1);
    second.close().await;
}
