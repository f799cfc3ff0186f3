//! File descriptors: the soft `nofile` limit raised to the hard one at start, and the budget
//! that keeps storage's share of them out of reach of connections, so a connection flood is
//! answered 503 at the cap instead of taking the descriptors RocksDB needs for its next
//! write-ahead log or table file.

/// Table files RocksDB keeps open at most (`max_open_files`).
pub const STORAGE_OPEN_FILES: u64 = 256;
/// Beyond its tables: write-ahead logs, MANIFEST, LOCK, info log, blob files, directories.
const STORAGE_OTHER: u64 = 64;
/// Everything else the process opens: listener, plugin artifacts, capability connections
/// (SMTP, SMS, HTTP), NATS connections, log-follow streams, stdio.
const PROCESS_OTHER: u64 = 128;
/// Descriptors set aside for everything but connections.
pub const RESERVED: u64 = STORAGE_OPEN_FILES + STORAGE_OTHER + PROCESS_OTHER;
/// Fewer connections than this and the server is not worth running.
const MIN_CONNECTIONS: u64 = 16;
/// The most connections `auto` gives, however many descriptors there are.
const MAX_AUTO_CONNECTIONS: u64 = 4096;

/// Raises the soft `nofile` limit to the hard limit (systemd's default soft limit is 1024);
/// returns the soft limit now in force (`None`: unlimited or unknown).
pub fn raise_nofile() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-files limit to the hard limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The connection cap for `[server] max_connections` (0 = derive it) under a `nofile` soft
/// limit: what is left after [`RESERVED`], at most [`MAX_AUTO_CONNECTIONS`] when derived.
/// Errors (naming the key and the numbers) when the limit leaves too little, or when an
/// explicit cap would let connections take descriptors storage needs.
pub fn connection_cap(configured: usize, nofile: Option<u64>) -> Result<usize, String> {
    let left = nofile.map(|n| n.saturating_sub(RESERVED));
    let cap = match (configured, left) {
        (0, None) => MAX_AUTO_CONNECTIONS,
        (0, Some(left)) => left.min(MAX_AUTO_CONNECTIONS),
        (n, None) => n as u64,
        (n, Some(left)) if n as u64 <= left => n as u64,
        (n, Some(left)) => {
            return Err(format!(
                "[server] max_connections = {n} would let connections take the file descriptors \
                 storage needs: the open-files limit is {} and {RESERVED} are kept for storage and \
                 the rest, leaving {left}; lower max_connections (0 derives it) or raise the limit \
                 (ulimit -n, systemd LimitNOFILE)",
                nofile.unwrap_or(0)
            ));
        }
    };
    if configured == 0 && cap < MIN_CONNECTIONS {
        return Err(format!(
            "the open-files limit ({}) leaves {cap} connections after the {RESERVED} descriptors \
             kept for storage; raise it (ulimit -n, systemd LimitNOFILE) to at least {}",
            nofile.unwrap_or(0),
            RESERVED + MIN_CONNECTIONS
        ));
    }
    usize::try_from(cap).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_what_storage_leaves() {
        // systemd's default soft limit: storage keeps its share, connections get the rest.
        assert_eq!(
            connection_cap(0, Some(1024)),
            Ok((1024 - RESERVED) as usize)
        );
        assert_eq!(connection_cap(0, Some(1 << 20)), Ok(4096));
        assert_eq!(connection_cap(0, None), Ok(4096));
        assert_eq!(connection_cap(100, Some(1024)), Ok(100));
        assert_eq!(
            connection_cap(4, Some(1024)),
            Ok(4),
            "a small explicit cap is the admin's"
        );
        let err = connection_cap(1024, Some(1024)).unwrap_err();
        assert!(err.contains("max_connections = 1024"), "{err}");
        assert!(connection_cap(0, Some(RESERVED + 3)).is_err());
        assert!(connection_cap(0, Some(10)).is_err());
    }
}
