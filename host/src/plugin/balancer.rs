//! Balancer plugins: load once ([`BalancerPlugin`]), instantiate per worker
//! ([`BalancerInstance`]), select per flow, fall back on any fault.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fulcrum_sdk::algo::fallback_pick;
use fulcrum_sdk::{BackendState, Flow, Protocol, Selection};
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Store, Trap};

use super::bindings::balancer::{Balancer, BalancerPre};
use super::bindings::types as wit;
use super::state::PluginState;
use super::{Fault, PluginError, PluginInfo, PluginRuntime};
use crate::config::PluginRef;
use crate::pool::PoolSnapshot;

/// Consecutive faults after which rebuilding the instance waits (backoff).
const FAULTS_BEFORE_BACKOFF: u32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A balancer plugin, compiled and linked, ready to instantiate on any worker.
pub struct BalancerPlugin {
    pub info: Arc<PluginInfo>,
    pre: BalancerPre<PluginState>,
    config: String,
    runtime: Arc<PluginRuntime>,
}

impl std::fmt::Debug for BalancerPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancerPlugin").field("name", &self.info.name).finish_non_exhaustive()
    }
}

/// A live instance: its store and its exports.
struct Live {
    store: Store<PluginState>,
    bindings: Balancer,
    /// Pool generation last pushed through `backends-changed` (0: none yet).
    generation: u64,
}

impl BalancerPlugin {
    /// Compiles and links the plugin, then makes one instance and calls
    /// `init` with `config` (JSON), so that a bad plugin or config fails here,
    /// at load, and not on the first flow.
    pub fn load(runtime: &Arc<PluginRuntime>, source: &PluginRef, config: &str) -> Result<Arc<Self>, PluginError> {
        let component = runtime.compile(source)?;
        let plugin = source.to_string();
        let compile_error =
            |e: wasmtime::Error| PluginError::Compile { plugin: plugin.clone(), error: format!("{e:#}") };
        let mut linker: Linker<PluginState> = Linker::new(&runtime.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(compile_error)?;
        Balancer::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s).map_err(compile_error)?;
        let pre = linker.instantiate_pre(&component).and_then(BalancerPre::new).map_err(compile_error)?;
        let loaded = Arc::new(BalancerPlugin {
            info: Arc::new(PluginInfo::new(plugin.clone())),
            pre,
            config: config.to_owned(),
            runtime: Arc::clone(runtime),
        });
        loaded.instantiate().map_err(|error| PluginError::Init { plugin, error })?;
        Ok(loaded)
    }

    /// A fresh instance, initialised with the plugin's config.
    fn instantiate(&self) -> Result<Live, String> {
        self.info.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        let memory = usize::try_from(self.runtime.limits.memory).unwrap_or(usize::MAX);
        let mut store = Store::new(&self.runtime.engine, PluginState::new(Arc::clone(&self.info), memory));
        store.limiter(|s| &mut s.memory);
        store.set_epoch_deadline(self.runtime.control_ticks());
        let bindings = self.pre.instantiate(&mut store).map_err(|e| format!("{e:#}"))?;
        store.set_epoch_deadline(self.runtime.control_ticks());
        match bindings.call_init(&mut store, &self.config) {
            Ok(Ok(())) => Ok(Live { store, bindings, generation: 0 }),
            Ok(Err(refused)) => Err(format!("init: {refused}")),
            Err(e) => Err(format!("init trapped: {e:#}")),
        }
    }

    /// An instance for one worker; it instantiates lazily on first use.
    pub fn instance(self: &Arc<Self>) -> BalancerInstance {
        BalancerInstance { plugin: Arc::clone(self), live: None, consecutive_faults: 0, retry_at: None }
    }
}

/// One worker's instance of a balancer plugin. Not shared, not locked.
pub struct BalancerInstance {
    plugin: Arc<BalancerPlugin>,
    live: Option<Live>,
    consecutive_faults: u32,
    /// While backing off after repeated faults: when to try a new instance.
    retry_at: Option<Instant>,
}

impl std::fmt::Debug for BalancerInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancerInstance").field("plugin", &self.plugin.info.name).finish_non_exhaustive()
    }
}

impl BalancerInstance {
    pub fn plugin(&self) -> &Arc<BalancerPlugin> {
        &self.plugin
    }

