//! `wasmq plugin new` and `wasmq plugin build` for Rust, Python and JavaScript plugins: a
//! scaffold that builds on the first try (with the guest SDK and the WIT contract vendored next
//! to it; they ship inside this binary), language detection, and builds that install their
//! toolchain when missing.

mod js;
mod python;
mod rust;
mod toolchain;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

/// The WIT contract, as this binary was built with it.
const WIT: &str = include_str!("../../../../wit/wasmq.wit");

/// The worlds of `wit/wasmq.wit` a plugin can target.
const WORLDS: [&str; 3] = ["consumer-plugin", "checker-plugin", "plugin"];

/// A plugin's language, from `--lang` or detected from its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl std::str::FromStr for Lang {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "rust" | "rs" => Ok(Lang::Rust),
            "python" | "py" => Ok(Lang::Python),
            "js" | "javascript" => Ok(Lang::Js),
            other => bail!("--lang {other}: use rust, python or js"),
        }
    }
}

impl Lang {
    /// By the manifest in `dir`: Cargo.toml, pyproject.toml or package.json.
    pub fn detect(dir: &Path) -> anyhow::Result<Lang> {
        for (file, lang) in [
            ("Cargo.toml", Lang::Rust),
            ("pyproject.toml", Lang::Python),
            ("package.json", Lang::Js),
        ] {
            if dir.join(file).is_file() {
                return Ok(lang);
            }
        }
        bail!(
            "{} has no Cargo.toml, pyproject.toml or package.json; is it a plugin directory? (`wasmq plugin new NAME --lang rust|python|js` makes one)",
            dir.display()
        )
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!("plugin name {name:?}: use 1-64 of a-z 0-9 - _, starting with a letter");
    }
    Ok(())
}

/// Writes `text` to `root/rel`, creating directories.
fn write_file(root: &Path, rel: &str, text: &str) -> anyhow::Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a new plugin `dir/name` in `lang` ("rust", "python" or "js").
pub fn new_plugin(name: &str, dir: &Path, lang: &str) -> anyhow::Result<PathBuf> {
    let lang: Lang = lang.parse()?;
    check_name(name)?;
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let files = match lang {
        Lang::Rust => rust::scaffold(name),
        Lang::Python => python::scaffold(name),
        Lang::Js => js::scaffold(name),
    };
    for (rel, text) in &files {
        write_file(&root, rel, text)?;
    }
    Ok(root)
}

/// Builds the plugin in `dir` (language detected) and returns the component's path; build
/// output goes to `dir/target`.
pub fn build_plugin(dir: &Path) -> anyhow::Result<PathBuf> {
    build_plugin_in(dir, None)
}

/// Like [`build_plugin`], with build output in `target` (e.g. a shared dir kept between runs).
pub fn build_plugin_in(dir: &Path, target: Option<&Path>) -> anyhow::Result<PathBuf> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let lang = Lang::detect(dir)?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    // Toolchains run in other directories: relative paths would move.
    let target = target.map(std::path::absolute).transpose()?;
    let own_target = || target.clone().unwrap_or_else(|| dir.join("target"));
    match lang {
        Lang::Rust => rust::build(&dir, target.as_deref()),
        Lang::Python => python::build(&dir, &own_target()),
        Lang::Js => js::build(&dir, &own_target()),
    }
}

/// Checks a manifest's `world`.
fn check_world(world: &str, manifest: &Path) -> anyhow::Result<()> {
    if !WORLDS.contains(&world) {
        bail!(
            "{}: world {world:?} is not one of {}",
            manifest.display(),
            WORLDS.join(", ")
        );
    }
    Ok(())
}

/// Files and directories a build never reads from a plugin's directory.
fn skipped(name: &str) -> bool {
    name.starts_with('.')
        || matches!(name, "target" | "node_modules" | "__pycache__" | "venv")
        || name.ends_with(".wasm")
}

