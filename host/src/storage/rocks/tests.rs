//! The RocksDB backend against the conformance suite, and its group commit.

use super::*;
use crate::storage::conformance::msg;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let open = move || {
        let path = path.clone();
        Box::pin(async move {
            Arc::new(RocksStorage::open(&path, FlushMode::Sync).unwrap()) as Arc<dyn Storage>
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Storage>> + Send>>
    };
    crate::storage::conformance::run_all(&open).await;
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
