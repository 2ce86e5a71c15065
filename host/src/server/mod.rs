//! # The running server
//!
//! ```text
//!  Server::start ─ prepare (load plugins, bind listeners) ──────────────┐
//!  SIGHUP, POST /reload, file change, Server::reload                    │
//!    ─> Shared::request_reload ─> control thread: reload::run ─ prepare ┴─> apply:
//!                                         pools, monitor, probes, bindings, listeners
//!  worker threads (one tokio runtime each): accept loops -> select -> flows
//! ```
//!
//! This room sits at the top: it builds the [`crate::live`] state and hands
//! the admin API a narrow [`crate::admin::Handle`] (implemented here), so
//! that `admin` never imports `server`.
//!
//! - [`control`]: the control thread: probes, the health monitor, applying
//!   reloads, the admin API.
//! - [`reload`]: parse -> validate -> load plugins (off the data path) ->
//!   diff against what runs -> a [`reload::Prepared`] the control thread
//!   applies at once. A reload that fails at any step changes nothing.

pub(crate) mod control;
pub(crate) mod reload;
pub mod takeover;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, Protocol};
use crate::error::{DrainError, Error, ReloadError};
use crate::flow::FlowTable;
use crate::live::{ReloadLog, ReloadResult, State, Trigger, WorkerCommand, WorkerLine};
use crate::plugin::{PluginInfo, PluginLimits, PluginRuntime, Preparer};
use crate::pool::Pool;
use crate::telemetry::Metrics;
use control::ControlMsg;

/// What the control thread, the workers, reloads and the admin API share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub runtime: Arc<PluginRuntime>,
    pub state: ArcSwap<State>,
    /// Where reloads read the config (none: started from text, reload refuses).
    pub config_path: Option<PathBuf>,
    pub workers: Vec<WorkerLine>,
    /// Prepares balancer instances off the data path (see `plugin::Selector`).
    pub preparer: Preparer,
    pub control: mpsc::UnboundedSender<control::ControlMsg>,
    pub reloads: ReloadLog,
    pub metrics: Metrics,
    pub next_frontend_id: AtomicU64,
    /// True once every flow must end (B17); see [`Server::halt`].
    pub halt: watch::Sender<bool>,
    /// Set when a graceful shutdown begins.
    pub draining: std::sync::Mutex<Option<crate::live::Draining>>,
    /// Sockets handed over by the process this one takes over, until the
    /// first apply adopts them.
    pub inherited: std::sync::Mutex<Option<takeover::Inherited>>,
    /// A duplicate of the admin API's socket, to hand over.
    pub admin_socket: Option<std::os::fd::OwnedFd>,
    /// Turns true when a new process has taken over (this one then drains).
    pub taken_over: watch::Sender<bool>,
    /// UDP receive loops wait for it (see [`crate::live::Frontend::udp_gate`]).
    pub udp_gate: watch::Sender<bool>,
}

/// Where a reload's outcome goes.
pub(crate) type ReloadReply = Box<dyn FnOnce(Result<ReloadResult, ReloadError>) + Send>;

impl Shared {
    /// The one way into a reload, whatever triggered it: the control thread
    /// runs it (one at a time) and calls `reply` with the outcome.
    pub fn request_reload(&self, trigger: Trigger, reply: ReloadReply) {
        if let Err(refused) = self.control.send(ControlMsg::Reload { trigger, reply })
            && let ControlMsg::Reload { reply, .. } = refused.0
        {
            reply(Err(ReloadError::ShuttingDown));
        }
    }

    /// [`Shared::request_reload`], answered on a channel.
    pub fn reload_answer(&self, trigger: Trigger) -> oneshot::Receiver<Result<ReloadResult, ReloadError>> {
        let (tx, rx) = oneshot::channel();
        self.request_reload(
            trigger,
            Box::new(move |outcome| {
                let _ = tx.send(outcome);
            }),
        );
        rx
    }
}

impl crate::admin::Handle for Shared {
    fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    fn reloads(&self) -> &ReloadLog {
        &self.reloads
    }

    fn metrics(&self) -> String {
        self.metrics.render(&self.state.load(), &self.reloads)
    }

    fn reload(&self) -> oneshot::Receiver<Result<ReloadResult, ReloadError>> {
        self.reload_answer(Trigger::Api)
    }

    fn drain(&self, pool: &str, addr: SocketAddr, drained: bool) -> oneshot::Receiver<Result<(), DrainError>> {
        let (reply, answer) = oneshot::channel();
        let _ = self.control.send(ControlMsg::Drain { pool: pool.to_owned(), addr, drained, reply });
        answer
    }

