//! Host capabilities with real side effects: email over SMTP (lettre), SMS through an HTTP
//! gateway, and outbound HTTP to allow-listed origins (reqwest). Relay addresses and
//! credentials live here; a plugin only sees whether its call worked.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message as Mail, Tokio1Executor};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::bindings::GuestError;
use crate::bindings::wasmq::plugin::http as wit_http;
use crate::config::{Config, StartTls};

/// Caps on one outbound HTTP call.
pub const MAX_HTTP_REQUEST_BYTES: usize = 1 << 20;
pub const MAX_HTTP_RESPONSE_BYTES: usize = 4 << 20;
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADERS: usize = 64;
const MAX_TEXT: usize = 1 << 20;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// One of [`GRANTED_CAPABILITIES`].
    pub capability: &'static str,
    /// One of [`CALL_RESULTS`].
    pub result: &'static str,
}

/// The capabilities a subscription grants (`grants`), as `wasmq_capability_calls_total` names
/// them.
pub const GRANTED_CAPABILITIES: [&str; 4] = ["email", "sms", "http", "publish"];
/// How a capability call ended: `ok`, or the guest error's kind.
pub const CALL_RESULTS: [&str; 5] = ["ok", "denied", "invalid", "unavailable", "failed"];

pub struct Capabilities {
    smtp: AsyncSmtpTransport<Tokio1Executor>,
    from: Option<Mailbox>,
    sms_url: String,
    sms_auth: String,
    http: reqwest::Client,
    /// Calls by capability and result (ok, denied, invalid, unavailable, failed).
    pub calls: Family<CallLabels, Counter>,
    /// What plugins log through the `log` import.
    pub logs: Arc<crate::logs::PluginLogs>,
    /// A dry run (`wasmq plugin test`): email, SMS and HTTP calls are checked as for real,
    /// then recorded here instead of made.
    dry_run: Option<Arc<Effects>>,
}

/// Side effects a dry-run host recorded instead of making, in call order.
#[derive(Debug, Default)]
pub struct Effects(std::sync::Mutex<Vec<Effect>>);

impl Effects {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Effect>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds one, after those recorded before.
    pub fn record(&self, effect: Effect) {
        self.list().push(effect);
    }

    /// Every effect recorded since the last take, oldest first.
    pub fn take(&self) -> Vec<Effect> {
        std::mem::take(&mut *self.list())
    }
}

/// A side effect as a dry run records it. `publish` is recorded by whoever publishes (the
/// broker's stand-in), with the id the message got.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "capability", rename_all = "snake_case")]
pub enum Effect {
    Email {
        to: String,
        subject: String,
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        html: Option<String>,
    },
    Sms {
        to: String,
        text: String,
    },
    /// Answered `200` with an empty body.
    Http {
        method: String,
        url: String,
        /// Body size in bytes.
        body_bytes: usize,
    },
    Publish {
        topic: String,
        id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// JSON bodies as JSON, others as text when UTF-8, else `{"base64": ...}`.
        body: serde_json::Value,
    },
}

fn transient(e: impl std::fmt::Display) -> GuestError {
    GuestError::Unavailable(e.to_string())
}

