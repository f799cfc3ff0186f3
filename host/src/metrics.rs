//! Prometheus metrics the broker updates as it works (publishes, deliveries, plugin calls);
//! state read at scrape time (lag, DLQ, timers, transactions) is added by the `/metrics` route.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PublishKind {
    single,
    batch,
    idempotent,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub kind: PublishKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub group: String,
    /// ack, retry, reject, trap, timeout, oom, error.
    pub outcome: &'static str,
}

/// Seconds from 50 µs to ~100 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 22))
}

#[derive(Debug)]
pub struct Metrics {
    pub published: Family<TopicLabel, Counter>,
    pub published_bytes: Family<TopicLabel, Counter>,
    pub publish_seconds: Family<PublishLabels, Histogram>,
    pub deliveries: Family<OutcomeLabels, Counter>,
    /// From when a message was due (born, or its delay or retry timer) to its plugin call.
    pub dispatch_delay_seconds: Family<GroupLabel, Histogram>,
    pub invocation_seconds: Family<GroupLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            published: Family::default(),
            published_bytes: Family::default(),
            publish_seconds: Family::new_with_constructor(seconds_histogram),
            deliveries: Family::default(),
            dispatch_delay_seconds: Family::new_with_constructor(seconds_histogram),
            invocation_seconds: Family::new_with_constructor(seconds_histogram),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "wasmq_published_messages",
            "Messages stored by publishes, by topic",
            self.published.clone(),
        );
        r.register(
            "wasmq_published_bytes",
            "Message body bytes stored by publishes, by topic",
            self.published_bytes.clone(),
        );
        r.register(
            "wasmq_publish_duration_seconds",
            "Time from a publish call to its durable acknowledgement",
            self.publish_seconds.clone(),
        );
        r.register(
            "wasmq_deliveries",
            "Plugin deliveries by subscription and outcome (ack, retry, reject, trap, timeout, oom, error)",
            self.deliveries.clone(),
        );
        r.register(
            "wasmq_dispatch_delay_seconds",
            "Time from a message being due to its plugin call starting, by subscription",
            self.dispatch_delay_seconds.clone(),
        );
        r.register(
            "wasmq_plugin_invocation_seconds",
            "Duration of plugin handle calls, by subscription",
            self.invocation_seconds.clone(),
        );
    }

    pub fn published(&self, topic: &str, messages: u64, bytes: u64) {
        let label = TopicLabel {
            topic: topic.to_string(),
        };
        self.published.get_or_create(&label).inc_by(messages);
        self.published_bytes.get_or_create(&label).inc_by(bytes);
    }
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
pub async fn scrape_state(
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
