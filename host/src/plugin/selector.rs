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
//! - While an instance knows an older snapshot than the pool's, its answer
//!   (an index into the snapshot it knows) is mapped to the same backend, by
//!   address, in the current snapshot and checked there.
//! - With no live instance (it died, or its plugin is benched for faulting
//!   too often, see [`super::PluginInfo::benched`]) the flow is served by the
//!   built-in fallback and counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use fulcrum_sdk::algo::fallback_pick;
use fulcrum_sdk::{Flow, Selection};

use super::balancer::NotPrimed;
use super::{BalancerInstance, BalancerPlugin};
use crate::pool::{Pool, PoolSnapshot};

/// An instance primed for a snapshot: it was told that snapshot's backends.
#[derive(Debug)]
pub struct Ready {
    pub instance: BalancerInstance,
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
    pub fn prepare(plugin: &Arc<BalancerPlugin>, pool: &Pool) -> Result<Ready, NotPrimed> {
        let snapshot = pool.load();
        let mut instance = plugin.instance();
        instance.prime(&snapshot)?;
        Ok(Ready { instance, snapshot })
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
        if let Some(ready) = self.handover.take() {
            self.serving = Some(ready);
        }
        self.collect(plugin);
        if let Some(ready) = &mut self.serving {
            ready.adopt(plugin, current);
        }
        let up_to_date = self.serving.as_ref().is_some_and(|r| {
            Arc::ptr_eq(r.instance.plugin(), plugin)
                && r.snapshot.generation == current.generation
                && r.instance.is_live()
        });
        if !up_to_date && self.waiting.is_none() && !plugin.info.benched() {
            self.waiting = self.preparer.request(plugin, pool);
        }
        match &mut self.serving {
            Some(ready) if ready.instance.is_live() && !ready.instance.plugin().info.benched() => {
                ready.instance.select(&ready.snapshot, current, flow)
            }
            // No live instance yet, or a benched plugin: the built-in policy.
            _ => {
                plugin.info.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                fallback_pick(&current.views, flow).map_or(Selection::Reject, Selection::Backend)
            }
        }
    }

    /// Takes a prepared instance, if one is ready (and is of `plugin`, or
    /// nothing else serves).
    fn collect(&mut self, plugin: &Arc<BalancerPlugin>) {
        let Some(waiting) = &self.waiting else { return };
        match waiting.try_recv() {
            Ok(Ok(ready)) => {
                if self.serving.is_none() || Arc::ptr_eq(ready.instance.plugin(), plugin) {
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
