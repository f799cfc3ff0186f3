//! What a web page the operator opens can do to a server on loopback with the default open
//! API: nothing. Cross-site requests (by `Origin` or `Sec-Fetch-Site`) are refused unless the
//! origin is allowed in config, a rebound DNS name is refused by `Host`, bodies must be JSON
//! (a form or `text/plain` body is what a page may send without asking), `invoke` grants
//! nothing no admin granted, and the dashboard carries a strict CSP and may not be framed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use wasmq_tests::peers::HttpPeer;
use wasmq_tests::plugins::PROBE;
use wasmq_tests::{TestServer, config_in};

async fn send(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    headers: &[(&'static str, &str)],
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    let mut req = s
        .client
        .request(method, format!("{}{path}", s.url))
        .headers(h);
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    wasmq_tests::decode(req.send().await.unwrap()).await
}

fn code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_the_open_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.server.allowed_origins = vec!["https://console.example.com".into()];
    let s = TestServer::start_with(config).await;
    s.create_topic("t", 1).await;
    use reqwest::Method as M;
    let json_body = Some(r#"{"body": 1}"#);
    let json_ct = ("content-type", "application/json");
    // A cross-site publish, as a page's fetch() sends it.
    for headers in [
        vec![("origin", "http://evil.example"), json_ct],
        vec![("sec-fetch-site", "cross-site"), json_ct],
        vec![("sec-fetch-site", "same-site"), json_ct],
        vec![("origin", "null"), json_ct],
    ] {
        let (st, v) = send(&s, M::POST, "/v1/topics/t/messages", &headers, json_body).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, Some("cross_site_request")),
            "{headers:?}: {v}"
        );
    }
    // The simple request a page may send without a preflight: text/plain.
    let (st, v) = send(
        &s,
        M::POST,
        "/v1/topics/t/messages",
        &[("content-type", "text/plain")],
        json_body,
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("unsupported_media_type")
        )
    );
    // A bodiless cross-site pause.
    s.upload_plugin("probe", PROBE).await;
    s.subscribe("g", json!({"topic": "t", "plugin": "probe"}))
        .await;
    let (st, v) = send(
        &s,
        M::POST,
        "/v1/subscriptions/g/pause",
        &[("origin", "http://evil.example")],
        None,
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, Some("cross_site_request"))
    );
    let (_, g) = s.get("/v1/subscriptions/g").await;
    assert_eq!(g["state"], "running");
    // DNS rebinding: the page's own name in Host.
    let (st, v) = send(
        &s,
        M::PUT,
        "/v1/topics/rebound",
        &[("host", "rebind.evil.example"), json_ct],
        Some("{}"),
    )
    .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::MISDIRECTED_REQUEST, Some("unknown_host"))
    );
    let (st, _) = s.get("/v1/topics/rebound").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send(
        &s,
        M::GET,
        "/v1/topics",
        &[("host", "rebind.evil.example")],
        None,
    )
    .await;
    assert_eq!(
        st,
        StatusCode::MISDIRECTED_REQUEST,
        "nothing readable either"
    );
    // What is allowed: this server's own pages, an allowed origin, clients without browser
    // headers, loopback names.
    let own = format!("http://{}", s.addr);
    for headers in [
        vec![
            ("origin", own.as_str()),
            ("sec-fetch-site", "same-origin"),
            json_ct,
        ],
        vec![
            ("origin", "https://console.example.com"),
            ("sec-fetch-site", "cross-site"),
            json_ct,
        ],
        vec![json_ct],
        vec![("host", "localhost"), json_ct],
    ] {
        let (st, v) = send(&s, M::POST, "/v1/topics/t/messages", &headers, json_body).await;
        assert_eq!(st, StatusCode::CREATED, "{headers:?}: {v}");
    }
    // The dashboard: a navigation from anywhere loads it, framed by no one, scripts from itself.
    let page = s
        .client
        .get(format!("{}/", s.url))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let h = page.headers();
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    let (st, _) = s.get("/v1/topics").await;
    assert_eq!(st, StatusCode::OK);
    // Every answer says nosniff: also an error made outside the routes' guard, such as an
    // extractor's plain-text rejection (a path that is not UTF-8) rebuilt as JSON.
    let r = s
        .client
        .get(format!("{}/v1/topics/%FF", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let (st, v) = wasmq_tests::decode(r).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
}

/// `invoke` with grants no admin configured for the plugin is refused before the plugin runs;
/// once a subscription grants them, a trial call may use them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_grants_only_what_an_admin_granted_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let internal = HttpPeer::start().await;
    s.upload_plugin("probe", PROBE).await;
    s.create_topic("t", 1).await;
    let grant = format!("127.0.0.1:{}", internal.addr.port());
    let call = json!({"message": {"body": {"do": "http", "url": format!("{}/admin", internal.url)}},
                      "grants": {"http": [grant]}});
    for grants in [
        json!({"http": [grant]}),
        json!({"email": true}),
        json!({"sms": true}),
        json!({"publish": ["t"]}),
    ] {
        let mut c = call.clone();
        c["grants"] = grants.clone();
        let (st, v) = s.post_json("/v1/plugins/probe/invoke", &c).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::FORBIDDEN, Some("grant_not_configured")),
            "{grants}: {v}"
        );
    }
    assert!(
        internal.requests().is_empty(),
        "the internal service was reached"
    );
    s.subscribe(
        "g",
        json!({"topic": "t", "plugin": "probe", "grants": {"http": [grant], "publish": ["t"]}}),
    )
    .await;
    let (st, v) = s.post_json("/v1/plugins/probe/invoke", &call).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(internal.requests().len(), 1);
    // Still nothing more than configured.
    let mut c = call.clone();
    c["grants"] = json!({"http": [grant], "email": true});
    let (st, v) = s.post_json("/v1/plugins/probe/invoke", &c).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::FORBIDDEN, Some("grant_not_configured"))
    );
}
