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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, Protocol};
use crate::error::{DrainError, Error, ReloadError};
use crate::flow::FlowTable;
use crate::live::{ReloadLog, ReloadResult, State, Trigger, WorkerLine};
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
    /// Starts serving `config`. Reloads re-read `config.file` when it exists.
    pub fn start(config: &Config) -> Result<Server, Error> {
        descriptors_for(config, crate::net::raise_descriptor_limit());
        let runtime = PluginRuntime::new(limits(config)).map_err(Error::Engine)?;
        let workers = config.runtime.workers;
        let (shutdown, _) = watch::channel(false);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let admin = match &config.admin {
            Some(admin) => Some(crate::net::bind_tcp(admin.listen).map_err(|error| Error::Listen {
                frontend: "admin".into(),
                addr: admin.listen,
                error,
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
        let state = shared.state.load();
        let addrs: Vec<(String, SocketAddr)> = state.frontends.iter().map(|f| (f.name.clone(), f.addr)).collect();
        tracing::info!(workers, frontends = ?addrs, admin = ?admin_addr, "fulcrum started");
        Ok(Server { shared, shutdown, threads, admin_addr })
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

    /// Stops accepting, ends the workers (and so every flow), and waits.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for handle in self.threads {
            let _ = handle.join();
        }
    }
}
