//! Counts messages per counter in kv and publishes one derived message per input, then, at
//! random, asks for a retry or traps: what exactly-once processing must make harmless (issue
//! 24). Body: `{"counter": NAME}` (default `all`). Config: `{"derived": TOPIC, "retry_percent":
//! N, "trap_percent": N}`. Each derived message is `{"input": ID, "counter": NAME, "value": V}`,
//! V the counter after this message: with exactly-once processing, a counter's derived values
//! are 1, 2, … n, each once, n the number of inputs of that counter.

use serde::Deserialize;
use serde_json::json;
use wasmq_guest_sdk::{Consumer, Message, MessageExt, Outcome, context, kv, publish};

#[derive(Deserialize)]
struct Config {
    derived: String,
    #[serde(default)]
    retry_percent: u32,
    #[serde(default)]
    trap_percent: u32,
}

#[derive(Deserialize, Default)]
struct Body {
    #[serde(default)]
    counter: Option<String>,
}

/// A number from 0 to 99 that differs from call to call (the clock's nanoseconds).
fn roll() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() / 7 % 100)
}

pub struct Tally;

impl Consumer for Tally {
    fn handle(message: Message) -> Outcome {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Outcome::Reject(format!("bad config: {}", e.message())),
        };
        let body: Body = message.json().unwrap_or_default();
        let counter = body.counter.unwrap_or_else(|| "all".into());
        let key = format!("count/{counter}");
        let value = match kv::get(&key) {
            Ok(v) => v
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0),
            Err(e) => return Outcome::Retry(0).or_log(e.message()),
        };
        let next = value + 1;
        if let Err(e) = kv::set(&key, next.to_string().as_bytes()) {
            return Outcome::Retry(0).or_log(e.message());
        }
        let derived = json!({"input": message.id, "counter": counter, "value": next});
        if let Err(e) = publish::send_json(&config.derived, &derived) {
            return Outcome::Retry(0).or_log(e.message());
        }
        let r = roll();
        if r < config.trap_percent {
            panic!("a trap after the kv write and the publish");
        }
        if r < config.trap_percent + config.retry_percent {
            return Outcome::Retry(0);
        }
        Outcome::Ack
    }
}

trait OrLog {
    fn or_log(self, why: &str) -> Self;
}

impl OrLog for Outcome {
    fn or_log(self, why: &str) -> Self {
        wasmq_guest_sdk::log::warn(why);
        self
    }
}

wasmq_guest_sdk::export!(Tally);