/// Installs rustls' ring provider for the whole process (idempotent). reqwest is built without
/// a provider of its own (the default one needs cmake), so call this before building a client.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Capabilities {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        install_tls_provider();
        let s = &config.smtp;
        let mut smtp = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
            .port(s.port)
            .timeout(Some(HTTP_TIMEOUT))
            .pool_config(PoolConfig::new().max_size(s.max_connections.max(1)));
        smtp = match s.starttls {
            StartTls::Off => smtp.tls(Tls::None),
            StartTls::Opportunistic => {
                smtp.tls(Tls::Opportunistic(TlsParameters::new(s.host.clone())?))
            }
            StartTls::Required => smtp.tls(Tls::Required(TlsParameters::new(s.host.clone())?)),
        };
        if !s.username.is_empty() {
            smtp = smtp.credentials(Credentials::new(s.username.clone(), s.password.clone()));
        }
        let from = match s.from.parse::<Mailbox>() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(from = %s.from, error = %e, "smtp.from is not an address; email is disabled");
                None
            }
        };
        let http = reqwest::Client::builder()
            // A redirect could lead anywhere; the plugin gets the 3xx and decides.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .no_proxy()
            .build()?;
        Ok(Self {
            smtp: smtp.build(),
            from,
            sms_url: config.sms.url.clone(),
            sms_auth: config.sms.auth_header.clone(),
            http,
            calls: {
                // Every series at zero from the start: a rate or an alert on denials works
                // before the first one.
                let calls: Family<CallLabels, Counter> = Family::default();
                for capability in GRANTED_CAPABILITIES {
                    for result in CALL_RESULTS {
                        let _ = calls.get_or_create(&CallLabels { capability, result });
                    }
                }
                calls
            },
            logs: Arc::default(),
            dry_run: None,
        })
    }

    /// Capabilities that check every call as [`Capabilities::new`]'s do (grants, origins,
    /// sizes, addresses) and then record it in `effects` instead of sending anything: no
    /// relay, gateway or network is needed.
    pub fn dry_run(config: &Config, effects: Arc<Effects>) -> anyhow::Result<Self> {
        Ok(Self {
            dry_run: Some(effects),
            ..Self::new(config)?
        })
    }

    /// Records `effect` when this is a dry run; `false` when the call is to be made for real.
    fn recorded(&self, effect: impl FnOnce() -> Effect) -> bool {
        let Some(effects) = &self.dry_run else {
            return false;
        };
        effects.record(effect());
        true
    }

    /// Counts a call's result, by capability.
    pub fn count(&self, capability: &'static str, result: &Result<impl Sized, GuestError>) {
        let result = match result {
            Ok(_) => "ok",
            Err(GuestError::Denied(_)) => "denied",
            Err(GuestError::Invalid(_)) => "invalid",
            Err(GuestError::Unavailable(_)) => "unavailable",
            Err(GuestError::Failed(_)) => "failed",
        };
        self.calls
            .get_or_create(&CallLabels { capability, result })
            .inc();
    }

    pub async fn send_email(
        &self,
        to: &str,
        subject: &str,
        text: &str,
        html: Option<&str>,
    ) -> Result<(), GuestError> {
        if subject.len() > 1000 || text.len() > MAX_TEXT || html.is_some_and(|h| h.len() > MAX_TEXT)
        {
            return Err(GuestError::Invalid(
                "email subject or body too large".into(),
            ));
        }
        let recipient: Mailbox = to
            .parse()
            .map_err(|e| GuestError::Invalid(format!("recipient {to:?}: {e}")))?;
        if self.recorded(|| Effect::Email {
            to: to.to_string(),
            subject: subject.to_string(),
            text: text.to_string(),
            html: html.map(str::to_string),
        }) {
            return Ok(());
        }
        let Some(from) = self.from.clone() else {
            return Err(GuestError::Unavailable(
                "this host has no valid smtp.from address".into(),
            ));
        };
        let builder = Mail::builder().from(from).to(recipient).subject(subject);
        let mail = match html {
            Some(h) => builder.multipart(MultiPart::alternative_plain_html(
                text.to_string(),
                h.to_string(),
            )),
            None => builder.body(text.to_string()),
        }
        .map_err(|e| GuestError::Invalid(e.to_string()))?;
        match self.smtp.send(mail).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(GuestError::Failed(format!("SMTP: {e}"))),
            Err(e) => Err(transient(format!("SMTP: {e}"))),
        }
    }

    pub async fn send_sms(&self, to: &str, text: &str) -> Result<(), GuestError> {
        if to.is_empty() || to.len() > 64 || text.len() > 10_000 {
            return Err(GuestError::Invalid(
                "an SMS needs a recipient and at most 10 000 bytes of text".into(),
            ));
        }
        if self.recorded(|| Effect::Sms {
            to: to.to_string(),
            text: text.to_string(),
        }) {
            return Ok(());
        }
        if self.sms_url.is_empty() {
            return Err(GuestError::Unavailable(
                "no SMS gateway is configured ([sms] url)".into(),
            ));
        }
        let mut req = self
            .http
            .post(&self.sms_url)
            .json(&serde_json::json!({"to": to, "text": text}));
        if !self.sms_auth.is_empty() {
            req = req.header(reqwest::header::AUTHORIZATION, &self.sms_auth);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| transient(format!("SMS gateway: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(transient(format!("SMS gateway answered {status}")))
        } else {
            Err(GuestError::Failed(format!("SMS gateway answered {status}")))
        }
    }

    /// Sends an HTTP request if its origin is one of `allowed` (see [`Origin`]).
    pub async fn http(
        &self,
        allowed: &[Origin],
        req: wit_http::Request,
    ) -> Result<wit_http::Response, GuestError> {
        let origin = Origin::of_request(&req.url)?;
        if !allowed.contains(&origin) {
            return Err(GuestError::Denied(format!(
                "the subscription does not grant http to {origin}"
            )));
        }
        let method = match req.method.to_ascii_uppercase().as_str() {
            m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE") => {
                reqwest::Method::from_bytes(m.as_bytes())
                    .map_err(|e| GuestError::Invalid(e.to_string()))?
            }
            other => {
                return Err(GuestError::Invalid(format!(
                    "method {other} is not allowed"
                )));
            }
        };
        if req.body.len() > MAX_HTTP_REQUEST_BYTES || req.headers.len() > MAX_HEADERS {
            return Err(GuestError::Invalid(format!(
                "at most {MAX_HTTP_REQUEST_BYTES} bytes of body and {MAX_HEADERS} headers"
            )));
        }
        // Parsed here, not by the client, so a dry run refuses what a real call would.
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &req.headers {
            if k.eq_ignore_ascii_case("host") {
                return Err(GuestError::Invalid(
                    "the Host header is set by the host".into(),
                ));
            }
            let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                reqwest::header::HeaderValue::from_str(v),
            ) else {
                return Err(GuestError::Invalid(format!(
                    "header {k:?} is not valid HTTP"
                )));
            };
            headers.append(name, value);
        }
        if self.recorded(|| Effect::Http {
            method: method.to_string(),
            url: req.url.clone(),
            body_bytes: req.body.len(),
        }) {
            return Ok(wit_http::Response {
                status: 200,
                headers: Vec::new(),
                body: Vec::new(),
            });
        }
        let mut resp = self
            .http
            .request(method, &req.url)
            .headers(headers)
            .body(req.body)
            .send()
            .await
            .map_err(|e| transient(format!("http: {e}")))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .take(MAX_HEADERS)
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| transient(format!("http: {e}")))?
        {
            if body.len() + chunk.len() > MAX_HTTP_RESPONSE_BYTES {
                return Err(GuestError::Failed(format!(
                    "response larger than {MAX_HTTP_RESPONSE_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(wit_http::Response {
            status,
            headers,
            body,
        })
    }
}

/// A normalised origin: scheme, host and port, compared exactly. No userinfo, no paths: a
/// grant for `http://127.0.0.1:8081` allows that origin only (not `localhost:8081`, not
/// `127.0.0.1:8082`, not `http://127.0.0.1:8081@evil`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

impl Origin {
    /// A grant: `http://host:port`, `https://host`, or `host:port` (http).
    pub fn parse_grant(grant: &str) -> Result<Origin, String> {
        let text = if grant.contains("://") {
            grant.to_string()
        } else {
            format!("http://{grant}")
        };
        let url = url::Url::parse(&text).map_err(|e| format!("http grant {grant:?}: {e}"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("http grant {grant:?} must not contain userinfo"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(format!(
                "http grant {grant:?} must be an origin (scheme, host, port), not a path"
            ));
        }
        Self::of_url(&url).map_err(|e| format!("http grant {grant:?}: {e:?}"))
    }

    fn of_request(url: &str) -> Result<Origin, GuestError> {
        let parsed =
            url::Url::parse(url).map_err(|e| GuestError::Invalid(format!("url {url:?}: {e}")))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(GuestError::Denied(
                "URLs with userinfo are not allowed".into(),
            ));
        }
        Self::of_url(&parsed)
    }

    fn of_url(url: &url::Url) -> Result<Origin, GuestError> {
        let scheme = url.scheme().to_string();
        if scheme != "http" && scheme != "https" {
            return Err(GuestError::Denied(format!(
                "scheme {scheme} is not allowed"
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| GuestError::Invalid("the URL has no host".into()))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| GuestError::Invalid("the URL has no port".into()))?;
        Ok(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// What a subscription granted its plugin. Nothing by default.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub email: bool,
    pub sms: bool,
    /// Allowed HTTP origins.
    pub http: Vec<Origin>,
    /// Topics the plugin may publish to.
    pub publish: Vec<String>,
}

impl Grants {
    /// `None` if every capability of `self` is also in one of `configured` (what admins
    /// granted the plugin in its subscriptions and as a transaction checker); otherwise the
    /// first one that is not, named as the API spells it.
    pub fn beyond(&self, configured: &[Grants]) -> Option<String> {
        if self.email && !configured.iter().any(|g| g.email) {
            return Some("email".into());
        }
        if self.sms && !configured.iter().any(|g| g.sms) {
            return Some("sms".into());
        }
        if let Some(o) = self
            .http
            .iter()
            .find(|o| !configured.iter().any(|g| g.http.contains(o)))
        {
            return Some(format!("http {o}"));
        }
        self.publish
            .iter()
            .find(|t| !configured.iter().any(|g| g.publish.contains(t)))
            .map(|t| format!("publish {t}"))
    }
}

/// Grants as the API spells them.
#[derive(
    Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, default)]
pub struct GrantSpec {
    pub email: bool,
    pub sms: bool,
    /// Origins: `http://host:port`, `https://host`, or `host:port` (http).
    /// (The pattern matches only grants the server takes: ports 1 to 65535, IPv6 as `[::1]`
    /// or in full.)
    #[schemars(inner(regex(
        pattern = r"^(https?://)?((([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)|((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])|\[(::1|[0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){7})\])(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?/?$"
    )))]
    pub http: Vec<String>,
    pub publish: Vec<String>,
}

