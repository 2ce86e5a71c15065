//! One plugin type for both worlds: a [`World`] says how to link,
//! instantiate and `init` its bindings; [`Plugin`] (loaded once) and
//! [`Instance`] (one per user: a worker, the monitor) do the rest the same
//! way for balancers and health plugins.

use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::bindings::balancer::{Balancer, BalancerPre};
use super::bindings::health::{Health, HealthPre};
use super::state::PluginState;
use super::supervise::{Supervised, prepare, start};
use super::{PluginError, PluginInfo, PluginRuntime, stock};
use crate::config::PluginRef;

/// A plugin kind of the contract (a world of `wit/plugin.wit`).
pub trait World: 'static {
    /// The stock plugins of this world (`stock:<name>`).
    const STOCK: &'static [&'static str];
    /// The bindings' pre-linked component.
    type Pre: Send + Sync;
    /// The bindings' exports of one instance.
    type Bindings: Send;
    /// Adds the world's host imports.
    fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()>;
    fn pre(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<PluginState>) -> wasmtime::Result<Self::Bindings>;
    fn init(
        bindings: &Self::Bindings,
        store: &mut Store<PluginState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>>;
}

/// The `balancer` world: picks the backend of each new flow.
#[derive(Debug)]
pub enum BalancerWorld {}

/// The `health` world: turns a probe result or a signal into a verdict.
#[derive(Debug)]
pub enum HealthWorld {}

/// `impl World` for a marker, from its bindings' types.
macro_rules! world {
    ($world:ident, $bindings:ident, $pre:ident, $stock:expr) => {
        impl World for $world {
            const STOCK: &'static [&'static str] = &$stock;
            type Pre = $pre<PluginState>;
            type Bindings = $bindings;

            fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
                $bindings::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
            }

            fn pre(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre> {
                $pre::new(pre)
            }

            fn instantiate(pre: &Self::Pre, store: &mut Store<PluginState>) -> wasmtime::Result<$bindings> {
                pre.instantiate(store)
            }

            fn init(
                b: &$bindings,
                store: &mut Store<PluginState>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                b.call_init(store, config)
            }
        }
    };
}

world!(BalancerWorld, Balancer, BalancerPre, stock::BALANCERS);
world!(HealthWorld, Health, HealthPre, stock::HEALTH);

/// A plugin of world `W`, compiled and linked, ready to instantiate anywhere.
pub struct Plugin<W: World> {
    pub info: Arc<PluginInfo>,
    pre: W::Pre,
    config: String,
    pub(super) runtime: Arc<PluginRuntime>,
}

impl<W: World> std::fmt::Debug for Plugin<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.info.name).finish_non_exhaustive()
    }
}

/// A live instance: its store and its exports.
pub(super) struct Live<W: World> {
    pub store: Store<PluginState>,
    pub bindings: W::Bindings,
    /// Pool generation last pushed through `backends-changed` (0: none yet).
    pub generation: u64,
}

impl<W: World> Plugin<W> {
    /// Compiles and links the plugin, then makes one instance and calls
    /// `init` with `config` (JSON), so that a bad plugin or config fails here,
    /// at load, and not on the first call.
    pub fn load(runtime: &Arc<PluginRuntime>, source: &PluginRef, config: &str) -> Result<Arc<Self>, PluginError> {
        let (info, pre) = prepare(runtime, source, W::STOCK, W::link, W::pre)?;
        let loaded = Arc::new(Plugin { info, pre, config: config.to_owned(), runtime: Arc::clone(runtime) });
        loaded.instantiate().map_err(|error| PluginError::Init { plugin: source.to_string(), error })?;
        Ok(loaded)
    }

    /// A fresh instance, initialised with the plugin's config.
    pub(super) fn instantiate(&self) -> Result<Live<W>, String> {
        let (store, bindings) = start(
            &self.runtime,
            &self.info,
            |store| W::instantiate(&self.pre, store),
            |b, store| W::init(b, store, &self.config),
        )?;
        Ok(Live { store, bindings, generation: 0 })
    }

    /// An instance of its own for one user (a worker, the monitor); it
    /// instantiates lazily on first use.
    pub fn instance(self: &Arc<Self>) -> Instance<W> {
        Instance { plugin: Arc::clone(self), live: Supervised::new(Arc::clone(&self.info)) }
    }
}

/// One user's instance of a plugin. Not shared, not locked.
pub struct Instance<W: World> {
    pub(super) plugin: Arc<Plugin<W>>,
    pub(super) live: Supervised<Live<W>>,
}

impl<W: World> std::fmt::Debug for Instance<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").field("plugin", &self.plugin.info.name).finish_non_exhaustive()
    }
}

impl<W: World> Instance<W> {
    pub fn plugin(&self) -> &Arc<Plugin<W>> {
        &self.plugin
    }
}
