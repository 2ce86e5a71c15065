//! The monitor: runs each observation through its health plugin and the
//! probe state machine, combines probe and signals into a backend's state and
//! weight, and publishes a new pool snapshot when they change (B7, B11, B12).
//!
//! - probe down: the backend takes no new flows; its established flows go on
//!   (or, with `on_all_down = "reset-flows"`, end when every backend is down);
//! - drain (a probe or signal verdict): no new flows, established ones go on;
//! - weight: configured x probe weight % x each signal's weight %.
//!
//! A signal never marks a backend down: a signal's "down" drains it.

use std::sync::Arc;
use std::time::Instant;

use fulcrum_sdk::{BackendState, Health, Observation, Verdict};

use super::state::{HealthMachine, ProbeHealth};
use crate::plugin::HealthInstance;
use crate::pool::Pool;

/// Which duty a report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Probe,
    /// The n-th `[[pool.signal]]`.
    Signal(usize),
}

/// One probe result, on its way to the monitor.
#[derive(Debug)]
pub struct Report {
    pub pool: usize,
    pub backend: usize,
    pub source: Source,
    /// Rises per duty: a late result older than one already applied is dropped.
    pub seq: u64,
    pub observation: Observation,
}

/// The last verdict of one source about one backend.
#[derive(Clone, Debug, Default)]
struct Judgement {
    drain: bool,
    weight: Option<u32>,
    reason: Option<String>,
}

#[derive(Debug)]
struct BackendHealth {
    machine: Option<HealthMachine>,
    probe: Judgement,
    signals: Vec<Judgement>,
    /// Last applied `seq` per source (probe, then signals).
    last_seq: Vec<u64>,
}

/// The health plugins and state of one pool.
#[derive(Debug)]
pub struct PoolMonitor {
    pub pool: Arc<Pool>,
    probe: Option<HealthInstance>,
    signals: Vec<HealthInstance>,
    backends: Vec<BackendHealth>,
}

impl PoolMonitor {
    /// `probe`: the probe's health plugin and (threshold, interval).
    pub fn new(
        pool: Arc<Pool>,
        probe: Option<(HealthInstance, u32, std::time::Duration)>,
        signals: Vec<HealthInstance>,
    ) -> Self {
        let count = pool.load().backends.len();
        let backends = (0..count)
            .map(|_| BackendHealth {
                machine: probe.as_ref().map(|(_, threshold, interval)| HealthMachine::new(*threshold, *interval)),
                probe: Judgement::default(),
                signals: vec![Judgement::default(); signals.len()],
                last_seq: vec![0; signals.len() + 1],
            })
            .collect();
        PoolMonitor { pool, probe: probe.map(|(p, _, _)| p), signals, backends }
    }
}

/// Every pool's monitor; lives on the control thread.
#[derive(Debug, Default)]
pub struct Monitor {
    pools: Vec<PoolMonitor>,
}

impl Monitor {
    pub fn new(pools: Vec<PoolMonitor>) -> Self {
        Monitor { pools }
    }

    /// Applies one report (calls the health plugin: outside tokio).
    pub fn apply(&mut self, report: Report, now: Instant) {
        let Some(pm) = self.pools.get_mut(report.pool) else { return };
        let snapshot = pm.pool.load();
        let (Some(view), Some(bh)) = (snapshot.views.get(report.backend), pm.backends.get_mut(report.backend)) else {
            return;
        };
        let slot = match report.source {
            Source::Probe => 0,
            Source::Signal(i) => i + 1,
        };
        match bh.last_seq.get_mut(slot) {
            Some(last) if *last < report.seq => *last = report.seq,
            _ => return,
        }
        let observation = &report.observation;
        match report.source {
            Source::Probe => {
                let Some(plugin) = pm.probe.as_mut() else { return };
                let verdict = plugin.evaluate(view, observation);
                bh.probe = judgement(&verdict, verdict.health == Health::Drain);
                if let Some(machine) = bh.machine.as_mut() {
                    machine.observe(now, observation.outcome, &verdict);
                }
            }
            Source::Signal(i) => {
                let (Some(plugin), Some(slot)) = (pm.signals.get_mut(i), bh.signals.get_mut(i)) else { return };
                let verdict = plugin.evaluate(view, observation);
                *slot = judgement(&verdict, verdict.health != Health::Up);
            }
        }
        pm.publish_if_changed(report.backend);
    }
}

fn judgement(verdict: &Verdict, drain: bool) -> Judgement {
    Judgement { drain, weight: verdict.weight, reason: verdict.reason.clone() }
}

impl PoolMonitor {
    /// Combines probe and signals into (state, effective weight, reason).
    fn effective(&self, backend: usize, configured: u32) -> Option<(BackendState, u32, Option<String>)> {
        let bh = self.backends.get(backend)?;
        let probed = match bh.machine.as_ref().map(HealthMachine::state) {
            None | Some(ProbeHealth::Up) => BackendState::Up,
            Some(ProbeHealth::Unknown) => BackendState::Unknown,
            Some(ProbeHealth::Down) => BackendState::Down,
        };
        let judgements = || std::iter::once(&bh.probe).chain(&bh.signals);
        let draining = judgements().find(|j| j.drain);
        let state = match (probed, draining) {
            (BackendState::Down, _) => BackendState::Down,
            (_, Some(_)) => BackendState::Draining,
            (state, None) => state,
        };
        let weight =
            judgements().fold(u64::from(configured), |w, j| w * u64::from(j.weight.unwrap_or(100)) / 100) as u32;
        let reason = match (state, draining) {
            (BackendState::Draining, Some(j)) => j.reason.clone(),
            _ => bh.probe.reason.clone().or_else(|| bh.signals.iter().find_map(|j| j.reason.clone())),
        };
        Some((state, weight, reason))
    }

    fn publish_if_changed(&mut self, backend: usize) {
        let snapshot = self.pool.load();
        let Some(current) = snapshot.backends.get(backend) else { return };
        let Some((state, weight, reason)) = self.effective(backend, current.configured_weight) else { return };
        let reason: Option<Arc<str>> = reason.map(Arc::from);
        if current.state == state && current.weight == weight && current.reason == reason {
            return;
        }
        if current.state != state {
            let why = reason.as_deref().unwrap_or("-");
            tracing::info!(pool = %self.pool.name, backend = %current.addr, from = ?current.state, to = ?state, reason = why, "backend state changed");
        }
        let mut backends = snapshot.backends.clone();
        backends[backend].state = state;
        backends[backend].weight = weight;
        backends[backend].reason = reason;
        let all_down = backends.iter().all(|b| b.state == BackendState::Down);
        self.pool.publish(backends);
        if all_down != *self.pool.watch_all_down().borrow() {
            if all_down {
                tracing::warn!(pool = %self.pool.name, "every backend is down: new flows are refused");
            }
            self.pool.set_all_down(all_down);
        }
    }
}
