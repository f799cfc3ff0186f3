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
    state.plugins.runtime().register_metrics(&mut registry);
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
        let members: Vec<(String, &[crate::dispatch::QueueStatus])> = match &sub.instances {
            Some(instances) => instances
                .iter()
                .map(|i| (i.instance.to_string(), i.queues.as_slice()))
                .collect(),
            None => vec![(String::new(), sub.queues.as_deref().unwrap_or_default())],
        };
        for (instance, queues) in members {
            for q in queues {
                let labels = LagLabels {
                    group: sub.group.clone(),
                    topic: sub.spec.topic.clone(),
                    queue: q.queue,
                    instance: instance.clone(),
                };
                lag.get_or_create(&labels)
                    .set(i64::try_from(q.lag).unwrap_or(i64::MAX));
            }
        }
        let g = GroupLabel {
            group: sub.group.clone(),
        };
        dlq.get_or_create(&g)
            .set(i64::try_from(sub.dlq).unwrap_or(i64::MAX));
        timers
            .get_or_create(&g)
            .set(i64::try_from(sub.pending_timers).unwrap_or(i64::MAX));
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
