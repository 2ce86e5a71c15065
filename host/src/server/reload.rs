//! Reload: parse -> validate -> load plugins (off the data path, reusing
//! those that did not change) -> diff frontends and pools against what runs
//! -> a [`Prepared`] change that the control thread applies at once.
//!
//! Nothing running is touched until every step has succeeded: a bad config,
//! a plugin that fails to load or a listener that cannot bind leaves the old
//! config serving, and the error is logged, counted and shown in `/status`.
//! What a reload keeps: established flows (on the backends they have), the
//! health and counters of backends that stay (by address), plugin instances
//! whose plugin did not change. `[runtime]` and `[admin]` changes need a restart.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::oneshot;

use super::Shared;
use super::control::ControlMsg;
use crate::config::diff::{Change, diff};
use crate::config::{AdminConfig, Config, ConfigError, PluginRef, PoolConfig, ProbeConfig};
use crate::error::{Error, ReloadError};
use crate::flow::FlowTable;
use crate::flow_log::FlowLog;
use crate::live::{Binding, FlowRecorder, Frontend, PoolRuntime, ReloadResult, State, Trigger};
use crate::net::Listener;
use crate::plugin::{
    BalancerPlugin, HandOver, HealthPlugin, NotPrimed, PluginError, PluginInfo, PluginRuntime, Ready, Selector,
};
use crate::pool::Pool;
use crate::probe::{self, Duty};

/// A frontend of the new config.
#[derive(Debug)]
pub enum PreparedFrontend {
    /// Already listening on the same address: gets the new binding, and
    /// when its balancer changed, each worker's first instance of it.
    Kept(Arc<Frontend>, Box<Binding>, Vec<Ready>),
    /// New (or moved): one bound socket per worker, each with the selector
    /// its loop picks backends with (first instance already primed).
    New(Arc<Frontend>, Vec<(Listener, Selector)>),
}

/// A fully loaded config, ready to apply.
#[derive(Debug)]
pub struct Prepared {
    pub config: Config,
    pub pools: Vec<Arc<PoolRuntime>>,
    pub frontends: Vec<PreparedFrontend>,
    /// Frontends that stop listening (their flows go on).
    pub removed: Vec<Arc<Frontend>>,
    pub duties: Vec<Duty>,
    /// Settings not applied (they need a restart), for the reload's outcome.
    pub notes: Vec<String>,
    /// What the reload changes (see [`crate::config::diff`]).
    pub changes: Vec<Change>,
}

/// Is the loaded plugin `info` still what `source` with `config` would load?
fn unchanged(runtime: &PluginRuntime, info: &PluginInfo, old: (&PluginRef, &str), new: (&PluginRef, &str)) -> bool {
    old == new && runtime.digest(new.0).is_ok_and(|d| d == info.digest)
}

/// Loads the plugins of every pool, reusing `current`'s where nothing changed.
pub(crate) fn load_pools(
    config: &Config,
    current: Option<&State>,
    runtime: &Arc<PluginRuntime>,
) -> Result<Vec<Arc<PoolRuntime>>, Error> {
    let plugin_error = |p: &PoolConfig, line, key, error: PluginError| Error::Plugin {
        file: config.file.clone(),
        line,
        pool: p.name.clone(),
        key,
        error: Box::new(error),
    };
    let mut pools = Vec::with_capacity(config.pools.len());
    for p in &config.pools {
        let old = current.and_then(|s| s.pool(&p.name));
        let balancer = match old {
            Some(o)
                if unchanged(
                    runtime,
                    &o.balancer.info,
                    (&o.config.balancer, &o.config.balancer_config),
                    (&p.balancer, &p.balancer_config),
                ) =>
            {
                Arc::clone(&o.balancer)
            }
            _ => BalancerPlugin::load(runtime, &p.balancer, &p.balancer_config)
                .map_err(|e| plugin_error(p, p.balancer_line, "balancer", e))?,
        };
        let health = |c: &ProbeConfig, was: Option<(&ProbeConfig, &Arc<HealthPlugin>)>| match was {
            Some((w, h))
                if unchanged(runtime, &h.info, (&w.health, &w.health_config), (&c.health, &c.health_config)) =>
            {
                Ok(Arc::clone(h))
            }
            _ => HealthPlugin::load(runtime, &c.health, &c.health_config)
                .map_err(|e| plugin_error(p, c.line, "health", e)),
        };
        let old_probe = old.and_then(|o| o.config.probe.as_ref().zip(o.probe.as_ref()));
        let probe = p.probe.as_ref().map(|c| health(c, old_probe)).transpose()?;
        let signals = p
            .signals
            .iter()
            .enumerate()
            .map(|(i, c)| health(c, old.and_then(|o| o.config.signals.get(i).zip(o.signals.get(i)))))
            .collect::<Result<_, _>>()?;
        let pool = old.map_or_else(|| Arc::new(Pool::new(p)), |o| Arc::clone(&o.pool));
        pools.push(Arc::new(PoolRuntime { config: p.clone(), pool, balancer, probe, signals }));
    }
    Ok(pools)
}

