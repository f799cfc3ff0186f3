//! Native stand-ins for the host, for unit tests of plugin logic: in-memory kv, captured logs,
//! published messages, emails and SMS, and a settable config and identity (per thread).

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::Message;
use crate::bindings::wasmq::plugin::log::Level;
use crate::bindings::wasmq::plugin::publish::Outgoing;

#[derive(Default)]
struct Fake {
    kv: BTreeMap<String, Vec<u8>>,
    logs: Vec<(Level, String)>,
    published: Vec<Outgoing>,
    emails: Vec<(String, String, String, Option<String>)>,
    sms: Vec<(String, String)>,
    config: Option<String>,
    fail_next: Option<crate::Error>,
}

thread_local! {
    static FAKE: RefCell<Fake> = RefCell::new(Fake::default());
}

fn with<R>(f: impl FnOnce(&mut Fake) -> R) -> R {
    FAKE.with(|cell| f(&mut cell.borrow_mut()))
}

/// A message with this body and plausible other fields.
pub fn message(body: impl Into<Vec<u8>>) -> Message {
    Message {
        id: "00000000-0000-7000-8000-000000000001".into(),
        topic: "test".into(),
        queue: 0,
        offset: 0,
        key: None,
        tag: None,
        sharding_key: None,
        properties: Vec::new(),
        body: body.into(),
        born_at: 0,
        attempt: 1,
    }
}

/// Forgets all fake state of this thread.
pub fn reset() {
    with(|f| *f = Fake::default());
}
pub fn set_config(json: &str) {
    with(|f| f.config = Some(json.to_string()));
}
/// The next capability call (email, sms, publish, http) fails with `error`.
pub fn fail_next(error: crate::Error) {
    with(|f| f.fail_next = Some(error));
}
pub fn logs() -> Vec<(Level, String)> {
    with(|f| f.logs.clone())
}
pub fn published() -> Vec<Outgoing> {
    with(|f| f.published.clone())
}
/// (to, subject, text, html) of each email sent.
pub fn emails() -> Vec<(String, String, String, Option<String>)> {
    with(|f| f.emails.clone())
}
/// (to, text) of each SMS sent.
pub fn sms() -> Vec<(String, String)> {
    with(|f| f.sms.clone())
}

fn take_failure() -> Result<(), crate::Error> {
    with(|f| f.fail_next.take()).map_or(Ok(()), Err)
}

#[doc(hidden)]
pub mod fake {
    use super::*;
    use crate::Error;

    pub mod log {
        use super::*;
        pub fn log(level: Level, message: &str) {
            with(|f| f.logs.push((level, message.to_string())));
        }
    }

    pub mod kv {
        use super::*;
        pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
            Ok(with(|f| f.kv.get(key).cloned()))
        }
        pub fn set(key: &str, value: &[u8]) -> Result<(), Error> {
            with(|f| f.kv.insert(key.to_string(), value.to_vec()));
            Ok(())
        }
        pub fn delete(key: &str) -> Result<(), Error> {
            with(|f| f.kv.remove(key));
            Ok(())
        }
        pub fn list_keys(prefix: &str, limit: u32) -> Result<Vec<String>, Error> {
            Ok(with(|f| {
                f.kv.keys()
                    .filter(|k| k.starts_with(prefix))
                    .take(limit as usize)
                    .cloned()
                    .collect()
            }))
        }
    }

    pub mod publish {
        use super::*;
        pub fn send(message: &Outgoing) -> Result<String, Error> {
            take_failure()?;
            Ok(with(|f| {
                f.published.push(message.clone());
                format!("fake-{}", f.published.len())
            }))
        }
    }

    pub mod context {
        use super::*;
        use crate::Identity;
        pub fn identity() -> Identity {
            Identity {
                group: "test".into(),
                plugin: "test".into(),
                plugin_version: 1,
                instance_index: 0,
                instance_count: 1,
            }
        }
        pub fn config() -> String {
            with(|f| f.config.clone()).unwrap_or_else(|| "{}".into())
        }
    }

    pub mod email {
        use super::*;
        pub fn send(to: &str, subject: &str, text: &str, html: Option<&str>) -> Result<(), Error> {
            take_failure()?;
            with(|f| {
                f.emails.push((
                    to.into(),
                    subject.into(),
                    text.into(),
                    html.map(String::from),
                ))
            });
            Ok(())
        }
    }

    pub mod sms {
        use super::*;
        pub fn send(to: &str, text: &str) -> Result<(), Error> {
            take_failure()?;
            with(|f| f.sms.push((to.into(), text.into())));
            Ok(())
        }
    }

    pub mod http {
        use super::*;
        use crate::bindings::wasmq::plugin::http::{Request, Response};
        pub fn send(_req: &Request) -> Result<Response, Error> {
            take_failure()?;
            Err(Error::Denied("no HTTP in native tests".into()))
        }
    }
}
