//! Disk quota: samples the data directory's size and the filesystem's free space, so that
//! publishing is refused with a retryable 503 before the disk fills instead of failing later.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the sizes are sampled: a burst can overshoot the bound by what arrives in this time.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// Why a publish is refused for now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiskFull {
    #[error(
        "the data directory holds {used} bytes, at its quota of {max} bytes ([limits] max_disk_bytes)"
    )]
    Quota { used: u64, max: u64 },
    #[error(
        "the disk has {free} bytes free, below the {min} bytes kept free ([limits] min_free_disk_bytes)"
    )]
    Free { free: u64, min: u64 },
}

#[derive(Debug)]
pub struct DiskGuard {
    dir: PathBuf,
    /// 0 = no quota.
    max_bytes: u64,
    /// 0 = no floor.
    min_free_bytes: u64,
    used: AtomicU64,
    free: AtomicU64,
}

impl DiskGuard {
    /// Samples once, so the first publish is already checked.
    pub fn new(dir: &Path, max_bytes: u64, min_free_bytes: u64) -> Arc<Self> {
        let guard = Arc::new(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            min_free_bytes,
            used: AtomicU64::new(0),
            free: AtomicU64::new(u64::MAX),
        });
        guard.sample();
        guard
    }

    /// Re-samples in the background until `stop` is cancelled.
    pub fn spawn_sampler(self: &Arc<Self>, stop: CancellationToken) {
        let guard = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(SAMPLE_EVERY) => {}
                }
                let g = guard.clone();
                let _ = tokio::task::spawn_blocking(move || g.sample()).await;
            }
        });
    }

    fn sample(&self) {
        // An unreadable file (deleted by a compaction mid-walk) just does not count.
        let used = dir_size(&self.dir);
        self.used.store(used, Ordering::Relaxed);
        match rustix::fs::statvfs(&self.dir) {
            Ok(s) => self
                .free
                .store(s.f_bavail.saturating_mul(s.f_frsize), Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot read free disk space")
            }
        }
    }

    /// Bytes the data directory held at the last sample.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes free on its filesystem at the last sample.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    pub fn check(&self) -> Result<(), DiskFull> {
        let used = self.used();
        if self.max_bytes > 0 && used >= self.max_bytes {
            return Err(DiskFull::Quota {
                used,
                max: self.max_bytes,
            });
        }
        let free = self.free();
        if self.min_free_bytes > 0 && free < self.min_free_bytes {
            return Err(DiskFull::Free {
                free,
                min: self.min_free_bytes,
            });
        }
        Ok(())
    }
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_and_free_space_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 3000]).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![0u8; 2000]).unwrap();
        let g = DiskGuard::new(dir.path(), 10_000, 0);
        assert_eq!(g.used(), 5000);
        assert!(g.check().is_ok());
        std::fs::write(dir.path().join("c"), vec![0u8; 5000]).unwrap();
        assert!(g.check().is_ok(), "not sampled yet");
        g.sample();
        assert!(matches!(
            g.check(),
            Err(DiskFull::Quota {
                used: 10_000,
                max: 10_000
            })
        ));
        // No filesystem has u64::MAX bytes free.
        let g = DiskGuard::new(dir.path(), 0, u64::MAX);
        assert!(matches!(g.check(), Err(DiskFull::Free { .. })));
        assert!(DiskGuard::new(dir.path(), 0, 1).check().is_ok());
    }
}
