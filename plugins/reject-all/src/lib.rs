//! Rejects every message: each goes straight to the dead-letter queue.

use wasmq_guest_sdk::{Consumer, Message, Outcome};

pub struct RejectAll;

impl Consumer for RejectAll {
    fn handle(message: Message) -> Outcome {
        Outcome::Reject(format!("reject-all rejects {}", message.id))
    }
}

wasmq_guest_sdk::export!(RejectAll);
