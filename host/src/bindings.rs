//! The one place the WIT contract is bound for the host (`wit/wasmq.wit`).
//!
//! Imports are async (a capability may wait on SMTP or HTTP without blocking other instances)
//! and trappable: a host function returns `wasmtime::Result<T>`, where an `Err` traps the guest
//! and `T` (often `Result<_, types::Error>`) is what the guest sees.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use exports::wasmq::plugin::checker;
pub use exports::wasmq::plugin::consumer;
pub use wasmq::plugin::types::{CheckResult, Error as GuestError, Message, Outcome};

/// The version of the WIT package this host implements.
pub const WIT_VERSION: &str = "0.1.0";
/// Export names, as components name them.
pub const CONSUMER_EXPORT: &str = "wasmq:plugin/consumer@0.1.0";
pub const CHECKER_EXPORT: &str = "wasmq:plugin/checker@0.1.0";

impl Message {
    /// The guest's view of a message of `topic` at `offset` (0 for a half message, which has
    /// no offset yet), delivered for the `attempt`-th time.
    pub fn of(topic: &str, offset: u64, m: &crate::storage::NewMessage, attempt: u32) -> Message {
        Message {
            id: m.id.to_string(),
            topic: topic.to_string(),
            queue: m.queue,
            offset,
            key: m.key.clone(),
            tag: m.tag.clone(),
            sharding_key: m.sharding_key.clone(),
            properties: m
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            body: m.body.clone(),
            born_at: m.born_at,
            attempt,
        }
    }
}
