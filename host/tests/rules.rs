//! Every behaviour rule the repository cites is defined in `docs/rules.md`.
//!
//! Code comments, tests and docs cite rules by code (`B14`, `(R6)`, `B1..B6`);
//! `docs/rules.md` defines each one under a heading `## B14: <title>`.
//!
//! Read from the source and docs: every `B1`..`B30` and `R1`..`R20` that
//! stands alone (no letter, digit or `_` right before or after it), so that
//! `0xB1`, `R2D2`, `B64`, `B0` or an identifier like `B3_MASK` is no rule.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where rules are cited, from the root: directories (walked) and files.
/// `docs/rules.md` itself defines them and is left out.
const PLACES: &[&str] = &[
    "host/src",
    "host/benches",
    "sdk/src",
    "plugins",
    "tests/e2e",
    "tests/src",
    "tests/plugins",
    "wasm-build/src",
    "examples",
    "fuzz/fuzz_targets",
    "fuzz/README.md",
    "bench",
    "wit",
    "docs",
    "README.md",
    "LIFECYCLE.md",
];

/// Directories never walked: build output, installed packages, fuzz inputs.
const SKIPPED_DIRS: &[&str] = &["target", "node_modules", "corpus"];

/// Files read (text written by people; lock files and JSON are not).
const EXTENSIONS: &[&str] = &["rs", "md", "toml", "wit", "txt", "py", "sh", "js", "mjs", "html", "tmpl", "wat"];

fn rules_md() -> PathBuf {
    root().join("docs").join("rules.md")
}

/// Every file to read below `path` (or `path` itself).
fn files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if SKIPPED_DIRS.contains(&name) || name.starts_with('.') {
            return;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for entry in entries {
            files(&entry, out);
        }
    } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e)) {
        out.push(path.to_owned());
    }
}

/// The rule codes cited in `line`, in order: `B1`..`B30` and `R1`..`R20`,
/// each with no letter, digit or `_` on either side.
fn codes_in(line: &str) -> Vec<String> {
    let bytes = line.as_bytes();
    let word = |i: usize| bytes.get(i).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    let mut out = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        let max = match b {
            b'B' => 30,
            b'R' => 20,
            _ => continue,
        };
        if i > 0 && word(i - 1) {
            continue;
        }
        let digits = bytes[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
        if !(1..=2).contains(&digits) || bytes[i + 1] == b'0' || word(i + 1 + digits) {
            continue;
        }
        let n = bytes[i + 1..i + 1 + digits].iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
        if (1..=max).contains(&n) {
            out.push(line[i..i + 1 + digits].to_owned());
        }
    }
    out
}

/// Every code cited in the repository, with where (`path:line`, from the root).
fn citations() -> BTreeMap<String, Vec<String>> {
    let root = root();
    let mut all = Vec::new();
    for place in PLACES {
        let path = root.join(place);
        if path.exists() {
            files(&path, &mut all);
        }
    }
    let rules = rules_md();
    let mut cited: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in all.iter().filter(|f| **f != rules) {
        let text = String::from_utf8_lossy(&std::fs::read(file).unwrap()).into_owned();
        let shown = file.strip_prefix(root.as_path()).unwrap_or(file).display().to_string();
        for (n, line) in text.lines().enumerate() {
            for code in codes_in(line) {
                cited.entry(code).or_default().push(format!("{shown}:{}", n + 1));
            }
        }
    }
    cited
}

/// The rule headings of `docs/rules.md`: (code, title) for each `## <code>: <title>`.
fn headings() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(rules_md()).unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("## ")?.split_once(':'))
        .filter(|(code, _)| codes_in(code) == [*code])
        .map(|(code, title)| (code.to_owned(), title.trim().to_owned()))
        .collect()
}

#[test]
fn every_cited_rule_is_defined_in_docs_rules_md() {
    let cited = citations();
    // The scan sees what it should (a broken walk would find nothing to check).
    let cited_in: BTreeSet<&str> =
        cited.values().flatten().filter_map(|at| at.rsplit_once(':').map(|(file, _)| file)).collect();
    assert!(cited_in.iter().any(|f| f.starts_with("host/src/")), "no rule cited in host/src: {cited:?}");
    assert!(cited_in.contains("README.md"), "no rule cited in README.md: {cited:?}");

    let defined: BTreeSet<String> = headings().into_iter().map(|(code, _)| code).collect();
    let missing: Vec<String> = cited
        .iter()
        .filter(|(code, _)| !defined.contains(*code))
        .map(|(code, at)| format!("{code}, cited in {}", at.join(", ")))
        .collect();
    for line in &missing {
        eprintln!("undefined rule {line}");
    }
    assert!(
        missing.is_empty(),
        "rules cited but not defined in docs/rules.md (add a `## <code>: <title>` section):\n{}",
        missing.join("\n")
    );
}

#[test]
fn each_rule_is_defined_once_with_a_title() {
    let headings = headings();
    assert!(!headings.is_empty(), "docs/rules.md has no `## <code>: <title>` heading");
    let mut seen = BTreeSet::new();
    for (code, title) in &headings {
        assert!(seen.insert(code.as_str()), "docs/rules.md defines {code} twice");
        assert!(!title.is_empty(), "docs/rules.md: {code} has no title");
    }
}

#[test]
fn only_codes_that_stand_alone_count() {
    let line = "B14, (R6) B1..B6 R8: 0xB1 R2D2 B64 B0 R21 B31 B30 _B3 B3_ B007 B12a aB2 R20";
    assert_eq!(codes_in(line), ["B14", "R6", "B1", "B6", "R8", "B30", "R20"]);
    assert_eq!(codes_in("## B14: Probe port"), ["B14"]);
    assert!(codes_in("B").is_empty() && codes_in("R").is_empty() && codes_in("").is_empty());
}
