//! What every plugin instance needs, whatever its world: a store with the
//! limits, a linker with WASI granting nothing, and supervision (a dead
//! instance is dropped and rebuilt, with backoff when it keeps faulting).

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::state::PluginState;
use super::{CallCounter, Fault, PluginError, PluginInfo, PluginRuntime};
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
    stock: &'static [&'static str],
    add_world: impl FnOnce(&mut Linker<PluginState>) -> wasmtime::Result<()>,
    pre: impl FnOnce(InstancePre<PluginState>) -> wasmtime::Result<P>,
) -> Result<(Arc<PluginInfo>, P), PluginError> {
    let (component, digest): (Component, String) = runtime.compile(source, stock)?;
    let plugin = source.to_string();
    let compile_error = |e: wasmtime::Error| PluginError::Compile { plugin: plugin.clone(), error: format!("{e:#}") };
    let mut linker: Linker<PluginState> = Linker::new(&runtime.engine);
    super::wasi::add_to_linker(&mut linker).map_err(compile_error)?;
    add_world(&mut linker).map_err(compile_error)?;
    let pre = linker.instantiate_pre(&component).and_then(pre).map_err(compile_error)?;
    let mut info = PluginInfo::new(plugin, digest);
    let component_type = component.component_type();
    info.wasi_notes = super::wasi::stubbed(component_type.imports(&runtime.engine).map(|(name, _)| name));
    Ok((Arc::new(info), pre))
}

/// Most times a call's deadline is extended because its thread was not
/// running (after that it is stopped whatever the reason).
const MAX_DEADLINE_EXTENSIONS: u32 = 100;

/// A fresh store for one instance: memory cap, CPU-checked deadlines, and
/// armed for set-up calls.
pub(crate) fn new_store(runtime: &PluginRuntime, info: &Arc<PluginInfo>) -> Store<PluginState> {
    info.stats.instantiations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let memory = usize::try_from(runtime.limits.memory).unwrap_or(usize::MAX);
    let mut store = Store::new(&runtime.engine, PluginState::new(Arc::clone(info), memory));
    store.limiter(|s| &mut s.memory);
    store.epoch_deadline_callback(|mut ctx| {
        let check = &mut ctx.data_mut().deadline;
        let now = thread_cpu_time();
        match check.checkpoint.replace(now) {
            // The first half of the deadline passed (wall clock): measure the next.
            None => Ok(UpdateDeadline::Continue(check.window_ticks)),
            // It ran for most of the window: it really is past its deadline.
            Some(before) if now.saturating_sub(before) >= check.window_cpu * 4 / 5 => Ok(UpdateDeadline::Interrupt),
            Some(_) if check.extensions >= MAX_DEADLINE_EXTENSIONS => Ok(UpdateDeadline::Interrupt),
            // The thread was set aside, not the plugin looping: extend.
            Some(_) => {
                check.extensions += 1;
                Ok(UpdateDeadline::Continue(check.window_ticks))
            }
        }
    });
    arm(&mut store, runtime.control_deadline());
    store
}

/// A new instance: a fresh store, the world's `instantiate`, then its
/// `init` with the plugin's config, under the set-up deadline.
pub(crate) fn start<B>(
    runtime: &PluginRuntime,
    info: &Arc<PluginInfo>,
    instantiate: impl FnOnce(&mut Store<PluginState>) -> wasmtime::Result<B>,
    init: impl FnOnce(&B, &mut Store<PluginState>) -> wasmtime::Result<Result<(), String>>,
) -> Result<(Store<PluginState>, B), String> {
    let mut store = new_store(runtime, info);
    let bindings = instantiate(&mut store).map_err(|e| format!("{e:#}"))?;
    arm(&mut store, runtime.control_deadline());
    match init(&bindings, &mut store) {
        Ok(Ok(())) => Ok((store, bindings)),
        Ok(Err(refused)) => Err(format!("init: {}", super::bounded(refused))),
        Err(e) => Err(format!("init trapped: {e:#}")),
    }
}

/// Arms the deadline for the next call: `deadline` of the thread's CPU time,
/// checked in two half windows.
pub(crate) fn arm(store: &mut Store<PluginState>, deadline: Duration) {
    let window_ticks = super::ticks(deadline / 2);
    let check = &mut store.data_mut().deadline;
    check.window_ticks = window_ticks;
    check.window_cpu = deadline / 2;
    check.checkpoint = None;
    check.extensions = 0;
    store.set_epoch_deadline(window_ticks);
}

fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Names what went wrong in a call: memory cap, deadline, or another trap.
pub(crate) fn classify(error: wasmtime::Error, state: &mut PluginState, call: &str) -> (Fault, String) {
    let fault = if std::mem::take(&mut state.memory.denied) {
        Fault::Memory
    } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt))
        || error.downcast_ref::<super::wasi::WouldWait>().is_some()
    {
        Fault::Timeout
    } else {
        Fault::Trap
    };
    (fault, format!("{call}: {error:#}"))
}

/// A supervised live instance `L` of one plugin.
pub(crate) struct Supervised<L> {
    pub info: Arc<PluginInfo>,
    /// This instance's calls (see [`CallCounter`]).
    pub calls: Arc<CallCounter>,
    live: Option<L>,
    consecutive_faults: u32,
    /// While backing off after repeated faults: when to try a new instance.
    retry_at: Option<Instant>,
}

impl<L> Drop for Supervised<L> {
    fn drop(&mut self) {
        self.info.stats.retire(&self.calls);
    }
}

/// Why a call did not happen or did not succeed. `None`: backing off (the
/// fault was already counted).
pub(crate) type CallError = Option<(Fault, String)>;

impl<L> Supervised<L> {
    pub fn new(info: Arc<PluginInfo>) -> Self {
        let calls = info.stats.call_counter();
        Supervised { info, calls, live: None, consecutive_faults: 0, retry_at: None }
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

    /// The live instance, if there is one (never makes one).
    pub fn current(&mut self) -> Option<&mut L> {
        self.live.as_mut()
    }

    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// The call succeeded with a valid answer.
    #[inline]
    pub fn ok(&mut self) {
        // Written only when it changes: the hot path stores nothing here, so
        // instances of different workers never share a dirty cache line.
        if self.consecutive_faults != 0 {
            self.consecutive_faults = 0;
        }
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
            let steps = self.consecutive_faults - FAULTS_BEFORE_BACKOFF;
            let wait = crate::backoff::Backoff::new(BACKOFF_FIRST, BACKOFF_MAX).after(steps).delay();
            self.retry_at = Some(Instant::now() + wait);
        }
    }

    /// Handles a failed call: counts it unless it was a backoff.
    pub fn failed(&mut self, error: CallError) {
        if let Some((fault, detail)) = error {
            self.fault(fault, &detail);
        }
    }
}
