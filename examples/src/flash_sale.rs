//! Scenario 4, peak shaving: a flash-sale burst of orders is published as fast as possible; the
//! notifier subscription drains it at `max_rate` (what the SMS gateway can take) while the
//! backlog shows in status. Checks every order is notified exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::peers::HttpPeer;
use crate::{Ctx, PluginDir};

pub struct Report {
    pub orders: usize,
    pub publish_secs: f64,
    pub drain_secs: f64,
    pub max_rate: u64,
    pub backlog: Vec<(f64, u64)>,
    pub notified_once: usize,
    pub duplicates: usize,
    pub missing: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "flash-sale: {} orders published in {:.2} s ({:.0}/s); notifier limited to {}/s drained them in {:.1} s",
            self.orders,
            self.publish_secs,
            self.orders as f64 / self.publish_secs,
            self.max_rate,
            self.drain_secs
        )?;
        for (t, lag) in &self.backlog {
            writeln!(f, "  t={t:5.1}s  backlog {lag}")?;
        }
        write!(
            f,
            "  notified exactly once: {} of {} (duplicates {}, missing {})",
            self.notified_once, self.orders, self.duplicates, self.missing
        )
    }
}

/// `gateway` must be the server's `[sms] url` peer.
pub async fn run(
    ctx: &Ctx,
    plugins: &PluginDir,
    gateway: &HttpPeer,
    orders: usize,
    max_rate: u64,
) -> anyhow::Result<Report> {
    ctx.put("/v1/topics/orders", &json!({"queues": 8})).await?;
    ctx.upload("sms-notifier", &plugins.path("sms-notifier"))
        .await?;
    // Created paused: the burst lands first, as during a sale; then the notifier drains it.
    ctx.put(
        "/v1/subscriptions/order-sms",
        &json!({"topic": "orders", "plugin": "sms-notifier", "instances": 8, "max_rate": max_rate,
                "config": {"to": "{{phone}}", "text": "Order {{order}} confirmed"}, "grants": {"sms": true}}),
    )
    .await?;
    ctx.post("/v1/subscriptions/order-sms/pause", &json!({}))
        .await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for part in 0..4 {
        let ctx = ctx.clone();
        let msgs: Vec<Value> = (0..orders)
            .filter(|i| i % 4 == part)
            .map(|i| json!({"body": {"order": format!("o{i}"), "phone": format!("+1555{:07}", i)}, "key": format!("o{i}")}))
            .collect();
        tasks.push(tokio::spawn(async move {
            ctx.publish_all("orders", msgs).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let drain = Instant::now();
    ctx.post("/v1/subscriptions/order-sms/resume", &json!({}))
        .await?;
    let mut backlog = Vec::new();
    ctx.wait_sub(
        "order-sms",
        Duration::from_secs(600),
        Duration::from_secs(1),
        |st| {
            backlog.push((
                drain.elapsed().as_secs_f64(),
                st["lag"].as_u64().unwrap_or(0),
            ))
        },
        |st| st["lag"] == 0 && st["in_flight"] == 0,
    )
    .await?;
    let drain_secs = drain.elapsed().as_secs_f64();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, _, body) in gateway.requests() {
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        // Other scenarios share the gateway; only order confirmations count here.
        if let Some(order) = v["text"]
            .as_str()
            .and_then(|t| t.strip_prefix("Order "))
            .and_then(|t| t.split_whitespace().next())
        {
            *seen.entry(order.to_string()).or_default() += 1;
        }
    }
    let notified_once = seen.values().filter(|&&n| n == 1).count();
    let duplicates = seen.values().filter(|&&n| n > 1).count();
    let missing = (0..orders)
        .filter(|i| !seen.contains_key(&format!("o{i}")))
        .count();
    Ok(Report {
        orders,
        publish_secs,
        drain_secs,
        max_rate,
        backlog,
        notified_once,
        duplicates,
        missing,
    })
}
