//! Compiles every plugin of `plugins/` for wasm32-wasip2 and writes their paths into
//! `$OUT_DIR/plugins.rs` as constants (`ECHO`, `PROBE`, ...). Plugins are grouped by the guest
//! SDK features they use, one cargo invocation per group, because cargo unifies features across
//! the packages of one invocation and the features pick each plugin's exported world.

// A build script reports failure by panicking, with a message saying why.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf();
    let plugins = root.join("plugins");
    for dir in ["plugins", "guest-sdk/src", "guest-sdk/Cargo.toml", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<pkg>/out: keep plugin builds beside, in <target>/plugins.
    let target_dir = out
        .ancestors()
        .nth(4)
        .map_or_else(|| out.join("plugins-target"), |t| t.join("plugins"));

    let workspace: toml::Table = read_toml(&plugins.join("Cargo.toml"));
    let members: Vec<String> = workspace["workspace"]["members"]
        .as_array()
        .expect("plugins/Cargo.toml lists members")
        .iter()
        .filter_map(|m| m.as_str().map(String::from))
        .collect();
    let mut groups: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for member in &members {
        let pkg: toml::Table = read_toml(&plugins.join(member).join("Cargo.toml"));
        let name = pkg["package"]["name"]
            .as_str()
            .expect("package name")
            .to_string();
        let mut features: Vec<String> = pkg["dependencies"]
            .get("wasmq-guest-sdk")
            .and_then(|d| d.get("features"))
            .and_then(|f| f.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        features.sort();
        groups
            .entry(features.join(","))
            .or_default()
            .push((member.clone(), name));
    }

    let mut consts = format!(
        "/// Where plugins are built (reusable by tests that build more plugins).\npub const TARGET_DIR: &str = {:?};\n",
        target_dir.display().to_string()
    );
    for (features, pkgs) in &groups {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&plugins)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
            .env("CARGO_TARGET_DIR", &target_dir)
            // Flags meant for the host build must not leak into the wasm build.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET");
        for (_, name) in pkgs {
            cmd.args(["-p", name]);
        }
        let status = cmd.status().expect("cannot run cargo to build the plugins");
        assert!(
            status.success(),
            "building plugins [{features}] failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`)"
        );
        for (_, name) in pkgs {
            let file = name.replace('-', "_");
            let path = target_dir
                .join("wasm32-wasip2/release")
                .join(format!("{file}.wasm"));
            assert!(path.exists(), "{} was not built", path.display());
            consts.push_str(&format!(
                "/// The `{name}` plugin, compiled from plugins/.\npub const {}: &str = {:?};\n",
                file.to_uppercase(),
                path.display().to_string()
            ));
        }
    }
    std::fs::write(out.join("plugins.rs"), consts).expect("cannot write plugins.rs");
}

fn read_toml(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
