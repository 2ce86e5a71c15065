//! # Selection on the data path, set-up off it
//!
//! A [`Selector`] is what one accept (or receive) loop of one worker holds to
//! pick backends: the balancer instance that serves now, and the snapshot of
//! the pool that instance was last told about (`backends-changed`). It never
//! instantiates, never calls `init` or `backends-changed` (R5): when the pool
//! snapshot or the binding's plugin changes, or the instance died, it asks
//! the [`Preparer`] (a thread of its own) for a new instance primed with the
//! newest snapshot, and goes on picking with the one it has; the new one
//! replaces it when ready.
//!
//! - An instance serves only the binding it was primed for: the same plugin
//!   *and* the same pool (a reload that moves a frontend to another pool
//!   never lets the old pool's instance answer for the new one).
//! - While an instance knows an older snapshot of its pool than the current
//!   one, its answer (an index into the snapshot it knows) is mapped to the
//!   same backend, by address, in the current snapshot and checked there.
//! - Whatever was answered, the index that leaves [`Selector::select`] is one
//!   of the current snapshot's backends (or a refusal).
//! - With no live instance (it died, or its plugin is benched for faulting
//!   too often, see [`super::PluginInfo::benched`]) the flow is served by the
//!   built-in fallback and counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use fulcrum_sdk::algo::fallback_pick_with;
use fulcrum_sdk::{Flow, Selection};

use super::balancer::NotPrimed;
use super::{BalancerInstance, BalancerPlugin};
use crate::pool::{Pool, PoolSnapshot};

/// An instance primed for a snapshot of one pool: it was told that
/// snapshot's backends.
#[derive(Debug)]
pub struct Ready {
    pub instance: BalancerInstance,
    /// The pool it was primed for (its snapshots are the only ones its
    /// answers are read against).
    pub pool: Arc<Pool>,
    pub snapshot: Arc<PoolSnapshot>,
}

impl Ready {
    /// Takes `current` as the snapshot it knows when that changes nothing a
    /// plugin is told (the same backends, states and weights: a snapshot
    /// republished by a reload, a reason that changed): no new instance then.
    fn adopt(&mut self, plugin: &Arc<BalancerPlugin>, current: &Arc<PoolSnapshot>) {
        if self.snapshot.generation != current.generation
            && Arc::ptr_eq(self.instance.plugin(), plugin)
            && self.snapshot.views == current.views
            && self.instance.adopt(&self.snapshot, current)
        {
            self.snapshot = Arc::clone(current);
        }
    }

    /// Makes a new instance of `plugin` and primes it with `pool`'s current
    /// snapshot (instantiate, `init`, `backends-changed`). Off the data path.
    pub fn prepare(plugin: &Arc<BalancerPlugin>, pool: &Arc<Pool>) -> Result<Ready, NotPrimed> {
        let snapshot = pool.load();
        let mut instance = plugin.instance();
        instance.prime(&snapshot)?;
        Ok(Ready { instance, pool: Arc::clone(pool), snapshot })
    }

    /// Is this an instance of `plugin` primed for `pool` (the binding's)?
    fn serves(&self, plugin: &Arc<BalancerPlugin>, pool: &Arc<Pool>) -> bool {
        Arc::ptr_eq(self.instance.plugin(), plugin) && Arc::ptr_eq(&self.pool, pool)
    }
}

/// Where the control plane leaves a primed instance for one selector: the
/// new plugin of a reload, made before the reload takes effect, so that no
/// flow that sees the new binding waits for it or uses the old plugin.
#[derive(Debug, Default)]
pub struct HandOver {
    full: AtomicBool,
    slot: Mutex<Option<Ready>>,
}

impl HandOver {
    pub fn put(&self, ready: Ready) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(ready);
        self.full.store(true, Ordering::Release);
    }

    /// Takes what was left, if anything (one atomic load when nothing was).
    fn take(&self) -> Option<Ready> {
        if !self.full.load(Ordering::Acquire) {
            return None;
        }
        self.full.store(false, Ordering::Relaxed);
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A request for a primed instance.
struct Job {
    plugin: Arc<BalancerPlugin>,
    pool: Arc<Pool>,
    reply: mpsc::Sender<Result<Ready, NotPrimed>>,
}

/// Prepares balancer instances on a thread of its own, in order of request.
#[derive(Debug, Clone)]
pub struct Preparer {
    jobs: mpsc::Sender<Job>,
}

impl Preparer {
    /// Starts the preparing thread; it ends when every `Preparer` is dropped.
    pub fn start() -> std::io::Result<Preparer> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("fulcrum-plugins".into()).spawn(move || {
            for job in queue {
                // A selector that went away meanwhile no longer wants it.
                let _ = job.reply.send(Ready::prepare(&job.plugin, &job.pool));
            }
        })?;
        Ok(Preparer { jobs })
    }

    fn request(
        &self,
        plugin: &Arc<BalancerPlugin>,
        pool: &Arc<Pool>,
    ) -> Option<mpsc::Receiver<Result<Ready, NotPrimed>>> {
        let (reply, answer) = mpsc::channel();
        let job = Job { plugin: Arc::clone(plugin), pool: Arc::clone(pool), reply };
        self.jobs.send(job).ok().map(|()| answer)
    }
}

