//! Loops forever without calling the host: only the CPU deadline can stop it.

use wasmq_guest_sdk::{Consumer, Message, Outcome};

pub struct Spin;

impl Consumer for Spin {
    fn handle(message: Message) -> Outcome {
        let mut x = message.offset;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            if x == 42 && std::hint::black_box(false) {
                return Outcome::Ack;
            }
        }
    }
}

wasmq_guest_sdk::export!(Spin);
