//! The control thread: probes (tokio tasks), the health monitor (outside
//! tokio: it calls health plugins), applying reloads, the admin API, and the
//! reload triggers (SIGHUP, file changes).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify_debouncer_mini::notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use super::reload::{self, Prepared, PreparedFrontend};
use super::{ReloadReply, Shared};
use crate::error::DrainError;
use crate::live::{State, Trigger, WorkerCommand};
use crate::probe::{self, Duty, DutyKey, Monitor, Report};

/// A reload run as a task of the control thread's runtime.
type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// How long file changes settle before a reload.
const FILE_DEBOUNCE: Duration = Duration::from_millis(200);

/// How often passive back-offs and slow starts are looked at.
const TICK: Duration = Duration::from_millis(100);

/// What reaches the control thread.
pub enum ControlMsg {
    Report(Report),
    /// Runs of data-path failures in this pool (passive health): at most one
    /// per pool is on its way, see [`crate::pool::Pool::take_passive_reports`].
    DataPathFailures(std::sync::Weak<crate::pool::Pool>),
    /// Time passed: passive back-offs end, slow starts ramp.
    Tick,
    /// Apply a prepared config; `done` when it is in effect.
    Apply(Box<Prepared>, oneshot::Sender<()>),
    /// Reload the config file (every trigger comes this way, see
    /// [`Shared::request_reload`]), then answer with the outcome.
    Reload {
        trigger: Trigger,
        reply: ReloadReply,
    },
    /// Every backend's health, for a takeover (the old process's side).
    ExportHealth(std::sync::mpsc::Sender<Vec<probe::Carried>>),
    /// Drain or undrain a backend (admin API).
    Drain {
        pool: String,
        addr: SocketAddr,
        drained: bool,
        reply: oneshot::Sender<Result<(), DrainError>>,
    },
}

impl std::fmt::Debug for ControlMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ControlMsg::Report(_) => "Report",
            ControlMsg::DataPathFailures(_) => "DataPathFailures",
            ControlMsg::Tick => "Tick",
            ControlMsg::Apply(..) => "Apply",
            ControlMsg::Reload { .. } => "Reload",
            ControlMsg::Drain { .. } => "Drain",
            ControlMsg::ExportHealth(_) => "ExportHealth",
        })
    }
}

impl From<Report> for ControlMsg {
    fn from(report: Report) -> Self {
        ControlMsg::Report(report)
    }
}

struct Control {
    shared: Arc<Shared>,
    handle: Handle,
    monitor: Monitor,
    /// The running probe tasks, by duty.
    probes: HashMap<DutyKey, (Duty, AbortHandle)>,
    /// Id of the next probe task.
    next_duty: u64,
    /// One reload at a time, whatever triggered it.
    reloading: Arc<tokio::sync::Mutex<()>>,
    watcher: Option<Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>>,
}

