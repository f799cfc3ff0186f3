//! The `/metrics` route: what the broker counts as it works, plus state read at scrape time
//! (lag, dead letters, timers, transactions, disk).

use axum::http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::AppState;
use super::error::ApiError;
use crate::metrics::GroupLabel;

/// Prometheus text format: counters and histograms kept as the broker works, plus state read
/// now (lag, dead letters, timers, transactions, disk).
pub(super) async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let mut registry = prometheus_client::registry::Registry::default();
    state.plugins.runtime().stats().register(&mut registry);
    registry.register(
        "wasmq_capability_calls",
        "Plugin capability calls by capability and result",
        state.plugins.runtime().capabilities().calls.clone(),
    );
    state.broker.metrics().register(&mut registry);
    state.broker.storage().register_metrics(&mut registry);
    state.node.register_metrics(
        &mut registry,
        state.dispatcher.dispatching().await,
        state.dispatcher.leases_held().await,
    );
    scrape_state(
        &mut registry,
        &state.dispatcher,
        &state.transactions,
        state.broker.disk().map(|d| d.as_ref()),
    )
    .await
    .map_err(ApiError::internal)?;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LagLabels {
    group: String,
    topic: String,
    queue: u32,
    /// The broadcast instance; empty for a clustering subscription (one shared offset).
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// Adds what is read at scrape time: lag per subscription and queue (and broadcast instance),
/// dead letters and pending timers per subscription, transactions by state, disk use.
async fn scrape_state(
    r: &mut Registry,
    dispatcher: &crate::dispatch::Dispatcher,
    transactions: &crate::txn::Transactions,
    disk: Option<&crate::disk::DiskGuard>,
) -> anyhow::Result<()> {
    use prometheus_client::metrics::gauge::Gauge;
    let lag: Family<LagLabels, Gauge> = Family::default();
    let dlq: Family<GroupLabel, Gauge> = Family::default();
    let timers: Family<GroupLabel, Gauge> = Family::default();
    for sub in dispatcher.list().await? {
        let group = sub["group"].as_str().unwrap_or_default().to_string();
        let topic = sub["spec"]["topic"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let members: Vec<(String, &serde_json::Value)> = match sub["instances"].as_array() {
            Some(instances) => instances
                .iter()
                .map(|i| (i["instance"].to_string(), &i["queues"]))
                .collect(),
            None => vec![(String::new(), &sub["queues"])],
        };
        for (instance, queues) in members {
            for q in queues.as_array().into_iter().flatten() {
                let labels = LagLabels {
                    group: group.clone(),
                    topic: topic.clone(),
                    queue: q["queue"].as_u64().unwrap_or(0) as u32,
                    instance: instance.clone(),
                };
                lag.get_or_create(&labels)
                    .set(q["lag"].as_i64().unwrap_or(0));
            }
        }
        let g = GroupLabel { group };
        dlq.get_or_create(&g).set(sub["dlq"].as_i64().unwrap_or(0));
        timers
            .get_or_create(&g)
            .set(sub["pending_timers"].as_i64().unwrap_or(0));
    }
    r.register(
        "wasmq_subscription_lag",
        "Messages not yet done, by subscription, queue and broadcast instance",
        lag,
    );
    r.register(
        "wasmq_dead_letters",
        "Messages in a subscription's dead-letter queue",
        dlq,
    );
    r.register(
        "wasmq_timers_pending",
        "Delayed messages and retries waiting for their time, by subscription",
        timers,
    );
    let txns: Family<StateLabel, Gauge> = Family::default();
    for (state, n) in transactions.counts().await? {
        txns.get_or_create(&StateLabel { state }).set(n as i64);
    }
    r.register("wasmq_transactions", "Transactions by state", txns);
    if let Some(d) = disk {
        let used: Gauge = Gauge::default();
        used.set(d.used() as i64);
        r.register(
            "wasmq_data_dir_bytes",
            "Bytes the data directory holds (sampled)",
            used,
        );
        let free: Gauge = Gauge::default();
        free.set(d.free().min(i64::MAX as u64) as i64);
        r.register(
            "wasmq_disk_free_bytes",
            "Free bytes on the data directory's filesystem (sampled)",
            free,
        );
    }
    Ok(())
}
