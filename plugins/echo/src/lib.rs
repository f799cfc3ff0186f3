//! Acks every message, after logging its id.

use wasmq_guest_sdk::{Consumer, Message, Outcome, log};

pub struct Echo;

impl Consumer for Echo {
    fn handle(message: Message) -> Outcome {
        log::debug(&format!(
            "echo {} ({} bytes)",
            message.id,
            message.body.len()
        ));
        Outcome::Ack
    }
}

wasmq_guest_sdk::export!(Echo);