pub fn run(
    shared: Arc<Shared>,
    initial: Prepared,
    admin: Option<std::net::TcpListener>,
    mut queue: mpsc::UnboundedReceiver<ControlMsg>,
    mut stop: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let Some(runtime) = crate::threads::current_thread_runtime("control") else {
        let _ = ready.send(());
        return;
    };
    let handle = runtime.handle().clone();
    let mut control = Control {
        shared: Arc::clone(&shared),
        handle: handle.clone(),
        monitor: Monitor::default(),
        probes: HashMap::new(),
        next_duty: 1,
        reloading: Arc::default(),
        watcher: None,
    };
    control.apply(initial);
    let _ = ready.send(());
    {
        let _context = handle.enter();
        if let Some(listener) = admin {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let api: Arc<dyn crate::admin::Handle> = Arc::clone(&shared) as _;
                    handle.spawn(crate::admin::serve(listener, api, shared.taken_over.subscribe()));
                }
                Err(e) => tracing::error!("admin API: cannot register its listener: {e}"),
            }
        }
        handle.spawn(reload_on_sighup(Arc::clone(&shared)));
        let ticks = shared.control.clone();
        handle.spawn(async move {
            let mut ticker = tokio::time::interval(TICK);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if ticks.send(ControlMsg::Tick).is_err() {
                    return;
                }
            }
        });
    }
    crate::threads::serve_outside_runtime(&runtime, &mut queue, &mut stop, |msg, tasks: &mut Vec<Task>| match msg {
        ControlMsg::Report(report) => {
            control.shared.metrics.probe_result(&report);
            control.monitor.apply(report, Instant::now());
        }
        ControlMsg::DataPathFailures(pool) => {
            if let Some(pool) = pool.upgrade() {
                let now = Instant::now();
                for addr in pool.take_passive_reports() {
                    control.monitor.data_path_failures(&pool.name, addr, now);
                }
            }
        }
        ControlMsg::Tick => control.monitor.tick(Instant::now()),
        ControlMsg::Apply(prepared, done) => {
            control.apply(*prepared);
            let _ = done.send(());
        }
        ControlMsg::Reload { trigger, reply } => {
            let (shared, reloading) = (Arc::clone(&control.shared), Arc::clone(&control.reloading));
            tasks.push(Box::pin(async move {
                let _one_at_a_time = reloading.lock().await;
                reply(reload::run(shared, trigger).await);
            }));
        }
        ControlMsg::Drain { pool, addr, drained, reply } => {
            let _ = reply.send(control.monitor.set_drain(&pool, addr, drained, Instant::now()));
        }
        ControlMsg::ExportHealth(reply) => {
            let _ = reply.send(control.monitor.export(Instant::now()));
        }
    });
}

impl Control {
    /// Switches to a prepared config: probes first (a duty whose work did
    /// not change goes on, schedule and probe in flight included), pools and
    /// health next, then what frontends serve with and where they listen.
    fn apply(&mut self, p: Prepared) {
        let mut running = std::mem::take(&mut self.probes);
        let mut ids = HashMap::with_capacity(p.duties.len());
        for mut duty in p.duties {
            let key = duty.key();
            let task = match running.remove(&key) {
                Some((old, task)) if old.same_work(&duty) => (old, task),
                replaced => {
                    if let Some((_, task)) = replaced {
                        task.abort();
                    }
                    duty.id = self.next_duty;
                    self.next_duty += 1;
                    let task = self.handle.spawn(probe::run(duty.clone(), self.shared.control.clone())).abort_handle();
                    (duty, task)
                }
            };
            ids.insert(key.clone(), task.0.id);
            self.probes.insert(key, task);
        }
        for (_, (_, task)) in running {
            task.abort();
        }
        for runtime in &p.pools {
            // Runs of data-path failures come here (set once per pool).
            let (control, pool) = (self.shared.control.clone(), Arc::downgrade(&runtime.pool));
            runtime.pool.set_passive_sink(crate::pool::PassiveSink(Box::new(move || {
                let _ = control.send(ControlMsg::DataPathFailures(pool.clone()));
            })));
        }
        self.monitor.reconfigure(&p.pools, &ids, Instant::now());
        // A takeover: health as the old process had it, before any frontend serves.
        let carried = self
            .shared
            .inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(|i| std::mem::take(&mut i.health));
        if let Some(carried) = carried.filter(|c| !c.is_empty()) {
            self.monitor.restore(&carried, Instant::now());
            tracing::info!(backends = carried.len(), "health carried over from the old process");
        }
        let mut frontends = Vec::with_capacity(p.frontends.len());
        for prepared in p.frontends {
            match prepared {
                PreparedFrontend::Kept(frontend, binding, readys) => {
                    // The new balancer's instances first: a flow that sees the
                    // new binding finds its worker's instance ready.
                    for (handover, ready) in frontend.handovers.iter().zip(readys) {
                        handover.put(ready);
                    }
                    frontend.flows.set_limit(binding.config.max_flows);
                    frontend.binding.store(Arc::new(*binding));
                    frontends.push(frontend);
                }
                PreparedFrontend::New(frontend, listeners) => {
                    // One socket per worker; a takeover may hand over more (the
                    // old process had more workers): some workers serve two.
                    let workers = &self.shared.workers;
                    for (i, (listener, selector)) in listeners.into_iter().enumerate() {
                        workers[i % workers.len()].send(WorkerCommand::Start(
                            listener,
                            Arc::clone(&frontend),
                            selector,
                        ));
                    }
                    tracing::info!(frontend = %frontend.name, addr = %frontend.addr, "frontend listening");
                    frontends.push(frontend);
                }
            }
        }
        for frontend in p.removed {
            // A UDP frontend whose address a new one takes closes at once
            // (its flows end; their clients' next datagrams reach the new one).
            let udp = |f: &crate::live::Frontend| f.binding.load().config.protocol == crate::config::Protocol::Udp;
            let taken = udp(&frontend)
                && frontends.iter().any(|f| f.id != frontend.id && udp(f) && overlaps(f.addr, frontend.addr));
            if taken {
                // The new frontend alone on the address before the reload is done.
                frontend.close_sockets();
                let close = |_, closed| Some(WorkerCommand::Close(frontend.id, closed));
                crate::live::ask_workers(&self.shared.workers, close, Duration::from_secs(1));
            } else {
                for worker in &self.shared.workers {
                    worker.send(WorkerCommand::Stop(frontend.id));
                }
                frontend.close_sockets();
            }
            tracing::info!(frontend = %frontend.name, addr = %frontend.addr, "frontend closed; its flows go on");
        }
        let watched = p.config.runtime.watch.then(|| p.config.plugin_files());
        self.shared.state.store(Arc::new(State { config: p.config, frontends, pools: p.pools }));
        match watched {
            Some(files) => self.watch(files),
            None => self.watcher = None,
        }
    }

