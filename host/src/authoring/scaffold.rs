//! `fulcrum plugin new NAME --kind balancer|health`: a plugin crate that
//! builds with one documented command, loads, and has native unit tests.
//!
//! The crate stands alone: it carries the SDK and the contract (`wit/`) of
//! this very binary, so what it builds is what this binary loads, with no
//! registry or checkout of Fulcrum needed.
//!
//! ```text
//! NAME/
//!   Cargo.toml          its own workspace; release profile tuned for plugins
//!   Cargo.lock          the dependency versions this Fulcrum was tested with
//!   .cargo/config.toml  flags for wasm32-wasip2
//!   src/lib.rs          the plugin, with native unit tests
//!   fulcrum.toml        a config that uses the built plugin (`fulcrum check -c`)
//!   README.md           build, test, use
//!   fulcrum-sdk/        the SDK of this Fulcrum
//!   wit/plugin.wit      the contract of this Fulcrum
//! ```

use std::path::{Path, PathBuf};

/// The plugin kinds (the contract's worlds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Balancer,
    Health,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Balancer => "balancer",
            Kind::Health => "health",
        }
    }
}

/// Why a crate could not be written.
#[derive(Debug)]
pub enum ScaffoldError {
    /// Not a usable crate name.
    Name(String),
    /// The folder exists already (nothing is overwritten).
    Exists(PathBuf),
    Io(PathBuf, std::io::Error),
}

impl std::fmt::Display for ScaffoldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScaffoldError::Name(name) => write!(
                f,
                "`{name}` is not a plugin name: use 1 to 64 lower-case letters, digits and `-`, starting with a letter"
            ),
            ScaffoldError::Exists(dir) => write!(f, "{} exists already: nothing was written", dir.display()),
            ScaffoldError::Io(path, e) => write!(f, "cannot write {}: {e}", path.display()),
        }
    }
}

impl std::error::Error for ScaffoldError {}

/// The SDK's sources, as this binary was built with them.
const SDK_SOURCES: [(&str, &str); 6] = [
    ("lib.rs", include_str!("../../../sdk/src/lib.rs")),
    ("algo.rs", include_str!("../../../sdk/src/algo.rs")),
    ("guest.rs", include_str!("../../../sdk/src/guest.rs")),
    ("host.rs", include_str!("../../../sdk/src/host.rs")),
    ("testing.rs", include_str!("../../../sdk/src/testing.rs")),
    ("types.rs", include_str!("../../../sdk/src/types.rs")),
];
const CONTRACT: &str = include_str!("../../../wit/plugin.wit");
/// Fulcrum's own lock file: the crate builds with the dependency versions
/// this Fulcrum was tested with (cargo drops the entries it does not need).
const LOCK: &str = include_str!("../../../Cargo.lock");
const BALANCER: &str = include_str!("templates/balancer.rs.txt");
const HEALTH: &str = include_str!("templates/health.rs.txt");

/// The build command, as documented in the crate and the README.
pub const BUILD: &str = "cargo build --release --target wasm32-wasip2";

/// Writes the crate `dir/name`; returns its folder.
pub fn new_plugin(dir: &Path, name: &str, kind: Kind) -> Result<PathBuf, ScaffoldError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && !matches!(name, "fulcrum-sdk" | "test" | "core" | "std");
    if !valid {
        return Err(ScaffoldError::Name(name.to_owned()));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    let artifact = format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_"));
    let world = kind.as_str();
    let source = match kind {
        Kind::Balancer => BALANCER,
        Kind::Health => HEALTH,
    };
    let mut files: Vec<(PathBuf, String)> = vec![
        (root.join("Cargo.toml"), manifest(name, world)),
        (root.join("Cargo.lock"), LOCK.to_owned()),
        (root.join(".cargo/config.toml"), CARGO_CONFIG.to_owned()),
        (root.join(".gitignore"), "/target\n".to_owned()),
        (root.join("src/lib.rs"), source.replace("{{name}}", name)),
        (root.join("fulcrum.toml"), example_config(kind, &artifact)),
        (root.join("README.md"), readme(name, world, &artifact)),
        (root.join("fulcrum-sdk/Cargo.toml"), SDK_MANIFEST.to_owned()),
        (root.join("wit/plugin.wit"), CONTRACT.to_owned()),
    ];
    files.extend(SDK_SOURCES.iter().map(|(file, text)| (root.join("fulcrum-sdk/src").join(file), (*text).to_owned())));
    for (path, text) in files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ScaffoldError::Io(parent.to_owned(), e))?;
        }
        std::fs::write(&path, text).map_err(|e| ScaffoldError::Io(path, e))?;
    }
    Ok(root)
}

fn manifest(name: &str, world: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the Wasm component; rlib: native unit tests (`cargo test`).
crate-type = ["cdylib", "rlib"]

[dependencies]
fulcrum-sdk = {{ path = "fulcrum-sdk", features = ["{world}"] }}
serde = {{ version = "1", features = ["derive"] }}

# A plugin is small and its hot call short: optimise across crates.
[profile.release]
lto = "fat"
codegen-units = 1
debug = false
strip = "debuginfo"

# A workspace of its own (not part of any around it).
[workspace]
"#
    )
}

const CARGO_CONFIG: &str = r#"# 64x64->128 multiplies (the SDK's hash mixer) as one instruction; Fulcrum's
# engine enables the wide-arithmetic proposal.
[target.wasm32-wasip2]
rustflags = ["-Ctarget-feature=+wide-arithmetic"]
"#;

const SDK_MANIFEST: &str = r#"[package]
name = "fulcrum-sdk"
description = "Write Fulcrum balancer and health plugins in Rust (the SDK of the Fulcrum that wrote this crate)"
version = "0.1.1"
edition = "2024"
publish = false

[features]
balancer = []
health = []

[dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = "1"

[target.'cfg(target_arch = "wasm32")'.dependencies]
wit-bindgen = "0.61"
"#;

fn example_config(kind: Kind, artifact: &str) -> String {
    let head = "# Try it: build the plugin, then `fulcrum check -c fulcrum.toml` (or `fulcrum run -c fulcrum.toml`).\n\
                [[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\n";
    let backends = "backends = [ { address = \"127.0.0.1:9001\" }, { address = \"127.0.0.1:9002\" } ]\n";
    match kind {
        Kind::Balancer => format!("{head}balancer = \"{artifact}\"\nbalancer_config = {{ }}\n{backends}"),
        Kind::Health => format!(
            "{head}balancer = \"stock:round-robin\"\n{backends}\n[pool.probe]\nprotocol = \"http\"\npath = \"/health\"\n\
             interval = \"5s\"\nhealth = \"{artifact}\"\nhealth_config = {{ }}\n"
        ),
    }
}

fn readme(name: &str, world: &str, artifact: &str) -> String {
    format!(
        "# {name}\n\nA Fulcrum {world} plugin.\n\n```sh\ncargo test                      # native unit tests\n{BUILD}\n\
         fulcrum plugin check {artifact}\nfulcrum check -c fulcrum.toml   # a pool that uses it\n```\n\n\
         The plugin is `src/lib.rs`. `fulcrum-sdk/` and `wit/` are the SDK and the contract of the Fulcrum \
         that wrote this crate; the SDK's docs: `cargo doc -p fulcrum-sdk --open`.\n"
    )
}