    fn count_accept_pause(&self) {
        self.metrics.admin_accept_pauses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn draining(&self) -> Option<crate::live::Draining> {
        *self.draining.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Loads every plugin of `config` (compile, link, instantiate, `init`) and
/// sets up its probes, as `fulcrum check` does, without listening anywhere.
/// Returns the pools with their loaded plugins (for what `check` reports).
pub fn check(config: &Config) -> Result<Vec<Arc<crate::live::PoolRuntime>>, Error> {
    let runtime = PluginRuntime::new(limits(config)).map_err(Error::Engine)?;
    let pools = reload::load_pools(config, None, &runtime)?;
    reload::check_sources(config)?;
    crate::probe::duties(config)?;
    Ok(pools)
}

/// Warns when the frontends' `max_flows` need more descriptors at full load
/// than the process may open (R2, R6): past the limit, new flows are refused
/// as `local_exhaustion` (a clear count, not a backend's failure).
fn descriptors_for(config: &Config, limit: u64) {
    let needed: u64 = config
        .frontends
        .iter()
        .map(|f| match f.protocol {
            Protocol::Tcp => 2 * f.max_flows as u64,
            Protocol::Udp => f.max_flows.min(crate::net::udp_socket_cap()) as u64,
        })
        .sum::<u64>()
        + crate::net::RESERVED_DESCRIPTORS as u64;
    if needed > limit {
        tracing::warn!(
            needed,
            limit,
            "at full load (max_flows) the frontends need more descriptors than the limit (RLIMIT_NOFILE): \
             past it, new flows are refused and counted as local_exhaustion; raise the limit (LimitNOFILE=) \
             or lower max_flows"
        );
    }
}

/// Is `bound` the address `listen` asks for (port 0: any port of that IP)?
fn same_address(listen: SocketAddr, bound: Option<SocketAddr>) -> bool {
    bound.is_some_and(|bound| bound == listen || listen.port() == 0 && listen.ip() == bound.ip())
}

fn limits(config: &Config) -> PluginLimits {
    PluginLimits { deadline: config.runtime.plugin_deadline, memory: config.runtime.plugin_memory }
}

/// A running Fulcrum: frontends listening, workers serving.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    admin_addr: Option<SocketAddr>,
}

impl Server {
    /// Starts serving `config`, and listens for a takeover on its
    /// `control_socket`. Reloads re-read `config.file` when it exists.
    pub fn start(config: &Config) -> Result<Server, Error> {
        let server = Server::start_with(config, None)?;
        server.listen_for_takeover();
        Ok(server)
    }

    /// Starts serving `config` on the sockets a running process handed over
    /// (the frontends it has, the admin API), binding only what is new; see
    /// [`takeover`]. Does not listen for a takeover itself: call
    /// [`Server::listen_for_takeover`] once the old process has let go.
    pub fn start_with(config: &Config, mut inherited: Option<takeover::Inherited>) -> Result<Server, Error> {
        descriptors_for(config, crate::net::raise_descriptor_limit());
        let takeover = inherited.is_some();
        let runtime = PluginRuntime::new(limits(config)).map_err(Error::Engine)?;
        let workers = config.runtime.workers;
        let (shutdown, _) = watch::channel(false);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let admin_error = |addr, error| Error::Listen { frontend: "admin".into(), addr, error };
        // The admin API: the old process's socket when the address is the
        // same, else bound anew (a takeover that cannot bind it fails before
        // the switch, and the old process serves on).
        let admin = match (&config.admin, inherited.as_mut().and_then(|i| i.admin.take())) {
            (Some(admin), Some(handed_over)) if same_address(admin.listen, handed_over.local_addr().ok()) => {
                Some(handed_over)
            }
            (Some(admin), _) => Some(crate::net::bind_tcp(admin.listen).map_err(|e| admin_error(admin.listen, e))?),
            (None, _) => None,
        };
        let admin_socket = match &admin {
            Some(l) => Some(l.try_clone().map(std::os::fd::OwnedFd::from).map_err(|e| {
                admin_error(config.admin.as_ref().map_or(crate::config::DEFAULT_ADMIN_LISTEN, |a| a.listen), e)
            })?),
            None => None,
        };
        let preparer = Preparer::start().map_err(|error| Error::Resources { what: "the plugin thread", error })?;
        let mut threads = Vec::with_capacity(workers + 1);
        let mut lines = Vec::with_capacity(workers);
        let stop_all = |threads: Vec<JoinHandle<()>>| {
            let _ = shutdown.send(true);
            threads.into_iter().for_each(|t| drop(t.join()));
        };
        for i in 0..workers {
            match crate::proxy::worker::spawn(i, workers, shutdown.subscribe()) {
                Ok((line, thread)) => {
                    lines.push(line);
                    threads.push(thread);
                }
                Err(error) => {
                    stop_all(threads);
                    return Err(Error::Resources { what: "a worker thread", error });
                }
            }
        }
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let shared = Arc::new(Shared {
            runtime,
            state: ArcSwap::from_pointee(State { config: config.clone(), frontends: Vec::new(), pools: Vec::new() }),
            config_path: config.file.is_file().then(|| config.file.clone()),
            workers: lines,
            preparer,
            control: control_tx,
            reloads: ReloadLog::default(),
            metrics: Metrics::new(),
            next_frontend_id: AtomicU64::new(1),
            halt: watch::channel(false).0,
            draining: std::sync::Mutex::new(None),
            inherited: std::sync::Mutex::new(inherited),
            admin_socket,
            taken_over: watch::channel(false).0,
            // A takeover reads UDP once the old process's flows are here.
            udp_gate: watch::channel(!takeover).0,
        });
        let initial = match reload::prepare(&shared, config.clone()) {
            Ok(initial) => initial,
            Err(e) => {
                stop_all(threads);
                return Err(e);
            }
        };
        let (stop, control_shared) = (shutdown.subscribe(), Arc::clone(&shared));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let control = std::thread::Builder::new()
            .name("fulcrum-control".into())
            .spawn(move || control::run(control_shared, initial, admin, control_rx, stop, ready_tx));
        match control {
            Ok(thread) => threads.push(thread),
            Err(error) => {
                stop_all(threads);
                return Err(Error::Resources { what: "the control thread", error });
            }
        }
        // The first apply (pools, bindings, listeners) is done before start returns.
        let _ = ready_rx.recv();
        // Sockets handed over that the config no longer has (a frontend
        // renamed, moved or dropped) close now: their ports refuse once the
        // old process lets go too, instead of queueing handshakes nobody takes.
        let unadopted = shared.inherited.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(unadopted) = unadopted {
            for (name, addr) in unadopted.close() {
                tracing::info!(frontend = %name, addr = ?addr, "handed-over socket not in this config: closed");
            }
        }
        let state = shared.state.load();
        let addrs: Vec<(String, SocketAddr)> = state.frontends.iter().map(|f| (f.name.clone(), f.addr)).collect();
        tracing::info!(workers, frontends = ?addrs, admin = ?admin_addr, "fulcrum started");
        Ok(Server { shared, shutdown, threads, admin_addr })
    }

    /// A takeover's UDP flows, from [`takeover::confirm`]: each goes to the
    /// worker holding the socket its client's datagrams reach, on its backend
    /// (the same backend socket); then every UDP receive loop starts reading.
    /// Waits at most 2 s for the workers.
    pub fn adopt_udp(&self, flows: Vec<crate::live::CarriedFlow>) {
        let state = self.shared.state.load();
        let workers = &self.shared.workers;
        // Each listening socket's inode, with its frontend and worker.
        let mut owners = std::collections::HashMap::new();
        for frontend in &state.frontends {
            let sockets = frontend.sockets.lock().unwrap_or_else(|e| e.into_inner());
            for (i, socket) in sockets.iter().enumerate() {
                if let Ok(stat) = rustix::fs::fstat(socket) {
                    owners.insert(stat.st_ino, (Arc::clone(frontend), i % workers.len().max(1)));
                }
            }
        }
        let total = flows.len();
        let mut shares: Vec<Vec<_>> = workers.iter().map(|_| Vec::new()).collect();
        for flow in flows {
            if let Some((frontend, worker)) = owners.get(&flow.socket) {
                shares[*worker].push((Arc::clone(frontend), flow));
            }
        }
        let adopt = |i: usize, reply| {
            let share = std::mem::take(&mut shares[i]);
            (!share.is_empty()).then(|| WorkerCommand::AdoptUdp(share, reply))
        };
        let adopted: usize = crate::live::ask_workers(workers, adopt, Duration::from_secs(2)).into_iter().sum();
        if total > 0 {
            tracing::info!(adopted, handed_over = total, "UDP flows of the old process carried on");
        }
        self.shared.udp_gate.send_replace(true);
    }

    /// What runs now.
    pub fn state(&self) -> Arc<State> {
        self.shared.state.load_full()
    }

    /// Reload outcomes so far (and a way to wait for the next one).
    pub fn reloads(&self) -> &ReloadLog {
        &self.shared.reloads
    }

    /// The address a frontend listens on (port 0 resolved).
    pub fn frontend_addr(&self, name: &str) -> Option<SocketAddr> {
        self.state().frontend(name).map(|f| f.addr)
    }

    /// Where the admin API listens, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The flow table of a frontend.
    pub fn flows(&self, frontend: &str) -> Option<Arc<FlowTable>> {
        self.state().frontend(frontend).map(|f| Arc::clone(&f.flows))
    }

    /// A pool's current state.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.state().pool(name).map(|p| Arc::clone(&p.pool))
    }

    /// A pool's balancer plugin: name, digest and counters (calls, faults, ...).
    pub fn balancer(&self, pool: &str) -> Option<Arc<PluginInfo>> {
        self.state().pool(pool).map(|p| Arc::clone(&p.balancer.info))
    }

    /// A pool's probe health plugin: name and counters.
    pub fn probe_health(&self, pool: &str) -> Option<Arc<PluginInfo>> {
        self.state().pool(pool).and_then(|p| p.probe.as_ref()).map(|h| Arc::clone(&h.info))
    }

    /// Re-reads the config file and applies it (what SIGHUP does); the old
    /// config keeps running if it fails. Blocks until the outcome is known.
    pub fn reload(&self) -> Result<ReloadResult, ReloadError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared.request_reload(
            Trigger::Api,
            Box::new(move |outcome| {
                let _ = tx.send(outcome);
            }),
        );
        rx.recv().unwrap_or(Err(ReloadError::ShuttingDown))
    }

