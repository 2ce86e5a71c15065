//! # Backend pools: snapshots, not locks
//!
//! The control plane (config, later probes and admin) builds an immutable
//! [`PoolSnapshot`] and stores it; the data path only loads it (`ArcSwap`).
//! Per-backend counters ([`BackendStats`]) live behind an `Arc` shared by
//! every snapshot that holds the backend, so they survive new snapshots.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use fulcrum_sdk::BackendState;
use fulcrum_sdk::types::ip_to_bits;
use tokio::sync::watch;

use crate::config::{PassiveConfig, PoolConfig};

mod histogram;

pub use histogram::{CONNECT_BUCKETS, DURATION_BUCKETS, Histogram, HistogramSnapshot};

/// Live counters of one backend, shared by all workers.
#[derive(Debug)]
pub struct BackendStats {
    /// Established flows now.
    pub active_flows: AtomicU32,
    /// Flows ever sent to it.
    pub flows_total: AtomicU64,
    /// Failed connects to its data port (B14).
    pub connect_failures: AtomicU64,
    /// Flows retried on another backend after a failed connect to this one.
    pub connect_retries: AtomicU64,
    /// Data-path failures since the last success (passive health).
    pub recent_failures: AtomicU32,
    /// Moving average of the data path's connect time, in µs (0: none yet).
    pub connect_time_us: AtomicU32,
    /// The weight % of the newest signal verdict ([`NO_SIGNAL`]: none).
    pub signal: AtomicU32,
    /// Flows from this backend's own host to its pool (hairpin attempts, B15).
    pub hairpin_clients: AtomicU64,
    /// A run of data-path failures not yet seen by the control plane.
    passive_due: std::sync::atomic::AtomicBool,
    last_probe: Mutex<Option<LastProbe>>,
}

fn outcome_name<S: serde::Serializer>(outcome: &fulcrum_sdk::Outcome, to: S) -> Result<S::Ok, S::Error> {
    to.serialize_str(outcome.as_str())
}

/// [`BackendStats::signal`] when no signal has judged the backend.
pub const NO_SIGNAL: u32 = u32::MAX;

/// The last probe result of a backend, for the status page (B14: a backend
/// that answers probes but refuses data connections shows both).
#[derive(Clone, Debug, serde::Serialize)]
pub struct LastProbe {
    #[serde(serialize_with = "outcome_name")]
    pub outcome: fulcrum_sdk::Outcome,
    pub status: Option<u16>,
    pub latency_ms: f64,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The answer's `Via` header: a proxy answered the probe (the "probe
    /// through an appliance" trap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// HTTPS: when the backend's certificate expires (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_expires_at: Option<i64>,
}

impl Default for BackendStats {
    fn default() -> Self {
        BackendStats {
            active_flows: AtomicU32::new(0),
            flows_total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            connect_retries: AtomicU64::new(0),
            recent_failures: AtomicU32::new(0),
            connect_time_us: AtomicU32::new(0),
            signal: AtomicU32::new(NO_SIGNAL),
            hairpin_clients: AtomicU64::new(0),
            passive_due: std::sync::atomic::AtomicBool::new(false),
            last_probe: Mutex::new(None),
        }
    }
}

/// Weight of a new sample in the connect-time average (1/8, as TCP's SRTT).
const CONNECT_TIME_SHIFT: u32 = 3;

impl BackendStats {
    /// A connect of the data path succeeded after `elapsed`: folded into the
    /// moving average, and the run of failures ends. Plain loads and stores
    /// (a lost update between workers only loses one sample).
    pub fn connected(&self, elapsed: std::time::Duration) {
        let sample = u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX).max(1);
        let old = self.connect_time_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            let (old, sample) = (i64::from(old), i64::from(sample));
            (old + ((sample - old) >> CONNECT_TIME_SHIFT)).clamp(1, i64::from(u32::MAX)) as u32
        };
        self.connect_time_us.store(new, Ordering::Relaxed);
        self.answered();
    }

    /// The backend answered on the data path (a connect, a UDP reply).
    #[inline]
    pub fn answered(&self) {
        if self.recent_failures.load(Ordering::Relaxed) != 0 {
            self.recent_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A data-path failure toward the backend; returns the run of failures
    /// it makes.
    pub fn failed(&self) -> u32 {
        self.recent_failures.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }

    pub fn last_probe(&self) -> Option<LastProbe> {
        self.last_probe.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_last_probe(&self, probe: LastProbe) {
        *self.last_probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(probe);
    }
}

/// What made a backend down or draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Its probe (and the probe's health plugin).
    Probe,
    /// Passive health: a run of data-path failures, out until its back-off ends (B18).
    Passive,
    /// A signal's health plugin (drain, or weight).
    Signal,
    /// The admin API's drain.
    Admin,
}

/// One backend as the data path sees it.
#[derive(Clone, Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Effective weight, 0..=100: configured, scaled by health verdicts.
    pub weight: u32,
    /// Weight as configured.
    pub configured_weight: u32,
    pub state: BackendState,
    /// Why it is in its state (the last verdict's reason), if known.
    pub reason: Option<Arc<str>>,
    /// What put it in its state (down or draining), typed: never read from `reason`.
    pub cause: Option<Cause>,
    /// When it last changed state, or was added.
    pub since: Instant,
    pub stats: Arc<BackendStats>,
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32, state: BackendState) -> Self {
        Backend {
            addr,
            weight,
            configured_weight: weight,
            state,
            reason: None,
            cause: None,
            since: Instant::now(),
            stats: Arc::default(),
        }
    }
}

