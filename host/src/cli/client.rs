//! A small client for the HTTP API that turns error bodies into readable messages.

use anyhow::{Context as _, anyhow};
use serde_json::Value;

/// `name` as one URL path segment or query value: every byte but ASCII letters and digits is
/// percent-encoded, so a name with `/`, `?` or `#` reaches the server whole and gets its rule
/// named (`topic create bad/name` used to be answered "no such route").
pub fn seg(name: &str) -> impl std::fmt::Display + '_ {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
}

/// The server's base URL from `--server`: `http://` is assumed without a scheme
/// (`127.0.0.1:7700`); anything but an http(s) URL is an error naming the flag.
pub fn base_url(server: &str) -> anyhow::Result<String> {
    let with_scheme = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    let url = url::Url::parse(&with_scheme).map_err(|e| {
        anyhow!("--server {server:?} is not a URL ({e}); e.g. http://127.0.0.1:7700")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        anyhow::bail!("--server {server:?} must be an http:// or https:// URL with a host");
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .context("the token has characters a header cannot carry")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            base: base_url(base)?,
            http,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.delete(self.url(path))).await
    }

    pub async fn put_wasm(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<Value> {
        self.send(
            self.http
                .put(self.url(path))
                .header("content-type", "application/wasm")
                .body(bytes),
        )
        .await
    }

    /// A GET whose body is read as it arrives (a log follow); errors as in the JSON calls.
    pub async fn get_stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.respond(self.http.get(self.url(path))).await
    }

    /// Sends; a success comes back as is, an error answer as one readable error.
    async fn respond(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach wasmq at {} (is `wasmq serve` running?)",
                self.base
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.context("cannot read the response")?;
        Err(failure(status, &text))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let text = self
            .respond(req)
            .await?
            .text()
            .await
            .context("cannot read the response")?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// An error answer as one readable line: the server's message and code.
fn failure(status: reqwest::StatusCode, text: &str) -> anyhow::Error {
    let value: Value = serde_json::from_str(text).unwrap_or(Value::String(text.to_string()));
    match (
        value["error"]["code"].as_str(),
        value["error"]["message"].as_str(),
    ) {
        (Some(code), Some(msg)) => anyhow!("{msg} ({code}, HTTP {})", status.as_u16()),
        _ => anyhow!("HTTP {status}: {value}"),
    }
}
