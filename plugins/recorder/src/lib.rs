//! Records every message it acknowledges to an audit topic (what it saw, with its tag, key and
//! properties; which instance, which attempt, when), so tests can check delivery order, counts and timing. Failures on request:
//! a body's `fail_attempts` (or the config's, for one instance or all) makes the first attempts
//! answer `retry`; a body's `reject` makes it `reject` unless the config says `honor_reject: false`.

use serde::Deserialize;
use serde_json::{Value, json};
use wasmq_guest_sdk::{Consumer, Message, MessageExt, Outcome, context, publish};

#[derive(Deserialize)]
struct Config {
    audit: String,
    /// Fail the first `fail_attempts` attempts of every message (on `fail_instance` only, if set).
    #[serde(default)]
    fail_attempts: u32,
    #[serde(default)]
    fail_instance: Option<u32>,
    #[serde(default = "yes")]
    honor_reject: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
struct Body {
    #[serde(default)]
    fail_attempts: u32,
    #[serde(default)]
    reject: bool,
}

pub struct Recorder;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Consumer for Recorder {
    fn handle(message: Message) -> Outcome {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Outcome::Reject(format!("bad config: {}", e.message())),
        };
        let me = context::identity();
        let body: Value = message.json().unwrap_or(Value::Null);
        let asked: Body = serde_json::from_value(body.clone()).unwrap_or_default();
        if asked.reject && config.honor_reject {
            return Outcome::Reject("the message asked to be rejected".into());
        }
        let mine = config.fail_instance.is_none_or(|i| i == me.instance_index);
        let fail = asked
            .fail_attempts
            .max(if mine { config.fail_attempts } else { 0 });
        if message.attempt <= fail {
            return Outcome::Retry(0);
        }
        let record = json!({
            "id": message.id, "queue": message.queue, "offset": message.offset,
            "key": message.sharding_key, "instance": me.instance_index, "attempt": message.attempt,
            "handled_at": now_ms(), "body": body, "tag": message.tag,
            "business_key": message.key,
            "properties": message.properties.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        });
        match publish::send_json(&config.audit, &record) {
            Ok(_) => Outcome::Ack,
            Err(_) => Outcome::Retry(0),
        }
    }
}

wasmq_guest_sdk::export!(Recorder);
