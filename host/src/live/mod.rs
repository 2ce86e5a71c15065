//! # What runs now
//!
//! The running configuration as the other rooms see it: frontends with their
//! flow tables and current [`Binding`]s, pools with their loaded plugins
//! ([`PoolRuntime`]), and the reload history. `server` builds these (start,
//! reload) and stores them; `proxy` serves with them, `probe` judges their
//! backends, `telemetry` and `admin` read them. This room depends only on the
//! rooms below it (`config`, `flow`, `plugin`, `pool`), never on those users.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{Config, FrontendConfig, PoolConfig};
use crate::flow::FlowTable;
use crate::net::Listener;
use crate::plugin::{BalancerPlugin, HandOver, HealthPlugin, Selector};
use crate::pool::Pool;

/// What runs now: the config, its frontends and pools.
#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub frontends: Vec<Arc<Frontend>>,
    pub pools: Vec<Arc<PoolRuntime>>,
}

impl State {
    pub fn pool(&self, name: &str) -> Option<&Arc<PoolRuntime>> {
        self.pools.iter().find(|p| p.config.name == name)
    }

    pub fn frontend(&self, name: &str) -> Option<&Arc<Frontend>> {
        self.frontends.iter().find(|f| f.name == name)
    }
}

/// A pool with its loaded plugins, as the current config has it. A reload
/// that changes a pool's plugins or backends makes a new one around the same
/// [`Pool`] (so health and counters carry over).
#[derive(Debug)]
pub struct PoolRuntime {
    pub config: PoolConfig,
    pub pool: Arc<Pool>,
    pub balancer: Arc<BalancerPlugin>,
    /// The probe's health plugin.
    pub probe: Option<Arc<HealthPlugin>>,
    /// Each signal's health plugin.
    pub signals: Vec<Arc<HealthPlugin>>,
}

/// What a frontend serves with, swapped whole by a reload: new flows load it
/// once at accept; established flows keep the one they started with.
#[derive(Debug)]
pub struct Binding {
    pub config: FrontendConfig,
    pub pool: Arc<PoolRuntime>,
    /// Told of each flow's end: the pool's duration histogram, the frontend's flow log.
    pub recorder: Arc<FlowRecorder>,
}

/// What a closed flow leaves behind: its duration in its pool's histogram,
/// its line in the frontend's flow log (if it has one).
#[derive(Debug)]
pub struct FlowRecorder {
    pub frontend: Arc<str>,
    pub pool: Arc<crate::pool::Pool>,
    pub log: Option<Arc<crate::flow_log::FlowLog>>,
}

impl FlowRecorder {
    /// A TCP flow refused before it had a backend: its line, if there is a log.
    pub fn refused(&self, key: &crate::flow::FlowKey, since: std::time::Instant, reason: crate::flow::CloseReason) {
        if let Some(log) = &self.log {
            log.record_refused(&self.frontend, key, since, reason);
        }
    }
}

impl crate::flow::FlowObserver for FlowRecorder {
    fn closed(&self, entry: &crate::flow::FlowEntry, reason: crate::flow::CloseReason) {
        self.pool.flow_seconds.record(entry.counters.started().elapsed());
        if let Some(log) = &self.log {
            log.record(&self.frontend, entry, reason);
        }
    }
}

/// A listening frontend: its identity, flow table and current binding.
#[derive(Debug)]
pub struct Frontend {
    /// Unique in the process (a frontend re-created by a reload gets a new one).
    pub id: u64,
    pub name: String,
    /// The address it listens on (port 0 resolved).
    pub addr: SocketAddr,
    pub flows: Arc<FlowTable>,
    pub binding: ArcSwap<Binding>,
    /// One per worker: where a reload leaves that worker's instance of a new
    /// balancer before the new binding takes effect.
    pub handovers: Vec<Arc<HandOver>>,
    /// A duplicate of each listening socket, kept to hand over to a new
    /// process in a takeover (B17); closed with the listeners (see
    /// [`Frontend::close_sockets`]), or they would keep the socket listening.
    pub sockets: std::sync::Mutex<Vec<std::os::fd::OwnedFd>>,
    /// Turns true when the process stops for good (shutdown grace over, or a
    /// second signal): every flow still open is reset (B17).
    pub halt: tokio::sync::watch::Receiver<bool>,
    /// UDP receive loops read once it is true: at once, or in a takeover once
    /// the old process's flows are adopted (B17).
    pub udp_gate: tokio::sync::watch::Receiver<bool>,
}

impl Frontend {
    /// Closes the duplicates kept for a takeover: once the workers' sockets
    /// close too, the address refuses connections.
    pub fn close_sockets(&self) {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Duplicates of the listening sockets, for a takeover.
    pub fn socket_dups(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|fd| fd.try_clone()).collect()
    }
}

/// A graceful shutdown in progress (B17): listeners closed, established
/// flows going on until they end or the grace does.
#[derive(Clone, Copy, Debug)]
pub struct Draining {
    pub since: std::time::Instant,
    pub deadline: std::time::Instant,
    /// Flows open when it began.
    pub flows_at_start: usize,
}