/// Every pool's `source_addresses` is an address this host can send from.
pub(crate) fn check_sources(config: &Config) -> Result<(), Error> {
    for p in &config.pools {
        for &addr in &p.source_addresses {
            crate::net::check_source(addr).map_err(|error| Error::Source { pool: p.name.clone(), addr, error })?;
        }
    }
    Ok(())
}

/// `count` instances of `pool`'s balancer, each primed with the pool's
/// current snapshot; the first that cannot be fails it all, naming the pool
/// and the plugin (a binding never switches to instances some workers lack).
fn prime(config: &Config, pool: &PoolRuntime, count: usize) -> Result<Vec<Ready>, Error> {
    (0..count)
        .map(|_| {
            Ready::prepare(&pool.balancer, &pool.pool).map_err(|NotPrimed(fault)| Error::Plugin {
                file: config.file.clone(),
                line: pool.config.balancer_line,
                pool: pool.config.name.clone(),
                key: "balancer",
                error: Box::new(PluginError::Prime {
                    plugin: pool.balancer.info.name.clone(),
                    backends: pool.pool.load().backends.len(),
                    fault,
                }),
            })
        })
        .collect()
}

/// Everything but the switch: plugins loaded, probes set up, new listeners
/// bound. Runs on any thread but the control thread.
pub(crate) fn prepare(shared: &Shared, mut config: Config) -> Result<Prepared, Error> {
    let current = shared.state.load_full();
    let mut notes = Vec::new();
    let restart_only = |c: &crate::config::RuntimeConfig| (c.workers, c.plugin_deadline, c.plugin_memory);
    if restart_only(&current.config.runtime) != restart_only(&config.runtime) && !current.pools.is_empty() {
        notes.push("[runtime] workers and plugin limits take effect at the next restart".to_owned());
    }
    let (admin, admin_notes) = admin_on_reload(current.config.admin.as_ref(), config.admin.take());
    config.admin = admin;
    notes.extend(admin_notes);
    for note in &notes {
        tracing::warn!("reload: {note}");
    }
    // What changes, from the configs alone (the loads, binds and primes below act on it).
    let resolved: Vec<(String, std::net::SocketAddr)> =
        current.frontends.iter().map(|f| (f.name.clone(), f.addr)).collect();
    let changes = diff(&current.config, &resolved, &config);
    let pools = load_pools(&config, Some(&current), &shared.runtime)?;
    check_sources(&config)?;
    let duties = probe::duties(&config)?;
    let mut frontends = Vec::with_capacity(config.frontends.len());
    for f in &config.frontends {
        // Validation checked the name; a miss here is a bug, reported as the config's.
        let pool = pools.iter().find(|p| p.config.name == f.pool).ok_or_else(|| ConfigError {
            file: config.file.clone(),
            line: None,
            key: "frontend.pool".into(),
            message: format!("frontend `{}`: no pool named `{}`", f.name, f.pool),
        })?;
        // The flow log: the running one when its target is unchanged (its
        // queue and writer go on), else a new one (a bad path fails the load).
        let running_log = current.frontend(&f.name).and_then(|old| old.binding.load().recorder.log.clone());
        let log = match (&f.flow_log, running_log) {
            (None, _) => None,
            // Unchanged, and still the file the path names (a rotation
            // renamed it away: the reload that follows opens the new one).
            (Some(target), Some(log)) if log.target == *target && log.is_current() => Some(log),
            (Some(target), _) => Some(Arc::new(FlowLog::open(target).map_err(|e| ConfigError {
                file: config.file.clone(),
                line: None,
                key: "frontend.flow_log".into(),
                message: format!("frontend `{}`: cannot open the flow log {target}: {e}", f.name),
            })?)),
        };
        let recorder =
            Arc::new(FlowRecorder { frontend: Arc::from(f.name.as_str()), pool: Arc::clone(&pool.pool), log });
        let binding = Binding { config: f.clone(), pool: Arc::clone(pool), recorder };
        // Kept unless the diff says its listener is new (added, or replaced:
        // another address or protocol).
        let kept = current.frontend(&f.name).filter(|_| {
            !changes.iter().any(|c| {
                matches!(c, Change::FrontendAdded { frontend } | Change::FrontendReplaced { frontend } if *frontend == f.name)
            })
        });
        frontends.push(match kept {
            Some(old) => {
                // A new balancer: each worker's instance, primed here (off the data path).
                // All or nothing: one that cannot be primed fails the reload.
                let readys = if Arc::ptr_eq(&old.binding.load().pool.balancer, &pool.balancer) {
                    Vec::new()
                } else {
                    prime(&config, pool, old.handovers.len())?
                };
                PreparedFrontend::Kept(Arc::clone(old), Box::new(binding), readys)
            }
            None => {
                let listen_error = |addr, error| Error::Listen { frontend: f.name.clone(), addr, error };
                let inherited =
                    shared.inherited.lock().ok().and_then(|mut i| i.as_mut()?.take(&f.name, f.protocol, f.listen));
                let sockets = match inherited {
                    // A takeover: the running process's own sockets (B17).
                    Some(sockets) if !sockets.is_empty() => sockets,
                    _ => {
                        // The first bind resolves port 0; the other workers join that port.
                        let first = Listener::bind(f.protocol, f.listen).map_err(|e| listen_error(f.listen, e))?;
                        let addr = first.local_addr().map_err(|e| listen_error(f.listen, e))?;
                        let mut sockets = vec![first];
                        for _ in 1..shared.workers.len() {
                            sockets.push(Listener::bind(f.protocol, addr).map_err(|e| listen_error(addr, e))?);
                        }
                        sockets
                    }
                };
                let addr = sockets[0].local_addr().map_err(|e| listen_error(f.listen, e))?;
                let dups = sockets
                    .iter()
                    .map(Listener::dup)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| listen_error(addr, e))?;
                // Each worker's first instance, primed here (off the data path):
                // one that cannot be primed fails the whole config.
                let handovers: Vec<Arc<HandOver>> = sockets.iter().map(|_| Arc::default()).collect();
                let readys = prime(&config, pool, sockets.len())?;
                let listeners = sockets
                    .into_iter()
                    .zip(&handovers)
                    .zip(readys)
                    .map(|((socket, handover), first)| {
                        (socket, Selector::new(Some(first), shared.preparer.clone(), Arc::clone(handover)))
                    })
                    .collect();
                let frontend = Frontend {
                    id: shared.next_frontend_id.fetch_add(1, Ordering::Relaxed),
                    name: f.name.clone(),
                    addr,
                    flows: Arc::new(FlowTable::new(f.max_flows)),
                    binding: ArcSwap::from_pointee(binding),
                    handovers,
                    sockets: std::sync::Mutex::new(dups),
                    halt: shared.halt.subscribe(),
                    udp_gate: shared.udp_gate.subscribe(),
                };
                PreparedFrontend::New(Arc::new(frontend), listeners)
            }
        });
    }
    let kept_ids: Vec<u64> = frontends
        .iter()
        .filter_map(|f| match f {
            PreparedFrontend::Kept(f, ..) => Some(f.id),
            PreparedFrontend::New(..) => None,
        })
        .collect();
    let removed = current.frontends.iter().filter(|f| !kept_ids.contains(&f.id)).cloned().collect();
    Ok(Prepared { config, pools, frontends, removed, duties, notes, changes })
}