impl Backend {
    /// The plugin contract's view of this backend (`id` = index in the pool).
    pub fn view(&self, id: u32) -> fulcrum_sdk::Backend {
        fulcrum_sdk::Backend {
            id,
            ip: ip_to_bits(self.addr.ip()),
            port: self.addr.port(),
            weight: self.weight,
            state: self.state,
        }
    }
}

/// An immutable view of a pool at one moment.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// Rises with every new snapshot: plugin instances re-read the backend set
    /// when it changes.
    pub generation: u64,
    pub backends: Vec<Backend>,
    /// `backends` in the contract's shape, built once per snapshot.
    pub views: Vec<fulcrum_sdk::Backend>,
    /// May a flow go to a backend that is its own client (B15)? Default no.
    pub allow_hairpin: bool,
    /// The pool's turn counter (the contract's `load.next-turn`), shared by
    /// every snapshot of the pool.
    pub turns: Arc<AtomicU64>,
}

impl PoolSnapshot {
    pub fn new(generation: u64, backends: Vec<Backend>) -> Self {
        let views = backends.iter().enumerate().map(|(i, b)| b.view(i as u32)).collect();
        PoolSnapshot { generation, backends, views, allow_hairpin: false, turns: Arc::default() }
    }

    /// Is `id` a backend that may take a new flow?
    pub fn is_eligible(&self, id: u32) -> bool {
        self.views.get(id as usize).is_some_and(fulcrum_sdk::Backend::is_eligible)
    }

    /// The backends on `flow`'s own client host (a hairpin attempt, B15;
    /// the balancer's own host never counts).
    pub fn client_backends<'a>(&'a self, flow: &'a fulcrum_sdk::Flow) -> impl Iterator<Item = &'a Backend> + 'a {
        let own_host = flow.client_ip == flow.frontend_ip;
        self.views
            .iter()
            .zip(&self.backends)
            .filter(move |(view, _)| !own_host && view.ip == flow.client_ip)
            .map(|(_, backend)| backend)
    }

    /// May `flow` go to backend `id`: eligible, and not the client's own host
    /// unless the pool allows hairpins (R4, B15)?
    pub fn accepts(&self, id: u32, flow: &fulcrum_sdk::Flow) -> bool {
        self.views.get(id as usize).is_some_and(|b| b.is_eligible() && (self.allow_hairpin || !b.is_client_of(flow)))
    }
}

/// A named pool: its current snapshot and settings.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    snapshot: ArcSwap<PoolSnapshot>,
    generation: AtomicU64,
    /// True while every backend is down (B7), for `reset-flows`.
    all_down: watch::Sender<bool>,
    /// The config's `allow_hairpin`, for the snapshots to come.
    allow_hairpin: AtomicBool,
    /// The generation of the newest snapshot, for whoever waits on changes.
    changes: watch::Sender<u64>,
    /// Backend connects that found no free source port here (B16): local
    /// exhaustion, never counted as the backend's failure.
    pub source_ports_exhausted: AtomicU64,
    /// Turn of the next connect among the pool's `source_addresses`.
    next_source: AtomicUsize,
    /// Data-path TCP connect times.
    pub connect_seconds: Histogram,
    /// Durations of the flows that ended.
    pub flow_seconds: Histogram,
    /// The balancer's shared turn counter (`load.next-turn`).
    turns: Arc<AtomicU64>,
    /// Where a run of data-path failures is reported (the control plane's
    /// passive health); unset, it goes nowhere.
    passive: std::sync::OnceLock<PassiveSink>,
    /// Some backend has a run of failures the control plane has not taken
    /// yet ([`Pool::take_passive_reports`]): the sink is called only when
    /// this turns true, so at most one word per pool is ever on its way.
    passive_dirty: std::sync::atomic::AtomicBool,
}

