//! Sends one email per message. The subscription's config holds templates filled from the
//! message's JSON body: `{"to": "{{email}}", "subject": "Welcome {{name}}", "text": "...",
//! "html": null}`. Needs the `email` grant. No recipient: reject. A transient SMTP failure:
//! retry. A retried message never sends a second email (idempotent per message id).

use serde::Deserialize;
use serde_json::Value;
use wasmq_guest_sdk::template::{recipient, render};
use wasmq_guest_sdk::{Consumer, Message, MessageExt, Outcome, context, email, once, outcome_of};

#[derive(Deserialize)]
struct Config {
    to: String,
    subject: String,
    text: String,
    #[serde(default)]
    html: Option<String>,
}

pub struct EmailNotifier;

impl Consumer for EmailNotifier {
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
        let subject = render(&config.subject, &data).text;
        let text = render(&config.text, &data).text;
        let html = config.html.as_deref().map(|h| render(h, &data).text);
        outcome_of(once(&message.id, || {
            email::send(&to, &subject, &text, html.as_deref())
        }))
    }
}

wasmq_guest_sdk::export!(EmailNotifier);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_guest_sdk::{Error, testing};

    #[test]
    fn renders_sends_once_and_retries_transient_failures() {
        testing::reset();
        testing::set_config(
            r#"{"to":"{{email}}","subject":"Welcome {{name}}","text":"Hi {{name}}"}"#,
        );
        let msg = testing::message(r#"{"email":"ann@example.com","name":"Ann"}"#);
        testing::fail_next(Error::Unavailable("smtp down".into()));
        assert_eq!(EmailNotifier::handle(msg.clone()), Outcome::Retry(0));
        assert_eq!(EmailNotifier::handle(msg.clone()), Outcome::Ack);
        assert_eq!(EmailNotifier::handle(msg), Outcome::Ack);
        let sent = testing::emails();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].0.as_str(), sent[0].1.as_str(), sent[0].2.as_str()),
            ("ann@example.com", "Welcome Ann", "Hi Ann")
        );
        assert!(matches!(
            EmailNotifier::handle(testing::message(r#"{"name":"Bob"}"#)),
            Outcome::Reject(_)
        ));
    }
}