/// The `[admin]` a reload puts in effect, and what it leaves for a restart.
/// The API keeps listening where it was bound at start; a new token applies
/// at once; a reload never opens an API that was closed (a token it removes
/// stays required until a restart).
fn admin_on_reload(running: Option<&AdminConfig>, new: Option<AdminConfig>) -> (Option<AdminConfig>, Vec<String>) {
    let mut notes = Vec::new();
    let admin = match (running, new) {
        (None, None) => None,
        (None, Some(new)) => {
            notes.push(format!("[admin] added (listen {}): the admin API starts at the next restart", new.listen));
            None
        }
        (Some(running), None) => {
            notes.push(
                "[admin] removed: the admin API keeps serving, as configured before, until the next restart".to_owned(),
            );
            Some(running.clone())
        }
        (Some(running), Some(mut new)) => {
            if new.listen != running.listen {
                notes.push(format!(
                    "[admin] listen changed to {}: the admin API stays on {} until the next restart",
                    new.listen, running.listen
                ));
                new.listen = running.listen;
            }
            if new.token.is_none() && running.token.is_some() {
                notes.push("[admin] token removed: the admin API keeps requiring it until the next restart".to_owned());
                new.token = running.token.clone();
            }
            Some(new)
        }
    };
    (admin, notes)
}