/// Tells the control plane that some backend of this pool failed on the
/// data path `failures` times in a row; it then calls
/// [`Pool::take_passive_reports`].
pub struct PassiveSink(pub Box<PassiveFn>);

/// The function behind a [`PassiveSink`].
pub type PassiveFn = dyn Fn() + Send + Sync;

impl std::fmt::Debug for PassiveSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PassiveSink")
    }
}

impl Pool {
    /// A pool as configured: backends `unknown` until probed when it has a
    /// probe (B4), `up` when it has none.
    pub fn new(config: &PoolConfig) -> Self {
        let state = if config.probe.is_some() { BackendState::Unknown } else { BackendState::Up };
        let backends = config.backends.iter().map(|b| Backend::new(b.address, b.weight, state)).collect();
        let turns: Arc<AtomicU64> = Arc::default();
        Pool {
            name: config.name.clone(),
            snapshot: ArcSwap::from_pointee(PoolSnapshot {
                allow_hairpin: config.allow_hairpin,
                turns: Arc::clone(&turns),
                ..PoolSnapshot::new(1, backends)
            }),
            allow_hairpin: AtomicBool::new(config.allow_hairpin),
            generation: AtomicU64::new(1),
            all_down: watch::channel(false).0,
            changes: watch::channel(1).0,
            source_ports_exhausted: AtomicU64::new(0),
            next_source: AtomicUsize::new(0),
            connect_seconds: Histogram::new(CONNECT_BUCKETS),
            flow_seconds: Histogram::new(DURATION_BUCKETS),
            turns,
            passive: std::sync::OnceLock::new(),
            passive_dirty: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Where runs of data-path failures go (set once, by the server).
    pub fn set_passive_sink(&self, sink: PassiveSink) {
        let _ = self.passive.set(sink);
    }

    /// A data-path failure toward backend `addr` (a connect refused or timed
    /// out, a UDP port unreachable): every `passive.failures`-th in a row is
    /// reported to the control plane, which may take the backend out. One
    /// atomic add per failure; runs coalesce until the control plane takes
    /// them, so nothing grows however many fail, and nothing allocates.
    pub fn data_path_failure(&self, stats: &BackendStats, passive: &PassiveConfig) {
        let run = stats.failed();
        if passive.enabled
            && run.is_multiple_of(passive.failures.max(1))
            && let Some(sink) = self.passive.get()
        {
            stats.passive_due.store(true, Ordering::Release);
            if !self.passive_dirty.swap(true, Ordering::AcqRel) {
                (sink.0)();
            }
        }
    }

    /// The backends with a run of data-path failures since the last call
    /// (control plane only): each once, however many runs it had.
    pub fn take_passive_reports(&self) -> Vec<SocketAddr> {
        // Cleared first: a run that comes during the look calls the sink again.
        self.passive_dirty.store(false, Ordering::Release);
        let snapshot = self.load();
        snapshot.backends.iter().filter(|b| b.stats.passive_due.swap(false, Ordering::AcqRel)).map(|b| b.addr).collect()
    }

    /// Whose turn it is among the pool's `sources` addresses (B16); no
    /// shared counter is touched when it has none.
    pub fn source_turn(&self, sources: &[std::net::IpAddr]) -> usize {
        if sources.is_empty() { 0 } else { self.next_source.fetch_add(1, Ordering::Relaxed) }
    }

    /// Flows that must end when every backend is down subscribe here.
    pub fn watch_all_down(&self) -> watch::Receiver<bool> {
        self.all_down.subscribe()
    }

    /// Records whether every backend is down (control plane only).
    pub fn set_all_down(&self, all_down: bool) {
        self.all_down.send_replace(all_down);
    }

    /// The current snapshot (lock-free).
    pub fn load(&self) -> Arc<PoolSnapshot> {
        self.snapshot.load_full()
    }

    /// The backend list for a reloaded config: a backend that stays (same
    /// address) keeps its state, reason and counters, its weight rescaled to
    /// the new configured weight; a new one starts unknown (probed pool) or up.
    /// The config's `allow_hairpin` holds from the next published snapshot.
    pub fn backends_for(&self, config: &PoolConfig) -> Vec<Backend> {
        self.allow_hairpin.store(config.allow_hairpin, Ordering::Relaxed);
        let current = self.load();
        let state = if config.probe.is_some() { BackendState::Unknown } else { BackendState::Up };
        config
            .backends
            .iter()
            .map(|b| match current.backends.iter().find(|c| c.addr == b.address) {
                Some(old) => {
                    let scaled = u64::from(b.weight) * u64::from(old.weight) / u64::from(old.configured_weight.max(1));
                    let weight = if old.configured_weight == 0 { b.weight } else { scaled as u32 };
                    Backend { weight, configured_weight: b.weight, ..old.clone() }
                }
                None => Backend::new(b.address, b.weight, state),
            })
            .collect()
    }

    /// Publishes a new backend list (control plane only).
    pub fn publish(&self, backends: Vec<Backend>) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let allow_hairpin = self.allow_hairpin.load(Ordering::Relaxed);
        let turns = Arc::clone(&self.turns);
        self.snapshot.store(Arc::new(PoolSnapshot { allow_hairpin, turns, ..PoolSnapshot::new(generation, backends) }));
        self.changes.send_replace(generation);
    }

    /// Changes whenever a new snapshot is published (its generation): for
    /// the control plane and tests that wait on health, drain or weight changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// What a UDP flow learns of its backend on the way (replies, ports
/// unreachable), for passive health.
#[derive(Clone, Debug)]
pub struct Feedback {
    pool: Arc<Pool>,
    stats: Arc<BackendStats>,
    passive: PassiveConfig,
}

impl Feedback {
    pub fn new(pool: &Arc<Pool>, backend: &Backend, passive: PassiveConfig) -> Self {
        Feedback { pool: Arc::clone(pool), stats: Arc::clone(&backend.stats), passive }
    }

    /// The backend answered.
    #[inline]
    pub fn answered(&self) {
        self.stats.answered();
    }

    /// The backend failed (see [`Pool::data_path_failure`]).
    pub fn failed(&self) {
        self.pool.data_path_failure(&self.stats, &self.passive);
    }
}

/// Counts a flow on its backend for as long as it lives.
#[derive(Debug)]
pub struct ActiveOnBackend(Arc<BackendStats>);

impl ActiveOnBackend {
    /// A flow established on the backend.
    pub fn new(stats: &Arc<BackendStats>) -> Self {
        let active = ActiveOnBackend::pending(stats);
        active.established();
        active
    }

    /// A flow connecting to the backend: a connect in progress is load
    /// already (balancers that read active flows see it), not yet a flow.
    pub fn pending(stats: &Arc<BackendStats>) -> Self {
        stats.active_flows.fetch_add(1, Ordering::Relaxed);
        ActiveOnBackend(Arc::clone(stats))
    }

    /// The pending connect succeeded: it counts as a flow of the backend.
    pub fn established(&self) {
        self.0.flows_total.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ActiveOnBackend {
    fn drop(&mut self) {
        self.0.active_flows.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::config::Config;

    fn pool(backends: usize) -> Arc<Pool> {
        let list: Vec<String> = (1..=backends).map(|i| format!("{{ address = \"10.0.0.{i}:80\" }}")).collect();
        let text = format!(
            "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\npool = \"web\"\n\n\
             [[pool]]\nname = \"web\"\nbackends = [ {} ]\n",
            list.join(", ")
        );
        let config = Config::parse(std::path::Path::new("pool.toml"), &text).unwrap();
        Arc::new(Pool::new(&config.pools[0]))
    }

    /// A flood of data-path failures: the control plane hears one word per
    /// pool until it looks, then each failing backend once.
    #[test]
    fn a_flood_of_data_path_failures_coalesces_into_one_report_per_backend() {
        let pool = pool(3);
        let words = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&words);
        pool.set_passive_sink(PassiveSink(Box::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })));
        let passive = PassiveConfig { failures: 2, ..PassiveConfig::default() };
        let snapshot = pool.load();
        for _ in 0..100_000 {
            pool.data_path_failure(&snapshot.backends[0].stats, &passive);
            pool.data_path_failure(&snapshot.backends[2].stats, &passive);
        }
        assert_eq!(words.load(Ordering::Relaxed), 1, "one word on its way, however many runs");
        let reported = pool.take_passive_reports();
        assert_eq!(reported, vec![snapshot.backends[0].addr, snapshot.backends[2].addr]);
        assert!(pool.take_passive_reports().is_empty(), "each run is taken once");
        // After the look, the next run is a new word.
        pool.data_path_failure(&snapshot.backends[1].stats, &passive);
        pool.data_path_failure(&snapshot.backends[1].stats, &passive);
        assert_eq!(words.load(Ordering::Relaxed), 2);
        assert_eq!(pool.take_passive_reports(), vec![snapshot.backends[1].addr]);
        // Below the run length, nothing is said.
        pool.data_path_failure(&snapshot.backends[1].stats, &passive);
        assert_eq!(words.load(Ordering::Relaxed), 2);
    }
}
