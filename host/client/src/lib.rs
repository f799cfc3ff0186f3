//! A producer client for wasmq's HTTP API: publish one message or a batch, with an idempotency
//! key, transactional half messages (begin, commit, rollback), retries on 429 and 503 that
//! honour `Retry-After`, and typed errors.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wasmq_client::Error> {
//! use wasmq_client::{Client, Message};
//! let client = Client::new("http://127.0.0.1:7700")?;
//! let sent = client
//!     .publish("orders", &Message::json(&serde_json::json!({"order": 7}))?.key("order-7"))
//!     .await?;
//! println!("{} at queue {} offset {}", sent.id, sent.queue, sent.offset);
//! # Ok(()) }
//! ```
//!
//! Retries: a request answered 429 (`backlog_full`) or a 503 of an admission check
//! (`disk_full`, `too_many_connections`, … see [`refused_before_writing`]) was not acted on, so
//! it is sent again after the server's `Retry-After` (at most [`Retry::max_wait`] per wait), up
//! to [`Retry::max_attempts`] sends. A connection that could not be made is retried too. After
//! anything that may have followed a write (a reset, a timeout, `storage_unavailable`, another
//! 5xx) a request is repeated only when a repeat cannot store twice: a message with an
//! idempotency key, a commit or a rollback.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error (`{"error":{"code","message"}}`): `status` is the
    /// HTTP status, `code` the stable machine-readable code (`unknown_topic`, `backlog_full`,
    /// `bad_json`, `idempotency_key_reused`, …; README's HTTP API lists them).
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// No answer: the server could not be reached, or the connection broke.
    #[error("cannot reach wasmq: {0}")]
    Transport(#[from] reqwest::Error),
    /// The base URL or an argument cannot make a request (a bad URL, a token a header cannot
    /// carry, a body that is not JSON-serialisable).
    #[error("{0}")]
    Invalid(String),
    /// The server answered 2xx with a body this client does not understand.
    #[error("unexpected answer from wasmq: {0}")]
    Protocol(String),
}

impl Error {
    /// The server's error code (`unknown_topic`, …), for an [`Error::Api`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, for an [`Error::Api`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the server refused for now before storing anything (429, or a 503 of an
    /// admission check: [`refused_before_writing`]); the client already retried
    /// [`Retry::max_attempts`] times before returning it.
    pub fn is_overloaded(&self) -> bool {
        matches!(self, Error::Api { status, code, .. } if refused_before_writing(*status, code))
    }
}

/// How often and how long a call waits and tries again.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Sends of one call in all, the first included (1 = never retry). Default 5.
    pub max_attempts: u32,
    /// The longest single wait, whatever `Retry-After` says. Default 30 s.
    pub max_wait: Duration,
    /// The first wait when the server names none; doubled each time. Default 100 ms.
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            max_wait: Duration::from_secs(30),
            backoff: Duration::from_millis(100),
        }
    }
}

/// A message to publish: a JSON or binary body and the envelope's optional fields.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Message {
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sharding_key: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    properties: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deliver_at: Option<u64>,
    #[serde(skip)]
    idempotency_key: Option<String>,
}

impl Message {
    /// A message whose body is `body` as JSON.
    pub fn json(body: &impl Serialize) -> Result<Self, Error> {
        let body = serde_json::to_value(body)
            .map_err(|e| Error::Invalid(format!("the body is not JSON: {e}")))?;
        Ok(Self {
            body: Some(body),
            ..Self::default()
        })
    }

    /// A message whose body is these bytes (sent base64-encoded, stored as they are).
    pub fn bytes(body: impl AsRef<[u8]>) -> Self {
        Self {
            body_base64: Some(base64::engine::general_purpose::STANDARD.encode(body)),
            ..Self::default()
        }
    }

    /// The business key (look the message up by it).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The tag subscriptions filter on.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Messages with the same sharding key go to the same queue, in order.
    pub fn sharding_key(mut self, key: impl Into<String>) -> Self {
        self.sharding_key = Some(key.into());
        self
    }

    /// One property (a string pair the plugin sees).
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Delivered no earlier than this many milliseconds from now (at most 30 days).
    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.delay_ms = Some(ms);
        self
    }

    /// Delivered no earlier than this time, in ms since the Unix epoch.
    pub fn deliver_at(mut self, ms: u64) -> Self {
        self.deliver_at = Some(ms);
        self
    }

    /// The `Idempotency-Key` of a single publish: a repeat within the server's idempotency
    /// window stores nothing and gets the first answer ([`Published::replayed`]). With it, a
    /// publish whose answer was lost is retried too. Ignored in a batch.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// Where a published message was stored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Published {
    /// The message id (a UUID).
    pub id: String,
    pub queue: u32,
    pub offset: u64,
    /// True when an idempotency key matched an earlier publish: nothing new was stored.
    #[serde(default)]
    pub replayed: bool,
}

