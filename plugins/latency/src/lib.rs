//! Measures publish→handle latency inside the plugin: the producer stamps `sent_us` (wall
//! clock, µs) on each message; this plugin subtracts it from the time `handle` starts, keeps
//! the samples in memory and publishes them in batches of `every` to the `report` topic.

use std::cell::RefCell;

use serde::Deserialize;
use wasmq_guest_sdk::{Consumer, Message, MessageExt, Outcome, context, publish};

#[derive(Deserialize)]
struct Config {
    report: String,
    every: usize,
}

thread_local! {
    static SAMPLES: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

pub struct Latency;

impl Consumer for Latency {
    fn handle(message: Message) -> Outcome {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let Some(sent) = message
            .property("sent_us")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return Outcome::Ack;
        };
        let Ok(config) = context::config::<Config>() else {
            return Outcome::Reject("config needs report and every".into());
        };
        let full = SAMPLES.with(|s| {
            let mut s = s.borrow_mut();
            s.push(now.saturating_sub(sent));
            (s.len() >= config.every).then(|| std::mem::take(&mut *s))
        });
        if let Some(batch) = full
            && publish::send_json(&config.report, &batch).is_err()
        {
            return Outcome::Retry(0);
        }
        Outcome::Ack
    }
}

wasmq_guest_sdk::export!(Latency);
