//! The `wasmq` binary: everything happens in [`wasmq::cli`].

fn main() -> std::process::ExitCode {
    wasmq::cli::main()
}
