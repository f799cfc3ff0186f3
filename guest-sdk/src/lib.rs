//! Write wasmq plugins in Rust. The crate README (below) is the guide; its examples are tested.
#![doc = include_str!("../README.md")]

#[doc(hidden)]
pub mod bindings {
    #[cfg(all(feature = "consumer", not(feature = "checker")))]
    wit_bindgen::generate!({
        world: "consumer-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_generated",
        default_bindings_module: "wasmq_guest_sdk::bindings",
        additional_derives: [PartialEq],
    });
    #[cfg(all(feature = "checker", not(feature = "consumer")))]
    wit_bindgen::generate!({
        world: "checker-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_generated",
        default_bindings_module: "wasmq_guest_sdk::bindings",
        additional_derives: [PartialEq],
    });
    #[cfg(all(feature = "consumer", feature = "checker"))]
    wit_bindgen::generate!({
        world: "plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_generated",
        default_bindings_module: "wasmq_guest_sdk::bindings",
        additional_derives: [PartialEq],
    });
    #[cfg(not(any(feature = "consumer", feature = "checker")))]
    wit_bindgen::generate!({ world: "imports", path: "wit" });
}

mod capabilities;
mod message;
pub mod template;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use bindings::wasmq::plugin::context::PluginInstance as Identity;
pub use bindings::wasmq::plugin::types::{CheckResult, Error, Message, Outcome};
pub use capabilities::{context, email, http, kv, log, once, outcome_of, publish, sms};
pub use message::MessageExt;

/// A consumer: called once per delivered message (again on retry, with a higher `attempt`).
pub trait Consumer {
    fn handle(message: Message) -> Outcome;
}

/// A transaction checker: asked about half messages whose producer neither committed nor
/// rolled back in time.
pub trait Checker {
    fn check_transaction(message: Message) -> CheckResult;
}

#[cfg(feature = "consumer")]
impl<T: Consumer> bindings::exports::wasmq::plugin::consumer::Guest for T {
    fn handle(message: Message) -> Outcome {
        <T as Consumer>::handle(message)
    }
}

#[cfg(feature = "checker")]
impl<T: Checker> bindings::exports::wasmq::plugin::checker::Guest for T {
    fn check_transaction(message: Message) -> CheckResult {
        <T as Checker>::check_transaction(message)
    }
}

/// Exports a plugin type: it must implement [`Consumer`] and/or [`Checker`], per the features.
#[macro_export]
macro_rules! export {
    ($t:ident) => {
        // Exports exist only in the component; a native build (unit tests) has none, so its
        // cdylib links without the WIT-named symbols.
        #[cfg(target_arch = "wasm32")]
        mod __wasmq_exports {
            use super::*;
            $crate::bindings::__export_generated!($t with_types_in $crate::bindings);
        }
    };
}

impl Error {
    /// `denied`, `invalid`, `unavailable` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Denied(_) => "denied",
            Error::Invalid(_) => "invalid",
            Error::Unavailable(_) => "unavailable",
            Error::Failed(_) => "failed",
        }
    }

    /// What the host said.
    pub fn message(&self) -> &str {
        match self {
            Error::Denied(m) | Error::Invalid(m) | Error::Unavailable(m) | Error::Failed(m) => m,
        }
    }

    /// Transient errors are worth a retry of the message; the others are not.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}
