//! A transaction checker for tests: the half message's body says what to answer
//! (`"commit"`, `"rollback"`), or how to misbehave (`"trap"`, `"loop"`); anything else is
//! unknown. `"count-unknown"` adds one to the kv counter `answers` and answers unknown;
//! `"count-commit-if-first"` adds one and commits if the counter is now 1, else answers
//! unknown; `"count-rollback"` adds one and rolls back (a checker's kv writes are stored with
//! a decision only).

use wasmq_guest_sdk::{CheckResult, Checker, Message, MessageExt, kv};

/// Adds one to the kv counter `answers`; its new value.
fn count() -> u64 {
    let n = kv::get("answers")
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let _ = kv::set("answers", (n + 1).to_string().as_bytes());
    n + 1
}

pub struct BodyChecker;

impl Checker for BodyChecker {
    fn check_transaction(message: Message) -> CheckResult {
        match message.json::<String>().as_deref() {
            Ok("commit") => CheckResult::Commit,
            Ok("rollback") => CheckResult::Rollback,
            Ok("trap") => panic!("checker asked to trap"),
            Ok("count-commit-if-first") => match count() {
                1 => CheckResult::Commit,
                _ => CheckResult::Unknown,
            },
            Ok("count-rollback") => {
                count();
                CheckResult::Rollback
            }
            Ok("count-unknown") => {
                count();
                CheckResult::Unknown
            }
            Ok("loop") => loop {
                std::hint::black_box(message.attempt);
            },
            _ => CheckResult::Unknown,
        }
    }
}

wasmq_guest_sdk::export!(BodyChecker);
