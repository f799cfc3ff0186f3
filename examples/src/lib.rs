//! The seed scenarios of wasmq as runnable examples (filled in by the scenarios issue).
