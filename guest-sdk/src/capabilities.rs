//! Typed wrappers over the host's imports. On wasm32 they call the host; natively they use the
//! in-memory fakes of [`crate::testing`], so plugin logic can be unit-tested with `cargo test`.

use crate::Error;

#[cfg(target_arch = "wasm32")]
use crate::bindings::wasmq::plugin as sys;
#[cfg(not(target_arch = "wasm32"))]
use crate::testing::fake as sys;

/// Log lines go to the plugin's log ring in the broker and to its tracing output.
pub mod log {
    use super::sys;
    pub use crate::bindings::wasmq::plugin::log::Level;

    pub fn log(level: Level, message: &str) {
        sys::log::log(level, message);
    }
    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }
    pub fn info(message: &str) {
        log(Level::Info, message);
    }
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}

/// Durable key-value state private to this plugin (shared by its instances).
pub mod kv {
    use super::{Error, sys};

    pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
        sys::kv::get(key)
    }
    pub fn set(key: &str, value: &[u8]) -> Result<(), Error> {
        sys::kv::set(key, value)
    }
    pub fn delete(key: &str) -> Result<(), Error> {
        sys::kv::delete(key)
    }
    /// Keys starting with `prefix`, in order, at most `limit`.
    pub fn list_keys(prefix: &str, limit: u32) -> Result<Vec<String>, Error> {
        sys::kv::list_keys(prefix, limit)
    }
    /// A JSON value; a stored value that is not valid JSON for `T` is `Error::Invalid`.
    pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
        match get(key)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Invalid(format!("kv {key}: {e}"))),
            None => Ok(None),
        }
    }
    pub fn set_json<T: serde::Serialize>(key: &str, value: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Invalid(e.to_string()))?;
        set(key, &bytes)
    }
}

/// Publishing to topics the subscription granted.
pub mod publish {
    use super::{Error, sys};
    pub use crate::bindings::wasmq::plugin::publish::Outgoing;

    /// A message with just a body; set the other fields on the returned value.
    pub fn message(topic: &str, body: impl Into<Vec<u8>>) -> Outgoing {
        Outgoing {
            topic: topic.to_string(),
            body: body.into(),
            key: None,
            tag: None,
            sharding_key: None,
            properties: Vec::new(),
        }
    }
    /// Publishes and returns the new message's id once it is durable.
    pub fn send(message: &Outgoing) -> Result<String, Error> {
        sys::publish::send(message)
    }
    /// Publishes a JSON body.
    pub fn send_json<T: serde::Serialize>(topic: &str, body: &T) -> Result<String, Error> {
        let bytes = serde_json::to_vec(body).map_err(|e| Error::Invalid(e.to_string()))?;
        send(&message(topic, bytes))
    }
}

/// This instance's identity and its subscription's configuration.
pub mod context {
    use super::{Error, sys};
    use crate::Identity;

    pub fn identity() -> Identity {
        sys::context::identity()
    }
    /// The subscription's `config` as JSON text.
    pub fn config_json() -> String {
        sys::context::config()
    }
    /// The subscription's `config` parsed into `T`.
    pub fn config<T: serde::de::DeserializeOwned>() -> Result<T, Error> {
        serde_json::from_str(&config_json()).map_err(|e| Error::Invalid(format!("config: {e}")))
    }
}

/// Email through the broker's SMTP relay (needs the `email` grant).
pub mod email {
    use super::{Error, sys};

    pub fn send(to: &str, subject: &str, text: &str, html: Option<&str>) -> Result<(), Error> {
        sys::email::send(to, subject, text, html)
    }
}

/// SMS through the broker's gateway (needs the `sms` grant).
pub mod sms {
    use super::{Error, sys};

    pub fn send(to: &str, text: &str) -> Result<(), Error> {
        sys::sms::send(to, text)
    }
}

/// HTTP to allow-listed origins (needs an `http` grant naming the origin).
pub mod http {
    use super::{Error, sys};
    pub use crate::bindings::wasmq::plugin::http::{Request, Response};

    pub fn request(req: &Request) -> Result<Response, Error> {
        sys::http::send(req)
    }
    pub fn get(url: &str) -> Result<Response, Error> {
        request(&Request {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
        })
    }
}

/// The outcome for a side effect's result: done (or done before) acks, a transient failure
/// retries, anything else (denied, invalid, refused) dead-letters with the reason.
pub fn outcome_of<T>(result: Result<T, Error>) -> crate::Outcome {
    match result {
        Ok(_) => crate::Outcome::Ack,
        Err(e) if e.is_transient() => crate::Outcome::Retry(0),
        Err(e) => crate::Outcome::Reject(format!("{}: {}", e.kind(), e.message())),
    }
}

/// Runs `f` at most once per `message_id` (per plugin), so a retried message does not send a
/// second email or SMS. The mark is written only after `f` succeeds; if `f` fails, a retry runs
/// it again. A crash between `f` and the mark can still repeat it once: at-least-once, narrowed.
pub fn once<T>(message_id: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<Option<T>, Error> {
    let mark = format!("__once/{message_id}");
    if kv::get(&mark)?.is_some() {
        return Ok(None);
    }
    let out = f()?;
    kv::set(&mark, b"1")?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn once_runs_a_side_effect_once_per_message_and_again_after_a_failure() {
        testing::reset();
        let send = || email::send("a@b.c", "hi", "text", None);
        testing::fail_next(Error::Unavailable("smtp down".into()));
        assert!(once("m1", send).is_err());
        assert_eq!(testing::emails().len(), 0);
        assert_eq!(once("m1", send).unwrap(), Some(()));
        assert_eq!(once("m1", send).unwrap(), None);
        assert_eq!(once("m2", send).unwrap(), Some(()));
        assert_eq!(testing::emails().len(), 2);
    }

    #[test]
    fn kv_json_and_config() {
        testing::reset();
        kv::set_json("k", &vec![1, 2]).unwrap();
        assert_eq!(kv::get_json::<Vec<u32>>("k").unwrap(), Some(vec![1, 2]));
        kv::set("bad", b"{").unwrap();
        assert!(matches!(kv::get_json::<u32>("bad"), Err(Error::Invalid(_))));
        testing::set_config(r#"{"to":"{{email}}"}"#);
        #[derive(serde::Deserialize)]
        struct C {
            to: String,
        }
        assert_eq!(context::config::<C>().unwrap().to, "{{email}}");
    }
}