    /// Begins a graceful shutdown (B17): every listener closes at once (new
    /// connections are refused, so an upstream health check fails over),
    /// reloads are refused, and established flows go on (TCP both ways, UDP
    /// replies) until they end or [`Server::halt`]. Returns the flows open now.
    pub fn drain(&self, grace: Duration) -> usize {
        let flows = self.active_flows();
        let now = Instant::now();
        let draining = crate::live::Draining { since: now, deadline: now + grace, flows_at_start: flows };
        *self.shared.draining.lock().unwrap_or_else(|e| e.into_inner()) = Some(draining);
        for frontend in &self.shared.state.load().frontends {
            for worker in &self.shared.workers {
                worker.send(WorkerCommand::Stop(frontend.id));
            }
            frontend.close_sockets();
        }
        flows
    }

    /// Listens on the config's `control_socket` for a new process to take
    /// over (on a thread of its own).
    /// A server started from config text (no file to start another from)
    /// does not listen.
    pub fn listen_for_takeover(&self) {
        if self.shared.config_path.is_none() {
            return;
        }
        let path = self.shared.state.load().config.runtime.control_socket.clone();
        takeover::listen(&self.shared, path);
    }

    /// Turns true when a new process has taken over: drain then.
    pub fn taken_over(&self) -> watch::Receiver<bool> {
        self.shared.taken_over.subscribe()
    }

