//! The monitor: runs each observation through its health plugin and the
//! probe state machine, combines probe, signals and admin drain into a
//! backend's state and weight, and publishes a new pool snapshot when they
//! change (B7, B11, B12). It lives on the control thread and is the only
//! writer of pool snapshots.
//!
//! - probe down: the backend takes no new flows; its established flows go on
//!   (or, with `on_all_down = "reset-flows"`, end when every backend is down);
//! - drain (a probe or signal verdict, or the admin API): no new flows,
//!   established ones go on;
//! - weight: configured x probe weight % x each signal's weight %, then x
//!   the slow start's ramp (10 % to 100 % over `slow_start`) for a backend
//!   that came back up or was added;
//! - passive health: a run of data-path failures (reported by the data path,
//!   see [`crate::pool::Pool::data_path_failure`]) takes a backend out for a
//!   back-off that doubles per ejection in a row; a passing probe or the end
//!   of the back-off ([`Monitor::tick`]) brings it back.
//!
//! A signal never marks a backend down: a signal's "down" drains it. Health
//! is kept per (pool, backend address), so it survives reloads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use fulcrum_sdk::{BackendState, Health, Observation, Verdict};

use super::state::{HealthMachine, ProbeHealth};
use crate::error::DrainError;
use crate::live::PoolRuntime;
use crate::plugin::HealthInstance;

/// Which duty a report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Probe,
    /// The n-th `[[pool.signal]]`.
    Signal(usize),
}

impl std::fmt::Display for Source {
    /// `probe`, or `signal<n>` (as metrics label them).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Probe => f.write_str("probe"),
            Source::Signal(i) => write!(f, "signal{i}"),
        }
    }
}

/// One probe result, on its way to the monitor.
#[derive(Debug)]
pub struct Report {
    /// The id of the duty's task: a report of a task that was stopped (its
    /// duty changed or went away) is dropped.
    pub duty: u64,
    pub pool: Arc<str>,
    /// The backend's configured address.
    pub backend: SocketAddr,
    pub source: Source,
    /// Rises per duty: a late result older than one already applied is dropped.
    pub seq: u64,
    pub observation: Observation,
    /// HTTPS: when the backend's certificate expires (Unix seconds).
    pub certificate_expires_at: Option<i64>,
}

/// The last verdict of one source about one backend.
#[derive(Clone, Debug, Default)]
struct Judgement {
    drain: bool,
    weight: Option<u32>,
    reason: Option<String>,
}

#[derive(Clone, Debug)]
struct BackendHealth {
    addr: SocketAddr,
    machine: Option<HealthMachine>,
    probe: Judgement,
    signals: Vec<Judgement>,
    /// Per source (probe, then signals): the id of the duty that feeds it
    /// and the last `seq` applied from it.
    feeds: Vec<(u64, u64)>,
    /// Drained through the admin API.
    admin_drain: bool,
    /// Passive health: taken out by data-path failures.
    passive: Ejection,
    /// Since when a slow start ramps its weight up (it came up, or was added).
    ramp_from: Option<Instant>,
}

/// Passive health of one backend: out after a run of data-path failures,
/// for a back-off that doubles with each ejection in a row.
#[derive(Clone, Debug, Default)]
struct Ejection {
    /// Out until then.
    until: Option<Instant>,
    /// Ejections in a row (the back-off's exponent).
    count: u32,
    /// When it last came back (a quiet `max_backoff` after it forgets `count`).
    returned: Option<Instant>,
    reason: Option<String>,
}

/// The health plugins and state of one pool.
#[derive(Debug)]
struct PoolMonitor {
    runtime: Arc<PoolRuntime>,
    probe: Option<HealthInstance>,
    signals: Vec<HealthInstance>,
    /// Aligned with the pool's snapshot.
    backends: Vec<BackendHealth>,
    /// Index in `backends` of each address.
    index: HashMap<SocketAddr, usize>,
    /// Some backend is ejected or ramping up: [`Monitor::tick`] has work here.
    timed: bool,
}

/// Every pool's monitor.
#[derive(Debug, Default)]
pub struct Monitor {
    pools: Vec<PoolMonitor>,
}

