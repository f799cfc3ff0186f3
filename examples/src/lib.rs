//! The seed scenarios of ../shared/SCENARIOS.md as runnable examples against a real wasmq
//! server: each scenario sets up topics, plugins and subscriptions over the HTTP API, drives
//! the load, checks the properties it promises, and returns a report to print.

pub mod flash_sale;
pub mod ordered_profile;
pub mod peers;
pub mod price_sync;
pub mod registration;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// A client for one wasmq server.
#[derive(Clone)]
pub struct Ctx {
    pub url: String,
    pub http: reqwest::Client,
}

/// Where the compiled plugins are (a `wasm32-wasip2/release` dir of the plugins workspace).
#[derive(Clone, Debug)]
pub struct PluginDir(pub PathBuf);

impl PluginDir {
    pub fn path(&self, crate_name: &str) -> PathBuf {
        self.0
            .join(format!("{}.wasm", crate_name.replace('-', "_")))
    }
}

impl Ctx {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        wasmq::capabilities::install_tls_provider();
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder().build()?,
        })
    }

    async fn call(&self, req: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("{what}: cannot reach {}", self.url))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .with_context(|| format!("{what}: not JSON"))?;
        if !status.is_success() {
            bail!("{what}: HTTP {status}: {body}");
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.get(format!("{}{path}", self.url)), path)
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(
            self.http.put(format!("{}{path}", self.url)).json(body),
            path,
        )
        .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(
            self.http.post(format!("{}{path}", self.url)).json(body),
            path,
        )
        .await
    }

    pub async fn upload(&self, name: &str, file: &Path) -> anyhow::Result<Value> {
        let bytes = std::fs::read(file)
            .with_context(|| format!("cannot read {} (build the plugins first)", file.display()))?;
        let req = self
            .http
            .put(format!("{}/v1/plugins/{name}", self.url))
            .header("content-type", "application/wasm")
            .body(bytes);
        self.call(req, "upload").await
    }

    /// Publishes in batches of 500; returns the results (id, queue, offset) in order.
    pub async fn publish_all(
        &self,
        topic: &str,
        messages: Vec<Value>,
    ) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::with_capacity(messages.len());
        for chunk in messages.chunks(500) {
            let r = self
                .post(
                    &format!("/v1/topics/{topic}/messages/batch"),
                    &serde_json::json!({"messages": chunk}),
                )
                .await?;
            out.extend(r["results"].as_array().cloned().unwrap_or_default());
        }
        Ok(out)
    }

    /// Every message body of a topic, queue by queue, in offset order.
    pub async fn read_topic(&self, topic: &str) -> anyhow::Result<Vec<Vec<Value>>> {
        let t = self.get(&format!("/v1/topics/{topic}")).await?;
        let mut queues = Vec::new();
        for q in 0..t["queues"].as_u64().unwrap_or(0) {
            let mut bodies = Vec::new();
            loop {
                let page = self
                    .get(&format!(
                        "/v1/topics/{topic}/messages?queue={q}&from={}&limit=1000",
                        bodies.len()
                    ))
                    .await?;
                let msgs = page["messages"].as_array().cloned().unwrap_or_default();
                if msgs.is_empty() {
                    break;
                }
                bodies.extend(msgs.into_iter().map(|m| m["body"].clone()));
            }
            queues.push(bodies);
        }
        Ok(queues)
    }

    /// Polls a subscription until `done` holds, calling `tick` about every `every`.
    pub async fn wait_sub(
        &self,
        group: &str,
        limit: Duration,
        every: Duration,
        mut tick: impl FnMut(&Value),
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let started = Instant::now();
        let mut last_tick = Instant::now();
        loop {
            let st = self.get(&format!("/v1/subscriptions/{group}")).await?;
            if done(&st) {
                return Ok(st);
            }
            if last_tick.elapsed() >= every {
                tick(&st);
                last_tick = Instant::now();
            }
            if started.elapsed() > limit {
                bail!("subscription {group} did not finish in {limit:?}: {st}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A tiny deterministic generator (xorshift), so scenario data is reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
