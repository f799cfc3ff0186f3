//! Python plugins: an `app.py` with the Python guest SDK (`wasmq` package) beside it, built into
//! a component by componentize-py. `pyproject.toml`'s `[tool.wasmq]` names the world and module.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use super::{Fingerprint, Output, WIT, check_world, toolchain, wit_dir, write_file};

/// The Python guest SDK, as this binary was built with it.
const SDK_FILES: [(&str, &str); 4] = [
    (
        "wasmq/__init__.py",
        include_str!("../../../../guest-sdk/python/wasmq/__init__.py"),
    ),
    (
        "wasmq/_component.py",
        include_str!("../../../../guest-sdk/python/wasmq/_component.py"),
    ),
    (
        "wasmq/template.py",
        include_str!("../../../../guest-sdk/python/wasmq/template.py"),
    ),
    (
        "wasmq/testing.py",
        include_str!("../../../../guest-sdk/python/wasmq/testing.py"),
    ),
];

const APP_PY: &str = r#""""A wasmq consumer plugin in Python. Build: `wasmq plugin build`; deploy:
`wasmq plugin deploy NAME FILE`; unit tests: `python3 -m unittest`."""

import wasmq


@wasmq.consumer
def handle(message: wasmq.Message):
    try:
        body = message.json()
    except ValueError as e:
        # Retrying cannot fix a body that is not JSON: send it to the dead-letter queue.
        return wasmq.Reject(f"body is not JSON: {e}")
    wasmq.log.info(f"got {message.id} on {message.topic}: {body}")
    return wasmq.ACK
"#;

const TEST_APP_PY: &str = r#""""Unit tests of the plugin's logic with the SDK's fake host (plain CPython)."""

import unittest

import app
from wasmq import ACK, Reject, testing


class AppTest(unittest.TestCase):
    def test_acks_json_and_rejects_the_rest(self):
        testing.reset()
        self.assertEqual(app.handle(testing.message({"hello": "world"})), ACK)
        self.assertIsInstance(app.handle(testing.message("not json")), Reject)
        self.assertIn("hello", testing.logs()[0][1])


if __name__ == "__main__":
    unittest.main()
"#;

fn pyproject(name: &str) -> String {
    format!(
        r#"[project]
name = "{name}"
version = "0.1.0"
requires-python = ">=3.11"

# What `wasmq plugin build` reads: the WIT world (consumer-plugin, checker-plugin or plugin:
# decorate functions with @wasmq.consumer, @wasmq.checker or both) and the module defining them.
[tool.wasmq]
world = "consumer-plugin"
module = "app"
"#
    )
}

/// The files of a new Python plugin.
pub(super) fn scaffold(name: &str) -> Vec<(String, String)> {
    let mut files = vec![
        ("pyproject.toml".to_string(), pyproject(name)),
        ("app.py".to_string(), APP_PY.to_string()),
        ("test_app.py".to_string(), TEST_APP_PY.to_string()),
        (
            ".gitignore".to_string(),
            "/target\n__pycache__/\n".to_string(),
        ),
        ("wit/wasmq.wit".to_string(), WIT.to_string()),
    ];
    files.extend(
        SDK_FILES
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string())),
    );
    files
}

/// What `pyproject.toml` says about the build.
struct Manifest {
    name: String,
    world: String,
    module: String,
}

fn manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join("pyproject.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let tool = doc
        .get("tool")
        .and_then(|t| t.get("wasmq"))
        .and_then(|t| t.as_table());
    let field = |key: &str, default: &str| {
        tool.and_then(|t| t.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or(default)
            .to_string()
    };
    let name = doc
        .get("project")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .map(String::from)
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "plugin".into());
    let m = Manifest {
        name,
        world: field("world", "consumer-plugin"),
        module: field("module", "app"),
    };
    check_world(&m.world, &path)?;
    let module_file = dir.join(format!("{}.py", m.module.replace('.', "/")));
    if !module_file.is_file() {
        bail!(
            "{}: module {:?} has no {}",
            path.display(),
            m.module,
            module_file.display()
        );
    }
    Ok(m)
}

/// Builds with componentize-py into `target` (skipped when no input changed).
pub(super) fn build(dir: &Path, target: &Path) -> anyhow::Result<PathBuf> {
    let m = manifest(dir)?;
    let tool = toolchain::componentize_py()?;
    // The plugin's own SDK copy wins (vendored by the scaffold); else this binary's.
    let own_sdk = dir.join("wasmq/__init__.py").is_file();
    let mut fp = Fingerprint::new(&[
        "python",
        toolchain::COMPONENTIZE_PY,
        &m.world,
        &m.module,
        WIT,
    ]);
    fp.sources(dir)?;
    if !own_sdk {
        for (rel, text) in SDK_FILES {
            fp.file(rel, text.as_bytes());
        }
    }
    let out = Output::open(target, &m.name, fp.hex())?;
    if out.up_to_date() {
        return Ok(out.wasm);
    }
    let wit = wit_dir(dir, target)?;
    let mut cmd = Command::new(&tool);
    cmd.arg("-d")
        .arg(&wit)
        .args(["-w", &m.world, "componentize", "-p"])
        .arg(dir);
    if !own_sdk {
        let sdk = target.join("python-sdk");
        for (rel, text) in SDK_FILES {
            write_file(&sdk, rel, text)?;
        }
        cmd.arg("-p").arg(&sdk);
    }
    eprintln!(
        "wasmq: building {} ({}, world {}) with componentize-py {}",
        m.name,
        dir.display(),
        m.world,
        toolchain::COMPONENTIZE_PY
    );
    let status = cmd
        .arg(&m.module)
        .arg("-o")
        .arg(out.partial())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(toolchain::to_stderr())
        .status()
        .with_context(|| format!("cannot run {}", tool.display()))?;
    if !status.success() {
        bail!("componentize-py failed (see above)");
    }
    out.finish()
}
