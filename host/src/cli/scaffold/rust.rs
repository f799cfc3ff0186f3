//! Rust plugins: a crate with the guest SDK vendored beside it, built by cargo for wasm32-wasip2.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The guest SDK and WIT files, as this binary was built with them.
const SDK_FILES: [(&str, &str); 8] = [
    (
        "Cargo.toml",
        include_str!("../../../../guest-sdk/Cargo.toml"),
    ),
    ("README.md", include_str!("../../../../guest-sdk/README.md")),
    (
        "src/lib.rs",
        include_str!("../../../../guest-sdk/src/lib.rs"),
    ),
    (
        "src/capabilities.rs",
        include_str!("../../../../guest-sdk/src/capabilities.rs"),
    ),
    (
        "src/message.rs",
        include_str!("../../../../guest-sdk/src/message.rs"),
    ),
    (
        "src/testing.rs",
        include_str!("../../../../guest-sdk/src/testing.rs"),
    ),
    (
        "src/template.rs",
        include_str!("../../../../guest-sdk/src/template.rs"),
    ),
    ("wit/wasmq.wit", include_str!("../../../../wit/wasmq.wit")),
];

const TARGET: &str = "wasm32-wasip2";

fn cargo_toml(name: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
# Features pick what the plugin exports: "consumer" (default), "checker", or both.
wasmq-guest-sdk = {{ path = "wasmq-guest-sdk" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

# A standalone workspace, so the plugin builds wherever it lives.
[workspace]

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
"#
    )
}

fn lib_rs(type_name: &str) -> String {
    format!(
        r##"//! A wasmq consumer plugin. Build: `wasmq plugin build`; deploy: `wasmq plugin deploy NAME FILE`.

use wasmq_guest_sdk::{{Consumer, Message, MessageExt, Outcome, log}};

pub struct {type_name};

impl Consumer for {type_name} {{
    fn handle(message: Message) -> Outcome {{
        match message.json::<serde_json::Value>() {{
            Ok(body) => {{
                log::info(&format!("got {{}} on {{}}: {{body}}", message.id, message.topic));
                Outcome::Ack
            }}
            // Retrying cannot fix a body that is not JSON: send it to the dead-letter queue.
            Err(e) => Outcome::Reject(format!("body is not JSON: {{e}}")),
        }}
    }}
}}

wasmq_guest_sdk::export!({type_name});

#[cfg(test)]
mod tests {{
    use super::*;
    use wasmq_guest_sdk::testing;

    #[test]
    fn acks_json_and_rejects_the_rest() {{
        assert_eq!({type_name}::handle(testing::message(r#"{{"hello":"world"}}"#)), Outcome::Ack);
        assert!(matches!({type_name}::handle(testing::message("not json")), Outcome::Reject(_)));
    }}
}}
"##
    )
}

fn type_name(name: &str) -> String {
    let mut out = String::new();
    for part in name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
    {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "Plugin");
    }
    out
}

/// The files of a new Rust plugin crate.
pub(super) fn scaffold(name: &str) -> Vec<(String, String)> {
    let mut files = vec![
        ("Cargo.toml".to_string(), cargo_toml(name)),
        ("src/lib.rs".to_string(), lib_rs(&type_name(name))),
        (".gitignore".to_string(), "/target\n".to_string()),
    ];
    for (rel, text) in SDK_FILES {
        files.push((format!("wasmq-guest-sdk/{rel}"), text.to_string()));
    }
    files
}

/// Installs the wasm32-wasip2 target if rustup lacks it, saying so.
fn ensure_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup (install Rust with rustup first)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    eprintln!("installing the {TARGET} target: rustup target add {TARGET}");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()?;
    if !status.success() {
        bail!("rustup target add {TARGET} failed");
    }
    Ok(())
}

/// Builds the plugin crate in `dir` for wasm32-wasip2 and returns the component's path.
pub(super) fn build(dir: &Path, target: Option<&Path>) -> anyhow::Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.exists() {
        bail!(
            "{} has no Cargo.toml; is it a plugin directory?",
            dir.display()
        );
    }
    ensure_target()?;
    let manifest = manifest.canonicalize()?;
    let mut cmd = Command::new("cargo");
    if let Some(target) = target {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let out = cmd
        .current_dir(dir)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    if !out.status.success() {
        bail!("cargo build failed (see above)");
    }
    // The cdylib of the package whose manifest is ours is the component.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact"
            || msg["manifest_path"].as_str().map(Path::new) != Some(&manifest)
        {
            continue;
        }
        let wasm = msg["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"));
        if let Some(path) = wasm {
            return Ok(PathBuf::from(path));
        }
    }
    bail!(
        "cargo built no .wasm for {}; is its crate-type \"cdylib\"?",
        manifest.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        assert_eq!(type_name("email-notifier"), "EmailNotifier");
        assert_eq!(type_name("x"), "X");
        assert_eq!(type_name("9lives"), "Plugin9lives");
    }
}
