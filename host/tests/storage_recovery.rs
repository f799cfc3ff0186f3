//! RocksDB storage after an I/O error: with every file descriptor taken, the write that needs a
//! new write-ahead log fails; once descriptors are free again, writes work without a restart and
//! every acknowledged message is still there. Its own test binary: it lowers the process's
//! open-files limit, which would starve tests running beside it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use wasmq::config::FlushMode;
use wasmq::storage::conformance::msg;
use wasmq::storage::{RocksStorage, Storage, StorageError};

/// Large enough that a few dozen fill RocksDB's 64 MiB memtable and force a new WAL file.
const BODY: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocks_writes_again_after_running_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let storage = RocksStorage::open(dir.path(), FlushMode::Sync).unwrap();
    let body = format!("\"{}\"", "x".repeat(BODY - 2));
    let mut acked = Vec::new();
    for _ in 0..3 {
        acked.extend(
            storage
                .append("t", vec![msg(0, None, &body)])
                .await
                .unwrap(),
        );
    }

    // Take every descriptor the (lowered) limit leaves, as a connection flood did.
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(open_now + 64),
            maximum: limit.maximum,
        },
    )
    .unwrap();
    let mut hogs = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hogs.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let mut failed = None;
    for _ in 0..200 {
        match storage.append("t", vec![msg(0, None, &body)]).await {
            Ok(a) => acked.extend(a),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let failed = failed.expect("200 MiB of appends never needed a new file");
    assert!(
        !matches!(failed, StorageError::Closed),
        "the failure is an I/O error, not a closed store: {failed}"
    );

    // Descriptors come back (the flood ended): writes work again, without a restart.
    drop(hogs);
    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).unwrap();
    let mut recovered = None;
    for _ in 0..100 {
        match storage
            .append("t", vec![msg(0, None, "{\"after\":true}")])
            .await
        {
            Ok(a) => {
                recovered = Some(a[0]);
                break;
            }
            Err(e) => {
                // Refused while the database reopens: the kind a client retries.
                assert!(
                    matches!(e, StorageError::Unavailable(_)),
                    "a write after the error: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let recovered = recovered.expect("storage never accepted a write again");

    // Every acknowledged message is there, offsets are dense, and the new one follows them
    // (a write answered with an error may or may not have landed: at most one such).
    let all = storage.read("t", 0, 0, 10_000).await.unwrap();
    for (i, m) in all.iter().enumerate() {
        assert_eq!(m.offset, i as u64, "offsets stay dense");
    }
    for a in &acked {
        let m = storage.message_by_id(a.id).await.unwrap().unwrap();
        assert_eq!(m.offset, a.offset);
        assert_eq!(all[a.offset as usize].message.id, a.id);
    }
    assert!(recovered.offset >= acked.len() as u64);
    assert!(recovered.offset <= acked.len() as u64 + 1);
    assert_eq!(all.last().unwrap().message.id, recovered.id);
    // Writes keep working, and reads see them.
    let more = storage
        .append("t", vec![msg(0, None, "{\"more\":1}")])
        .await
        .unwrap();
    assert_eq!(more[0].offset, recovered.offset + 1);
    assert_eq!(
        storage.high_water("t", 0).await.unwrap(),
        more[0].offset + 1
    );
    storage.close().await;
}
