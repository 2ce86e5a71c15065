//! `fulcrum plugin check`: what a `.wasm` file is, as a Fulcrum plugin.
//!
//! It says which world (balancer or health) and contract version a
//! component implements, or exactly what is wrong: not Wasm, a core module
//! (not a component), a component of another world, a missing export, an
//! import Fulcrum does not grant, a refused `init`. For a balancer it also
//! times `select` on a synthetic pool of ten backends.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use fulcrum_sdk::{BackendState, Flow, Protocol};
use wasmtime::component::Component;

use crate::config::PluginRef;
use crate::plugin::{BalancerPlugin, HealthPlugin, PluginError, PluginRuntime};
use crate::pool::{Backend, PoolSnapshot};

/// What the worlds export (`wit/plugin.wit`).
const BALANCER_EXPORTS: [&str; 3] = ["init", "backends-changed", "select"];
const HEALTH_EXPORTS: [&str; 2] = ["init", "evaluate"];
/// The contract's package, as imports name it.
const PACKAGE: &str = "fulcrum:plugin/";
/// `select` calls timed on the synthetic pool.
const TIMED_CALLS: u32 = 100_000;

/// A plugin that passed every check.
#[derive(Debug)]
pub struct Inspection {
    /// `balancer` or `health`.
    pub world: &'static str,
    /// The newest `fulcrum:plugin` version it imports (what it was built
    /// against), or `None` when it imports nothing of the contract.
    pub contract: Option<String>,
    /// Every import, by name.
    pub imports: Vec<String>,
    /// Mean time of one `select` on a pool of ten backends (balancers).
    pub select_ns: Option<f64>,
}

/// What is wrong with a file, in words a plugin author can act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Problem {
    Read(String),
    NotWasm,
    CoreModule,
    Invalid(String),
    /// Exports neither world's functions.
    WrongWorld {
        exports: Vec<String>,
    },
    /// Looks like `world` but lacks exports.
    Missing {
        world: &'static str,
        missing: Vec<&'static str>,
    },
    /// Does not link: an import Fulcrum does not grant, or a type that does
    /// not match the contract.
    Link(String),
    /// `init` refused the config, or trapped.
    Init(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Read(e) => write!(f, "cannot read it: {e}"),
            Problem::NotWasm => f.write_str("not WebAssembly (no `\\0asm` header)"),
            Problem::CoreModule => f.write_str(
                "a core Wasm module, not a component: build for `--target wasm32-wasip2` \
                 (which links a component), or wrap it with `wasm-tools component new`",
            ),
            Problem::Invalid(e) => write!(f, "not a valid component: {e}"),
            Problem::WrongWorld { exports } => write!(
                f,
                "a component of another world: it exports [{}], but a Fulcrum balancer exports \
                 [init, backends-changed, select] and a health plugin [init, evaluate]",
                exports.join(", ")
            ),
            Problem::Missing { world, missing } => {
                write!(f, "a {world} plugin without the export(s) {}: implement them", missing.join(", "))
            }
            Problem::Link(e) => write!(f, "does not fit the contract (fulcrum:plugin@0.1.x): {e}"),
            Problem::Init(e) => write!(f, "loads, but `init` failed: {e}"),
        }
    }
}

/// Checks the plugin in `file`, with `config` (JSON) for its `init`.
pub fn inspect(runtime: &Arc<PluginRuntime>, file: &Path, config: &str) -> Result<Inspection, Problem> {
    let bytes = std::fs::read(file).map_err(|e| Problem::Read(e.to_string()))?;
    if bytes.get(..4) != Some(b"\0asm") {
        return Err(Problem::NotWasm);
    }
    // The preamble's layer: 0 for a core module, 1 for a component.
    if bytes.get(6..8) == Some(&[0, 0]) {
        return Err(Problem::CoreModule);
    }
    let component = Component::new(runtime.engine(), &bytes).map_err(|e| Problem::Invalid(format!("{e:#}")))?;
    let ty = component.component_type();
    let exports: BTreeSet<String> = ty.exports(runtime.engine()).map(|(name, _)| name.to_owned()).collect();
    let imports: Vec<String> = ty.imports(runtime.engine()).map(|(name, _)| name.to_owned()).collect();
    let has = |names: &[&'static str]| names.iter().filter(|n| !exports.contains(**n)).copied().collect::<Vec<_>>();
    let world = match (has(&BALANCER_EXPORTS), has(&HEALTH_EXPORTS)) {
        (missing, _) if missing.is_empty() => "balancer",
        (_, missing) if missing.is_empty() => "health",
        (missing, _) if exports.contains("select") || exports.contains("backends-changed") => {
            return Err(Problem::Missing { world: "balancer", missing });
        }
        (_, missing) if exports.contains("evaluate") => return Err(Problem::Missing { world: "health", missing }),
        _ => return Err(Problem::WrongWorld { exports: exports.into_iter().collect() }),
    };
    let contract = imports
        .iter()
        .filter_map(|name| name.strip_prefix(PACKAGE)?.split_once('@').map(|(_, v)| v.to_owned()))
        .max_by_key(|v| v.split('.').map(|n| n.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>());
    let source = PluginRef::File(file.to_owned());
    let problem = |e: PluginError| match e {
        PluginError::Init { error, .. } => Problem::Init(error),
        PluginError::Compile { error, .. } => Problem::Link(error),
        other => Problem::Link(other.to_string()),
    };
    let select_ns = if world == "balancer" {
        let plugin = BalancerPlugin::load(runtime, &source, config).map_err(problem)?;
        Some(time_select(&plugin).map_err(Problem::Init)?)
    } else {
        HealthPlugin::load(runtime, &source, config).map_err(problem)?;
        None
    };
    Ok(Inspection { world, contract, imports, select_ns })
}

/// Mean nanoseconds of one `select` (through the host's checks, as a
/// worker calls it) on ten backends, flows from varying clients.
fn time_select(plugin: &Arc<BalancerPlugin>) -> Result<f64, String> {
    let backends =
        (1..=10u8).map(|i| Backend::new(SocketAddr::from(([10, 0, 0, i], 8080)), 100, BackendState::Up)).collect();
    let pool = Arc::new(PoolSnapshot::new(1, backends));
    let mut instance = plugin.instance();
    instance.prime(&pool).map_err(|e| format!("backends-changed failed: {:?}", e.0))?;
    let frontend = SocketAddr::from(([10, 9, 9, 9], 80));
    let flows: Vec<Flow> = (0..256u16)
        .map(|i| Flow::new(SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 1024 + i)), frontend, Protocol::Tcp))
        .collect();
    let started = Instant::now();
    for i in 0..TIMED_CALLS {
        std::hint::black_box(instance.select(&pool, &pool, &flows[i as usize % flows.len()]));
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(TIMED_CALLS);
    let fallbacks = plugin.info.stats.fallbacks.load(std::sync::atomic::Ordering::Relaxed);
    if fallbacks > 0 {
        return Err(format!("{fallbacks} of {TIMED_CALLS} selects faulted (the host served them with its fallback)"));
    }
    Ok(ns)
}
