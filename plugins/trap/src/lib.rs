//! Panics on every message; in wasm a panic aborts, which the host sees as a trap.

use wasmq_guest_sdk::{Consumer, Message, Outcome};

pub struct Trap;

impl Consumer for Trap {
    fn handle(message: Message) -> Outcome {
        panic!("trap plugin: message {} makes me panic", message.id)
    }
}

wasmq_guest_sdk::export!(Trap);
