//! The `wasmq` binary: everything happens in [`wasmq::cli`].

/// mimalloc, not glibc's malloc: requests allocate and free many small buffers on every
/// worker thread, and glibc's arenas and consolidation took 10% of a one-message-per-request
/// publish run's CPU (the peers bench sets the same allocator, so it measures what ships).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    wasmq::base::without_huge_pages();
    wasmq::cli::main()
}