impl GrantSpec {
    /// The runtime's form of these grants; every HTTP grant must be an origin.
    pub fn to_grants(&self) -> Result<Grants, String> {
        let http = self
            .http
            .iter()
            .map(|g| Origin::parse_grant(g))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Grants {
            email: self.email,
            sms: self.sms,
            http,
            publish: self.publish.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(s: &str) -> Origin {
        Origin::parse_grant(s).unwrap()
    }

    #[test]
    fn grants_normalise() {
        assert_eq!(o("127.0.0.1:8081"), o("http://127.0.0.1:8081"));
        assert_eq!(o("http://EXAMPLE.com"), o("http://example.com:80/"));
        assert_eq!(o("https://api.example.com").port, 443);
        assert!(Origin::parse_grant("http://u:p@127.0.0.1:1").is_err());
        assert!(Origin::parse_grant("http://127.0.0.1:1/admin").is_err());
        assert!(Origin::parse_grant("ftp://127.0.0.1").is_err());
    }

    #[test]
    fn requests_match_origins_exactly() {
        let allowed = o("http://127.0.0.1:8081");
        let of = |u: &str| Origin::of_request(u);
        assert_eq!(of("http://127.0.0.1:8081/users/1?x=1").unwrap(), allowed);
        assert_ne!(of("http://127.0.0.1:8082/").unwrap(), allowed);
        assert_ne!(of("https://127.0.0.1:8081/").unwrap(), allowed);
        assert_ne!(
            of("http://localhost:8081/").unwrap(),
            allowed,
            "no aliasing of names and addresses"
        );
        // The classic trick: the real host is what follows the @.
        assert!(matches!(
            of("http://127.0.0.1:8081@evil.example/"),
            Err(GuestError::Denied(_))
        ));
        assert_eq!(
            of("http://evil.example/#@127.0.0.1:8081").unwrap().host,
            "evil.example"
        );
        assert!(of("file:///etc/passwd").is_err());
        assert!(of("not a url").is_err());
    }
}