/// What the control plane tells a worker thread.
#[derive(Debug)]
pub enum WorkerCommand {
    /// Start serving a frontend on this socket (this worker's `SO_REUSEPORT`
    /// one), picking backends with this selector (its first instance
    /// prepared off the data path).
    Start(Listener, Arc<Frontend>, Selector),
    /// Stop accepting for this frontend id; its established flows go on.
    Stop(u64),
    /// Stop this frontend id and end its UDP flows: a new frontend took its
    /// address, and a socket kept for replies would take a share of the new
    /// one's datagrams (`SO_REUSEPORT`) that nobody reads. Answered once
    /// this worker's sockets of it are closed.
    Close(u64, std::sync::mpsc::Sender<()>),
    /// A takeover (B17): stop every loop of this worker and give up its UDP
    /// flows, each with its backend socket, for the new process.
    HandOverUdp(std::sync::mpsc::Sender<Vec<CarriedFlow>>),
    /// Take these UDP flows of the old process (each on this worker's port
    /// of the same socket); answers how many it took.
    AdoptUdp(Vec<(Arc<Frontend>, CarriedFlow)>, std::sync::mpsc::Sender<usize>),
}

/// A UDP flow handed from one process to the next in a takeover (B17): the
/// listening socket its client's datagrams reach (its inode, the same in
/// both processes), its client and backend, and its backend-facing socket
/// (the backend keeps seeing the same source port).
#[derive(Debug)]
pub struct CarriedFlow {
    pub socket: u64,
    pub client: SocketAddr,
    pub backend: SocketAddr,
    pub upstream: std::os::fd::OwnedFd,
}

/// The control plane's line to one worker thread (the data path implements
/// it, so the control plane needs none of its types).
pub struct WorkerLine(Box<dyn Fn(WorkerCommand) + Send + Sync>);

impl WorkerLine {
    pub fn new(send: impl Fn(WorkerCommand) + Send + Sync + 'static) -> Self {
        WorkerLine(Box::new(send))
    }

    /// Sends a command; a worker that is gone (shutting down) drops it.
    pub fn send(&self, command: WorkerCommand) {
        (self.0)(command);
    }
}

/// Asks the workers for something and gathers their answers: `ask(i, reply)`
/// makes worker `i`'s command (none: that worker is not asked). Answers that
/// do not come within `limit` (a worker gone or stuck) are not waited for.
pub fn ask_workers<T>(
    workers: &[WorkerLine],
    mut ask: impl FnMut(usize, std::sync::mpsc::Sender<T>) -> Option<WorkerCommand>,
    limit: std::time::Duration,
) -> Vec<T> {
    let (reply, answers) = std::sync::mpsc::channel();
    let mut asked = 0;
    for (i, line) in workers.iter().enumerate() {
        if let Some(command) = ask(i, reply.clone()) {
            line.send(command);
            asked += 1;
        }
    }
    drop(reply);
    let deadline = std::time::Instant::now() + limit;
    let mut gathered = Vec::with_capacity(asked);
    for _ in 0..asked {
        match answers.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(answer) => gathered.push(answer),
            Err(_) => break,
        }
    }
    gathered
}

impl std::fmt::Debug for WorkerLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerLine")
    }
}

/// What started a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `POST /reload` or [`crate::Server::reload`].
    Api,
    /// The config file or a plugin file changed.
    File,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Api => "api",
            Trigger::File => "file",
        }
    }
}

/// The outcome of one reload, as `/status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReloadResult {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub trigger: Trigger,
    pub ok: bool,
    /// From the trigger to the new config in effect.
    pub duration_ms: f64,
    pub error: Option<String>,
    /// What the reload did not apply, and why (settings that need a restart).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// What it changed (a failed reload: nothing).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<crate::config::diff::Change>,
}

/// Reload outcomes kept for `/status` and the dashboard.
pub const RECENT_RELOADS: usize = 10;

/// Reload outcomes so far, for `/status` and `/metrics`.
#[derive(Debug)]
pub struct ReloadLog {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// The newest [`RECENT_RELOADS`] outcomes, oldest first.
    recent: Mutex<std::collections::VecDeque<ReloadResult>>,
    /// Reloads recorded so far, for whoever waits on the next one.
    recorded: watch::Sender<u64>,
}

impl Default for ReloadLog {
    fn default() -> Self {
        ReloadLog {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            recent: Mutex::default(),
            recorded: watch::channel(0).0,
        }
    }
}

impl ReloadLog {
    /// Counts a reload's outcome and keeps it as the last one.
    pub fn record(&self, result: &ReloadResult) {
        let counter = if result.ok { &self.ok } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_RELOADS {
            recent.pop_front();
        }
        recent.push_back(result.clone());
        drop(recent);
        self.recorded.send_modify(|n| *n += 1);
    }

    /// Changes at every reload recorded (its count), whatever triggered it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.recorded.subscribe()
    }

    /// The last reload's outcome, if any.
    pub fn last(&self) -> Option<ReloadResult> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).back().cloned()
    }

    /// The newest reloads' outcomes, newest first.
    pub fn recent(&self) -> Vec<ReloadResult> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).iter().rev().cloned().collect()
    }
}