    /// The backend for a new flow: the plugin's answer if it is an eligible
    /// backend of `pool`, else the built-in fallback's. `Reject` only when the
    /// plugin says so, or when the fallback finds no eligible backend.
    pub fn select(&mut self, pool: &Arc<PoolSnapshot>, flow: &Flow) -> Selection {
        let info = Arc::clone(&self.plugin.info);
        info.stats.calls.fetch_add(1, Ordering::Relaxed);
        match self.call(pool, flow) {
            Ok(Selection::Backend(id)) if pool.is_eligible(id) => {
                self.consecutive_faults = 0;
                return Selection::Backend(id);
            }
            Ok(Selection::Reject) => {
                self.consecutive_faults = 0;
                return Selection::Reject;
            }
            Ok(Selection::Backend(id)) => {
                let what = match pool.views.get(id as usize) {
                    None => format!("backend {id}, but the pool has {} backends", pool.views.len()),
                    Some(b) if b.state == BackendState::Down => format!("backend {id} ({}), which is down", b.addr()),
                    Some(b) => format!("backend {id} ({}), which takes no new flows", b.addr()),
                };
                self.fault(Fault::InvalidAnswer, &format!("select answered {what}"));
            }
            Err(Some((fault, detail))) => self.fault(fault, &detail),
            Err(None) => {} // backing off: already counted
        }
        info.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        fallback_pick(&pool.views, flow).map_or(Selection::Reject, Selection::Backend)
    }

    fn fault(&mut self, fault: Fault, detail: &dyn std::fmt::Display) {
        self.plugin.info.fault(fault, detail);
        if fault != Fault::InvalidAnswer {
            self.live = None; // a trapped instance is dead: rebuild it
        }
        self.consecutive_faults = self.consecutive_faults.saturating_add(1);
        if self.consecutive_faults >= FAULTS_BEFORE_BACKOFF {
            let exp = (self.consecutive_faults - FAULTS_BEFORE_BACKOFF).min(16);
            self.retry_at = Some(Instant::now() + (BACKOFF_FIRST * 2u32.pow(exp)).min(BACKOFF_MAX));
        }
    }

    /// Calls the plugin. `Err(None)`: not called (backing off).
    fn call(&mut self, pool: &Arc<PoolSnapshot>, flow: &Flow) -> Result<Selection, Option<(Fault, String)>> {
        if self.live.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(None);
            }
            self.retry_at = None;
            let live = self.plugin.instantiate().map_err(|e| Some((Fault::Instantiate, e)))?;
            self.live = Some(live);
        }
        let runtime = &self.plugin.runtime;
        let Some(live) = self.live.as_mut() else { return Err(None) };
        if live.generation != pool.generation {
            let backends: Vec<wit::Backend> = pool.views.iter().map(to_wit_backend).collect();
            live.store.data_mut().pool = Some(Arc::clone(pool));
            live.store.set_epoch_deadline(runtime.control_ticks());
            live.bindings
                .call_backends_changed(&mut live.store, &backends)
                .map_err(|e| Some(classify(e, live.store.data_mut(), "backends-changed")))?;
            live.generation = pool.generation;
        }
        live.store.set_epoch_deadline(runtime.call_ticks());
        match live.bindings.call_select(&mut live.store, to_wit_flow(flow)) {
            Ok(wit::Selection::Backend(id)) => Ok(Selection::Backend(id)),
            Ok(wit::Selection::Reject) => Ok(Selection::Reject),
            Err(e) => Err(Some(classify(e, live.store.data_mut(), "select"))),
        }
    }
}

fn classify(error: wasmtime::Error, state: &mut PluginState, call: &str) -> (Fault, String) {
    let fault = if std::mem::take(&mut state.memory.denied) {
        Fault::Memory
    } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        Fault::Timeout
    } else {
        Fault::Trap
    };
    (fault, format!("{call}: {error:#}"))
}

fn to_wit_ip(bits: u128) -> wit::Ip {
    wit::Ip { hi: (bits >> 64) as u64, lo: bits as u64 }
}

fn to_wit_flow(flow: &Flow) -> wit::Flow {
    wit::Flow {
        client_ip: to_wit_ip(flow.client_ip),
        client_port: flow.client_port,
        frontend_ip: to_wit_ip(flow.frontend_ip),
        frontend_port: flow.frontend_port,
        protocol: match flow.protocol {
            Protocol::Tcp => wit::Protocol::Tcp,
            Protocol::Udp => wit::Protocol::Udp,
        },
    }
}

fn to_wit_backend(b: &fulcrum_sdk::Backend) -> wit::Backend {
    wit::Backend {
        id: b.id,
        ip: to_wit_ip(b.ip),
        port: b.port,
        weight: b.weight,
        state: match b.state {
            BackendState::Unknown => wit::BackendState::Unknown,
            BackendState::Up => wit::BackendState::Up,
            BackendState::Down => wit::BackendState::Down,
            BackendState::Draining => wit::BackendState::Draining,
        },
    }
}
