//! The Python and JavaScript component toolchains (componentize-py in a venv, componentize-js
//! from npm): pinned versions, installed once under `$WASMQ_TOOLCHAINS` (default
//! `~/.cache/wasmq/toolchains`) when missing, saying what is done, under a file lock so that
//! concurrent builds install once.

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The componentize-py release (PyPI) Python plugins are built with.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// The componentize-js release (npm) JavaScript plugins are built with.
pub const COMPONENTIZE_JS: &str = "0.23.0";

/// Where toolchains live.
pub fn root() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WASMQ_TOOLCHAINS") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .context("neither WASMQ_TOOLCHAINS nor HOME is set: where should toolchains go?")?;
    Ok(PathBuf::from(home).join(".cache/wasmq/toolchains"))
}

/// An exclusive lock on `path` (created if missing), held until the file is dropped.
pub fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

/// A child's stdout goes to our stderr: `plugin build` prints only the component's path on
/// stdout, for scripts.
pub fn to_stderr() -> Stdio {
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// Runs an installer step, saying what it runs.
fn run(cmd: &mut Command, what: &str, hint: &str) -> anyhow::Result<()> {
    eprintln!("wasmq: {what}");
    let status = cmd
        .stdout(to_stderr())
        .status()
        .with_context(|| format!("cannot run {:?}: {hint}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status}); {hint}");
    }
    Ok(())
}

/// `componentize-py`, installed into a venv when missing.
pub fn componentize_py() -> anyhow::Result<PathBuf> {
    let root = root()?;
    let venv = root.join(format!("py-{COMPONENTIZE_PY}"));
    let bin = venv.join("bin/componentize-py");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let _lock = lock(&root.join(".install.lock"))?;
    if bin.is_file() {
        return Ok(bin); // another build installed it while we waited
    }
    let hint =
        "Python plugins need python3 with venv and pip (Debian: apt-get install python3-venv)";
    let _ = std::fs::remove_dir_all(&venv); // a half-made venv from an interrupted install
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        &format!(
            "creating a Python venv for componentize-py in {}",
            venv.display()
        ),
        hint,
    )?;
    run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("componentize-py=={COMPONENTIZE_PY}")),
        &format!("installing componentize-py {COMPONENTIZE_PY} (pip)"),
        hint,
    )?;
    if !bin.is_file() {
        bail!(
            "pip installed componentize-py, but {} is missing",
            bin.display()
        );
    }
    Ok(bin)
}

/// `componentize-js`, installed with npm when missing.
pub fn componentize_js() -> anyhow::Result<PathBuf> {
    let root = root()?;
    let dir = root.join(format!("js-{COMPONENTIZE_JS}"));
    let bin = dir.join("node_modules/.bin/componentize-js");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = lock(&root.join(".install.lock"))?;
    if bin.is_file() {
        return Ok(bin);
    }
    // npm wants a package.json where it installs.
    let manifest = dir.join("package.json");
    if !manifest.exists() {
        std::fs::write(&manifest, "{\"private\": true}\n")?;
    }
    run(
        Command::new("npm")
            .current_dir(&dir)
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .arg(format!(
                "@bytecodealliance/componentize-js@{COMPONENTIZE_JS}"
            )),
        &format!(
            "installing componentize-js {COMPONENTIZE_JS} (npm, ~400 MB) into {}",
            dir.display()
        ),
        "JavaScript plugins need Node.js 20+ and npm (Debian: apt-get install nodejs npm)",
    )?;
    if !bin.is_file() {
        bail!(
            "npm installed componentize-js, but {} is missing",
            bin.display()
        );
    }
    Ok(bin)
}
