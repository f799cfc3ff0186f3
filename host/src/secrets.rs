//! Secret references in plugin config: a value `{"$secret": "NAME"}` anywhere in a
//! subscription's `config` or a topic's `transaction_checker_config` stands for the secret
//! `NAME`, from `[secrets]` in the server config or the environment variable
//! `WASMQ_SECRET_NAME`. Only the reference is stored and shown; the value is put in inside the
//! host, in the config a plugin instance reads, and never reaches an API answer, a log line, a
//! metric or the dashboard.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The key of a reference object.
pub const KEY: &str = "$secret";

/// Named secrets from `[secrets]`; `Debug` shows names only.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secrets(BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The secret a value refers to, if it is a reference (an object whose only key is `$secret`).
fn reference(v: &Value) -> Option<&Value> {
    match v {
        Value::Object(m) if m.len() == 1 => m.get(KEY),
        _ => None,
    }
}

/// Secret names: 1 to 64 of `A-Z 0-9 _`, as environment variables are named.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

impl Secrets {
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Self(values)
    }

    fn value(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .cloned()
            .or_else(|| std::env::var(format!("WASMQ_SECRET_{name}")).ok())
    }

    /// Checks that every reference in `config` names a secret this server has; the error names
    /// the first that does not (never a value).
    pub fn check(&self, config: &Value) -> Result<(), String> {
        self.resolve(config).map(drop)
    }

    /// `config` with every reference replaced by its secret's value, for a plugin instance.
    pub fn resolve(&self, config: &Value) -> Result<Value, String> {
        if let Some(name) = reference(config) {
            let name = name
                .as_str()
                .filter(|n| valid_name(n))
                .ok_or_else(|| format!("{{\"{KEY}\": NAME}} needs a name of 1 to 64 A-Z 0-9 _"))?;
            return self.value(name).map(Value::String).ok_or_else(|| {
                format!(
                    "secret {name:?} is not configured ([secrets] {name} or WASMQ_SECRET_{name})"
                )
            });
        }
        Ok(match config {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), self.resolve(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|v| self.resolve(v))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_resolve_to_values_and_unknown_ones_are_named() {
        let s = Secrets::new([("SMTP_KEY".to_string(), "hunter2".to_string())].into());
        let config = json!({"to": "a@example.com", "auth": {"key": {"$secret": "SMTP_KEY"}},
                            "list": [{"$secret": "SMTP_KEY"}], "not": {"$secret": "X", "other": 1}});
        let resolved = s.resolve(&config).unwrap();
        assert_eq!(resolved["auth"]["key"], "hunter2");
        assert_eq!(resolved["list"][0], "hunter2");
        assert_eq!(resolved["not"], config["not"], "two keys: not a reference");
        let err = s.check(&json!({"k": {"$secret": "MISSING"}})).unwrap_err();
        assert!(err.contains("MISSING") && !err.contains("hunter2"), "{err}");
        assert!(s.check(&json!({"$secret": "lower"})).is_err());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
