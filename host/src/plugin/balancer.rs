//! Balancer plugins: `select` per flow on a worker's own [`Instance`], the
//! answer validated (R4), the built-in fallback on any fault.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fulcrum_sdk::algo::fallback_pick;
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

impl Instance<BalancerWorld> {
    /// The backend for a new flow: the plugin's answer if `pool` accepts it
    /// (an eligible backend, not the client's own host unless the pool
    /// allows hairpins), else the built-in fallback's. `Reject` only when the
    /// plugin says so, or when the fallback finds no eligible backend.
    pub fn select(&mut self, pool: &Arc<PoolSnapshot>, flow: &Flow) -> Selection {
        let timer = self.live.calls.call();
        let answer = self.call(pool, flow);
        self.plugin.info.stats.timed(timer);
        match answer {
            Ok(Selection::Backend(id)) if pool.accepts(id, flow) => {
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
        fallback_pick(&pool.views, flow).map_or(Selection::Reject, Selection::Backend)
    }

    fn call(&mut self, pool: &Arc<PoolSnapshot>, flow: &Flow) -> Result<Selection, CallError> {
        let plugin = &self.plugin;
        let live = self.live.live(|| plugin.instantiate())?;
        let runtime = &plugin.runtime;
        if live.generation != pool.generation {
            let backends: Vec<wit::Backend> = pool.views.iter().map(wit::Backend::from).collect();
            live.store.data_mut().pool = Some(Arc::clone(pool));
            arm(&mut live.store, runtime.control_deadline());
            live.bindings
                .call_backends_changed(&mut live.store, &backends)
                .map_err(|e| Some(classify(e, live.store.data_mut(), "backends-changed")))?;
            live.generation = pool.generation;
        }
        arm(&mut live.store, runtime.call_deadline());
        match live.bindings.call_select(&mut live.store, wit::Flow::from(flow)) {
            Ok(selection) => Ok(selection.into()),
            Err(e) => Err(Some(classify(e, live.store.data_mut(), "select"))),
        }
    }
}
