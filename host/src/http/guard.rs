//! What stops a web page the operator opens from driving the API: the `Host` a request names
//! must be this server's (no DNS rebinding), a browser's cross-site request is refused unless
//! its origin is allowed in config (`Origin`, `Sec-Fetch-Site`), request bodies must declare a
//! non-form content type (so no "simple" cross-site request carries one), and every response
//! says `nosniff`. The dashboard's pages also get a strict Content-Security-Policy and may not
//! be framed.

use std::net::{IpAddr, SocketAddr};

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// Which hosts and browser origins may reach the API.
#[derive(Debug, Clone, Default)]
pub struct BrowserPolicy {
    /// The address the server listens on.
    listen: Option<SocketAddr>,
    /// `[server] allowed_hosts`: more names (or addresses) clients use for this server, as in
    /// `Host` (port ignored).
    hosts: Vec<String>,
    /// `[server] allowed_origins`: web origins (`https://console.example.com`) whose pages may
    /// call the API across sites.
    origins: Vec<String>,
}

impl BrowserPolicy {
    pub fn new(listen: Option<SocketAddr>, hosts: &[String], origins: &[String]) -> Self {
        let lower = |v: &[String]| v.iter().map(|s| s.trim().to_ascii_lowercase()).collect();
        Self {
            listen,
            hosts: lower(hosts),
            origins: lower(origins)
                .into_iter()
                .map(|o: String| o.trim_end_matches('/').to_string())
                .collect(),
        }
    }

    /// Whether `host` (a `Host` header: name or address, maybe with a port) names this server:
    /// a loopback name or address, the listen address, or a configured name. Listening on every
    /// address (`0.0.0.0`) with no names configured accepts any host (say so in config).
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = name.parse::<IpAddr>()
            && (ip.is_loopback() || self.listen.is_some_and(|l| l.ip() == ip))
        {
            return true;
        }
        if self.hosts.iter().any(|h| host_name(h) == name) {
            return true;
        }
        self.hosts.is_empty() && self.listen.is_some_and(|l| l.ip().is_unspecified())
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        self.origins.iter().any(|o| *o == origin || o == "*")
    }
}

/// The name or address of a `Host` value, without port or IPv6 brackets.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        // One colon: name:port. More: a bare IPv6 address.
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// Dashboard pages and liveness may be reached by a plain navigation from anywhere.
fn is_page(path: &str) -> bool {
    path == "/" || path == "/healthz" || path.starts_with("/ui/")
}

fn refuse(status: StatusCode, code: &'static str, message: String) -> Response {
    ApiError::new(status, code, message).into_response()
}

/// Why a browser request is cross-site, if it is: an `Origin` other than this server's own
/// (and not allowed), or `Sec-Fetch-Site` saying another site or a sibling one sent it.
fn cross_site(policy: &BrowserPolicy, headers: &HeaderMap, host: Option<&str>) -> Option<String> {
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let origin = text(header::ORIGIN);
    if let Some(o) = origin {
        if policy.origin_allowed(o) {
            return None;
        }
        let own = o
            .split_once("://")
            .map(|(_, authority)| authority.trim_end_matches('/'))
            .zip(host)
            .is_some_and(|(authority, host)| authority.eq_ignore_ascii_case(host));
        if !own {
            return Some(format!("Origin {o:?}"));
        }
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some(site @ ("cross-site" | "same-site")) => Some(format!("Sec-Fetch-Site: {site}")),
        _ => None,
    }
}

/// A request body's content type as the route takes it: plugin uploads are components
/// (`application/wasm` or `application/octet-stream`), everything else JSON.
fn content_type_ok(method: &Method, path: &str, headers: &HeaderMap) -> Result<(), String> {
    let has_body = match headers.get(header::CONTENT_LENGTH) {
        Some(len) => len.as_bytes() != b"0",
        None => headers.contains_key(header::TRANSFER_ENCODING),
    };
    // Other methods are no route's (405 from the router).
    if !has_body
        || !matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        )
    {
        return Ok(());
    }
    let kind = content_type_essence(headers).unwrap_or_default();
    let upload = *method == Method::PUT
        && path.starts_with("/v1/plugins/")
        && path.trim_end_matches('/').matches('/').count() == 3;
    // A binary-mode CloudEvent's body is the event's data in its own media type. It carries a
    // `ce-specversion` header, which no cross-site form can send without a CORS preflight.
    let cloudevent = *method == Method::POST
        && headers.contains_key("ce-specversion")
        && path.starts_with("/v1/topics/")
        && path.ends_with("/messages")
        && path.matches('/').count() == 4;
    let ok = if upload {
        kind == "application/wasm" || kind == "application/octet-stream"
    } else if cloudevent {
        true
    } else {
        kind == "application/json" || (kind.starts_with("application/") && kind.ends_with("+json"))
    };
    if ok {
        return Ok(());
    }
    let wanted = if upload {
        "application/wasm"
    } else {
        "application/json"
    };
    let given = if kind.is_empty() { "none" } else { &kind };
    Err(format!(
        "send this body as {wanted} (Content-Type {given} is refused: a web page could send it across sites)"
    ))
}

