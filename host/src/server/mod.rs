//! # The running server
//!
//! ```text
//!  Server::start ─ prepare (load plugins, bind listeners) ─┐
//!  reload (SIGHUP, POST /reload, file change) ─ prepare ───┴─> control thread: apply
//!                                                               pools, monitor, probes,
//!                                                               bindings, listeners
//!  worker threads (one tokio runtime each): accept loops -> select -> flows
//! ```
//!
//! - [`worker`]: a worker thread: its listeners (`SO_REUSEPORT`), its plugin
//!   instances, its flows.
//! - [`control`]: the control thread: probes, the health monitor, applying
//!   reloads, the admin API.
//! - [`reload`]: parse -> validate -> load plugins (off the data path) ->
//!   diff against what runs -> a [`reload::Prepared`] the control thread
//!   applies at once. A reload that fails at any step changes nothing.

pub(crate) mod control;
pub mod reload;
pub(crate) mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use crate::Error;
use crate::admin::metrics::Metrics;
use crate::config::Config;
use crate::flow::FlowTable;
use crate::plugin::{PluginInfo, PluginLimits, PluginRuntime};
use crate::pool::Pool;
use crate::proxy::{Frontend, PoolRuntime};
pub use reload::ReloadResult;

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

/// Reload outcomes so far, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct ReloadLog {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub last: Mutex<Option<ReloadResult>>,
}

/// What the control thread, the workers, reloads and the admin API share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub runtime: Arc<PluginRuntime>,
    pub state: ArcSwap<State>,
    /// Where reloads read the config (none: started from text, reload refuses).
    pub config_path: Option<PathBuf>,
    pub workers: Vec<mpsc::UnboundedSender<worker::WorkerMsg>>,
    pub control: mpsc::UnboundedSender<control::ControlMsg>,
    pub reloads: ReloadLog,
    /// One reload at a time.
    pub reload_lock: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    pub next_frontend_id: AtomicU64,
    pub generation: AtomicU64,
}

/// Loads every plugin of `config` (compile, link, instantiate, `init`) and
/// sets up its probes, as `fulcrum check` does, without listening anywhere.
pub fn check(config: &Config) -> Result<(), Error> {
    let runtime = PluginRuntime::new(limits(config)).map_err(|e| Error::Internal(e.to_string()))?;
    reload::load_pools(config, None, &runtime)?;
    reload::duties(config, 0).map(|_| ())
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
        let runtime = PluginRuntime::new(limits(config)).map_err(|e| Error::Internal(e.to_string()))?;
        let workers = config.runtime.workers;
        let (shutdown, _) = watch::channel(false);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let mut worker_queues = Vec::new();
        let mut worker_txs = Vec::new();
        for _ in 0..workers {
            let (tx, rx) = mpsc::unbounded_channel();
            worker_txs.push(tx);
            worker_queues.push(rx);
        }
        let admin = match &config.admin {
            Some(admin) => Some(crate::proxy::bind_tcp(admin.listen).map_err(|error| Error::Listen {
                frontend: "admin".into(),
                addr: admin.listen,
                error,
            })?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let shared = Arc::new(Shared {
            runtime,
            state: ArcSwap::from_pointee(State { config: config.clone(), frontends: Vec::new(), pools: Vec::new() }),
            config_path: config.file.is_file().then(|| config.file.clone()),
            workers: worker_txs,
            control: control_tx,
            reloads: ReloadLog::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            metrics: Metrics::new(),
            next_frontend_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
        });
        let initial = reload::prepare(&shared, config.clone())?;
        let mut threads = Vec::with_capacity(workers + 1);
        for (i, queue) in worker_queues.into_iter().enumerate() {
            let (stop, me) = (shutdown.subscribe(), shared.workers[i].clone());
            threads.push(spawn(format!("fulcrum-worker-{i}"), move || worker::run(queue, me, stop))?);
        }
        let (stop, control_shared) = (shutdown.subscribe(), Arc::clone(&shared));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(spawn("fulcrum-control".into(), move || {
            control::run(control_shared, initial, admin, control_rx, stop, ready_tx)
        })?);
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
    /// config keeps running if it fails.
    pub fn reload(&self) -> Result<ReloadResult, String> {
        let shared = Arc::clone(&self.shared);
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = self.shared.control.send(control::ControlMsg::Reload(Box::new(move |result| {
            let _ = tx.send(result);
        })));
        drop(shared);
        rx.recv().map_err(|_| "the control thread is gone".to_owned())?
    }

    /// Stops accepting, ends the workers (and so every flow), and waits.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for handle in self.threads {
            let _ = handle.join();
        }
    }
}

fn spawn(name: String, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name)
        .spawn(body)
        .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))
}

/// Runs `runtime` until `stop`, handing each item of `queue` to `handle`
/// *outside* the runtime (between `block_on`s). Plugins are called there:
/// WASI's synchronous host functions (a plugin's stdout, its panic message)
/// block on an async runtime of their own, which tokio forbids inside one.
///
/// The tasks `handle` pushes are spawned at the start of the next `block_on`,
/// from inside the runtime: there a spawn is a queue push, while a spawn from
/// outside also wakes the runtime's driver with a syscall (an eventfd write,
/// one per new flow).
pub(crate) fn serve_outside_runtime<T, F>(
    runtime: &tokio::runtime::Runtime,
    queue: &mut mpsc::UnboundedReceiver<T>,
    stop: &mut watch::Receiver<bool>,
    mut handle: impl FnMut(T, &mut Vec<F>),
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks: Vec<F> = Vec::new();
    loop {
        let next = runtime.block_on(async {
            for task in tasks.drain(..) {
                tokio::spawn(task);
            }
            tokio::select! {
                next = queue.recv() => next,
                _ = stop.wait_for(|stopped| *stopped) => None,
            }
        });
        let Some(first) = next else { break };
        let mut next = Some(first);
        while let Some(item) = next {
            handle(item, &mut tasks);
            next = queue.try_recv().ok();
        }
    }
}

pub(crate) fn current_thread_runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!("{what} cannot start its runtime: {e}");
            None
        }
    }
}
