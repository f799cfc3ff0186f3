//! The `/metrics` route: what the broker counts as it works, plus state read at scrape time
//! (lag, dead letters, timers, transactions, disk).

use axum::http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::AppState;
use super::error::ApiError;
use crate::metrics::GroupLabel;

/// The formats `/metrics` answers in, in the server's order of preference for an `Accept`
/// that allows several equally (`*/*`, no header): the classic Prometheus text format
/// (version 0.0.4, what `promtool check metrics` and older scrapers read), then OpenMetrics 1.0
/// (what Prometheus asks for first by default).
const FORMATS: [&str; 4] = [
    "text/plain; version=0.0.4",
    "text/plain",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text",
];

/// Whether `accept` (an `Accept` header) prefers OpenMetrics to the classic text format, by
/// RFC 9110 §12.5.1 (quality values, then the client's order). A missing or unreadable header,
/// or one that names neither, gets the classic format, as Prometheus' own client libraries do.
fn wants_openmetrics(accept: Option<&axum::http::HeaderValue>) -> bool {
    let Some(accept) = accept
        .and_then(|v| v.to_str().ok())
        .and_then(|v| relevant_params(v).parse::<headers_accept::Accept>().ok())
    else {
        return false;
    };
    let formats: Vec<mediatype::MediaType<'static>> = FORMATS
        .iter()
        .filter_map(|f| mediatype::MediaType::parse(f).ok())
        .collect();
    accept
        .negotiate(formats.iter())
        .is_some_and(|m| m.subty.as_str() == "openmetrics-text")
}

/// `accept` with only the parameters negotiation reads (`version`, `q`) on each media range:
/// headers-accept matches a range only when all its parameters are equal, and Prometheus 3
/// adds `escaping=allow-utf-8` to its OpenMetrics ranges.
fn relevant_params(accept: &str) -> String {
    accept
        .split(',')
        .map(|range| {
            let mut parts = range.split(';').map(str::trim);
            let mut kept: Vec<&str> = parts.next().into_iter().collect();
            kept.extend(parts.filter(|p| {
                let name = p.split('=').next().unwrap_or_default().trim();
                name.eq_ignore_ascii_case("version") || name.eq_ignore_ascii_case("q")
            }));
            kept.join(";")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Counters and histograms kept as the broker works, plus state read now (lag, dead letters,
/// timers, transactions, disk). Every series the README lists exists from the start, at zero
/// before its first event, for every topic and subscription there is. Answers OpenMetrics
/// 1.0 when `Accept` prefers it, else the classic text format 0.0.4 (see [`FORMATS`]).
pub(super) async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let mut registry = prometheus_client::registry::Registry::default();
    state.plugins.runtime().register_metrics(&mut registry);
    registry.register(
        "wasmq_capability_calls",
        "Plugin capability calls by capability and result",
        state.plugins.runtime().capabilities().calls.clone(),
    );
    let metrics = state.broker.metrics();
    // One scrape at a time from listing to sweeping.
    let mut known = metrics.scrapes.lock().await;
    let subscriptions = state.dispatcher.list().await.map_err(ApiError::internal)?;
    metrics.keep_series_of(
        &mut known,
        state.broker.topics().into_iter().map(|t| t.name).collect(),
        subscriptions.iter().map(|s| s.group.clone()).collect(),
    );
    metrics.register(&mut registry);
    state.broker.storage().register_metrics(&mut registry);
    state.node.register_metrics(
        &mut registry,
        state.dispatcher.dispatching().await,
        state.dispatcher.leases_held().await,
    );
    scrape_state(
        &mut registry,
        &subscriptions,
        &state.transactions,
        state.broker.disk().map(|d| d.as_ref()),
    )
    .await
    .map_err(ApiError::internal)?;
    let mut text = String::new();
    let encoded = if wants_openmetrics(headers.get(axum::http::header::ACCEPT)) {
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .map(|()| "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .map(|()| prometheus_client::encoding::prometheus_text::CONTENT_TYPE)
    };
    let content_type = encoded
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, content_type),
            (axum::http::header::VARY, "accept"),
        ],
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
    subscriptions: &[crate::dispatch::SubscriptionStatus],
    transactions: &crate::txn::Transactions,
    disk: Option<&crate::disk::DiskGuard>,
) -> anyhow::Result<()> {
    use prometheus_client::metrics::gauge::Gauge;
    let lag: Family<LagLabels, Gauge> = Family::default();
    let dlq: Family<GroupLabel, Gauge> = Family::default();
    let timers: Family<GroupLabel, Gauge> = Family::default();
    for sub in subscriptions {
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
    for state in crate::txn::TxnState::ALL {
        let _ = txns.get_or_create(&StateLabel {
            state: state.wire_name(),
        });
    }
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
