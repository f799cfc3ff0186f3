//! The broker seen from a plugin: the kv and publish services the runtime's capabilities use,
//! through the runtime's [`Services`] trait.

use base64::Engine as _;

use super::{Broker, BrokerError, Envelope};
use crate::bindings::GuestError;
use crate::bindings::wasmq::plugin::publish::Outgoing;
use crate::runtime::Services;
use crate::storage::{MessageId, Storage};

#[async_trait::async_trait]
impl Services for Broker {
    fn storage(&self) -> &std::sync::Arc<dyn Storage> {
        Broker::storage(self)
    }

    fn reserve_disk_bytes(&self, bytes: u64) -> Result<(), String> {
        Broker::reserve_disk_bytes(self, bytes).map_err(|e| e.to_string())
    }

    async fn publish(&self, message: Outgoing) -> Result<MessageId, GuestError> {
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
        let envelope = Envelope {
            body,
            body_base64,
            key: message.key,
            tag: message.tag,
            sharding_key: message.sharding_key,
            properties: message.properties.into_iter().collect(),
            ..Envelope::default()
        };
        match Broker::publish(self, &message.topic, envelope).await {
            Ok(a) => Ok(a.id),
            // Transient: the plugin's message is retried rather than rejected.
            Err(e @ (BrokerError::Storage(_) | BrokerError::DiskFull(_))) => {
                Err(GuestError::Unavailable(e.to_string()))
            }
            Err(e) => Err(GuestError::Invalid(e.to_string())),
        }
    }
}
