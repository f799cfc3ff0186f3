//! Helpers on delivered messages: JSON bodies, text bodies, properties.

use crate::Message;

pub trait MessageExt {
    /// Parses the body as JSON into `T`.
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error>;
    /// The body as UTF-8 text, if it is.
    fn text(&self) -> Option<&str>;
    /// A property by name.
    fn property(&self, name: &str) -> Option<&str>;
}

impl MessageExt for Message {
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
