//! Balancer plugins: an [`Instance`] is primed off the data path
//! ([`Instance::prime`]: instantiate, `init`, `backends-changed`) and then
//! picks per flow ([`Instance::select`]: the `select` call only), its answer
//! validated (R4), the built-in fallback on any fault.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fulcrum_sdk::algo::fallback_pick_with;
use fulcrum_sdk::{BackendState, Flow, Selection};

use super::Fault;
use super::bindings::types as wit;
use super::supervise::{CallError, arm, classify};
use super::world::{BalancerWorld, Instance, Plugin};
use crate::pool::PoolSnapshot;

/// A balancer plugin, compiled and linked, ready to instantiate on any worker.
pub type BalancerPlugin = Plugin<BalancerWorld>;
/// One worker's instance of a balancer plugin.
pub type BalancerInstance = Instance<BalancerWorld>;

/// An instance could not be primed: the fault (counted on the plugin), or
/// `None` when it was backing off after earlier ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotPrimed(pub Option<Fault>);

impl Instance<BalancerWorld> {
    /// Makes the instance live (instantiate and `init` when it is not) and
    /// tells it `snapshot`'s backends. Set-up work: never on a flow's path.
    /// A fault is counted (and a trapped instance dropped).
    pub fn prime(&mut self, snapshot: &Arc<PoolSnapshot>) -> Result<(), NotPrimed> {
        let plugin = &self.plugin;
        let primed = self.live.live(|| plugin.instantiate()).and_then(|live| {
            if live.generation == snapshot.generation {
                return Ok(());
            }
            let backends: Vec<wit::Backend> = snapshot.views.iter().map(wit::Backend::from).collect();
            live.store.data_mut().pool = Some(Arc::clone(snapshot));
            arm(&mut live.store, plugin.runtime.control_deadline());
            live.bindings
                .call_backends_changed(&mut live.store, &backends)
                .map_err(|e| Some(classify(e, live.store.data_mut(), "backends-changed")))?;
            live.generation = snapshot.generation;
            Ok(())
        });
        primed.map_err(|error| {
            let fault = error.as_ref().map(|(fault, _)| *fault);
            self.live.failed(error);
            NotPrimed(fault)
        })
    }

    /// Moves a live instance primed with `known` to `current`, whose backends
    /// it was told already (the same views); `false` when it is not live.
    pub(super) fn adopt(&mut self, known: &PoolSnapshot, current: &Arc<PoolSnapshot>) -> bool {
        match self.live.current() {
            Some(live) if live.generation == known.generation => {
                live.generation = current.generation;
                live.store.data_mut().pool = Some(Arc::clone(current));
                true
            }
            _ => false,
        }
    }

    /// Is there a live instance (primed, not dead of a fault)?
    pub fn is_live(&self) -> bool {
        self.live.is_live()
    }

    /// The backend for a new flow, as an index into `current`: the plugin's
    /// answer if `current` accepts it (an eligible backend, not the client's
    /// own host unless the pool allows hairpins), else the built-in
    /// fallback's. `known` is the snapshot the instance was primed with: an
    /// answer is an index into it, mapped by address when `current` is newer.
    /// `Reject` only when the plugin says so, or when the fallback finds no
    /// eligible backend. Calls `select` only: no set-up, no waiting.
    pub fn select(&mut self, known: &PoolSnapshot, current: &PoolSnapshot, flow: &Flow) -> Selection {
        let timer = self.live.calls.call();
        let answer = self.call(known, flow);
        self.plugin.info.stats.timed(timer);
        match answer {
            Ok(Selection::Reject) => {
                self.live.ok();
                if known.generation == current.generation {
                    return Selection::Reject;
                }
                // It refused with an older view (every backend down then, say).
            }
            Ok(Selection::Backend(id)) if known.accepts(id, flow) => {
                self.live.ok();
                // The common case: the instance knows the current snapshot, and
                // the answer was checked against it already.
                if known.generation == current.generation {
                    return Selection::Backend(id);
                }
                let addr = known.backends[id as usize].addr;
                let now = current.backends.iter().position(|b| b.addr == addr).map(|i| i as u32);
                if let Some(id) = now.filter(|&id| current.accepts(id, flow)) {
                    return Selection::Backend(id);
                }
                // Valid when the plugin was told; no longer (down, drained, removed).
            }
            Ok(Selection::Backend(id)) => {
                let what = match known.views.get(id as usize) {
                    None => format!("backend {id}, but the pool has {} backends", known.views.len()),
                    Some(b) if b.state == BackendState::Down => format!("backend {id} ({}), which is down", b.addr()),
                    Some(b) if b.is_eligible() => {
                        format!("backend {id} ({}), the client's own host (hairpin, B15)", b.addr())
                    }
                    Some(b) => format!("backend {id} ({}), which takes no new flows", b.addr()),
                };
                self.live.fault(Fault::InvalidAnswer, &format!("select answered {what}"));
            }
            Err(error) => self.live.failed(error),
        }
        self.plugin.info.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        fallback_pick_with(&current.views, flow, current.allow_hairpin).map_or(Selection::Reject, Selection::Backend)
    }

    fn call(&mut self, known: &PoolSnapshot, flow: &Flow) -> Result<Selection, CallError> {
        let runtime = &self.plugin.runtime;
        let live = self.live.current().filter(|live| live.generation == known.generation).ok_or(None)?;
        arm(&mut live.store, runtime.call_deadline());
        match live.bindings.call_select(&mut live.store, wit::Flow::from(flow)) {
            Ok(selection) => Ok(selection.into()),
            Err(e) => Err(Some(classify(e, live.store.data_mut(), "select"))),
        }
    }
}