/// Asks `preparer` for an instance of `plugin` primed for `pool`, unless one
/// is on its way (`waiting`) or the plugin is benched.
fn request(
    waiting: &mut Option<mpsc::Receiver<Result<Ready, NotPrimed>>>,
    preparer: &Preparer,
    plugin: &Arc<BalancerPlugin>,
    pool: &Arc<Pool>,
) {
    if waiting.is_none() && !plugin.info.benched() {
        *waiting = preparer.request(plugin, pool);
    }
}

/// One loop's balancer: the instance serving now and the one being prepared.
#[derive(Debug)]
pub struct Selector {
    serving: Option<Ready>,
    waiting: Option<mpsc::Receiver<Result<Ready, NotPrimed>>>,
    preparer: Preparer,
    handover: Arc<HandOver>,
}

impl Selector {
    /// A selector serving with `first` (prepared before the loop started),
    /// taking reloads' instances from `handover`.
    pub fn new(first: Option<Ready>, preparer: Preparer, handover: Arc<HandOver>) -> Selector {
        Selector { serving: first, waiting: None, preparer, handover }
    }

    /// The backend for a new flow of a pool balanced by `plugin`, whose
    /// current snapshot is `current`. Never waits for a plugin's set-up.
    pub fn select(
        &mut self,
        plugin: &Arc<BalancerPlugin>,
        pool: &Arc<Pool>,
        current: &Arc<PoolSnapshot>,
        flow: &Flow,
    ) -> Selection {
        if let Some(ready) = self.handover.take()
            && ready.serves(plugin, pool)
        {
            self.serving = Some(ready);
        }
        self.collect(plugin, pool);
        if self.serving.as_ref().is_some_and(|r| !r.serves(plugin, pool)) {
            // Primed for a binding that is no longer this loop's.
            self.serving = None;
        }
        let serving = self.serving.as_mut().filter(|r| r.serves(plugin, pool));
        if let Some(ready) = serving {
            ready.adopt(plugin, current);
            if ready.snapshot.generation != current.generation || !ready.instance.is_live() {
                request(&mut self.waiting, &self.preparer, plugin, pool);
            }
            if ready.instance.is_live() && !plugin.info.benched() {
                let answer = ready.instance.select(&ready.snapshot, current, flow);
                return Self::checked(answer, plugin, current, flow);
            }
        } else {
            // Nothing primed for this binding (yet): ask, serve with the fallback.
            request(&mut self.waiting, &self.preparer, plugin, pool);
        }
        // No live instance of this binding's plugin for its pool, or a benched plugin.
        Self::fallback(plugin, current, flow)
    }

    /// The built-in policy over `current`, counted on `plugin`.
    fn fallback(plugin: &BalancerPlugin, current: &PoolSnapshot, flow: &Flow) -> Selection {
        plugin.info.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        fallback_pick_with(&current.views, flow, current.allow_hairpin).map_or(Selection::Reject, Selection::Backend)
    }

    /// The last word on an answer: an index that is not one of `current`'s
    /// backends never leaves the selector (the fallback answers instead).
    fn checked(answer: Selection, plugin: &BalancerPlugin, current: &PoolSnapshot, flow: &Flow) -> Selection {
        match answer {
            Selection::Backend(id) if id as usize >= current.backends.len() => {
                tracing::error!(plugin = %plugin.info.name, id, "an answer outside the current snapshot reached the selector (a bug): the fallback serves");
                Self::fallback(plugin, current, flow)
            }
            answer => answer,
        }
    }

