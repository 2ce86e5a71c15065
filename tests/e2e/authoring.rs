//! Writing plugins: `fulcrum plugin new` writes a crate that builds with the
//! documented command and passes `fulcrum check`; `fulcrum plugin check`
//! names what a component is, or exactly what is wrong with it.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fulcrum_tests::*;

fn fulcrum(args: &[&str]) -> Output {
    Command::new(fulcrum_bin()).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A folder of this test's own.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fulcrum-authoring-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Where the test plugins were built: its dependencies compiled for Wasm
/// already, so a new crate with the same lock file builds in seconds.
fn wasm_target_dir() -> PathBuf {
    Path::new(plugins::MISBEHAVE_PATH).ancestors().nth(3).unwrap().to_owned()
}

/// `plugin new`, then the documented build, then `fulcrum check` of the
/// config it wrote, and `plugin check` of what it built.
fn new_build_check(kind: &str) {
    let dir = scratch(kind);
    let out = fulcrum(&["plugin", "new", &format!("my-{kind}"), "--kind", kind, "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let root = dir.join(format!("my-{kind}"));
    assert!(text(&out).contains("cargo build --release --target wasm32-wasip2"), "{}", text(&out));
    // The documented command (with a shared target folder and no network).
    let target = wasm_target_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--offline"])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", text(&build));
    let file = format!("my_{kind}.wasm");
    let built = target.join("wasm32-wasip2/release").join(&file);
    let expected = root.join("target/wasm32-wasip2/release");
    std::fs::create_dir_all(&expected).unwrap();
    std::fs::copy(&built, expected.join(&file)).unwrap();
    let config = root.join("fulcrum.toml");
    let check = fulcrum(&["check", "-c", config.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("every plugin loaded"), "{}", text(&check));
    let inspect = fulcrum(&["plugin", "check", expected.join(&file).to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", text(&inspect));
    let said = text(&inspect);
    assert!(said.contains(&format!("a {kind} plugin, built against fulcrum:plugin@0.1.1")), "{said}");
    assert_eq!(said.contains("select:"), kind == "balancer", "{said}");
    // A second `new` of the same name writes nothing.
    let again = fulcrum(&["plugin", "new", &format!("my-{kind}"), "--kind", kind, "--dir", dir.to_str().unwrap()]);
    assert!(!again.status.success() && text(&again).contains("exists already"), "{}", text(&again));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_balancer_builds_and_passes_check() {
    new_build_check("balancer");
}

#[test]
fn a_new_health_plugin_builds_and_passes_check() {
    new_build_check("health");
}

#[test]
fn plugin_new_refuses_bad_names() {
    let dir = scratch("names");
    for name in ["Bad", "x-", "9lives", "a b", "x/../y", "", "fulcrum-sdk"] {
        let out = fulcrum(&["plugin", "new", name, "--kind", "balancer", "--dir", dir.to_str().unwrap()]);
        assert!(!out.status.success(), "{name:?} was accepted");
        assert!(text(&out).contains("is not a plugin name"), "{name:?}: {}", text(&out));
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "something was written");
}

/// Writes `bytes` to a file and runs `plugin check` on it; returns (success, output).
fn check_bytes(name: &str, bytes: &[u8]) -> (bool, String) {
    let dir = scratch("broken");
    let file = dir.join(name);
    std::fs::write(&file, bytes).unwrap();
    let out = fulcrum(&["plugin", "check", file.to_str().unwrap()]);
    (out.status.success(), text(&out))
}

const GROW_TABLE: &str = include_str!("../plugins/wat/grow-table.wat");

#[test]
fn plugin_check_explains_each_broken_component() {
    let (ok, said) = check_bytes("hello.wasm", b"hello");
    assert!(!ok && said.contains("not WebAssembly"), "{said}");

    let core = wat::parse_str("(module (func (export \"select\")))").unwrap();
    let (ok, said) = check_bytes("core.wasm", &core);
    assert!(!ok && said.contains("a core Wasm module, not a component"), "{said}");

    let other = wat::parse_str(
        "(component (core module $m (func (export \"run\"))) (core instance $i (instantiate $m)) \
         (func (export \"run\") (canon lift (core func $i \"run\"))))",
    )
    .unwrap();
    let (ok, said) = check_bytes("other.wasm", &other);
    assert!(!ok && said.contains("a component of another world: it exports [run]"), "{said}");

    // The balancer without its `select` export.
    let start = GROW_TABLE.find("  (func (export \"select\") (param \"flow\"").unwrap();
    let end = start + GROW_TABLE[start..].find("memory\"))))").unwrap() + "memory\"))))".len();
    let no_select = format!("{}{}", &GROW_TABLE[..start], &GROW_TABLE[end..]);
    let (ok, said) = check_bytes("no-select.wasm", &wat::parse_str(&no_select).unwrap());
    assert!(!ok && said.contains("a balancer plugin without the export(s) select"), "{said}");

    // A balancer that imports something Fulcrum does not grant.
    let import = "(component\n  (import \"acme:net/socket@1.0.0\" (instance (export \"connect\" (func))))";
    let greedy = GROW_TABLE.replacen("(component", import, 1);
    let (ok, said) = check_bytes("greedy.wasm", &wat::parse_str(&greedy).unwrap());
    assert!(!ok && said.contains("does not fit the contract") && said.contains("acme:net/socket@1.0.0"), "{said}");

    // A whole balancer whose `select` traps: the timing finds it out.
    let (ok, said) = check_bytes("grow.wasm", &wat::parse_str(GROW_TABLE).unwrap());
    assert!(!ok && said.contains("selects faulted"), "{said}");
}

#[test]
fn plugin_check_names_the_contract_of_the_stock_and_legacy_plugins() {
    let out = fulcrum(&["plugin", "check", plugins::LEGACY_BALANCER_PATH]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("a balancer plugin, built against fulcrum:plugin@0.1.0"), "{}", text(&out));
    let out = fulcrum(&["plugin", "check", plugins::CPU_BACKPRESSURE_PATH]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("a health plugin"), "{}", text(&out));
}