/// A transaction begun with a half message (invisible until committed).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Transaction {
    pub txn_id: String,
    /// The id the message has once committed.
    pub message_id: String,
    /// When the topic's checker is first asked, if nobody decides before.
    pub check_after_ms: u64,
}

/// A transaction's state as the server reports it after a decision.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TxnStatus {
    pub txn_id: String,
    /// `pending`, `committed`, `rolled_back` or `unresolved`.
    pub state: String,
}

/// Called before each wait for a retry with the error that caused it and the number of the
/// send that failed (1 for the first): for logging or metrics.
pub type OnRetry = std::sync::Arc<dyn Fn(&Error, u32) + Send + Sync>;

/// A client for one wasmq server. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    retry: Retry,
    on_retry: Option<OnRetry>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Options of a [`Client`].
#[derive(Clone, Default)]
pub struct ClientBuilder {
    base: String,
    token: Option<String>,
    retry: Retry,
    timeout: Option<Duration>,
    on_retry: Option<OnRetry>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base", &self.base)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A bearer token (`[auth] tokens`; a `produce` token suffices to publish and decide).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// See [`OnRetry`].
    pub fn on_retry(mut self, hook: impl Fn(&Error, u32) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(std::sync::Arc::new(hook));
        self
    }

    /// The whole of one send, answer included. Default: none (the server bounds requests).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        // https through rustls with ring (as the server's own capabilities use it).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = self.base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "{base:?} is not an http:// or https:// URL"
            )));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &self.token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| {
                    Error::Invalid("the token has characters a header cannot carry".into())
                })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut http = reqwest::Client::builder().default_headers(headers);
        if let Some(t) = self.timeout {
            http = http.timeout(t);
        }
        Ok(Client {
            base,
            http: http.build()?,
            retry: self.retry,
            on_retry: self.on_retry,
        })
    }
}

/// A path segment, percent-encoded (a topic name with `/` reaches the server whole).
fn seg(name: &str) -> impl std::fmt::Display + '_ {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
}

/// Whether repeating a request can store something twice.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Only when the server surely did not act (429, 503, no connection).
    IfNotDone,
    /// Always: a repeat has the same effect (idempotency key, commit, rollback).
    Safe,
}

impl Client {
    /// A client for the server at `base` (`http://127.0.0.1:7700`) with default options.
    pub fn new(base: &str) -> Result<Self, Error> {
        Self::builder(base).build()
    }

    pub fn builder(base: &str) -> ClientBuilder {
        ClientBuilder {
            base: base.to_string(),
            ..ClientBuilder::default()
        }
    }

    /// Publishes one message (`POST /v1/topics/{topic}/messages`).
    pub async fn publish(&self, topic: &str, message: &Message) -> Result<Published, Error> {
        let url = format!("{}/v1/topics/{}/messages", self.base, seg(topic));
        let key = message.idempotency_key.as_deref();
        let repeat = if key.is_some() {
            Repeat::Safe
        } else {
            Repeat::IfNotDone
        };
        let (headers, body) = self
            .send(repeat, || {
                let mut req = self.http.post(&url).json(message);
                if let Some(k) = key {
                    req = req.header("idempotency-key", k);
                }
                req
            })
            .await?;
        let mut published: Published = decode(&body)?;
        published.replayed = headers
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes() == b"true");
        Ok(published)
    }

    /// Publishes messages atomically in one write (`POST /v1/topics/{topic}/messages/batch`):
    /// all are stored or none. At most the server's `[limits] max_batch` (1000 by default).
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: &[Message],
    ) -> Result<Vec<Published>, Error> {
        #[derive(Deserialize)]
        struct Results {
            results: Vec<Published>,
        }
        let url = format!("{}/v1/topics/{}/messages/batch", self.base, seg(topic));
        let body = serde_json::json!({ "messages": messages });
        let (_, answer) = self
            .send(Repeat::IfNotDone, || self.http.post(&url).json(&body))
            .await?;
        Ok(decode::<Results>(&answer)?.results)
    }

    /// Begins a transaction with a half message (`POST /v1/topics/{topic}/transactions`);
    /// `check_after_ms` overrides when the topic's checker is first asked.
    pub async fn begin(
        &self,
        topic: &str,
        message: &Message,
        check_after_ms: Option<u64>,
    ) -> Result<Transaction, Error> {
        let url = format!("{}/v1/topics/{}/transactions", self.base, seg(topic));
        let mut body = serde_json::to_value(message).map_err(|e| Error::Invalid(e.to_string()))?;
        if let (Some(ms), Some(map)) = (check_after_ms, body.as_object_mut()) {
            map.insert("check_after_ms".into(), ms.into());
        }
        let (_, answer) = self
            .send(Repeat::IfNotDone, || self.http.post(&url).json(&body))
            .await?;
        decode(&answer)
    }

    /// Commits: the half message becomes visible. Idempotent; a transaction already rolled
    /// back is a 409.
    pub async fn commit(&self, txn_id: &str) -> Result<TxnStatus, Error> {
        self.decide(txn_id, "commit").await
    }

    /// Rolls back: the half message is dropped. Idempotent; a committed one is a 409.
    pub async fn rollback(&self, txn_id: &str) -> Result<TxnStatus, Error> {
        self.decide(txn_id, "rollback").await
    }

    async fn decide(&self, txn_id: &str, verb: &str) -> Result<TxnStatus, Error> {
        let url = format!("{}/v1/transactions/{}/{verb}", self.base, seg(txn_id));
        let (_, answer) = self.send(Repeat::Safe, || self.http.post(&url)).await?;
        decode(&answer)
    }

    /// Sends what `request` builds, again after 429/503 (waiting `Retry-After`) and after
    /// transport failures `repeat` allows, up to `max_attempts` sends; the answer's headers
    /// and body on success, the last error otherwise.
    async fn send(
        &self,
        repeat: Repeat,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>), Error> {
        let mut backoff = self.retry.backoff;
        let mut attempt = 1;
        loop {
            let error = match request().send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    match resp.bytes().await {
                        Ok(body) if status.is_success() => return Ok((headers, body.to_vec())),
                        Ok(body) => api_error(status.as_u16(), &headers, &body),
                        Err(e) => Error::Transport(e),
                    }
                }
                Err(e) => Error::Transport(e),
            };
            let again = match &error {
                Error::Api { status, code, .. } => {
                    refused_before_writing(*status, code)
                        || (*status >= 500 && repeat == Repeat::Safe)
                }
                Error::Transport(e) => e.is_connect() || repeat == Repeat::Safe,
                _ => false,
            };
            if !again || attempt >= self.retry.max_attempts.max(1) {
                return Err(error);
            }
            let wait = match &error {
                Error::Api {
                    retry_after: Some(after),
                    ..
                } => *after,
                _ => backoff,
            };
            if let Some(hook) = &self.on_retry {
                hook(&error, attempt);
            }
            tokio::time::sleep(wait.min(self.retry.max_wait)).await;
            backoff = backoff.saturating_mul(2).min(self.retry.max_wait);
            attempt += 1;
        }
    }
}

