//! Allocates (and touches) memory without bound: only the memory limit can stop it.

use wasmq_guest_sdk::{Consumer, Message, Outcome};

pub struct Hog;

impl Consumer for Hog {
    fn handle(_message: Message) -> Outcome {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

wasmq_guest_sdk::export!(Hog);
