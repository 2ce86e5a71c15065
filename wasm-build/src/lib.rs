//! # fulcrum-wasm-build
//!
//! Used from build scripts (the host's for the stock plugins, the end-to-end
//! tests' for the test plugins): compiles workspace plugin crates for
//! `wasm32-wasip2` with a nested `cargo build`, the way wasmtime builds its
//! test programs (`crates/test-programs/artifacts/build.rs`):
//!
//! - its own `CARGO_TARGET_DIR` inside `OUT_DIR`, so the outer build's lock is
//!   not contended and the result is cached per outer profile;
//! - the outer build's compiler flags and wrappers (clippy, coverage) removed;
//! - `wasm32-wasip2` links a component directly (wasm-component-ld), so the
//!   output needs no further wrapping.
//!
//! The build writes `plugins.rs` into `OUT_DIR`: one
//! `pub const NAME: &[u8] = include_bytes!(..)` and `NAME_PATH` (the file) a
//! plugin, plus `ALL`.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target the plugins are built for.
const TARGET: &str = "wasm32-wasip2";

/// A plugin crate to build: its package name and the constant to generate.
pub struct Plugin<'a> {
    pub package: &'a str,
    /// Name used for the constant (upper-cased) and in `ALL`.
    pub name: &'a str,
}

/// Builds each group of plugins and writes `$OUT_DIR/plugins.rs`. `watch` are
/// the folders whose changes must re-run the build script (plugin sources,
/// SDK, WIT).
///
/// A group is built by one cargo invocation, so its plugins share the SDK's
/// features: one group per world (balancer, health).
pub fn build(groups: &[&[Plugin<'_>]], watch: &[&Path]) {
    for dir in watch {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    let target_dir = out_dir.join("wasm");
    ensure_target();
    for group in groups {
        cargo_build(group, &target_dir);
    }
    write_constants(groups.iter().flat_map(|g| g.iter()), &target_dir, &out_dir);
}

fn cargo_build(plugins: &[Plugin<'_>], target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--release").arg(format!("--target={TARGET}"));
    for p in plugins {
        cmd.arg("-p").arg(p.package);
    }
    cmd.env("CARGO_TARGET_DIR", target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET")
        // Plugins ship without debug info: smaller to embed, faster to compile.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        // The hot call is a few dozen instructions: let the SDK's helpers inline
        // into it, across crates.
        .env("CARGO_PROFILE_RELEASE_LTO", "fat")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        // 64x64->128 multiplies (the hash mixer) as one instruction instead of a
        // call to `__multi3`; the host's engine enables the proposal.
        .env("CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS", "-Ctarget-feature=+wide-arithmetic")
        .env_remove("CARGO_LLVM_COV")
        .env_remove("LLVM_PROFILE_FILE");
    let status = cmd.status().expect("failed to run cargo for the Wasm plugins");
    assert!(status.success(), "building the Wasm plugins for {TARGET} failed ({status}); the errors are above");
}

/// Makes sure the active toolchain has the standard library for [`TARGET`].
///
/// `rust-toolchain.toml` lists the target, but rustup installs listed targets
/// only when it installs the toolchain itself, and not at all with
/// `RUSTUP_AUTO_INSTALL=0`: a machine whose toolchain came first has none. So
/// the build adds it with `rustup target add` for the toolchain this build
/// runs on. Two build scripts (the host's, the tests') may get here at once:
/// a lock file keeps them from installing over each other.
fn ensure_target() {
    if target_installed() {
        return;
    }
    let lock = env::temp_dir().join("fulcrum-wasm-build-rustup.lock");
    let lock = std::fs::File::create(&lock)
        .and_then(|f| f.lock().map(|()| f))
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock.display()));
    if target_installed() {
        return;
    }
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", TARGET]);
    // Set by rustup's proxies for everything they start: the toolchain this
    // build runs on, whatever pinned or overrode it.
    if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
        rustup.arg("--toolchain").arg(toolchain);
    }
    match rustup.status() {
        Ok(status) if status.success() && target_installed() => println!(
            "cargo:warning=the toolchain had no {TARGET} target, which the plugins need: added it with `rustup target add {TARGET}`"
        ),
        Ok(status) => panic!(
            "`rustup target add {TARGET}` failed ({status}): the stock plugins need the {TARGET} \
             standard library; run it by hand to see why"
        ),
        Err(e) => panic!(
            "the stock plugins need the {TARGET} standard library, and there is no rustup to \
             install it ({e}). Install it for the Rust in use, with rustup: `rustup target add {TARGET}`"
        ),
    }
    drop(lock);
}

/// Whether the compiler this build runs on has the target's standard library.
fn target_installed() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    libdir.is_some_and(|dir| {
        std::fs::read_dir(dir).is_ok_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libstd-")))
        })
    })
}

fn write_constants<'a>(plugins: impl Iterator<Item = &'a Plugin<'a>>, target_dir: &Path, out_dir: &Path) {
    let mut code = String::from("// Generated by fulcrum-wasm-build: the Wasm components of the plugins.\n");
    let mut all = String::from("pub const ALL: &[(&str, &[u8])] = &[\n");
    for p in plugins {
        let file = target_dir.join(TARGET).join("release").join(format!("{}.wasm", p.package.replace('-', "_")));
        assert!(file.exists(), "cargo built {} but {} is missing", p.package, file.display());
        let constant = p.name.to_uppercase().replace('-', "_");
        let path = file.display().to_string();
        let _ = writeln!(code, "pub const {constant}: &[u8] = include_bytes!({path:?});");
        let _ = writeln!(code, "pub const {constant}_PATH: &str = {path:?};");
        let _ = writeln!(all, "    ({:?}, {constant}),", p.name);
    }
    all.push_str("];\n");
    code.push_str(&all);
    std::fs::write(out_dir.join("plugins.rs"), code).expect("failed to write plugins.rs in OUT_DIR");
}
