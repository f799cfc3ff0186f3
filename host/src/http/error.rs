//! The one error type of the HTTP edge: a status, a stable code and a message, as JSON.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::broker::{BrokerError, EnvelopeError};
use crate::storage::StorageError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (backpressure).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        // Details go to the log, not to the client.
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl ApiError {
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}

impl From<EnvelopeError> for ApiError {
    fn from(e: EnvelopeError) -> Self {
        let code = match &e {
            EnvelopeError::BothBodies | EnvelopeError::MissingBody => "bad_body",
            EnvelopeError::BadBase64(_) => "bad_base64",
            EnvelopeError::TooLarge { .. } => {
                return Self::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "message_too_large",
                    e.to_string(),
                );
            }
            EnvelopeError::FieldTooLong { .. } | EnvelopeError::EmptyField(_) => "bad_field",
            EnvelopeError::TooManyProperties => "too_many_properties",
            EnvelopeError::BadTag(_) => "bad_tag",
            EnvelopeError::BadDelay => "bad_delay",
            EnvelopeError::TxnOnly => "bad_field",
            EnvelopeError::TooLong { .. } => "bad_duration",
        };
        Self::bad_request(code, e.to_string())
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let msg = e.to_string();
        match e {
            BrokerError::BadTopicName(_) => Self::bad_request("bad_topic_name", msg),
            BrokerError::UnknownTopic(_) => Self::not_found("unknown_topic", msg),
            BrokerError::BadTopicSpec(_) => Self::bad_request("bad_topic_spec", msg),
            BrokerError::BadIdempotencyKey => Self::bad_request("bad_idempotency_key", msg),
            BrokerError::IdempotencyKeyReused(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                msg,
            ),
            BrokerError::TooManyQueues { .. } => Self::bad_request("too_many_queues", msg),
            BrokerError::BeingDeleted(_) => {
                Self::new(StatusCode::CONFLICT, "topic_being_deleted", msg)
            }
            BrokerError::IdempotentMessageDeleted { .. } => {
                Self::new(StatusCode::GONE, "idempotent_message_deleted", msg)
            }
            BrokerError::QueuesShrink { .. } => {
                Self::new(StatusCode::CONFLICT, "queues_shrink", msg)
            }
            BrokerError::Envelope(e) => e.into(),
            BrokerError::EmptyBatch => Self::bad_request("empty_batch", msg),
            BrokerError::BatchTooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large", msg)
            }
            BrokerError::InBatch { source, .. } => {
                let inner = ApiError::from(source);
                Self::new(inner.status, inner.code, msg)
            }
            BrokerError::Storage(e) => e.into(),
            BrokerError::DiskFull(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "disk_full", msg).retry_after(5)
            }
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            ),
            // The shared backend is unreachable or electing a leader: worth a retry, and the
            // request changed nothing that was acknowledged.
            StorageError::JetStream(m) | StorageError::Unavailable(m) => {
                tracing::warn!(error = %m, "storage unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    format!("storage is unavailable, retry: {m}"),
                )
                .retry_after(1)
            }
            other => Self::internal(other),
        }
    }
}

impl From<crate::plugins::PluginError> for ApiError {
    fn from(e: crate::plugins::PluginError) -> Self {
        use crate::plugins::PluginError as P;
        use crate::runtime::{CompileError as C, InvokeError as I};
        let msg = e.to_string();
        match e {
            P::BadName(_) => Self::bad_request("bad_plugin_name", msg),
            P::Unknown(_) => Self::not_found("unknown_plugin", msg),
            P::UnknownVersion { .. } => Self::not_found("unknown_plugin_version", msg),
            P::TooLarge { .. } => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "plugin_too_large", msg),
            P::Compile(C::Budget(_)) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "compile_budget", msg)
            }
            P::Compile(C::TookTooLong(_)) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "compile_busy", msg).retry_after(5)
            }
            P::Compile(c) => Self::bad_request(
                match c {
                    C::NotWasm => "not_wasm",
                    C::CoreModule => "core_module",
                    C::Invalid(_) => "invalid_component",
                    C::UnknownWorld => "unknown_world",
                    C::UnsupportedImports(_) => "unsupported_imports",
                    C::Budget(_) => "compile_budget",
                    C::TookTooLong(_) => "compile_busy",
                },
                msg,
            ),
            P::BadLimits(_) => Self::bad_request("bad_limits", msg),
            P::InUse { .. } => Self::new(StatusCode::CONFLICT, "plugin_in_use", msg),
            P::Invoke(I::MissingExport(_)) => Self::bad_request("missing_export", msg),
            P::Invoke(other) => Self::internal(other),
            P::Storage(s) => s.into(),
        }
    }
}

impl From<crate::dispatch::DispatchError> for ApiError {
    fn from(e: crate::dispatch::DispatchError) -> Self {
        use crate::dispatch::DispatchError as D;
        let msg = e.to_string();
        match e {
            D::BadName(_) => Self::bad_request("bad_group_name", msg),
            D::Unknown(_) => Self::not_found("unknown_subscription", msg),
            D::Invalid(_) => Self::bad_request("invalid_subscription", msg),
            D::TopicChange(_) => Self::new(StatusCode::CONFLICT, "topic_change", msg),
            D::TopicInUse { .. } => Self::new(StatusCode::CONFLICT, "topic_in_use", msg),
            D::Broker(b) => b.into(),
            D::Plugin(p) => p.into(),
            D::Storage(s) => s.into(),
        }
    }
}

impl From<crate::txn::TxnError> for ApiError {
    fn from(e: crate::txn::TxnError) -> Self {
        use crate::txn::TxnError as T;
        let msg = e.to_string();
        match e {
            T::Unknown(_) => Self::not_found("unknown_transaction", msg),
            T::Decided { .. } => Self::new(StatusCode::CONFLICT, "transaction_decided", msg),
            T::NotUnresolved(_) => Self::new(StatusCode::CONFLICT, "not_unresolved", msg),
            T::Broker(b) => b.into(),
            T::Storage(s) => s.into(),
        }
    }
}
