//! `/status` and `/flows` as JSON.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Serialize;

use crate::flow::CloseReason;
use crate::live::{Draining, ReloadLog, ReloadResult, State};
use crate::plugin::{Fault, PluginInfo};

#[derive(Serialize)]
pub struct Status {
    /// `serving`, or `draining` (a graceful shutdown: listeners closed,
    /// established flows going on until the grace ends, B17).
    pub state: &'static str,
    /// While draining: flows left and time left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<ShutdownStatus>,
    pub frontends: Vec<FrontendStatus>,
    pub pools: Vec<PoolStatus>,
    pub reloads: Reloads,
}

#[derive(Serialize)]
pub struct ShutdownStatus {
    pub flows_at_start: usize,
    pub flows_left: usize,
    /// Until what remains is reset.
    pub grace_left_ms: u64,
}

#[derive(Serialize)]
pub struct FrontendStatus {
    pub name: String,
    pub listen: String,
    pub pool: String,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    pub active_flows: usize,
    pub flows_started: u64,
    pub flows_ended: BTreeMap<&'static str, u64>,
    /// UDP datagrams dropped.
    pub datagrams_dropped: u64,
    /// Times an accept loop paused, out of descriptors (R1).
    pub accept_pauses: u64,
    /// Bytes forwarded client to backend, and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Flow log lines written and dropped (queue full, write failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_log: Option<FlowLogStatus>,
    /// PROXY headers refused (`accept_proxy`): malformed, too slow, too big.
    pub proxy_headers_refused: u64,
    /// Connections refused with every PROXY header slot taken (or the peer's share).
    pub proxy_header_slots_full: u64,
}

#[derive(Serialize)]
pub struct FlowLogStatus {
    pub written: u64,
    pub dropped: u64,
}

#[derive(Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub balancer: PluginStatus,
    pub probe_health: Option<PluginStatus>,
    pub signal_health: Vec<PluginStatus>,
    pub backends: Vec<BackendStatus>,
    /// The histograms of `/metrics`: TCP connect time to the backends, and
    /// the durations of the flows that ended.
    pub connect_seconds: crate::pool::HistogramSnapshot,
    pub flow_duration_seconds: crate::pool::HistogramSnapshot,
}

#[derive(Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub sha256: String,
    /// `serving`, or `benched` (faulting too often: the fallback serves).
    pub state: &'static str,
    /// While benched: how long it still lasts.
    pub benched_for_ms: Option<u64>,
    pub last_fault: Option<LastFaultStatus>,
    pub calls: u64,
    pub faults: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub memory_faults: u64,
    pub invalid_answers: u64,
    pub instantiate_failures: u64,
    pub fallbacks: u64,
    pub instantiations: u64,
    /// Log lines and bytes not shown (rate limit, long lines cut).
    pub log_lines_dropped: u64,
    pub log_bytes_dropped: u64,
}

#[derive(Serialize)]
pub struct LastFaultStatus {
    /// `trap`, `timeout`, `memory`, `invalid_answer` or `instantiate`.
    pub kind: &'static str,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub address: String,
    /// unknown | up | down | draining
    pub state: &'static str,
    pub weight: u32,
    pub configured_weight: u32,
    pub reason: Option<String>,
    /// What made it down or draining: probe, passive, signal or admin.
    pub cause: Option<crate::pool::Cause>,
    pub active_flows: u32,
    pub flows_total: u64,
    /// Failed connects to the data port (B14: compare with the last probe).
    pub connect_failures: u64,
    /// Data-path failures since its last success (passive health).
    pub recent_failures: u32,
    /// The probe's port when it is not the data port (B14).
    pub probe_port: Option<u16>,
    /// Flows from this backend's own host to its pool (B15).
    pub hairpin_clients: u64,
    pub last_probe: Option<crate::pool::LastProbe>,
}

#[derive(Serialize)]
pub struct Reloads {
    pub ok: u64,
    pub failed: u64,
    pub last: Option<ReloadResult>,
    /// The newest reloads (at most [`crate::live::RECENT_RELOADS`]), newest first.
    pub recent: Vec<ReloadResult>,
}

pub fn plugin(info: &PluginInfo) -> PluginStatus {
    let s = &info.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let benched_for = info.benched_for();
    PluginStatus {
        name: info.name.clone(),
        sha256: info.digest.clone(),
        state: if benched_for.is_some() { "benched" } else { "serving" },
        benched_for_ms: benched_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        last_fault: info.last_fault().map(|f| LastFaultStatus {
            kind: f.fault.as_str(),
            at: f.at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }),
        calls: s.calls(),
        faults: n(&s.faults),
        traps: s.faults_of(Fault::Trap),
        timeouts: s.faults_of(Fault::Timeout),
        memory_faults: s.faults_of(Fault::Memory),
        invalid_answers: s.faults_of(Fault::InvalidAnswer),
        instantiate_failures: s.faults_of(Fault::Instantiate),
        fallbacks: n(&s.fallbacks),
        instantiations: n(&s.instantiations),
        log_lines_dropped: n(&s.logs_dropped),
        log_bytes_dropped: n(&s.log_bytes_dropped),
    }
}