/// One backend's health as a takeover hands it to the new process (times as
/// durations from the moment of the hand-over), so that it starts where the
/// old one was: drained stays drained, down stays down until its probe says
/// otherwise, an ejection and a slow start run on.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Carried {
    pub pool: String,
    pub backend: SocketAddr,
    pub admin_drain: bool,
    /// The probe's machine, when the pool has a probe.
    pub probe: Option<super::state::MachineState>,
    pub probe_drain: bool,
    pub probe_weight: Option<u32>,
    pub probe_reason: Option<String>,
    /// Passive ejection: how long it still lasts, ejections in a row, why.
    pub ejected_for_ms: Option<u64>,
    pub ejections: u32,
    pub ejected_reason: Option<String>,
    /// How far into its slow start it is.
    pub ramped_ms: Option<u64>,
}

/// Most backends a takeover carries the health of (the rest start afresh).
pub const MAX_CARRIED: usize = 20_000;
/// Longest reason carried (bytes).
const MAX_CARRIED_REASON: usize = 256;

impl Monitor {
    /// Takes on the pools of a (re)loaded config, fed by the duties `duties`
    /// (their task ids): keeps the health of backends that stay, and their
    /// plugin instances when the plugin did not change; publishes a pool's
    /// backend list only when it changed (a reload that changes nothing
    /// publishes nothing).
    pub fn reconfigure(&mut self, pools: &[Arc<PoolRuntime>], duties: &HashMap<super::DutyKey, u64>, now: Instant) {
        let mut old: HashMap<String, PoolMonitor> =
            self.pools.drain(..).map(|pm| (pm.runtime.config.name.clone(), pm)).collect();
        for runtime in pools {
            let config = &runtime.config;
            let previous = old.remove(&config.name);
            let mut carried: HashMap<SocketAddr, BackendHealth> =
                previous.as_ref().map(|p| p.backends.iter().map(|b| (b.addr, b.clone())).collect()).unwrap_or_default();
            let same_probe = previous.as_ref().is_some_and(|p| p.runtime.config.probe == config.probe);
            let same_signals = previous.as_ref().is_some_and(|p| p.runtime.config.signals == config.signals);
            let same_list = previous.as_ref().is_some_and(|p| {
                let was = &p.runtime.config;
                was.backends == config.backends && was.allow_hairpin == config.allow_hairpin
            }) && same_probe;
            let name: Arc<str> = Arc::from(config.name.as_str());
            let backends: Vec<BackendHealth> = config
                .backends
                .iter()
                .map(|b| {
                    let sources = std::iter::once(Source::Probe).chain((0..config.signals.len()).map(Source::Signal));
                    let feeds: Vec<(u64, u64)> = sources
                        .map(|s| (duties.get(&(Arc::clone(&name), b.address, s)).copied().unwrap_or(0), 0))
                        .collect();
                    let fresh = BackendHealth {
                        addr: b.address,
                        machine: config.probe.as_ref().map(|p| HealthMachine::new(p.threshold, p.interval)),
                        probe: Judgement::default(),
                        signals: vec![Judgement::default(); config.signals.len()],
                        feeds,
                        admin_drain: false,
                        passive: Ejection::default(),
                        // Added by a reload: it ramps up (at start, all do alike: none).
                        ramp_from: previous.as_ref().and(config.slow_start).map(|_| now),
                    };
                    match carried.remove(&b.address) {
                        Some(mut kept) => {
                            if !same_probe {
                                kept.machine = fresh.machine;
                                kept.probe = Judgement::default();
                            }
                            if !same_signals {
                                kept.signals = fresh.signals;
                            }
                            // A duty that goes on keeps its place in its sequence.
                            let feeds =
                                fresh.feeds.iter().enumerate().map(|(slot, &(id, _))| match kept.feeds.get(slot) {
                                    Some(&(was, seq)) if was == id => (id, seq),
                                    _ => (id, 0),
                                });
                            kept.feeds = feeds.collect();
                            kept
                        }
                        None => fresh,
                    }
                })
                .collect();
            let instance =
                |new: &Option<Arc<crate::plugin::HealthPlugin>>, old: Option<HealthInstance>| match (new, old) {
                    (Some(plugin), Some(old)) if Arc::ptr_eq(old.plugin(), plugin) => Some(old),
                    (Some(plugin), _) => Some(plugin.instance()),
                    (None, _) => None,
                };
            let (old_probe, old_signals) = match previous {
                Some(p) => (p.probe, p.signals),
                None => (None, Vec::new()),
            };
            let probe = instance(&runtime.probe, old_probe);
            let mut old_signals = old_signals.into_iter();
            let signals = runtime
                .signals
                .iter()
                .filter_map(|plugin| instance(&Some(Arc::clone(plugin)), old_signals.next()))
                .collect();
            let index = backends.iter().enumerate().map(|(i, b)| (b.addr, i)).collect();
            let timed = backends.iter().any(|b| b.passive.until.is_some() || b.ramp_from.is_some());
            let mut pm = PoolMonitor { runtime: Arc::clone(runtime), probe, signals, backends, index, timed };
            if same_list {
                pm.publish(0..config.backends.len(), now);
            } else {
                let backends = runtime.pool.backends_for(config);
                pm.publish_from(backends, 0..config.backends.len(), true, now);
            }
            self.pools.push(pm);
        }
    }

