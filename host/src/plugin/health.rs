//! Health plugins: map a probe result or a custom signal to a verdict. They
//! run on the control thread (one instance per probe or signal), off the data
//! path. A faulting health plugin never decides: that observation is judged by
//! the stock default (`stock:http-200`, built natively) and the fault counted.

use std::sync::Arc;

use fulcrum_sdk::{Backend, HealthCheck, Observation, Outcome, ProbeKind, Verdict};
use wasmtime::Store;
use wasmtime::component::HasSelf;

use super::bindings::health::{Health, HealthPre};
use super::bindings::types as wit;
use super::state::PluginState;
use super::supervise::{CallError, Supervised, arm, classify, prepare, start};
use super::{Fault, PluginError, PluginInfo, PluginRuntime, to_wit_backend};
use crate::config::PluginRef;

/// Longest reason kept from a plugin's verdict.
const MAX_REASON: usize = 200;

/// A health plugin, compiled and linked.
pub struct HealthPlugin {
    pub info: Arc<PluginInfo>,
    pre: HealthPre<PluginState>,
    config: String,
    runtime: Arc<PluginRuntime>,
}

impl std::fmt::Debug for HealthPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthPlugin").field("name", &self.info.name).finish_non_exhaustive()
    }
}

struct Live {
    store: Store<PluginState>,
    bindings: Health,
}

impl HealthPlugin {
    /// Compiles, links, instantiates once and calls `init` with `config`.
    pub fn load(runtime: &Arc<PluginRuntime>, source: &PluginRef, config: &str) -> Result<Arc<Self>, PluginError> {
        let (info, pre) = prepare(
            runtime,
            source,
            |linker| Health::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s),
            HealthPre::new,
        )?;
        let loaded = Arc::new(HealthPlugin { info, pre, config: config.to_owned(), runtime: Arc::clone(runtime) });
        loaded.instantiate().map_err(|error| PluginError::Init { plugin: source.to_string(), error })?;
        Ok(loaded)
    }

    fn instantiate(&self) -> Result<Live, String> {
        let (store, bindings) = start(
            &self.runtime,
            &self.info,
            |store| self.pre.instantiate(store),
            |b, store| b.call_init(store, &self.config),
        )?;
        Ok(Live { store, bindings })
    }

    pub fn instance(self: &Arc<Self>) -> HealthInstance {
        HealthInstance { plugin: Arc::clone(self), live: Supervised::new(Arc::clone(&self.info)) }
    }
}

/// One instance of a health plugin (owned by the control thread).
pub struct HealthInstance {
    plugin: Arc<HealthPlugin>,
    live: Supervised<Live>,
}

impl std::fmt::Debug for HealthInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthInstance").field("plugin", &self.plugin.info.name).finish_non_exhaustive()
    }
}

impl HealthInstance {
    pub fn plugin(&self) -> &Arc<HealthPlugin> {
        &self.plugin
    }

    /// The plugin's verdict, validated; the stock default's on any fault.
    pub fn evaluate(&mut self, backend: &Backend, observation: &Observation) -> Verdict {
        let timer = self.live.calls.call();
        let answer = self.call(backend, observation);
        self.plugin.info.stats.timed(timer);
        match answer {
            Ok(verdict) if verdict.weight.is_none_or(|w| w <= 100) => {
                self.live.ok();
                let mut verdict = verdict;
                if let Some(reason) = &mut verdict.reason {
                    truncate(reason, MAX_REASON);
                }
                return verdict;
            }
            Ok(verdict) => {
                self.live.fault(Fault::InvalidAnswer, &format!("weight {:?} is not 0..=100", verdict.weight))
            }
            Err(error) => self.live.failed(error),
        }
        self.plugin.info.stats.fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        fulcrum_plugin_http_200::Http200.evaluate(backend, observation)
    }

    fn call(&mut self, backend: &Backend, observation: &Observation) -> Result<Verdict, CallError> {
        let plugin = &self.plugin;
        let live = self.live.live(|| plugin.instantiate())?;
        arm(&mut live.store, plugin.runtime.call_deadline());
        let result =
            live.bindings.call_evaluate(&mut live.store, to_wit_backend(backend), &to_wit_observation(observation));
        let verdict = result.map_err(|e| Some(classify(e, live.store.data_mut(), "evaluate")))?;
        Ok(Verdict {
            health: match verdict.health {
                wit::Health::Up => fulcrum_sdk::Health::Up,
                wit::Health::Down => fulcrum_sdk::Health::Down,
                wit::Health::Drain => fulcrum_sdk::Health::Drain,
            },
            weight: verdict.weight,
            reason: verdict.reason,
        })
    }
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

fn to_wit_observation(o: &Observation) -> wit::Observation {
    wit::Observation {
        kind: match o.kind {
            ProbeKind::Tcp => wit::ProbeKind::Tcp,
            ProbeKind::Http => wit::ProbeKind::Http,
            ProbeKind::Https => wit::ProbeKind::Https,
            ProbeKind::Signal => wit::ProbeKind::Signal,
        },
        outcome: match o.outcome {
            Outcome::Ok => wit::Outcome::Ok,
            Outcome::Refused => wit::Outcome::Refused,
            Outcome::Reset => wit::Outcome::Reset,
            Outcome::Timeout => wit::Outcome::Timeout,
            Outcome::TlsError => wit::Outcome::TlsError,
            Outcome::HttpStatus => wit::Outcome::HttpStatus,
        },
        latency_us: o.latency_us,
        status: o.status,
        headers: o.headers.clone(),
        body: o.body.clone(),
    }
}
