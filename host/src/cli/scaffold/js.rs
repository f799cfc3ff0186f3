//! JavaScript plugins: an ES module `app.js` importing the JS guest SDK (`./wasmq.js`), built into
//! a component by componentize-js. `package.json`'s `wasmq` object names the world and module.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use super::{Fingerprint, Output, WIT, check_world, source_files, toolchain, wit_dir, write_file};

/// The JavaScript guest SDK, as this binary was built with it.
const SDK: &str = include_str!("../../../../guest-sdk/js/wasmq.js");
/// Its fake host for unit tests under Node.js.
const TESTING: &str = include_str!("../../../../guest-sdk/js/testing.js");

const TEST_JS: &str = r#"// Unit tests of the plugin's logic with the SDK's fake host: `npm test`
// (node --import ./testing.js --test).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import * as testing from './testing.js';
import { consumer } from './app.js';

test('acks JSON and rejects the rest', () => {
  testing.reset();
  assert.deepEqual(consumer.handle(testing.message({ hello: 'world' })), { tag: 'ack' });
  assert.equal(consumer.handle(testing.message('not json')).tag, 'reject');
  assert.match(testing.logs()[0][1], /hello/);
});
"#;

const APP_JS: &str = r#"// A wasmq consumer plugin in JavaScript. Build: `wasmq plugin build`; deploy:
// `wasmq plugin deploy NAME FILE`.

import * as wasmq from './wasmq.js';

export const consumer = wasmq.consumer((message) => {
  let body;
  try {
    body = message.json();
  } catch (e) {
    // Retrying cannot fix a body that is not JSON: send it to the dead-letter queue.
    return wasmq.reject(`body is not JSON: ${e.message}`);
  }
  wasmq.log.info(`got ${message.id} on ${message.topic}: ${JSON.stringify(body)}`);
  return wasmq.ACK;
});
"#;

fn package_json(name: &str) -> String {
    format!(
        r#"{{
  "name": "{name}",
  "version": "0.1.0",
  "type": "module",
  "private": true,
  "scripts": {{
    "test": "node --import ./testing.js --test"
  }},
  "wasmq": {{
    "world": "consumer-plugin",
    "main": "app.js"
  }}
}}
"#
    )
}

/// The files of a new JavaScript plugin.
pub(super) fn scaffold(name: &str) -> Vec<(String, String)> {
    vec![
        ("package.json".to_string(), package_json(name)),
        ("app.js".to_string(), APP_JS.to_string()),
        ("wasmq.js".to_string(), SDK.to_string()),
        ("testing.js".to_string(), TESTING.to_string()),
        ("test.js".to_string(), TEST_JS.to_string()),
        (".gitignore".to_string(), "/target\n".to_string()),
        ("wit/wasmq.wit".to_string(), WIT.to_string()),
    ]
}

struct Manifest {
    name: String,
    world: String,
    main: String,
}

fn manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join("package.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let field = |key: &str| doc["wasmq"][key].as_str().map(String::from);
    let name = doc["name"]
        .as_str()
        .map(String::from)
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "plugin".into());
    let m = Manifest {
        // A scoped npm name (@scope/name) is not a file name.
        name: name.rsplit('/').next().unwrap_or("plugin").to_string(),
        world: field("world").unwrap_or_else(|| "consumer-plugin".into()),
        main: field("main")
            .or_else(|| doc["main"].as_str().map(String::from))
            .unwrap_or_else(|| "app.js".into()),
    };
    check_world(&m.world, &path)?;
    if !dir.join(&m.main).is_file() {
        bail!("{}: main module {:?} is missing", path.display(), m.main);
    }
    Ok(m)
}

/// Builds with componentize-js into `target` (skipped when no input changed). The sources are
/// staged into `target/stage` with the SDK beside them, because componentize-js resolves
/// relative imports only.
pub(super) fn build(dir: &Path, target: &Path) -> anyhow::Result<PathBuf> {
    let m = manifest(dir)?;
    let tool = toolchain::componentize_js()?;
    let own_sdk = dir.join("wasmq.js").is_file();
    let mut fp = Fingerprint::new(&["js", toolchain::COMPONENTIZE_JS, &m.world, &m.main, WIT]);
    fp.sources(dir)?;
    if !own_sdk {
        fp.file("wasmq.js", SDK.as_bytes());
    }
    let out = Output::open(target, &m.name, fp.hex())?;
    if out.up_to_date() {
        return Ok(out.wasm);
    }
    let stage = target.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    for rel in source_files(dir)? {
        let to = stage.join(&rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(dir.join(&rel), &to)
            .with_context(|| format!("cannot copy {} to {}", rel.display(), to.display()))?;
    }
    if !own_sdk {
        write_file(&stage, "wasmq.js", SDK)?;
    }
    let wit = wit_dir(dir, target)?;
    eprintln!(
        "wasmq: building {} ({}, world {}) with componentize-js {}",
        m.name,
        dir.display(),
        m.world,
        toolchain::COMPONENTIZE_JS
    );
    // The host offers no wasi:http (plugins reach HTTP through the `http` capability only), so
    // the engine's fetch support is left out.
    let status = Command::new(&tool)
        .current_dir(&stage)
        .arg(&m.main)
        .arg("--wit")
        .arg(&wit)
        .args(["-n", &m.world, "-d", "http", "-d", "fetch-event", "-o"])
        .arg(out.partial())
        .stdout(toolchain::to_stderr())
        .status()
        .with_context(|| format!("cannot run {}", tool.display()))?;
    if !status.success() {
        bail!("componentize-js failed (see above)");
    }
    out.finish()
}