    /// Applies one report (calls the health plugin: outside tokio).
    pub fn apply(&mut self, report: Report, now: Instant) {
        let Some(pm) = self.pools.iter_mut().find(|p| *p.runtime.config.name == *report.pool) else { return };
        let Some(&i) = pm.index.get(&report.backend) else { return };
        let snapshot = pm.runtime.pool.load();
        let (Some(view), Some(bh)) = (snapshot.views.get(i), pm.backends.get_mut(i)) else {
            return;
        };
        let slot = match report.source {
            Source::Probe => 0,
            Source::Signal(i) => i + 1,
        };
        match bh.feeds.get_mut(slot) {
            Some((duty, last)) if *duty == report.duty && *last < report.seq => *last = report.seq,
            _ => return,
        }
        let observation = &report.observation;
        if report.source == Source::Probe
            && let Some(backend) = snapshot.backends.get(i)
        {
            backend.stats.set_last_probe(crate::pool::LastProbe {
                outcome: observation.outcome,
                status: observation.status,
                latency_ms: observation.latency_us as f64 / 1000.0,
                at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                via: observation.headers.iter().find(|(name, _)| name == "via").map(|(_, value)| value.clone()),
                certificate_expires_at: report.certificate_expires_at,
            });
        }
        match report.source {
            Source::Probe => {
                let Some(plugin) = pm.probe.as_mut() else { return };
                let verdict = plugin.evaluate(view, observation);
                bh.probe = judgement(&verdict, verdict.health == Health::Drain);
                if let Some(machine) = bh.machine.as_mut() {
                    machine.observe(now, observation.outcome, &verdict);
                }
                // A passing probe of the data port itself ends a passive
                // ejection (as Envoy's outlier detection); one of another port
                // proves nothing of the data port (B14): the back-off runs out.
                let data_port =
                    pm.runtime.config.probe.as_ref().and_then(|p| p.port).is_none_or(|p| p == bh.addr.port());
                if verdict.health != Health::Down && bh.passive.until.is_some() && data_port {
                    bh.passive.end(now, snapshot.backends.get(i));
                }
            }
            Source::Signal(s) => {
                let (Some(plugin), Some(slot)) = (pm.signals.get_mut(s), bh.signals.get_mut(s)) else { return };
                let verdict = plugin.evaluate(view, observation);
                *slot = judgement(&verdict, verdict.health != Health::Up);
                if let Some(backend) = snapshot.backends.get(i) {
                    let value = verdict.weight.unwrap_or(100).min(100);
                    backend.stats.signal.store(value, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        pm.publish(std::iter::once(i), now);
    }

    /// A run of data-path failures toward `addr` (passive health): takes the
    /// backend out for its back-off, unless it is out already or the pool's
    /// `max_ejected_percent` would be passed.
    pub fn data_path_failures(&mut self, pool: &str, addr: SocketAddr, now: Instant) {
        let Some(pm) = self.pools.iter_mut().find(|p| p.runtime.config.name == pool) else { return };
        let passive = pm.runtime.config.passive;
        let Some(&i) = pm.index.get(&addr) else { return };
        if !passive.enabled || pm.backends[i].passive.until.is_some() {
            return;
        }
        let out = pm.backends.iter().filter(|b| b.passive.until.is_some()).count();
        let total = pm.backends.len();
        if (out + 1) * 100 > passive.max_ejected_percent as usize * total {
            // Failures go on while it stays in: said at debug level, not as a flood.
            tracing::debug!(pool, backend = %addr, "data-path failures, but {out} of {total} backends are out already (max_ejected_percent = {}): kept in", passive.max_ejected_percent);
            return;
        }
        let bh = &mut pm.backends[i];
        let e = &mut bh.passive;
        if e.returned.is_some_and(|t| now.saturating_duration_since(t) > passive.max_backoff) {
            e.count = 0;
        }
        let backoff = crate::backoff::Backoff::new(passive.backoff, passive.max_backoff).after(e.count).delay();
        e.count = e.count.saturating_add(1);
        e.until = Some(now + backoff);
        e.reason = Some(format!(
            "passive: {} data-path failures in a row; out for {}",
            passive.failures,
            humantime::format_duration(backoff)
        ));
        tracing::warn!(pool, backend = %addr, backoff = %humantime::format_duration(backoff), "data-path failures: backend taken out");
        pm.timed = true;
        pm.publish(std::iter::once(i), now);
    }

    /// Ends passive back-offs that are over and moves slow starts on
    /// (called a few times a second).
    pub fn tick(&mut self, now: Instant) {
        for pm in self.pools.iter_mut().filter(|p| p.timed) {
            let snapshot = pm.runtime.pool.load();
            let window = pm.runtime.config.slow_start;
            let mut changed = Vec::new();
            for (i, bh) in pm.backends.iter_mut().enumerate() {
                if bh.passive.until.is_some_and(|t| t <= now) {
                    bh.passive.end(now, snapshot.backends.get(i));
                    changed.push(i);
                }
                if let Some(from) = bh.ramp_from {
                    if window.is_none_or(|w| now.saturating_duration_since(from) >= w) {
                        bh.ramp_from = None;
                    }
                    changed.push(i);
                }
            }
            pm.timed = pm.backends.iter().any(|b| b.passive.until.is_some() || b.ramp_from.is_some());
            pm.publish(changed.into_iter(), now);
        }
    }

    /// Drains (or undrains) a backend by admin request.
    pub fn set_drain(&mut self, pool: &str, addr: SocketAddr, drained: bool, now: Instant) -> Result<(), DrainError> {
        let pm = self
            .pools
            .iter_mut()
            .find(|p| p.runtime.config.name == pool)
            .ok_or_else(|| DrainError::NoPool { pool: pool.to_owned() })?;
        let i = pm
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or_else(|| DrainError::NoBackend { pool: pool.to_owned(), addr })?;
        pm.backends[i].admin_drain = drained;
        tracing::info!(pool, backend = %addr, drained, "admin drain");
        pm.publish(std::iter::once(i), now);
        Ok(())
    }

    /// Every backend's health, for a takeover (see [`Carried`]).
    pub fn export(&self, now: Instant) -> Vec<Carried> {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.pools
            .iter()
            .flat_map(|pm| pm.backends.iter().map(move |bh| (pm, bh)))
            .take(MAX_CARRIED)
            .map(|(pm, bh)| Carried {
                pool: pm.runtime.config.name.clone(),
                backend: bh.addr,
                admin_drain: bh.admin_drain,
                probe: bh.machine.as_ref().map(HealthMachine::export),
                probe_drain: bh.probe.drain,
                probe_weight: bh.probe.weight,
                probe_reason: bh.probe.reason.clone(),
                ejected_for_ms: bh.passive.until.map(|t| ms(t.saturating_duration_since(now))),
                ejections: bh.passive.count,
                ejected_reason: bh.passive.reason.clone(),
                ramped_ms: bh.ramp_from.map(|t| ms(now.saturating_duration_since(t))),
            })
            .collect()
    }

    /// Starts from an old process's health (a takeover): each backend the
    /// running config still has in that pool takes what was carried, checked
    /// and bounded; the pools publish the result.
    pub fn restore(&mut self, carried: &[Carried], now: Instant) {
        let reason = |r: &Option<String>| {
            r.as_ref().map(|r| crate::plugin::inert(&r[..r.floor_char_boundary(MAX_CARRIED_REASON)]).into_owned())
        };
        for pm in &mut self.pools {
            let mut changed = Vec::new();
            for c in carried.iter().take(MAX_CARRIED).filter(|c| c.pool == pm.runtime.config.name) {
                let Some(&i) = pm.index.get(&c.backend) else { continue };
                let bh = &mut pm.backends[i];
                bh.admin_drain = c.admin_drain;
                if let (Some(machine), Some(state)) = (bh.machine.as_mut(), &c.probe) {
                    machine.restore(state);
                    bh.probe = Judgement {
                        drain: c.probe_drain,
                        weight: c.probe_weight.filter(|w| *w <= 100),
                        reason: reason(&c.probe_reason),
                    };
                }
                let passive = pm.runtime.config.passive;
                if let Some(left) = c.ejected_for_ms.filter(|_| passive.enabled) {
                    let left = std::time::Duration::from_millis(left).min(passive.max_backoff);
                    bh.passive.until = Some(now + left);
                    bh.passive.reason = reason(&c.ejected_reason);
                }
                bh.passive.count = c.ejections.min(64);
                if let (Some(done), Some(window)) = (c.ramped_ms, pm.runtime.config.slow_start) {
                    let done = std::time::Duration::from_millis(done).min(window);
                    bh.ramp_from = Some(now.checked_sub(done).unwrap_or(now));
                }
                changed.push(i);
            }
            pm.timed = pm.backends.iter().any(|b| b.passive.until.is_some() || b.ramp_from.is_some());
            pm.publish(changed.into_iter(), now);
        }
    }

    /// Is this backend drained by the admin API?
    pub fn admin_drained(&self, pool: &str, addr: SocketAddr) -> bool {
        self.pools
            .iter()
            .filter(|p| p.runtime.config.name == pool)
            .flat_map(|p| &p.backends)
            .any(|b| b.addr == addr && b.admin_drain)
    }
}

impl Ejection {
    /// Back in: the back-off is over, or a probe passed. Its run of failures
    /// starts again from nothing.
    fn end(&mut self, now: Instant, backend: Option<&crate::pool::Backend>) {
        self.until = None;
        self.returned = Some(now);
        self.reason = None;
        if let Some(b) = backend {
            b.stats.answered();
        }
    }
}

fn judgement(verdict: &Verdict, drain: bool) -> Judgement {
    Judgement { drain, weight: verdict.weight, reason: verdict.reason.clone() }
}

/// The share (percent, 10..=100, in steps of 5) of a backend `elapsed` into
/// a slow start of `window`: linear, from a floor of 10 % (as Envoy's
/// `min_weight_percent`), so that it is tried at once.
fn ramp_percent(elapsed: std::time::Duration, window: std::time::Duration) -> u64 {
    let fraction = elapsed.as_secs_f64() / window.as_secs_f64().max(f64::MIN_POSITIVE);
    ((fraction * 20.0).ceil() as u64 * 5).clamp(10, 100)
}

/// Would the backend be up (or unknown), not down, by its own health now?
fn bh_state_up(bh: &BackendHealth) -> bool {
    bh.passive.until.is_none() && bh.machine.as_ref().is_none_or(|m| m.state() != ProbeHealth::Down)
}

impl PoolMonitor {
    /// Combines probe, passive health, signals, admin drain and slow start
    /// into (state, weight, reason).
    fn effective(
        bh: &BackendHealth,
        configured: u32,
        slow_start: Option<std::time::Duration>,
        now: Instant,
    ) -> (BackendState, u32, Option<String>, Option<crate::pool::Cause>) {
        let probed = match bh.machine.as_ref().map(HealthMachine::state) {
            None | Some(ProbeHealth::Up) => BackendState::Up,
            Some(ProbeHealth::Unknown) => BackendState::Unknown,
            Some(ProbeHealth::Down) => BackendState::Down,
        };
        let probed = if bh.passive.until.is_some() { BackendState::Down } else { probed };
        let judgements = || std::iter::once(&bh.probe).chain(&bh.signals);
        let draining = judgements().find(|j| j.drain);
        let state = match (probed, draining.is_some() || bh.admin_drain) {
            (BackendState::Down, _) => BackendState::Down,
            (_, true) => BackendState::Draining,
            (state, false) => state,
        };
        let weight = judgements().fold(u64::from(configured), |w, j| w * u64::from(j.weight.unwrap_or(100)) / 100);
        let weight = match (slow_start, bh.ramp_from) {
            // A weight above 0 stays above 0: ramping, it still takes some flows.
            (Some(window), Some(from)) if weight > 0 => {
                (weight * ramp_percent(now.saturating_duration_since(from), window) / 100).max(1)
            }
            _ => weight,
        } as u32;
        use crate::pool::Cause;
        let by_probe = |j: &Judgement| if std::ptr::eq(j, &bh.probe) { Cause::Probe } else { Cause::Signal };
        let (reason, cause) = match (state, draining) {
            (BackendState::Down, _) if bh.passive.until.is_some() => (bh.passive.reason.clone(), Some(Cause::Passive)),
            (BackendState::Down, _) => (bh.probe.reason.clone(), Some(Cause::Probe)),
            (BackendState::Draining, Some(j)) => (j.reason.clone(), Some(by_probe(j))),
            (BackendState::Draining, None) => (Some("drained by the admin API".to_owned()), Some(Cause::Admin)),
            _ => (bh.probe.reason.clone().or_else(|| bh.signals.iter().find_map(|j| j.reason.clone())), None),
        };
        (state, weight, reason, cause)
    }

    /// Publishes a new snapshot if any of `changed` changed state, weight or reason.
    fn publish(&mut self, changed: impl Iterator<Item = usize>, now: Instant) {
        let backends = self.runtime.pool.load().backends.clone();
        self.publish_from(backends, changed, false, now);
    }

    /// Applies health to `changed` of `backends` and publishes the list: when
    /// anything changed, or always (`force`: a reloaded list, one snapshot).
    fn publish_from(
        &mut self,
        mut backends: Vec<crate::pool::Backend>,
        changed: impl Iterator<Item = usize>,
        force: bool,
        now: Instant,
    ) {
        let pool = &self.runtime.pool;
        let mut any = force;
        let slow_start = self.runtime.config.slow_start;
        for i in changed {
            let (Some(bh), Some(current)) = (self.backends.get_mut(i), backends.get_mut(i)) else { continue };
            if slow_start.is_some() && current.state == BackendState::Down && bh_state_up(bh) {
                // Coming back: its share ramps up over the window.
                bh.ramp_from = Some(now);
                self.timed = true;
            }
            let (state, weight, reason, cause) = Self::effective(bh, current.configured_weight, slow_start, now);
            let reason: Option<Arc<str>> = reason.map(Arc::from);
            if current.state == state && current.weight == weight && current.reason == reason && current.cause == cause
            {
                continue;
            }
            if current.state != state {
                current.since = now;
                let why = reason.as_deref().unwrap_or("-");
                tracing::info!(pool = %pool.name, backend = %current.addr, from = ?current.state, to = ?state, reason = why, "backend state changed");
            }
            current.state = state;
            current.weight = weight;
            current.reason = reason;
            current.cause = cause;
            any = true;
        }
        if !any {
            return;
        }
        let all_down = !backends.is_empty() && backends.iter().all(|b| b.state == BackendState::Down);
        pool.publish(backends);
        if all_down != *pool.watch_all_down().borrow() {
            if all_down {
                tracing::warn!(pool = %pool.name, "every backend is down: new flows are refused");
            }
            pool.set_all_down(all_down);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;
    use std::time::Duration;

    use fulcrum_sdk::{Observation, Outcome, ProbeKind};

    use super::*;
    use crate::config::Config;
    use crate::plugin::{BalancerPlugin, PluginLimits, PluginRuntime};
    use crate::pool::Pool;

    const B0: &str = "127.0.0.1:9001";

    /// A pool `web` of two backends with a probe (threshold 1) and one
    /// signal, both judged by `stock:http-200`, as a running config has it.
    fn pool() -> Arc<PoolRuntime> {
        pool_with("")
    }

    /// [`pool`], with `extra` keys in the pool's table.
    fn pool_with(extra: &str) -> Arc<PoolRuntime> {
        let text = format!(
            "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\n{extra}\
             balancer = \"stock:round-robin\"\nbackends = [ {{ address = \"{B0}\", weight = 50 }}, {{ address = \"127.0.0.1:9002\" }} ]\n\
             [pool.probe]\nprotocol = \"http\"\nthreshold = 1\n\n[[pool.signal]]\nprotocol = \"http\"\npath = \"/load\"\n\
             health = \"stock:http-200\"\n"
        );
        let config = Config::parse(Path::new("monitor.toml"), &text).unwrap();
        let runtime =
            PluginRuntime::new(PluginLimits { deadline: Duration::from_millis(50), memory: 16 << 20 }).unwrap();
        let c = &config.pools[0];
        let health = |p: &crate::config::ProbeConfig| {
            crate::plugin::HealthPlugin::load(&runtime, &p.health, &p.health_config).unwrap()
        };
        Arc::new(PoolRuntime {
            config: c.clone(),
            pool: Arc::new(Pool::new(c)),
            balancer: BalancerPlugin::load(&runtime, &c.balancer, &c.balancer_config).unwrap(),
            probe: c.probe.as_ref().map(health),
            signals: c.signals.iter().map(health).collect(),
        })
    }

    fn observation(kind: ProbeKind, status: u16) -> Observation {
        let outcome = if status == 200 { Outcome::Ok } else { Outcome::HttpStatus };
        Observation { kind, outcome, latency_us: 100, status: Some(status), headers: Vec::new(), body: Vec::new() }
    }

    /// A report of duty `duty` about B0.
    fn report(duty: u64, source: Source, seq: u64, status: u16) -> Report {
        let kind = if source == Source::Probe { ProbeKind::Http } else { ProbeKind::Signal };
        Report {
            duty,
            pool: Arc::from("web"),
            backend: B0.parse().unwrap(),
            source,
            seq,
            observation: observation(kind, status),
            certificate_expires_at: None,
        }
    }

    /// Every duty of the pool `web`, fed by task `id`.
    fn duties(id: u64) -> HashMap<crate::probe::DutyKey, u64> {
        let backends = [B0, "127.0.0.1:9002"].map(|b| b.parse().unwrap());
        backends
            .into_iter()
            .flat_map(|b| [Source::Probe, Source::Signal(0)].map(|s| ((Arc::from("web"), b, s), id)))
            .collect()
    }

    fn b0(runtime: &PoolRuntime) -> (BackendState, u32) {
        let snapshot = runtime.pool.load();
        (snapshot.backends[0].state, snapshot.backends[0].weight)
    }

    #[test]
    fn probe_signal_and_admin_drain_combine() {
        let runtime = pool();
        let mut monitor = Monitor::default();
        monitor.reconfigure(std::slice::from_ref(&runtime), &duties(1), Instant::now());
        let now = Instant::now();
        assert_eq!(b0(&runtime).0, BackendState::Unknown, "B4: unknown until probed");
        monitor.apply(report(1, Source::Probe, 1, 200), now);
        assert_eq!(b0(&runtime), (BackendState::Up, 50));
        // A signal's "down" drains, never downs (B12).
        monitor.apply(report(1, Source::Signal(0), 1, 503), now);
        assert_eq!(b0(&runtime).0, BackendState::Draining);
        // The admin drain holds after the signal recovers; undrain lifts it.
        monitor.set_drain("web", B0.parse().unwrap(), true, Instant::now()).unwrap();
        monitor.apply(report(1, Source::Signal(0), 2, 200), now);
        assert_eq!(b0(&runtime).0, BackendState::Draining);
        assert_eq!(runtime.pool.load().backends[0].reason.as_deref(), Some("drained by the admin API"));
        monitor.set_drain("web", B0.parse().unwrap(), false, Instant::now()).unwrap();
        assert_eq!(b0(&runtime).0, BackendState::Up);
        // Down by the probe wins over any drain.
        monitor.set_drain("web", B0.parse().unwrap(), true, Instant::now()).unwrap();
        monitor.apply(report(1, Source::Probe, 2, 500), now);
        assert_eq!(b0(&runtime).0, BackendState::Down);
        // Drain errors name what is missing.
        assert_eq!(
            monitor.set_drain("api", B0.parse().unwrap(), true, Instant::now()),
            Err(DrainError::NoPool { pool: "api".into() })
        );
        let stranger = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            monitor.set_drain("web", stranger, true, Instant::now()),
            Err(DrainError::NoBackend { pool: "web".into(), addr: stranger })
        );
    }

    /// Slow start and a passive back-off follow the clock the monitor is
    /// given: no sleep, no wall clock, the same result on any host.
    #[test]
    fn slow_start_ramps_and_a_passive_back_off_ends_by_the_given_clock() {
        let runtime = pool_with("slow_start = \"10s\"\npassive = { backoff = \"4s\", max_backoff = \"60s\" }\n");
        let mut monitor = Monitor::default();
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        monitor.reconfigure(std::slice::from_ref(&runtime), &duties(1), t0);
        monitor.apply(report(1, Source::Probe, 1, 200), t0);
        monitor.apply(report(1, Source::Probe, 2, 500), t0);
        assert_eq!(b0(&runtime).0, BackendState::Down);
        // Back up at t0: 10 % of its weight (50), then linear over the window.
        monitor.apply(report(1, Source::Probe, 3, 200), t0);
        assert_eq!(b0(&runtime), (BackendState::Up, 5));
        monitor.tick(at(5.0));
        assert_eq!(b0(&runtime), (BackendState::Up, 25));
        monitor.tick(at(9.9));
        assert_eq!(b0(&runtime), (BackendState::Up, 50));
        monitor.tick(at(10.0));
        assert_eq!(b0(&runtime), (BackendState::Up, 50), "the window is over: its full weight");
        // A run of data-path failures: out for the back-off (4 s), then back, ramping again.
        monitor.data_path_failures("web", B0.parse().unwrap(), at(20.0));
        let snapshot = runtime.pool.load();
        assert_eq!(
            (snapshot.backends[0].state, snapshot.backends[0].cause),
            (BackendState::Down, Some(crate::pool::Cause::Passive))
        );
        monitor.tick(at(23.9));
        assert_eq!(b0(&runtime).0, BackendState::Down, "the back-off is not over");
        monitor.tick(at(24.0));
        assert_eq!(b0(&runtime), (BackendState::Up, 5), "back, from the floor of the ramp");
        // The next ejection in a row doubles the back-off (8 s).
        monitor.data_path_failures("web", B0.parse().unwrap(), at(25.0));
        monitor.tick(at(32.9));
        assert_eq!(b0(&runtime).0, BackendState::Down);
        monitor.tick(at(33.0));
        assert_eq!(b0(&runtime).0, BackendState::Up);
    }

    #[test]
    fn stale_reports_are_dropped() {
        let runtime = pool();
        let mut monitor = Monitor::default();
        monitor.reconfigure(std::slice::from_ref(&runtime), &duties(2), Instant::now());
        let now = Instant::now();
        // A report of a stopped duty (another task): dropped.
        monitor.apply(report(1, Source::Probe, 1, 200), now);
        assert_eq!(b0(&runtime).0, BackendState::Unknown);
        monitor.apply(report(2, Source::Probe, 5, 200), now);
        assert_eq!(b0(&runtime).0, BackendState::Up);
        // An older result arriving late: dropped.
        monitor.apply(report(2, Source::Probe, 4, 500), now);
        assert_eq!(b0(&runtime).0, BackendState::Up);
    }

    #[test]
    fn health_and_drain_survive_a_reconfigure_with_the_same_probe() {
        let runtime = pool();
        let mut monitor = Monitor::default();
        monitor.reconfigure(std::slice::from_ref(&runtime), &duties(1), Instant::now());
        monitor.apply(report(1, Source::Probe, 1, 200), Instant::now());
        monitor.set_drain("web", B0.parse().unwrap(), true, Instant::now()).unwrap();
        let generation = runtime.pool.load().generation;
        // A reload that keeps the pool: same backends, same probe, the same
        // duty going on: nothing is republished, and its next result counts.
        monitor.reconfigure(std::slice::from_ref(&runtime), &duties(1), Instant::now());
        assert_eq!(runtime.pool.load().generation, generation, "a no-op reload publishes nothing");
        monitor.apply(report(1, Source::Probe, 2, 200), Instant::now());
        assert_eq!(b0(&runtime).0, BackendState::Draining);
        assert!(monitor.admin_drained("web", B0.parse().unwrap()));
        monitor.set_drain("web", B0.parse().unwrap(), false, Instant::now()).unwrap();
        assert_eq!(b0(&runtime).0, BackendState::Up, "the probe's verdict was kept");
    }

    #[test]
    fn weights_multiply_configured_probe_and_signals() {
        let bh = BackendHealth {
            addr: B0.parse().unwrap(),
            machine: None,
            probe: Judgement { drain: false, weight: Some(50), reason: None },
            signals: vec![Judgement { drain: false, weight: Some(80), reason: Some("cpu 20 %".into()) }],
            feeds: vec![(0, 0), (0, 0)],
            admin_drain: false,
            passive: Ejection::default(),
            ramp_from: None,
        };
        let (state, weight, reason, cause) = PoolMonitor::effective(&bh, 100, None, Instant::now());
        assert_eq!((state, weight, reason.as_deref(), cause), (BackendState::Up, 40, Some("cpu 20 %"), None));
        // Slow start: 10 % at first, in steps of 5 % to the whole; never 0 for a weight above 0.
        let now = Instant::now();
        let ramping = BackendHealth { ramp_from: Some(now), ..bh.clone() };
        let window = Some(Duration::from_secs(10));
        assert_eq!(PoolMonitor::effective(&ramping, 100, window, now).1, 4);
        assert_eq!(PoolMonitor::effective(&ramping, 100, window, now + Duration::from_secs(5)).1, 20);
        assert_eq!(PoolMonitor::effective(&ramping, 100, window, now + Duration::from_secs(11)).1, 40);
        let plain = BackendHealth { probe: Judgement::default(), signals: Vec::new(), ..ramping };
        assert_eq!(PoolMonitor::effective(&plain, 1, window, now).1, 1);
    }
}
