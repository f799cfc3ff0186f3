//! A transaction checker for tests: the half message's body says what to answer
//! (`"commit"`, `"rollback"`), or how to misbehave (`"trap"`, `"loop"`); anything else is
//! unknown.

use wasmq_guest_sdk::{CheckResult, Checker, Message, MessageExt};

pub struct BodyChecker;

impl Checker for BodyChecker {
    fn check_transaction(message: Message) -> CheckResult {
        match message.json::<String>().as_deref() {
            Ok("commit") => CheckResult::Commit,
            Ok("rollback") => CheckResult::Rollback,
            Ok("trap") => panic!("checker asked to trap"),
            Ok("loop") => loop {
                std::hint::black_box(message.attempt);
            },
            _ => CheckResult::Unknown,
        }
    }
}

wasmq_guest_sdk::export!(BodyChecker);