    /// Flows open now, over every frontend.
    pub fn active_flows(&self) -> usize {
        self.shared.state.load().frontends.iter().map(|f| f.flows.active()).sum()
    }

    /// Resets every flow still open (RST both ways, so a cut transfer looks
    /// cut) and stops the process's threads; waits for them at most 5 s (a
    /// stuck thread does not hold the exit). Returns the flows reset.
    pub fn halt(self) -> usize {
        let left = self.active_flows();
        let _ = self.shared.halt.send(true);
        // The resets go out from the workers before they stop.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.active_flows() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop_threads(Duration::from_secs(5));
        left
    }

    /// Stops accepting, ends the workers (and so every flow), and waits.
    pub fn shutdown(self) {
        self.stop_threads(Duration::from_secs(30));
    }

    fn stop_threads(self, wait: Duration) {
        let _ = self.shutdown.send(true);
        let (done, joined) = std::sync::mpsc::channel();
        let threads = self.threads;
        let joiner = std::thread::Builder::new().name("fulcrum-join".into()).spawn(move || {
            for handle in threads {
                let _ = handle.join();
            }
            let _ = done.send(());
        });
        if joiner.is_ok() && joined.recv_timeout(wait).is_err() {
            tracing::warn!("a thread did not stop within {wait:?}: exiting without it");
        }
        // Every flow has ended: its line is queued. Written before the process exits.
        for f in &self.shared.state.load().frontends {
            if let Some(log) = &f.binding.load().recorder.log
                && !log.flush(Duration::from_secs(2))
            {
                tracing::warn!(frontend = %f.name, "the flow log could not be written out within 2 s: lines lost");
            }
        }
    }
}
