//! The module layering of `host/src` (see the map in `lib.rs`): no import cycle between its
//! top-level modules. Reads the sources: every `crate::<module>` path outside comments and
//! `#[cfg(test)]` code is an edge from the file's top-level module to that one; the crate root
//! (`lib.rs`, `main.rs`) wires everything and is left out.
//!
//! Our own check rather than cargo-modules' `--acyclic`: that one loads the crate through
//! rust-analyzer (build scripts included, so RocksDB is compiled again: 12 minutes on 2 cores)
//! and checks the item graph, where a type and its own method already form a cycle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// (from module, to module) → the first place that makes the edge, as `file:line`.
type Edges = BTreeMap<(String, String), String>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`dispatch/runner/ordered.rs` → `dispatch`);
/// `None` for the crate root.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        name => Some(name.trim_end_matches(".rs").to_string()),
    }
}

/// The modules a line names as `crate::<module>` (comments and string contents aside).
fn named_modules(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // `use crate::{a, b}`: every name in the braces.
        if name.is_empty() && after.starts_with('{') {
            let inside = after[1..].split('}').next().unwrap_or("");
            out.extend(
                inside
                    .split(',')
                    .filter_map(|p| p.trim().split("::").next())
                    .filter(|m| !m.is_empty())
                    .map(str::to_string),
            );
        } else if !name.is_empty() {
            out.push(name);
        }
        rest = after;
    }
    out
}

fn edges(src: &Path) -> Edges {
    let mut files = Vec::new();
    sources(src, &mut files);
    files.sort();
    let mut edges = Edges::new();
    for file in files {
        let Some(from) = module_of(src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("#[cfg(test)]") {
                break;
            }
            if line.trim_start().starts_with("//") {
                continue;
            }
            for to in named_modules(line) {
                if to != from {
                    let place = format!("{}:{}", file.display(), n + 1);
                    edges.entry((from.clone(), to)).or_insert(place);
                }
            }
        }
    }
    edges
}

/// One cycle of the graph, if it has any, as the modules along it (first = last).
fn find_cycle(edges: &Edges) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().insert(to);
    }
    // Depth-first search; a node met again while on the stack closes a cycle.
    fn visit<'a>(
        node: &'a str,
        next: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = stack[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        stack.push(node);
        for to in next.get(node).into_iter().flatten() {
            if let Some(c) = visit(to, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in next.keys() {
        if let Some(c) = visit(node, &next, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn host_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = edges(&src);
    assert!(
        edges.len() > 20,
        "the scan found the imports ({} edges)",
        edges.len()
    );
    if let Some(cycle) = find_cycle(&edges) {
        let evidence: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                let place = &edges[&(w[0].clone(), w[1].clone())];
                format!("  {} -> {}  ({place})", w[0], w[1])
            })
            .collect();
        panic!(
            "import cycle between host/src modules:\n{}\nsee the layers in host/src/lib.rs",
            evidence.join("\n")
        );
    }
}

#[test]
fn the_check_sees_a_cycle() {
    let edge = |a: &str, b: &str| ((a.to_string(), b.to_string()), "here".to_string());
    let acyclic: Edges = [edge("http", "broker"), edge("broker", "storage")].into();
    assert_eq!(find_cycle(&acyclic), None);
    let cyclic: Edges = [
        edge("http", "broker"),
        edge("broker", "runtime"),
        edge("runtime", "broker"),
    ]
    .into();
    assert_eq!(
        find_cycle(&cyclic).unwrap(),
        vec!["broker", "runtime", "broker"]
    );
    assert_eq!(
        named_modules("use crate::{base::now_ms, storage::Storage}; // crate::http"),
        vec!["base", "storage"]
    );
    assert_eq!(
        named_modules("    let x = crate::broker::now_ms() + crate::text::MAX;"),
        vec!["broker", "text"]
    );
}