    /// Takes a prepared instance, if one is ready and is of `plugin` for
    /// `pool` (one prepared for an older binding is dropped).
    fn collect(&mut self, plugin: &Arc<BalancerPlugin>, pool: &Arc<Pool>) {
        let Some(waiting) = &self.waiting else { return };
        match waiting.try_recv() {
            Ok(Ok(ready)) => {
                if ready.serves(plugin, pool) {
                    self.serving = Some(ready);
                }
                self.waiting = None;
            }
            // It could not be prepared (counted as a fault), or the preparer is gone.
            Ok(Err(NotPrimed(_))) | Err(mpsc::TryRecvError::Disconnected) => self.waiting = None,
            Err(mpsc::TryRecvError::Empty) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    use fulcrum_sdk::Protocol;

    use super::*;
    use crate::config::{Config, PluginRef};
    use crate::plugin::{PluginLimits, PluginRuntime};

    /// Pools `a` (five backends) and `b` (two), both at their first generation.
    fn pools() -> (Arc<Pool>, Arc<Pool>) {
        let backends =
            |n: u8| (1..=n).map(|i| format!("{{ address = \"10.0.0.{i}:80\" }}")).collect::<Vec<_>>().join(", ");
        let text = format!(
            "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\npool = \"a\"\n\n\
             [[pool]]\nname = \"a\"\nbackends = [ {} ]\n\n[[pool]]\nname = \"b\"\nbackends = [ {} ]\n",
            backends(5),
            backends(2)
        );
        let config = Config::parse(Path::new("selector.toml"), &text).unwrap();
        (Arc::new(Pool::new(&config.pools[0])), Arc::new(Pool::new(&config.pools[1])))
    }

    fn flow(port: u16) -> Flow {
        Flow::new(SocketAddr::from(([10, 1, 1, 1], port)), SocketAddr::from(([10, 9, 9, 9], 80)), Protocol::Tcp)
    }

    /// The reload that moves a frontend to another pool: the instance of the
    /// old pool (primed, live, at the same generation number as the new
    /// pool's snapshot) must never answer for the new pool.
    #[test]
    fn an_instance_of_another_pool_never_answers_for_this_one() {
        let runtime =
            PluginRuntime::new(PluginLimits { deadline: Duration::from_millis(50), memory: 16 << 20 }).unwrap();
        let (a, b) = pools();
        assert_eq!(a.load().generation, b.load().generation, "the case of the bug: equal generation numbers");
        // Round robin over `a` answers ids 0..5: ids 2..5 are out of range in `b`.
        let load = || BalancerPlugin::load(&runtime, &PluginRef::Stock("round-robin".into()), "{}").unwrap();
        let (old_plugin, new_plugin) = (load(), load());
        for same_plugin in [false, true] {
            let plugin_b = if same_plugin { Arc::clone(&old_plugin) } else { Arc::clone(&new_plugin) };
            let first = Ready::prepare(&old_plugin, &a).unwrap();
            let mut selector = Selector::new(Some(first), Preparer::start().unwrap(), Arc::default());
            let current = b.load();
            for port in 0..200 {
                match selector.select(&plugin_b, &b, &current, &flow(port)) {
                    Selection::Backend(id) => {
                        assert!((id as usize) < current.backends.len(), "answer {id} from pool a")
                    }
                    Selection::Reject => panic!("refused"),
                }
            }
        }
        // And the instance of `a` still serves `a`.
        let first = Ready::prepare(&old_plugin, &a).unwrap();
        let mut selector = Selector::new(Some(first), Preparer::start().unwrap(), Arc::default());
        let current = a.load();
        let before = old_plugin.info.stats.fallbacks.load(Ordering::Relaxed);
        for port in 0..50 {
            assert!(
                matches!(selector.select(&old_plugin, &a, &current, &flow(port)), Selection::Backend(id) if id < 5)
            );
        }
        assert_eq!(old_plugin.info.stats.fallbacks.load(Ordering::Relaxed), before, "no fallback for its own pool");
    }

    /// A hand-over left for an older binding is not taken for this one.
    #[test]
    fn a_handover_for_another_binding_is_dropped() {
        let runtime =
            PluginRuntime::new(PluginLimits { deadline: Duration::from_millis(50), memory: 16 << 20 }).unwrap();
        let (a, b) = pools();
        let plugin = BalancerPlugin::load(&runtime, &PluginRef::Stock("round-robin".into()), "{}").unwrap();
        let handover: Arc<HandOver> = Arc::default();
        handover.put(Ready::prepare(&plugin, &a).unwrap());
        let mut selector = Selector::new(None, Preparer::start().unwrap(), Arc::clone(&handover));
        let current = b.load();
        for port in 0..100 {
            assert!(matches!(selector.select(&plugin, &b, &current, &flow(port)), Selection::Backend(id) if id < 2));
        }
        assert!(handover.take().is_none(), "taken (and dropped), not left behind");
    }
}
