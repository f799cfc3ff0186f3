//! Scenario 5, cache sync by broadcast: a stream of price updates reaches every instance of a
//! broadcast subscription; each keeps its own table; one instance fails for a while and
//! catches up. Checks that every instance ends with the same, latest prices.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::ensure;
use serde_json::{Value, json};

use crate::{Ctx, PluginDir, Rng};

pub struct Report {
    pub updates: usize,
    pub instances: usize,
    /// (seconds since start, lag of each instance) while draining.
    pub lag_over_time: Vec<(f64, Vec<u64>)>,
    pub identical: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "price-sync: {} updates broadcast to {} instances (instance 2 failing the first 200 updates twice each)",
            self.updates, self.instances
        )?;
        for (t, lags) in &self.lag_over_time {
            writeln!(f, "  t={t:5.1}s  lag per instance {lags:?}")?;
        }
        write!(
            f,
            "  every instance holds the latest price of every SKU: {}",
            self.identical
        )
    }
}

/// Runs the scenario with a cache-sync plugin: the Rust one from `plugins`, or another build of
/// the same logic (`plugin`: the JavaScript one).
pub async fn run(
    ctx: &Ctx,
    plugins: &PluginDir,
    plugin: Option<&Path>,
    updates: usize,
) -> anyhow::Result<Report> {
    ctx.put("/v1/topics/prices", &json!({"queues": 4})).await?;
    ctx.put("/v1/topics/price-report", &json!({"queues": 1}))
        .await?;
    let wasm = plugin.map_or_else(|| plugins.path("cache-sync"), Path::to_path_buf);
    ctx.upload("cache-sync", &wasm).await?;
    let instances = 4;
    ctx.put(
        "/v1/subscriptions/price-cache",
        &json!({"topic": "prices", "plugin": "cache-sync", "mode": "broadcast", "instances": instances,
                "retry": {"max_attempts": 100, "backoff_ms": [20]},
                "config": {"report": "price-report", "fail_instance": 2, "fail_attempts": 2, "fail_below_seq": 200},
                "grants": {"publish": ["price-report"]}}),
    )
    .await?;
    let mut rng = Rng::new(7);
    let mut latest: BTreeMap<String, f64> = BTreeMap::new();
    let msgs: Vec<Value> = (0..updates as u64)
        .map(|seq| {
            let sku = format!("sku-{}", rng.below(50));
            let price = (rng.below(100_000) as f64) / 100.0;
            latest.insert(sku.clone(), price);
            json!({"body": {"sku": sku, "price": price, "seq": seq}, "sharding_key": sku})
        })
        .collect();
    let started = Instant::now();
    ctx.publish_all("prices", msgs).await?;
    let mut lag_over_time = Vec::new();
    let lags = |st: &Value| -> Vec<u64> {
        st["instances"]
            .as_array()
            .map(|a| a.iter().map(|i| i["lag"].as_u64().unwrap_or(0)).collect())
            .unwrap_or_default()
    };
    ctx.wait_sub(
        "price-cache",
        Duration::from_secs(120),
        Duration::from_millis(250),
        |st| lag_over_time.push((started.elapsed().as_secs_f64(), lags(st))),
        |st| st["lag"] == 0 && st["in_flight"] == 0,
    )
    .await?;
    ctx.publish_all("prices", vec![json!({"body": {"snapshot": true}})])
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let reports = loop {
        let r = ctx.read_topic("price-report").await?.concat();
        if r.len() >= instances || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ensure!(
        reports.len() == instances,
        "{} of {instances} instances reported",
        reports.len()
    );
    // Compared as numbers: a JavaScript plugin reports 12.0 as 12.
    let identical = reports.iter().all(|r| {
        serde_json::from_value::<BTreeMap<String, f64>>(r["prices"].clone())
            .is_ok_and(|prices| prices == latest)
    });
    Ok(Report {
        updates,
        instances,
        lag_over_time,
        identical,
    })
}
