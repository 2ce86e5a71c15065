//! What every plugin instance needs, whatever its world: a store with the
//! limits, a linker with WASI granting nothing, and supervision (a dead
//! instance is dropped and rebuilt, with backoff when it keeps faulting).

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Store, Trap};

use super::state::PluginState;
use super::{Fault, PluginError, PluginInfo, PluginRuntime};
use crate::config::PluginRef;

/// Consecutive faults after which rebuilding an instance waits (backoff).
const FAULTS_BEFORE_BACKOFF: u32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Compiles `source` and links it with WASI plus what `add_world` adds (the
/// world's host imports); `pre` turns the result into the world's `*Pre`.
pub(crate) fn prepare<P>(
    runtime: &PluginRuntime,
    source: &PluginRef,
    add_world: impl FnOnce(&mut Linker<PluginState>) -> wasmtime::Result<()>,
    pre: impl FnOnce(InstancePre<PluginState>) -> wasmtime::Result<P>,
) -> Result<(Arc<PluginInfo>, P), PluginError> {
    let (component, digest): (Component, String) = runtime.compile(source)?;
    let plugin = source.to_string();
    let compile_error = |e: wasmtime::Error| PluginError::Compile { plugin: plugin.clone(), error: format!("{e:#}") };
    let mut linker: Linker<PluginState> = Linker::new(&runtime.engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(compile_error)?;
    add_world(&mut linker).map_err(compile_error)?;
    let pre = linker.instantiate_pre(&component).and_then(pre).map_err(compile_error)?;
    Ok((Arc::new(PluginInfo::new(plugin, digest)), pre))
}

/// A fresh store for one instance: memory cap, set-up deadline.
pub(crate) fn new_store(runtime: &PluginRuntime, info: &Arc<PluginInfo>) -> Store<PluginState> {
    info.stats.instantiations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let memory = usize::try_from(runtime.limits.memory).unwrap_or(usize::MAX);
    let mut store = Store::new(&runtime.engine, PluginState::new(Arc::clone(info), memory));
    store.limiter(|s| &mut s.memory);
    store.set_epoch_deadline(runtime.control_ticks());
    store
}

/// Names what went wrong in a call: memory cap, deadline, or another trap.
pub(crate) fn classify(error: wasmtime::Error, state: &mut PluginState, call: &str) -> (Fault, String) {
    let fault = if std::mem::take(&mut state.memory.denied) {
        Fault::Memory
    } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        Fault::Timeout
    } else {
        Fault::Trap
    };
    (fault, format!("{call}: {error:#}"))
}

/// A supervised live instance `L` of one plugin.
pub(crate) struct Supervised<L> {
    pub info: Arc<PluginInfo>,
    live: Option<L>,
    consecutive_faults: u32,
    /// While backing off after repeated faults: when to try a new instance.
    retry_at: Option<Instant>,
}

/// Why a call did not happen or did not succeed. `None`: backing off (the
/// fault was already counted).
pub(crate) type CallError = Option<(Fault, String)>;

impl<L> Supervised<L> {
    pub fn new(info: Arc<PluginInfo>) -> Self {
        Supervised { info, live: None, consecutive_faults: 0, retry_at: None }
    }

    /// The live instance, made with `make` if there is none (unless backing off).
    pub fn live(&mut self, make: impl FnOnce() -> Result<L, String>) -> Result<&mut L, CallError> {
        if self.live.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(None);
            }
            self.retry_at = None;
            self.live = Some(make().map_err(|e| Some((Fault::Instantiate, e)))?);
        }
        self.live.as_mut().ok_or(None)
    }

    /// The call succeeded with a valid answer.
    pub fn ok(&mut self) {
        self.consecutive_faults = 0;
    }

    /// Counts and logs a fault; a fault other than an invalid answer kills the
    /// instance (a trapped instance is dead).
    pub fn fault(&mut self, fault: Fault, detail: &dyn std::fmt::Display) {
        self.info.fault(fault, detail);
        if fault != Fault::InvalidAnswer {
            self.live = None;
        }
        self.consecutive_faults = self.consecutive_faults.saturating_add(1);
        if self.consecutive_faults >= FAULTS_BEFORE_BACKOFF {
            let exp = (self.consecutive_faults - FAULTS_BEFORE_BACKOFF).min(16);
            self.retry_at = Some(Instant::now() + (BACKOFF_FIRST * 2u32.pow(exp)).min(BACKOFF_MAX));
        }
    }

    /// Handles a failed call: counts it unless it was a backoff.
    pub fn failed(&mut self, error: CallError) {
        if let Some((fault, detail)) = error {
            self.fault(fault, &detail);
        }
    }
}
