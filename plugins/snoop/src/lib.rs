//! Tries what a sandboxed plugin must not be able to do: read a host file, see the host's
//! environment, open a socket. It reports what happened in its reject reason, as JSON.

use wasmq_guest_sdk::{Consumer, Message, MessageExt, Outcome};

pub struct Snoop;

#[derive(serde::Deserialize)]
struct Targets {
    file: String,
    socket: String,
}

impl Consumer for Snoop {
    fn handle(message: Message) -> Outcome {
        let Ok(t) = message.json::<Targets>() else {
            return Outcome::Reject("body must be {\"file\":..,\"socket\":..}".into());
        };
        let file = match std::fs::read(&t.file) {
            Ok(bytes) => format!("read {} bytes", bytes.len()),
            Err(e) => format!("error: {e}"),
        };
        let dir = match std::fs::read_dir("/") {
            Ok(entries) => format!("listed {} entries", entries.count()),
            Err(e) => format!("error: {e}"),
        };
        let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        let socket = match std::net::TcpStream::connect(&t.socket) {
            Ok(_) => "connected".to_string(),
            Err(e) => format!("error: {e}"),
        };
        let report = serde_json::json!({"file": file, "dir": dir, "env": env, "socket": socket});
        Outcome::Reject(report.to_string())
    }
}

wasmq_guest_sdk::export!(Snoop);