    /// Watches the config file and the plugin files for changes (debounced).
    fn watch(&mut self, plugins: Vec<PathBuf>) {
        self.watcher = None;
        let Some(config) = self.shared.config_path.clone() else { return };
        let files: HashSet<PathBuf> =
            std::iter::once(config).chain(plugins).map(|f| std::fs::canonicalize(&f).unwrap_or(f)).collect();
        let dirs: HashSet<PathBuf> = files.iter().filter_map(|f| f.parent().map(PathBuf::from)).collect();
        let tx = self.shared.control.clone();
        let watched = files.clone();
        // What each file holds now: an event that changes no content (a
        // process reading the config, a `touch`) reloads nothing.
        let mut seen: HashMap<PathBuf, Option<[u8; 32]>> =
            files.iter().map(|f| (f.clone(), content_digest(f))).collect();
        let debouncer = new_debouncer(FILE_DEBOUNCE, move |events: DebounceEventResult| {
            let Ok(events) = events else { return };
            if !events
                .iter()
                .any(|e| watched.contains(&std::fs::canonicalize(&e.path).unwrap_or_else(|_| e.path.clone())))
            {
                return;
            }
            let mut changed = false;
            for (file, digest) in &mut seen {
                let now = content_digest(file);
                changed |= now != *digest;
                *digest = now;
            }
            if changed {
                // The outcome is logged and counted by the reload itself.
                let _ = tx.send(ControlMsg::Reload { trigger: Trigger::File, reply: Box::new(|_| ()) });
            }
        });
        match debouncer {
            Ok(mut debouncer) => {
                for dir in &dirs {
                    if let Err(e) = debouncer.watcher().watch(dir, RecursiveMode::NonRecursive) {
                        tracing::warn!("cannot watch {} for changes: {e}", dir.display());
                    }
                }
                self.watcher = Some(debouncer);
            }
            Err(e) => tracing::warn!("cannot watch files for changes: {e}"),
        }
    }
}

/// SHA-256 of a file's content (none if it cannot be read: gone, say).
fn content_digest(path: &std::path::Path) -> Option<[u8; 32]> {
    use sha2::Digest;
    std::fs::read(path).ok().map(|bytes| sha2::Sha256::digest(&bytes).into())
}

/// SIGHUP reloads the config.
async fn reload_on_sighup(shared: Arc<Shared>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reload with POST /reload or by editing the config");
        return;
    };
    while hangups.recv().await.is_some() {
        // The outcome is logged and counted by the reload itself.
        let _ = shared.reload_answer(Trigger::Signal).await;
    }
}

/// Do sockets bound to `a` and `b` receive datagrams for one address (the
/// same port, the same IP or a wildcard)?
fn overlaps(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