/// A plugin directory's source files (relative paths, sorted), without build output.
fn source_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let here = root.join(rel);
        for entry in
            std::fs::read_dir(&here).with_context(|| format!("cannot read {}", here.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            if skipped(&name.to_string_lossy()) {
                continue;
            }
            let path = rel.join(&name);
            // Follows symlinks, as the toolchains do.
            if root.join(&path).is_dir() {
                walk(root, &path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}

/// A build's inputs, hashed: a component is rebuilt only when one of them changed.
struct Fingerprint(Sha256);

impl Fingerprint {
    fn new(parts: &[&str]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        Fingerprint(h)
    }

    fn file(&mut self, name: &str, bytes: &[u8]) {
        for part in [name.as_bytes(), bytes] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
    }

    fn sources(&mut self, dir: &Path) -> anyhow::Result<()> {
        for rel in source_files(dir)? {
            let path = dir.join(&rel);
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            self.file(&rel.to_string_lossy(), &bytes);
        }
        Ok(())
    }

    fn hex(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A component built by a non-cargo toolchain into `target`, with its inputs' fingerprint beside
/// it and a lock so that concurrent builds of one plugin wait for each other.
struct Output {
    wasm: PathBuf,
    stamp: PathBuf,
    fingerprint: String,
    _lock: std::fs::File,
}

impl Output {
    fn open(target: &Path, name: &str, fingerprint: String) -> anyhow::Result<Output> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        let lock = toolchain::lock(&target.join(".wasmq-build.lock"))?;
        Ok(Output {
            wasm: target.join(format!("{name}.wasm")),
            stamp: target.join(format!("{name}.wasm.inputs")),
            fingerprint,
            _lock: lock,
        })
    }

    /// True when the component on disk was built from the same inputs.
    fn up_to_date(&self) -> bool {
        self.wasm.is_file()
            && std::fs::read_to_string(&self.stamp).is_ok_and(|s| s.trim() == self.fingerprint)
    }

    /// Where the toolchain writes; [`Output::finish`] moves it into place.
    fn partial(&self) -> PathBuf {
        self.wasm.with_extension("wasm.partial")
    }

    fn finish(self) -> anyhow::Result<PathBuf> {
        std::fs::rename(self.partial(), &self.wasm)
            .with_context(|| format!("cannot write {}", self.wasm.display()))?;
        std::fs::write(&self.stamp, &self.fingerprint)?;
        Ok(self.wasm)
    }
}

/// The WIT dir a build uses: the plugin's own `wit/` if it has one, else this binary's copy.
fn wit_dir(dir: &Path, target: &Path) -> anyhow::Result<PathBuf> {
    let own = dir.join("wit");
    if own.is_dir() {
        return Ok(own);
    }
    let path = target.join("wit");
    write_file(&path, "wasmq.wit", WIT)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names_languages_and_existing_dirs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(new_plugin("Bad Name", dir.path(), "rust").is_err());
        assert!(new_plugin("ok", dir.path(), "cobol").is_err());
        for lang in ["rust", "python", "js"] {
            let root = new_plugin(&format!("ok-{lang}"), dir.path(), lang).unwrap();
            assert!(
                root.join("wit/wasmq.wit").exists()
                    || root.join("wasmq-guest-sdk/wit/wasmq.wit").exists()
            );
            assert_eq!(Lang::detect(&root).unwrap(), lang.parse::<Lang>().unwrap());
        }
        assert!(
            new_plugin("ok-rust", dir.path(), "rust")
                .unwrap_err()
                .to_string()
                .contains("exists")
        );
        assert!(Lang::detect(dir.path()).is_err());
    }

    #[test]
    fn fingerprints_change_with_sources_but_not_build_output() {
        let dir = tempfile::tempdir().unwrap();
        let root = new_plugin("fp", dir.path(), "python").unwrap();
        let fp = || {
            let mut f = Fingerprint::new(&["python"]);
            f.sources(&root).unwrap();
            f.hex()
        };
        let before = fp();
        std::fs::create_dir_all(root.join("target")).unwrap();
        std::fs::write(root.join("target/x.wasm"), b"x").unwrap();
        std::fs::create_dir_all(root.join("__pycache__")).unwrap();
        std::fs::write(root.join("__pycache__/app.pyc"), b"x").unwrap();
        assert_eq!(fp(), before);
        std::fs::write(root.join("app.py"), b"# changed").unwrap();
        assert_ne!(fp(), before);
    }
}
