//! A test plugin that does what each message's JSON body says, and reports results in its
//! reject reason (the invoke API shows it), so tests can reach every host capability.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use serde_json::json;
use wasmq_guest_sdk::{
    Consumer, Message, MessageExt, Outcome, context, email, http, kv, log, publish, sms,
};

pub struct Probe;

/// Calls seen by this instance: shows whether instances live across messages.
static CALLS: AtomicU64 = AtomicU64::new(0);

#[derive(Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case")]
enum Command {
    Ack,
    Retry {
        after_ms: u64,
    },
    Reject {
        reason: String,
    },
    Config,
    Identity,
    Calls,
    KvSet {
        key: String,
        value: String,
    },
    KvGet {
        key: String,
    },
    KvDelete {
        key: String,
    },
    KvList {
        prefix: String,
    },
    Publish {
        topic: String,
        body: serde_json::Value,
    },
    Email,
    Sms,
    Http {
        url: String,
    },
    Log {
        lines: u32,
    },
    /// Logs this text as one line, whatever it holds.
    Say {
        text: String,
    },
    /// Calls an ungranted capability `calls` times, as a hostile plugin would.
    Flood {
        calls: u32,
    },
    /// Sleeps `ms` milliseconds (a WASI clock wait, no CPU) and acks.
    Sleep {
        ms: u64,
    },
}

fn fail(e: &wasmq_guest_sdk::Error) -> Outcome {
    report(json!({"error": format!("{}: {}", e.kind(), e.message())}))
}

fn report(v: serde_json::Value) -> Outcome {
    Outcome::Reject(v.to_string())
}

impl Consumer for Probe {
    fn handle(message: Message) -> Outcome {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        let command = match message.json::<Command>() {
            Ok(c) => c,
            Err(e) => return Outcome::Reject(format!("unknown command: {e}")),
        };
        match command {
            Command::Ack => Outcome::Ack,
            Command::Retry { after_ms } => Outcome::Retry(after_ms),
            Command::Reject { reason } => Outcome::Reject(reason),
            Command::Config => report(json!({"config": context::config_json()})),
            Command::Identity => {
                let i = context::identity();
                report(
                    json!({"group": i.group, "plugin": i.plugin, "version": i.plugin_version,
                              "index": i.instance_index, "count": i.instance_count,
                              "attempt": message.attempt, "topic": message.topic}),
                )
            }
            Command::Calls => report(json!({"calls": calls})),
            Command::KvSet { key, value } => match kv::set(&key, value.as_bytes()) {
                Ok(()) => Outcome::Ack,
                Err(e) => fail(&e),
            },
            Command::KvGet { key } => match kv::get(&key) {
                Ok(v) => {
                    report(json!({"value": v.map(|b| String::from_utf8_lossy(&b).into_owned())}))
                }
                Err(e) => fail(&e),
            },
            Command::KvDelete { key } => match kv::delete(&key) {
                Ok(()) => Outcome::Ack,
                Err(e) => fail(&e),
            },
            Command::KvList { prefix } => match kv::list_keys(&prefix, 100) {
                Ok(keys) => report(json!({"keys": keys})),
                Err(e) => fail(&e),
            },
            Command::Publish { topic, body } => match publish::send_json(&topic, &body) {
                Ok(id) => report(json!({"id": id})),
                Err(e) => fail(&e),
            },
            Command::Email => match email::send("a@example.com", "hi", "text", None) {
                Ok(()) => report(json!({"sent": true})),
                Err(e) => fail(&e),
            },
            Command::Sms => match sms::send("+15550100", "hi") {
                Ok(()) => report(json!({"sent": true})),
                Err(e) => fail(&e),
            },
            Command::Http { url } => match http::get(&url) {
                Ok(r) => report(json!({"status": r.status})),
                Err(e) => fail(&e),
            },
            Command::Flood { calls } => {
                let denied = (0..calls)
                    .filter(|_| {
                        matches!(
                            email::send("x@example.com", "s", "t", None),
                            Err(wasmq_guest_sdk::Error::Denied(_))
                        )
                    })
                    .count();
                report(json!({"denied": denied}))
            }
            Command::Sleep { ms } => {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Outcome::Ack
            }
            Command::Say { text } => {
                log::warn(&text);
                Outcome::Ack
            }
            Command::Log { lines } => {
                for i in 0..lines {
                    log::info(&format!("log line {i}"));
                }
                Outcome::Ack
            }
        }
    }
}

wasmq_guest_sdk::export!(Probe);
