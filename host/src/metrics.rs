//! Prometheus metrics the broker updates as it works (publishes, deliveries, plugin calls);
//! state read at scrape time (lag, DLQ, timers, transactions) is added by the `/metrics` route
//! (`http::metrics`).

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
    /// One of [`OUTCOMES`].
    pub outcome: &'static str,
}

/// Delivery outcomes as `wasmq_deliveries_total` labels them.
pub const OUTCOMES: [&str; 7] = ["ack", "retry", "reject", "timeout", "oom", "trap", "error"];

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
    /// Messages retention deleted before a subscription handled them.
    pub expired_unconsumed: Family<GroupLabel, Counter>,
    /// Messages retention deleted, by topic (consumed or not).
    pub retention_deleted: Family<TopicLabel, Counter>,
    /// Retention passes finished (each looks at every topic once).
    pub retention_passes: Counter,
    /// Held by a scrape from its listing of topics and subscriptions to its sweep
    /// ([`Metrics::keep_series_of`]), so a scrape with an older list cannot drop the series of
    /// a subscription a newer one has seen made.
    pub scrapes: tokio::sync::Mutex<Known>,
}

/// The topics and subscriptions whose series the last scrape made sure of, so the next one can
/// drop the series of those deleted since (on any node).
#[derive(Debug, Default)]
pub struct Known {
    topics: std::collections::BTreeSet<String>,
    groups: std::collections::BTreeSet<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        let publish_seconds = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        for kind in [
            PublishKind::single,
            PublishKind::batch,
            PublishKind::idempotent,
        ] {
            let _ = publish_seconds.get_or_create(&PublishLabels { kind });
        }
        Self {
            published: Family::default(),
            published_bytes: Family::default(),
            publish_seconds,
            deliveries: Family::default(),
            dispatch_delay_seconds: Family::new_with_constructor(seconds_histogram),
            invocation_seconds: Family::new_with_constructor(seconds_histogram),
            expired_unconsumed: Family::default(),
            retention_deleted: Family::default(),
            retention_passes: Counter::default(),
            scrapes: Default::default(),
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
        r.register(
            "wasmq_messages_expired_unconsumed",
            "Messages retention deleted before a subscription handled them, by subscription",
            self.expired_unconsumed.clone(),
        );
        r.register(
            "wasmq_retention_deleted_messages",
            "Messages retention deleted (by age, size, or once every subscription was done with them), by topic",
            self.retention_deleted.clone(),
        );
        r.register(
            "wasmq_retention_passes",
            "Retention passes finished; each looks at every topic once",
            self.retention_passes.clone(),
        );
    }

    /// Makes the series of every topic and subscription there is now exist (at zero until
    /// their first event, so an alert or a rate sees them from the start: issue 26), and drops
    /// the series of those deleted since the last call. Called by each scrape; deletions on
    /// this node also drop their series at once ([`Metrics::forget_topic`],
    /// [`Metrics::forget_group`]).
    pub fn keep_series_of(
        &self,
        known: &mut Known,
        topics: std::collections::BTreeSet<String>,
        groups: std::collections::BTreeSet<String>,
    ) {
        for gone in known.topics.difference(&topics) {
            self.forget_topic(gone);
        }
        for gone in known.groups.difference(&groups) {
            self.forget_group(gone);
        }
        for topic in &topics {
            let l = TopicLabel {
                topic: topic.clone(),
            };
            let _ = self.published.get_or_create(&l);
            let _ = self.published_bytes.get_or_create(&l);
            let _ = self.retention_deleted.get_or_create(&l);
        }
        for group in &groups {
            for outcome in OUTCOMES {
                let _ = self.deliveries.get_or_create(&OutcomeLabels {
                    group: group.clone(),
                    outcome,
                });
            }
            let l = GroupLabel {
                group: group.clone(),
            };
            let _ = self.dispatch_delay_seconds.get_or_create(&l);
            let _ = self.invocation_seconds.get_or_create(&l);
            let _ = self.expired_unconsumed.get_or_create(&l);
        }
        *known = Known { topics, groups };
    }

    /// Drops a deleted topic's series (a topic made again under its name counts from zero).
    pub fn forget_topic(&self, topic: &str) {
        let l = TopicLabel {
            topic: topic.to_string(),
        };
        self.published.remove(&l);
        self.published_bytes.remove(&l);
        self.retention_deleted.remove(&l);
    }

    /// Drops a deleted subscription's series.
    pub fn forget_group(&self, group: &str) {
        for outcome in OUTCOMES {
            self.deliveries.remove(&OutcomeLabels {
                group: group.to_string(),
                outcome,
            });
        }
        let l = GroupLabel {
            group: group.to_string(),
        };
        self.dispatch_delay_seconds.remove(&l);
        self.invocation_seconds.remove(&l);
        self.expired_unconsumed.remove(&l);
    }

    pub fn published(&self, topic: &str, messages: u64, bytes: u64) {
        let label = TopicLabel {
            topic: topic.to_string(),
        };
        self.published.get_or_create(&label).inc_by(messages);
        self.published_bytes.get_or_create(&label).inc_by(bytes);
    }
}