/// Re-reads the config file and applies it; records and logs the outcome.
/// Only the control thread runs it (see [`Shared::request_reload`]).
pub(crate) async fn run(shared: Arc<Shared>, trigger: Trigger) -> Result<ReloadResult, ReloadError> {
    let started = Instant::now();
    let draining = || shared.draining.lock().map_or(true, |d| d.is_some());
    let outcome = async {
        // Shutting down: no reload may open listeners again.
        if draining() {
            return Err(ReloadError::ShuttingDown);
        }
        let path = shared.config_path.clone().ok_or(ReloadError::NoConfigFile)?;
        let (tx, rx) = oneshot::channel();
        let loader = Arc::clone(&shared);
        // Loading compiles plugins: a thread of its own, off the data path and
        // off the control thread's runtime (probes keep running).
        std::thread::Builder::new()
            .name("fulcrum-reload".into())
            .spawn(move || {
                let prepared = Config::load(&path).map_err(Error::from).and_then(|config| prepare(&loader, config));
                let _ = tx.send(prepared);
            })
            .map_err(|error| Error::Resources { what: "the reload thread", error })?;
        let prepared = rx.await.map_err(|_| ReloadError::ShuttingDown)??;
        let notes = (prepared.notes.clone(), prepared.changes.clone());
        if draining() {
            return Err(ReloadError::ShuttingDown);
        }
        let (done, applied) = oneshot::channel();
        shared.control.send(ControlMsg::Apply(Box::new(prepared), done)).map_err(|_| ReloadError::ShuttingDown)?;
        applied.await.map_err(|_| ReloadError::ShuttingDown)?;
        Ok::<_, ReloadError>(notes)
    }
    .await;
    let (outcome, (notes, changes)) = match outcome {
        Ok(notes) => (Ok(()), notes),
        Err(e) => (Err(e), (Vec::new(), Vec::new())),
    };
    let result = ReloadResult {
        at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        trigger,
        ok: outcome.is_ok(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        error: outcome.as_ref().err().map(ToString::to_string),
        notes,
        changes,
    };
    shared.reloads.record(&result);
    match &outcome {
        Ok(()) => tracing::info!(
            trigger = trigger.as_str(),
            duration_ms = result.duration_ms,
            changes = result.changes.len(),
            "reload applied"
        ),
        Err(e) => tracing::error!(trigger = trigger.as_str(), "reload failed, the running config stays: {e}"),
    }
    outcome.map(|()| result)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;
    use crate::live::{ReloadLog, WorkerLine};
    use crate::plugin::PluginLimits;

    fn config(balancer_config: &str, frontend: &str) -> Config {
        let text = format!(
            "[[frontend]]\n{frontend}\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbalancer = \"stock:round-robin\"\n\
             balancer_config = {balancer_config}\nbackends = [ {{ address = \"127.0.0.1:9001\" }} ]\n\
             [pool.probe]\nprotocol = \"tcp\"\n"
        );
        Config::parse(Path::new("reload.toml"), &text).unwrap()
    }

    const WEB: &str = "name = \"web\"\nlisten = \"127.0.0.1:0\"";

    fn shared(config: &Config) -> Shared {
        let runtime =
            PluginRuntime::new(PluginLimits { deadline: Duration::from_millis(50), memory: 16 << 20 }).unwrap();
        Shared {
            runtime,
            state: ArcSwap::from_pointee(State { config: config.clone(), frontends: Vec::new(), pools: Vec::new() }),
            config_path: None,
            workers: vec![WorkerLine::new(|_| ()), WorkerLine::new(|_| ())],
            preparer: crate::plugin::Preparer::start().unwrap(),
            control: mpsc::unbounded_channel().0,
            reloads: ReloadLog::default(),
            metrics: crate::telemetry::Metrics::new(),
            next_frontend_id: AtomicU64::new(1),
            halt: tokio::sync::watch::channel(false).0,
            draining: std::sync::Mutex::new(None),
            inherited: std::sync::Mutex::new(None),
            admin_socket: None,
            taken_over: tokio::sync::watch::channel(false).0,
            udp_gate: tokio::sync::watch::channel(true).0,
        }
    }

    /// Takes `prepared` as what runs now (what the control thread's apply stores).
    fn run(shared: &Shared, prepared: Prepared) -> Arc<State> {
        let frontends = prepared
            .frontends
            .into_iter()
            .map(|f| match f {
                PreparedFrontend::Kept(frontend, ..) | PreparedFrontend::New(frontend, _) => frontend,
            })
            .collect();
        shared.state.store(Arc::new(State { config: prepared.config, frontends, pools: prepared.pools }));
        shared.state.load_full()
    }

    #[test]
    fn unchanged_plugins_and_pools_are_reused_and_changed_ones_reloaded() {
        let first = config("{}", WEB);
        let shared = shared(&first);
        let before = run(&shared, prepare(&shared, first.clone()).unwrap());
        // Nothing changed: the same plugin instances, the same pool (health, counters).
        let same = prepare(&shared, first).unwrap();
        assert!(Arc::ptr_eq(&same.pools[0].balancer, &before.pools[0].balancer));
        assert!(Arc::ptr_eq(same.pools[0].probe.as_ref().unwrap(), before.pools[0].probe.as_ref().unwrap()));
        assert!(Arc::ptr_eq(&same.pools[0].pool, &before.pools[0].pool));
        // The balancer's config changed: a new balancer, the same pool.
        let changed = prepare(&shared, config("{}\nallow_hairpin = true", WEB)).unwrap();
        assert!(!Arc::ptr_eq(&changed.pools[0].balancer, &before.pools[0].balancer));
        assert!(Arc::ptr_eq(&changed.pools[0].pool, &before.pools[0].pool));
    }

    #[test]
    fn a_frontend_on_the_same_address_is_kept_and_a_moved_one_replaced() {
        let first = config("{}", WEB);
        let shared = shared(&first);
        let running = run(&shared, prepare(&shared, first.clone()).unwrap());
        let web = Arc::clone(&running.frontends[0]);
        // As written (port 0) or as resolved: kept, with its flow table.
        for listen in ["127.0.0.1:0".to_owned(), web.addr.to_string()] {
            let p = prepare(&shared, config("{}", &format!("name = \"web\"\nlisten = \"{listen}\""))).unwrap();
            assert!(matches!(&p.frontends[0], PreparedFrontend::Kept(f, ..) if Arc::ptr_eq(f, &web)), "{listen}");
            assert!(p.removed.is_empty());
        }
        // Another protocol on the address: a new frontend (one socket per worker), the old one removed.
        let udp = prepare(&shared, config("{}", &format!("{WEB}\nprotocol = \"udp\""))).unwrap();
        assert!(matches!(&udp.frontends[0], PreparedFrontend::New(f, sockets) if f.id != web.id && sockets.len() == 2));
        assert_eq!(udp.removed.iter().map(|f| f.id).collect::<Vec<_>>(), vec![web.id]);
        // A renamed frontend is another frontend.
        let renamed = prepare(&shared, config("{}", "name = \"api\"\nlisten = \"127.0.0.1:0\"")).unwrap();
        assert!(matches!(&renamed.frontends[0], PreparedFrontend::New(..)));
        assert_eq!(renamed.removed.len(), 1);
    }

    /// Which stock plugins exist is the loader's to say; `check` names the
    /// line and key, and a health name is no balancer (nor the other way).
    #[test]
    fn unknown_stock_plugins_are_named_at_their_line() {
        let balancer = config("{}", WEB);
        let mut wrong = balancer.clone();
        wrong.pools[0].balancer = PluginRef::Stock("http-200".into());
        let e = crate::check(&wrong).unwrap_err().to_string();
        assert!(e.starts_with("reload.toml:8: pool `web` key `balancer`: no stock plugin `http-200` here"), "{e}");
        let mut wrong = balancer;
        if let Some(probe) = wrong.pools[0].probe.as_mut() {
            probe.health = PluginRef::Stock("round-robin".into());
        }
        let e = crate::check(&wrong).unwrap_err().to_string();
        assert!(e.contains("key `health`: no stock plugin `round-robin` here (expected one of: http-200"), "{e}");
    }

    #[test]
    fn a_config_whose_listener_cannot_bind_fails_whole() {
        let first = config("{}", WEB);
        let shared = shared(&first);
        run(&shared, prepare(&shared, first).unwrap());
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        // Bound without SO_REUSEPORT: the new frontend cannot join it.
        let e = prepare(&shared, config("{}", &format!("name = \"api\"\nlisten = \"{addr}\""))).unwrap_err();
        assert!(matches!(&e, Error::Listen { frontend, .. } if frontend == "api"), "{e}");
    }
}
