//! Disk quota: the data directory's size and the filesystem's free space, sampled and
//! advanced by every write accepted since, so that publishing (and plugin kv writes) are refused
//! with a retryable 503 before the disk fills instead of failing later.
//!
//! The bound holds to within the requests in flight, whatever the machine's speed: each write
//! reserves its estimated size before it is stored ([`DiskGuard::reserve`]), and a sample
//! replaces the reservations made before it started with what the files really hold.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the sizes are sampled (reservations count what arrives in between).
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
    /// Bytes the data directory held at the last sample.
    used: AtomicU64,
    /// Bytes free on the filesystem at the last sample.
    free: AtomicU64,
    /// Bytes reserved by writes accepted since the last sample started.
    reserved: AtomicU64,
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
            reserved: AtomicU64::new(0),
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
        // Writes reserved before the walk are in the files it reads (or were refused); those
        // reserved during the walk stay reserved until the next sample, counted twice at worst.
        let before = self.reserved.load(Ordering::Acquire);
        // An unreadable file (deleted by a compaction mid-walk) just does not count.
        let used = dir_size(&self.dir);
        self.used.store(used, Ordering::Relaxed);
        self.reserved.fetch_sub(before, Ordering::AcqRel);
        match rustix::fs::statvfs(&self.dir) {
            Ok(s) => self
                .free
                .store(s.f_bavail.saturating_mul(s.f_frsize), Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot read free disk space")
            }
        }
    }

    /// Bytes the data directory holds: at the last sample, plus what was reserved since.
    pub fn used(&self) -> u64 {
        self.used
            .load(Ordering::Relaxed)
            .saturating_add(self.reserved.load(Ordering::Relaxed))
    }

    /// Bytes free on its filesystem: at the last sample, less what was reserved since.
    pub fn free(&self) -> u64 {
        self.free
            .load(Ordering::Relaxed)
            .saturating_sub(self.reserved.load(Ordering::Relaxed))
    }

    /// Refuses a write while the quota or the free-space floor is reached; otherwise reserves
    /// `bytes` (an estimate of what the write will take on disk) until the next sample, so
    /// writes accepted between samples count at once. A refused write reserves nothing.
    ///
    /// Errors: [`DiskFull::Quota`] (`[limits] max_disk_bytes`), [`DiskFull::Free`]
    /// (`[limits] min_free_disk_bytes`).
    pub fn reserve(&self, bytes: u64) -> Result<(), DiskFull> {
        self.check()?;
        if self.max_bytes > 0 || self.min_free_bytes > 0 {
            self.reserved.fetch_add(bytes, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Whether a write would be refused now (nothing is reserved).
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

/// Bytes of the files under `dir`, recursively (unreadable entries count 0).
pub fn dir_size(dir: &Path) -> u64 {
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

    /// Writes accepted between two samples count at once: however fast they come, the quota
    /// is passed by at most the last write accepted.
    #[test]
    fn reservations_hold_the_quota_between_samples() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::new(dir.path(), 10_000, 0);
        let mut accepted = 0u64;
        while g.reserve(3000).is_ok() {
            accepted += 3000;
            assert!(accepted < 100_000, "the quota never applied");
        }
        assert_eq!(accepted, 12_000, "refused once 10 000 bytes were reserved");
        assert!(matches!(
            g.check(),
            Err(DiskFull::Quota { used: 12_000, .. })
        ));
        // A sample replaces the reservations with what the files hold (nothing was written).
        g.sample();
        assert_eq!(g.used(), 0);
        assert!(g.reserve(3000).is_ok());
        // Without a quota or floor nothing is reserved.
        let g = DiskGuard::new(dir.path(), 0, 0);
        g.reserve(u64::MAX).unwrap();
        g.reserve(u64::MAX).unwrap();
        assert_eq!(g.used(), 0);
    }
}
