//! # The running server
//!
//! [`Server::start`] loads every pool's plugin, binds every frontend once per
//! worker (`SO_REUSEPORT`), and starts the worker threads, each a
//! single-threaded tokio runtime with its own accept loops and plugin
//! instances, and the control thread (probes and the health monitor).
//! [`check`] does the loading part only (`fulcrum check`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, watch};

use crate::Error;
use crate::config::{Config, PoolConfig, ProbeConfig};
use crate::flow::FlowTable;
use crate::plugin::{BalancerPlugin, HealthPlugin, PluginInfo, PluginLimits, PluginRuntime};
use crate::pool::Pool;
use crate::probe::{self, Monitor, monitor::PoolMonitor};
use crate::proxy::{FrontendContext, bind_tcp, tcp};

/// A pool with its loaded plugins.
#[derive(Debug)]
struct LoadedPool {
    pool: Arc<Pool>,
    balancer: Arc<BalancerPlugin>,
    /// The probe's health plugin.
    probe: Option<Arc<HealthPlugin>>,
    /// Each signal's health plugin.
    signals: Vec<Arc<HealthPlugin>>,
}

/// Everything a config needs loaded before serving: plugins, probe duties.
struct Loaded {
    runtime: Arc<PluginRuntime>,
    /// In config order.
    pools: Vec<(String, LoadedPool)>,
    duties: Vec<probe::Duty>,
}

fn load(config: &Config) -> Result<Loaded, Error> {
    let limits = PluginLimits { deadline: config.runtime.plugin_deadline, memory: config.runtime.plugin_memory };
    let runtime = PluginRuntime::new(limits).map_err(|e| Error::Internal(e.to_string()))?;
    let plugin_error = |p: &PoolConfig, line, key, error| Error::Plugin {
        file: config.file.clone(),
        line,
        pool: p.name.clone(),
        key,
        error: Box::new(error),
    };
    let mut pools = Vec::new();
    for p in &config.pools {
        let balancer = BalancerPlugin::load(&runtime, &p.balancer, &p.balancer_config)
            .map_err(|e| plugin_error(p, p.balancer_line, "balancer", e))?;
        let health = |c: &ProbeConfig| {
            HealthPlugin::load(&runtime, &c.health, &c.health_config).map_err(|e| plugin_error(p, c.line, "health", e))
        };
        let probe = p.probe.as_ref().map(health).transpose()?;
        let signals = p.signals.iter().map(health).collect::<Result<_, _>>()?;
        pools.push((p.name.clone(), LoadedPool { pool: Arc::new(Pool::new(p)), balancer, probe, signals }));
    }
    let duties = probe::duties(&config.pools).map_err(|(pool, line, message)| Error::Probe {
        file: config.file.clone(),
        line,
        pool: config.pools[pool].name.clone(),
        message,
    })?;
    Ok(Loaded { runtime, pools, duties })
}

/// Loads every plugin of `config` (compile, link, instantiate, `init`) and
/// sets up its probes, as `fulcrum check` does, without listening anywhere.
pub fn check(config: &Config) -> Result<(), Error> {
    load(config).map(|_| ())
}

/// A running Fulcrum: frontends listening, workers serving.
#[derive(Debug)]
pub struct Server {
    frontends: Vec<Arc<FrontendContext>>,
    addrs: HashMap<String, SocketAddr>,
    pools: HashMap<String, LoadedPool>,
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    _runtime: Arc<PluginRuntime>,
}

impl Server {
    pub fn start(config: &Config) -> Result<Server, Error> {
        let Loaded { runtime, pools, duties } = load(config)?;
        let monitors = pools
            .iter()
            .zip(&config.pools)
            .map(|((_, loaded), c)| {
                let probe =
                    loaded.probe.as_ref().zip(c.probe.as_ref()).map(|(h, p)| (h.instance(), p.threshold, p.interval));
                PoolMonitor::new(Arc::clone(&loaded.pool), probe, loaded.signals.iter().map(|h| h.instance()).collect())
            })
            .collect();
        let pools: HashMap<String, LoadedPool> = pools.into_iter().collect();
        let workers = config.runtime.workers;
        let mut frontends = Vec::new();
        let mut addrs = HashMap::new();
        // listeners[w] = this worker's (listener, frontend) pairs
        let mut listeners: Vec<Vec<(std::net::TcpListener, Arc<FrontendContext>)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for f in &config.frontends {
            let loaded = pools.get(&f.pool).ok_or_else(|| Error::Internal(format!("pool `{}` vanished", f.pool)))?;
            let ctx = Arc::new(FrontendContext {
                config: f.clone(),
                pool: Arc::clone(&loaded.pool),
                balancer: Arc::clone(&loaded.balancer),
                flows: Arc::new(FlowTable::new(f.max_flows)),
            });
            let listen_error = |addr, error| Error::Listen { frontend: f.name.clone(), addr, error };
            // The first bind resolves port 0; the other workers join that port.
            let first = bind_tcp(f.listen).map_err(|e| listen_error(f.listen, e))?;
            let addr = first.local_addr().map_err(|e| listen_error(f.listen, e))?;
            listeners[0].push((first, Arc::clone(&ctx)));
            for worker in listeners.iter_mut().skip(1) {
                worker.push((bind_tcp(addr).map_err(|e| listen_error(addr, e))?, Arc::clone(&ctx)));
            }
            addrs.insert(f.name.clone(), addr);
            frontends.push(ctx);
        }
        let (shutdown, _) = watch::channel(false);
        let mut handles = Vec::with_capacity(workers + 1);
        let stop = shutdown.subscribe();
        let monitor = Monitor::new(monitors);
        handles.push(
            std::thread::Builder::new()
                .name("fulcrum-control".into())
                .spawn(move || run_control(monitor, duties, stop))
                .map_err(|e| Error::Internal(format!("cannot start the control thread: {e}")))?,
        );
        for (i, mine) in listeners.into_iter().enumerate() {
            let stop = shutdown.subscribe();
            let handle = std::thread::Builder::new()
                .name(format!("fulcrum-worker-{i}"))
                .spawn(move || run_worker(mine, stop))
                .map_err(|e| Error::Internal(format!("cannot start worker thread: {e}")))?;
            handles.push(handle);
        }
        tracing::info!(workers, frontends = ?addrs, "fulcrum started");
        Ok(Server { frontends, addrs, pools, shutdown, workers: handles, _runtime: runtime })
    }

