//! The house has no circles: the rooms of `host/src` (its top-level modules)
//! import each other in one direction only, as `lib.rs`'s Layout lists them,
//! and the control plane (`probe`, `server`) names no type of the data path
//! (`proxy`).
//!
//! Read from the source: every `crate::room` path outside comments, in `use`
//! lines (grouped ones too) and inline.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file below `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The room a file belongs to: its top-level module (`lib.rs`, `main.rs`: none).
fn room_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.trim_end_matches(".rs").to_owned();
    (!matches!(first.as_str(), "lib" | "main")).then_some(first)
}

/// The code of a file without its comments (line comments and doc comments).
fn code(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            // `//` inside a string literal (a URL) is rare here; a whole-line comment is common.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after each `crate::` in `code`: `a::B`, or each item of `{a::B, c}`.
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect::<String>();
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            out.extend(group[..end].split(',').map(|item| ident(item.trim())).filter(|p| !p.is_empty()));
        } else {
            out.push(ident(rest));
        }
    }
    out
}

/// The room a `crate::` path leads to (root re-exports resolved).
fn room_of_path(path: &str) -> String {
    let first = path.split("::").next().unwrap_or("");
    match first {
        "Error" | "ReloadError" | "DrainError" | "TlsSetupError" => "error".into(),
        "Server" | "check" => "server".into(),
        other => other.into(),
    }
}

/// Each room and the rooms it imports (itself left out).
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The rooms' imports, and every `crate::` path with the file that names it.
fn graph() -> (Graph, Vec<(PathBuf, String)>) {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let mut graph = Graph::new();
    let mut uses = Vec::new();
    for file in all {
        let Some(room) = room_of(&file) else { continue };
        let code = code(&std::fs::read_to_string(&file).unwrap());
        let deps = graph.entry(room.clone()).or_default();
        for path in crate_paths(&code) {
            let to = room_of_path(&path);
            if to != room {
                deps.insert(to);
            }
            uses.push((file.clone(), path));
        }
    }
    (graph, uses)
}

#[test]
fn no_room_imports_a_room_that_imports_it_back() {
    let (graph, _) = graph();
    // Depth-first search for a cycle; report it whole.
    fn visit(room: &str, graph: &Graph, stack: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|r| r == room) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(room.to_owned());
            return Some(cycle);
        }
        if done.contains(room) {
            return None;
        }
        stack.push(room.to_owned());
        for next in graph.get(room).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(room.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for room in graph.keys() {
        if let Some(cycle) = visit(room, &graph, &mut Vec::new(), &mut done) {
            panic!("import circle: {}\n(all imports: {graph:#?})", cycle.join(" -> "));
        }
    }
    // The check sees the rooms it should (a broken parser would find none).
    assert!(graph["server"].contains("admin") && graph["server"].contains("proxy"), "{graph:#?}");
    assert!(graph["proxy"].contains("live") && graph["probe"].contains("live"), "{graph:#?}");
}

#[test]
fn the_rooms_named_stay_apart() {
    let (graph, uses) = graph();
    let imports = |from: &str, to: &str| graph.get(from).is_some_and(|d| d.contains(to));
    assert!(!imports("admin", "server"), "admin must reach the server only through admin::Handle");
    assert!(!imports("config", "plugin"), "config must not load plugins");
    assert!(!imports("probe", "proxy"), "probe must not import the data path");
    // The control plane may start the data path (functions), never name its types.
    for (file, path) in &uses {
        let control = file.components().any(|c| matches!(c.as_os_str().to_str(), Some("server" | "probe")));
        let names_a_type = path.split("::").any(|seg| seg.starts_with(char::is_uppercase));
        assert!(
            !(control && path.starts_with("proxy") && names_a_type),
            "{} names the data path's type crate::{path}",
            file.display()
        );
    }
}