/// A media type's essence: `type/subtype` in lower case, without parameters
/// (`Application/JSON; charset=utf-8` → `application/json`).
pub(super) fn media_essence(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The essence of the request's `Content-Type`, if it has a readable one.
pub(super) fn content_type_essence(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(media_essence(v))
}

/// The content-type check, for requests that match a route (others get the router's 404 or
/// 405, whatever they carry).
pub async fn content_type(req: Request, next: Next) -> Response {
    if let Err(why) = content_type_ok(req.method(), req.uri().path(), req.headers()) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            why,
        );
    }
    next.run(req).await
}

/// Host and cross-site checks before anything else runs, and the dashboard pages' response
/// headers (`nosniff`, which every answer carries, is set by the layer in front of this, so
/// answers made outside it, a timeout or a rebuilt extractor error, carry it too).
pub async fn check<Fut: Future<Output = Response>>(
    state: &AppState,
    req: Request,
    run: impl FnOnce(Request) -> Fut,
) -> Response {
    let policy = &state.browser;
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(h) = host
        && !policy.host_allowed(h)
    {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            format!(
                "Host {h:?} is not a name of this server; add it to [server] allowed_hosts if clients use it"
            ),
        );
    }
    let path = req.uri().path();
    let (page, healthz) = (is_page(path), path == "/healthz");
    if !page && let Some(why) = cross_site(policy, headers, host) {
        return refuse(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            format!(
                "a browser request from another site ({why}) is refused; allow its origin in [server] allowed_origins"
            ),
        );
    }
    let mut resp = run(req).await;
    let h = resp.headers_mut();
    if page && !healthz {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hosts_are_this_servers_names_only() {
        let loopback = BrowserPolicy::new(Some(([127, 0, 0, 1], 7700).into()), &[], &[]);
        for ok in [
            "127.0.0.1:7700",
            "localhost:7700",
            "[::1]:7700",
            "127.0.0.1",
            "LOCALHOST",
        ] {
            assert!(loopback.host_allowed(ok), "{ok}");
        }
        for bad in [
            "rebind.evil.example",
            "rebind.evil.example:7700",
            "10.0.0.1:7700",
        ] {
            assert!(!loopback.host_allowed(bad), "{bad}");
        }
        let named = BrowserPolicy::new(
            Some(([0, 0, 0, 0], 7700).into()),
            &["mq.example.com".into()],
            &[],
        );
        assert!(named.host_allowed("mq.example.com:443"));
        assert!(!named.host_allowed("evil.example"));
        let any = BrowserPolicy::new(Some(([0, 0, 0, 0], 7700).into()), &[], &[]);
        assert!(any.host_allowed("whatever.example"));
    }

    #[test]
    fn cross_site_browser_requests_are_recognised() {
        let p = BrowserPolicy::new(None, &[], &["https://console.example.com/".into()]);
        let host = Some("127.0.0.1:7700");
        assert!(cross_site(&p, &headers(&[("origin", "http://evil.example")]), host).is_some());
        assert!(cross_site(&p, &headers(&[("origin", "null")]), host).is_some());
        assert!(cross_site(&p, &headers(&[("sec-fetch-site", "cross-site")]), host).is_some());
        assert!(cross_site(&p, &headers(&[("sec-fetch-site", "same-site")]), host).is_some());
        assert!(cross_site(&p, &headers(&[("origin", "http://127.0.0.1:7700")]), host).is_none());
        assert!(cross_site(&p, &headers(&[("sec-fetch-site", "same-origin")]), host).is_none());
        assert!(
            cross_site(&p, &headers(&[]), host).is_none(),
            "curl, the CLI, clients"
        );
        assert!(
            cross_site(
                &p,
                &headers(&[
                    ("origin", "https://console.example.com"),
                    ("sec-fetch-site", "cross-site")
                ]),
                host
            )
            .is_none()
        );
    }

    #[test]
    fn bodies_need_a_content_type_no_form_can_send() {
        let post = Method::POST;
        let json = headers(&[
            ("content-length", "2"),
            ("content-type", "application/json"),
        ]);
        let text = headers(&[("content-length", "2"), ("content-type", "text/plain")]);
        let none = headers(&[("content-length", "2")]);
        let empty = headers(&[("content-length", "0")]);
        assert!(content_type_ok(&post, "/v1/topics/t/messages", &json).is_ok());
        assert!(content_type_ok(&post, "/v1/topics/t/messages", &text).is_err());
        assert!(content_type_ok(&post, "/v1/topics/t/messages", &none).is_err());
        assert!(content_type_ok(&post, "/v1/subscriptions/g/pause", &empty).is_ok());
        let wasm = headers(&[
            ("content-length", "9"),
            ("content-type", "application/wasm"),
        ]);
        assert!(content_type_ok(&Method::PUT, "/v1/plugins/p", &wasm).is_ok());
        assert!(content_type_ok(&Method::PUT, "/v1/plugins/p", &none).is_err());
        assert!(content_type_ok(&Method::PUT, "/v1/plugins/p", &json).is_err());
        // A binary-mode CloudEvent may carry any media type, on the publish route only.
        let event = headers(&[
            ("content-length", "2"),
            ("content-type", "text/plain"),
            ("ce-specversion", "1.0"),
        ]);
        assert!(content_type_ok(&post, "/v1/topics/t/messages", &event).is_ok());
        assert!(content_type_ok(&post, "/v1/topics/t/messages/batch", &event).is_err());
        assert!(content_type_ok(&post, "/v1/topics/t/transactions", &event).is_err());
    }
}
