//! Balancer plugins: load once ([`BalancerPlugin`]), instantiate per worker
//! ([`BalancerInstance`]), select per flow, fall back on any fault.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fulcrum_sdk::algo::fallback_pick;
use fulcrum_sdk::{BackendState, Flow, Protocol, Selection};
use wasmtime::Store;
use wasmtime::component::HasSelf;

use super::bindings::balancer::{Balancer, BalancerPre};
use super::bindings::types as wit;
use super::state::PluginState;
use super::supervise::{CallError, Supervised, arm, classify, prepare, start};
use super::{Fault, PluginError, PluginInfo, PluginRuntime, to_wit_backend, to_wit_ip};
use crate::config::PluginRef;
use crate::pool::PoolSnapshot;

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
        let (info, pre) = prepare(
            runtime,
            source,
            |linker| Balancer::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s),
            BalancerPre::new,
        )?;
        let loaded = Arc::new(BalancerPlugin { info, pre, config: config.to_owned(), runtime: Arc::clone(runtime) });
        loaded.instantiate().map_err(|error| PluginError::Init { plugin: source.to_string(), error })?;
        Ok(loaded)
    }

    /// A fresh instance, initialised with the plugin's config.
    fn instantiate(&self) -> Result<Live, String> {
        let (store, bindings) = start(
            &self.runtime,
            &self.info,
            |store| self.pre.instantiate(store),
            |b, store| b.call_init(store, &self.config),
        )?;
        Ok(Live { store, bindings, generation: 0 })
    }

    /// An instance for one worker; it instantiates lazily on first use.
    pub fn instance(self: &Arc<Self>) -> BalancerInstance {
        BalancerInstance { plugin: Arc::clone(self), live: Supervised::new(Arc::clone(&self.info)) }
    }
}

/// One worker's instance of a balancer plugin. Not shared, not locked.
pub struct BalancerInstance {
    plugin: Arc<BalancerPlugin>,
    live: Supervised<Live>,
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
        let timer = self.live.calls.call();
        let answer = self.call(pool, flow);
        self.plugin.info.stats.timed(timer);
        match answer {
            Ok(Selection::Backend(id)) if pool.is_eligible(id) => {
                self.live.ok();
                return Selection::Backend(id);
            }
            Ok(Selection::Reject) => {
                self.live.ok();
                return Selection::Reject;
            }
            Ok(Selection::Backend(id)) => {
                let what = match pool.views.get(id as usize) {
                    None => format!("backend {id}, but the pool has {} backends", pool.views.len()),
                    Some(b) if b.state == BackendState::Down => format!("backend {id} ({}), which is down", b.addr()),
                    Some(b) => format!("backend {id} ({}), which takes no new flows", b.addr()),
                };
                self.live.fault(Fault::InvalidAnswer, &format!("select answered {what}"));
            }
            Err(error) => self.live.failed(error),
        }
        self.plugin.info.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        fallback_pick(&pool.views, flow).map_or(Selection::Reject, Selection::Backend)
    }

    fn call(&mut self, pool: &Arc<PoolSnapshot>, flow: &Flow) -> Result<Selection, CallError> {
        let plugin = &self.plugin;
        let live = self.live.live(|| plugin.instantiate())?;
        let runtime = &plugin.runtime;
        if live.generation != pool.generation {
            let backends: Vec<wit::Backend> = pool.views.iter().map(to_wit_backend).collect();
            live.store.data_mut().pool = Some(Arc::clone(pool));
            arm(&mut live.store, runtime.control_deadline());
            live.bindings
                .call_backends_changed(&mut live.store, &backends)
                .map_err(|e| Some(classify(e, live.store.data_mut(), "backends-changed")))?;
            live.generation = pool.generation;
        }
        arm(&mut live.store, runtime.call_deadline());
        match live.bindings.call_select(&mut live.store, to_wit_flow(flow)) {
            Ok(wit::Selection::Backend(id)) => Ok(Selection::Backend(id)),
            Ok(wit::Selection::Reject) => Ok(Selection::Reject),
            Err(e) => Err(Some(classify(e, live.store.data_mut(), "select"))),
        }
    }
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