    /// The address a frontend listens on (port 0 resolved).
    pub fn frontend_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.get(name).copied()
    }

    /// The flow table of a frontend.
    pub fn flows(&self, frontend: &str) -> Option<&Arc<FlowTable>> {
        self.frontends.iter().find(|f| f.config.name == frontend).map(|f| &f.flows)
    }

    /// A pool's current state.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name).map(|p| &p.pool)
    }

    /// A pool's balancer plugin: name and counters (calls, faults, ...).
    pub fn balancer(&self, pool: &str) -> Option<&Arc<PluginInfo>> {
        self.pools.get(pool).map(|p| &p.balancer.info)
    }

    /// A pool's probe health plugin: name and counters.
    pub fn probe_health(&self, pool: &str) -> Option<&Arc<PluginInfo>> {
        self.pools.get(pool).and_then(|p| p.probe.as_ref()).map(|h| &h.info)
    }

    /// Stops accepting, ends the workers (and so every flow), and waits.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for handle in self.workers {
            let _ = handle.join();
        }
    }
}

/// Runs `runtime` until `stop`, handing each item of `queue` to `handle`
/// *outside* the runtime (between `block_on`s). Plugins are called there:
/// WASI's synchronous host functions (a plugin's stdout, its panic message)
/// block on an async runtime of their own, which tokio forbids inside one.
fn serve_outside_runtime<T>(
    runtime: &tokio::runtime::Runtime,
    queue: &mut mpsc::UnboundedReceiver<T>,
    stop: &mut watch::Receiver<bool>,
    mut handle: impl FnMut(T),
) {
    loop {
        let next = runtime.block_on(async {
            tokio::select! {
                next = queue.recv() => next,
                _ = stop.wait_for(|stopped| *stopped) => None,
            }
        });
        let Some(first) = next else { break };
        let mut next = Some(first);
        while let Some(item) = next {
            handle(item);
            next = queue.try_recv().ok();
        }
    }
}

fn current_thread_runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!("{what} cannot start its runtime: {e}");
            None
        }
    }
}

/// One worker thread: a single-threaded tokio runtime for the I/O, and this
/// thread's balancer instances, one per frontend.
fn run_worker(listeners: Vec<(std::net::TcpListener, Arc<FrontendContext>)>, mut stop: watch::Receiver<bool>) {
    let Some(runtime) = current_thread_runtime("worker") else { return };
    let (to_worker, mut accepted) = mpsc::unbounded_channel();
    let mut frontends = Vec::with_capacity(listeners.len());
    runtime.block_on(async {
        for (i, (listener, ctx)) in listeners.into_iter().enumerate() {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    tokio::spawn(tcp::accept_loop(
                        i,
                        listener,
                        ctx.config.name.clone(),
                        to_worker.clone(),
                        stop.clone(),
                    ));
                }
                Err(e) => tracing::error!(frontend = %ctx.config.name, "cannot register listener: {e}"),
            }
            frontends.push(ctx);
        }
    });
    drop(to_worker);
    let mut selectors: Vec<_> = frontends.iter().map(|f| f.balancer.instance()).collect();
    let handle = runtime.handle().clone();
    serve_outside_runtime(&runtime, &mut accepted, &mut stop, |conn| {
        let i = conn.frontend;
        tcp::start_flow(conn, &frontends[i], &mut selectors[i], &handle);
    });
}

/// The control thread: probes (tokio tasks) and the monitor that judges
/// their results (health plugins, outside tokio) and publishes snapshots.
fn run_control(mut monitor: Monitor, duties: Vec<probe::Duty>, mut stop: watch::Receiver<bool>) {
    let Some(runtime) = current_thread_runtime("control") else { return };
    let (reports, mut queue) = mpsc::unbounded_channel();
    runtime.block_on(async {
        for duty in duties {
            tokio::spawn(probe::run(duty, reports.clone()));
        }
    });
    drop(reports);
    serve_outside_runtime(&runtime, &mut queue, &mut stop, |report| monitor.apply(report, std::time::Instant::now()));
}
