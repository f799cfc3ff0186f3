//! Applies user profile events in order (the ordered-profile scenario): `{"op": "create" |
//! "update" | "delete", "user", "profile", "seq"}` changes the profile kept in kv, then the
//! resulting profile (or null) is published to the config's `output` topic with the user as
//! sharding key, so the output carries each user's changes in order.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use wasmq_guest_sdk::{Consumer, Message, MessageExt, Outcome, context, kv, publish};

#[derive(Deserialize)]
struct Config {
    output: String,
}

#[derive(Deserialize)]
struct Event {
    op: String,
    user: String,
    #[serde(default)]
    profile: Map<String, Value>,
    seq: u64,
}

pub struct ProfileStore;

impl Consumer for ProfileStore {
    fn handle(message: Message) -> Outcome {
        let Ok(config) = context::config::<Config>() else {
            return Outcome::Reject("config needs an output topic".into());
        };
        let Ok(e) = message.json::<Event>() else {
            return Outcome::Reject("not a profile event".into());
        };
        let key = format!("profile/{}", e.user);
        let current: Option<Map<String, Value>> = match kv::get_json(&key) {
            Ok(c) => c,
            Err(_) => return Outcome::Retry(0),
        };
        let next = match (e.op.as_str(), current) {
            ("create", _) => Some(e.profile),
            ("update", Some(mut p)) => {
                p.extend(e.profile);
                Some(p)
            }
            ("update", None) => {
                return Outcome::Reject(format!("update of unknown user {}", e.user));
            }
            ("delete", _) => None,
            (op, _) => return Outcome::Reject(format!("unknown op {op}")),
        };
        let stored = match &next {
            Some(p) => kv::set_json(&key, p),
            None => kv::delete(&key),
        };
        if stored.is_err() {
            return Outcome::Retry(0);
        }
        let mut out = publish::message(
            &config.output,
            json!({"user": e.user, "profile": next, "seq": e.seq}).to_string(),
        );
        out.sharding_key = Some(e.user.clone());
        match publish::send(&out) {
            Ok(_) => Outcome::Ack,
            Err(_) => Outcome::Retry(0),
        }
    }
}

wasmq_guest_sdk::export!(ProfileStore);
