//! Sends one SMS per message. The subscription's config holds templates filled from the
//! message's JSON body: `{"to": "{{phone}}", "text": "Hi {{name}}"}`. Needs the `sms` grant.
//! No recipient: reject. A transient gateway failure: retry. One SMS per message id.

use serde::Deserialize;
use serde_json::Value;
use wasmq_guest_sdk::template::{recipient, render};
use wasmq_guest_sdk::{Consumer, Message, MessageExt, Outcome, context, once, outcome_of, sms};

#[derive(Deserialize)]
struct Config {
    to: String,
    text: String,
}

pub struct SmsNotifier;

impl Consumer for SmsNotifier {
    fn handle(message: Message) -> Outcome {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Outcome::Reject(format!("bad config: {}", e.message())),
        };
        let Ok(data) = message.json::<Value>() else {
            return Outcome::Reject("the message body is not JSON".into());
        };
        let Some(to) = recipient(&config.to, &data) else {
            return Outcome::Reject(format!("no recipient in {:?}", config.to));
        };
        let text = render(&config.text, &data).text;
        outcome_of(once(&message.id, || sms::send(&to, &text)))
    }
}

wasmq_guest_sdk::export!(SmsNotifier);
