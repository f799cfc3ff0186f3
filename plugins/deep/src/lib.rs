//! Recurses without bound: only the wasm stack limit can stop it.

use wasmq_guest_sdk::{Consumer, Message, Outcome};

pub struct Deep;

#[inline(never)]
#[allow(unconditional_recursion)] // the point of this plugin
fn down(n: u64, pad: [u64; 16]) -> u64 {
    let mut p = std::hint::black_box(pad);
    p[(n % 16) as usize] = n;
    down(n + 1, p) + p[0]
}

impl Consumer for Deep {
    fn handle(message: Message) -> Outcome {
        std::hint::black_box(down(message.offset, [0; 16]));
        Outcome::Ack
    }
}

wasmq_guest_sdk::export!(Deep);