/// Whether the server said it refused before writing anything: 429 (`backlog_full`), and the
/// 503s of an admission check (`disk_full`, `too_many_connections`, `too_many_streams`,
/// `compile_busy`). Other 5xx answers (`storage_unavailable`, `shutting_down`, a proxy's) may
/// come after a write, so only a request that cannot store twice is repeated after them.
pub fn refused_before_writing(status: u16, code: &str) -> bool {
    status == 429
        || (status == 503
            && matches!(
                code,
                "disk_full" | "too_many_connections" | "too_many_streams" | "compile_busy"
            ))
}

/// The error an error answer carries; its status alone when the body is not wasmq's shape.
fn api_error(status: u16, headers: &reqwest::header::HeaderMap, body: &[u8]) -> Error {
    #[derive(Deserialize)]
    struct Shape {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: String,
        message: String,
    }
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match serde_json::from_slice::<Shape>(body) {
        Ok(Shape { error }) => Error::Api {
            status,
            code: error.code,
            message: error.message,
            retry_after,
        },
        Err(_) => Error::Api {
            status,
            code: "http_error".into(),
            message: String::from_utf8_lossy(body).chars().take(500).collect(),
            retry_after,
        },
    }
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_serialise_to_the_envelope() {
        let m = Message::json(&serde_json::json!({"a": 1}))
            .unwrap()
            .key("k")
            .tag("t")
            .sharding_key("s")
            .property("p", "v")
            .delay_ms(5)
            .idempotency_key("never in the body");
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"body": {"a": 1}, "key": "k", "tag": "t", "sharding_key": "s",
                               "properties": {"p": "v"}, "delay_ms": 5})
        );
        assert_eq!(
            serde_json::to_value(Message::bytes([0u8, 255, 16])).unwrap(),
            serde_json::json!({"body_base64": "AP8Q"})
        );
    }

    #[test]
    fn error_answers_become_typed_errors() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        let e = api_error(
            429,
            &headers,
            br#"{"error":{"code":"backlog_full","message":"later"}}"#,
        );
        assert_eq!(e.code(), Some("backlog_full"));
        assert_eq!(e.status(), Some(429));
        assert!(e.is_overloaded());
        assert!(
            matches!(e, Error::Api { retry_after: Some(d), .. } if d == Duration::from_secs(2))
        );
        // Only refusals made before any write are repeated without an idempotency key.
        assert!(refused_before_writing(503, "disk_full"));
        assert!(!refused_before_writing(503, "storage_unavailable"));
        assert!(!refused_before_writing(503, "shutting_down"));
        assert!(!refused_before_writing(500, "internal"));
        let e = api_error(
            502,
            &reqwest::header::HeaderMap::new(),
            b"<html>bad gateway",
        );
        assert_eq!(e.code(), Some("http_error"));
        assert!(Client::new("127.0.0.1:7700").is_err(), "no scheme");
    }
}
