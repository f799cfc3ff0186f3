//! Decides a half sign-up message (the registration scenario): asks the registration service,
//! over the granted HTTP capability, whether the user was written. Written: commit. Not found:
//! rollback. No answer: unknown (the broker asks again later).

use serde::Deserialize;
use wasmq_guest_sdk::{CheckResult, Checker, Message, MessageExt, context, http, log};

#[derive(Deserialize)]
struct Config {
    /// The registration service, e.g. `http://127.0.0.1:8081`.
    service: String,
}

#[derive(Deserialize)]
struct Signup {
    user_id: String,
}

pub struct RegistrationChecker;

impl Checker for RegistrationChecker {
    fn check_transaction(message: Message) -> CheckResult {
        let (Ok(config), Ok(signup)) = (context::config::<Config>(), message.json::<Signup>())
        else {
            return CheckResult::Unknown;
        };
        match http::get(&format!(
            "{}/users/{}",
            config.service.trim_end_matches('/'),
            signup.user_id
        )) {
            Ok(r) if r.status == 200 => CheckResult::Commit,
            Ok(r) if r.status == 404 => CheckResult::Rollback,
            Ok(r) => {
                log::warn(&format!("registration service answered {}", r.status));
                CheckResult::Unknown
            }
            Err(e) => {
                log::warn(&format!(
                    "registration service unreachable: {}",
                    e.message()
                ));
                CheckResult::Unknown
            }
        }
    }
}

wasmq_guest_sdk::export!(RegistrationChecker);