pub fn status(state: &State, reloads: &ReloadLog, draining: Option<Draining>) -> Status {
    let shutdown = draining.map(|d| ShutdownStatus {
        flows_at_start: d.flows_at_start,
        flows_left: state.frontends.iter().map(|f| f.flows.active()).sum(),
        grace_left_ms: u64::try_from(d.deadline.saturating_duration_since(Instant::now()).as_millis())
            .unwrap_or(u64::MAX),
    });
    let frontends = state
        .frontends
        .iter()
        .map(|f| {
            let binding = f.binding.load();
            let (bytes_up, bytes_down) = f.flows.bytes();
            FrontendStatus {
                name: f.name.clone(),
                listen: f.addr.to_string(),
                pool: binding.config.pool.clone(),
                protocol: binding.config.protocol.as_str(),
                active_flows: f.flows.active(),
                flows_started: f.flows.started(),
                flows_ended: CloseReason::ALL.iter().map(|r| (r.as_str(), f.flows.closed(*r))).collect(),
                datagrams_dropped: f.flows.dropped(),
                accept_pauses: f.flows.accept_pauses(),
                bytes_up,
                bytes_down,
                flow_log: binding.recorder.log.as_ref().map(|log| FlowLogStatus {
                    written: log.counters.written.load(Ordering::Relaxed),
                    dropped: log.counters.dropped.load(Ordering::Relaxed),
                }),
                proxy_headers_refused: f.flows.proxy_headers_refused(),
                proxy_header_slots_full: f.flows.proxy_header_slots_full(),
            }
        })
        .collect();
    let pools = state
        .pools
        .iter()
        .map(|p| PoolStatus {
            name: p.config.name.clone(),
            balancer: plugin(&p.balancer.info),
            probe_health: p.probe.as_ref().map(|h| plugin(&h.info)),
            signal_health: p.signals.iter().map(|h| plugin(&h.info)).collect(),
            connect_seconds: p.pool.connect_seconds.snapshot(),
            flow_duration_seconds: p.pool.flow_seconds.snapshot(),
            backends: p
                .pool
                .load()
                .backends
                .iter()
                .map(|b| BackendStatus {
                    address: b.addr.to_string(),
                    state: b.state.as_str(),
                    weight: b.weight,
                    configured_weight: b.configured_weight,
                    reason: b.reason.as_deref().map(str::to_owned),
                    cause: b.cause,
                    active_flows: b.stats.active_flows.load(Ordering::Relaxed),
                    flows_total: b.stats.flows_total.load(Ordering::Relaxed),
                    connect_failures: b.stats.connect_failures.load(Ordering::Relaxed),
                    recent_failures: b.stats.recent_failures.load(Ordering::Relaxed),
                    probe_port: p.config.probe.as_ref().and_then(|c| c.port).filter(|&port| port != b.addr.port()),
                    hairpin_clients: b.stats.hairpin_clients.load(Ordering::Relaxed),
                    last_probe: b.stats.last_probe(),
                })
                .collect(),
        })
        .collect();
    let reloads = Reloads {
        ok: reloads.ok.load(Ordering::Relaxed),
        failed: reloads.failed.load(Ordering::Relaxed),
        last: reloads.last(),
        recent: reloads.recent(),
    };
    let state = if shutdown.is_some() { "draining" } else { "serving" };
    Status { state, shutdown, frontends, pools, reloads }
}

#[derive(Serialize)]
pub struct FlowStatus {
    pub frontend: String,
    pub protocol: &'static str,
    pub client: String,
    pub local: String,
    pub backend: String,
    pub age_ms: u128,
    pub idle_ms: u128,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

pub fn flows(state: &State, limit: usize) -> Vec<FlowStatus> {
    let now = Instant::now();
    let mut out = Vec::new();
    for f in &state.frontends {
        for entry in f.flows.sample(limit - out.len()) {
            let c = &entry.counters;
            out.push(FlowStatus {
                frontend: f.name.clone(),
                protocol: entry.key.protocol.as_str(),
                client: entry.key.client.to_string(),
                local: entry.key.frontend.to_string(),
                backend: entry.backend.to_string(),
                age_ms: now.saturating_duration_since(c.started()).as_millis(),
                idle_ms: now.saturating_duration_since(c.last_activity()).as_millis(),
                bytes_up: c.bytes_up.load(Ordering::Relaxed),
                bytes_down: c.bytes_down.load(Ordering::Relaxed),
            });
        }
        if out.len() >= limit {
            break;
        }
    }
    out
}
