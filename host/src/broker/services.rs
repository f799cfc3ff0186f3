//! The broker seen from a plugin: the kv and publish services the runtime's capabilities use,
//! through the runtime's [`Services`] trait.

use base64::Engine as _;

use super::{Broker, BrokerError, Envelope};
use crate::bindings::GuestError;
use crate::bindings::wasmq::plugin::publish::Outgoing;
use crate::runtime::Services;
use crate::storage::{Commit, Committed, MessageId, NewMessage, Storage, StorageError};

impl Broker {
    fn usage(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.kv_usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets a kv namespace's count (its records were removed); counted again at next use.
    pub fn forget_kv_usage(&self, space: &str) {
        self.usage().remove(space);
    }
}

#[async_trait::async_trait]
impl Services for Broker {
    fn storage(&self) -> &std::sync::Arc<dyn Storage> {
        Broker::storage(self)
    }

    async fn reserve_kv(&self, space: &str, old: u64, new: u64) -> Result<(), GuestError> {
        let unavailable = |e: String| GuestError::Unavailable(e);
        let known = self.usage().get(space).copied();
        let used = match known {
            Some(u) => u,
            None => {
                // First write since start: count what storage holds (bounded by the cap).
                let records = self
                    .storage()
                    .list_records(space, "", usize::MAX)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                let counted = records
                    .iter()
                    .map(|(k, r)| (k.len() + r.value.len()) as u64)
                    .sum::<u64>();
                *self.usage().entry(space.to_string()).or_insert(counted)
            }
        };
        let cap = self.limits().max_kv_bytes;
        if new > old {
            let after = used.saturating_add(new - old);
            if after > cap {
                return Err(unavailable(format!(
                    "the kv namespace is full: {used} of {cap} bytes ([limits] max_kv_bytes) used, {} more asked",
                    new - old
                )));
            }
            // kv state counts against the disk quota like messages do.
            Broker::reserve_disk_bytes(self, new - old).map_err(|e| unavailable(e.to_string()))?;
        }
        let mut usage = self.usage();
        let u = usage.entry(space.to_string()).or_insert(used);
        *u = u.saturating_add(new).saturating_sub(old);
        Ok(())
    }

    async fn publish(&self, message: Outgoing) -> Result<MessageId, GuestError> {
        let topic = message.topic.clone();
        match Broker::publish(self, &topic, envelope_of(message)).await {
            Ok(a) => Ok(a.id),
            Err(e) => Err(guest_error(e)),
        }
    }

    async fn prepare_publish(&self, message: Outgoing) -> Result<(String, NewMessage), GuestError> {
        let topic = message.topic.clone();
        match self.prepare_message(&topic, envelope_of(message)).await {
            Ok(m) => Ok((topic, m)),
            Err(e) => Err(guest_error(e)),
        }
    }

    async fn commit(&self, commit: Commit) -> Result<Committed, StorageError> {
        // No topic deletion runs meanwhile, and the topics published to still exist: a
        // message is never stored under a topic deleted since the call staged it.
        let _topics_stay = self.deletion.read().await;
        for (topic, _) in &commit.appends {
            if let Err(e) = self.lookup(topic).await {
                return Err(StorageError::Unavailable(format!(
                    "cannot publish to {topic:?}: {e}"
                )));
            }
        }
        let started = std::time::Instant::now();
        let sizes: Vec<(String, usize, usize)> = commit
            .appends
            .iter()
            .map(|(t, m)| (t.clone(), m.len(), m.iter().map(|m| m.body.len()).sum()))
            .collect();
        let out = self.storage().commit(commit).await?;
        for (topic, n, bytes) in sizes {
            self.observe(
                &topic,
                crate::metrics::PublishKind::single,
                (n, bytes),
                started,
            );
        }
        Ok(out)
    }
}

/// A transient failure (storage, a full disk) is `Unavailable`: the plugin's message is
/// retried rather than rejected. Anything else the broker refuses is `Invalid`.
fn guest_error(e: BrokerError) -> GuestError {
    match e {
        e @ (BrokerError::Storage(_) | BrokerError::DiskFull(_)) => {
            GuestError::Unavailable(e.to_string())
        }
        e => GuestError::Invalid(e.to_string()),
    }
}

/// A plugin's message as a producer's envelope.
fn envelope_of(message: Outgoing) -> Envelope {
    {
        // JSON bodies stay JSON (readable in the API); anything else travels as bytes.
        let (body, body_base64) = match std::str::from_utf8(&message.body)
            .ok()
            .and_then(|s| serde_json::value::RawValue::from_string(s.to_string()).ok())
        {
            Some(raw) => (Some(raw), None),
            None => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&message.body)),
            ),
        };
        Envelope {
            body,
            body_base64,
            key: message.key,
            tag: message.tag,
            sharding_key: message.sharding_key,
            properties: message.properties.into_iter().collect(),
            ..Envelope::default()
        }
    }
}
