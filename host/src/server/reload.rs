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

use super::control::ControlMsg;
use super::{Shared, State};
use crate::Error;
use crate::config::{Config, PluginRef, PoolConfig, ProbeConfig};
use crate::flow::FlowTable;
use crate::plugin::{BalancerPlugin, HealthPlugin, PluginError, PluginInfo, PluginRuntime};
use crate::pool::Pool;
use crate::probe::{self, Duty};
use crate::proxy::{Binding, Frontend, Listener, PoolRuntime};

/// The outcome of one reload, as `/status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReloadResult {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `signal`, `api`, `file` or `start`.
    pub trigger: String,
    pub ok: bool,
    /// From the trigger to the new config in effect.
    pub duration_ms: f64,
    pub error: Option<String>,
}

/// A frontend of the new config.
#[derive(Debug)]
pub enum PreparedFrontend {
    /// Already listening on the same address: gets the new binding.
    Kept(Arc<Frontend>, Binding),
    /// New (or moved): one bound socket per worker.
    New(Arc<Frontend>, Vec<Listener>),
}

/// A fully loaded config, ready to apply.
#[derive(Debug)]
pub struct Prepared {
    pub config: Config,
    pub generation: u64,
    pub pools: Vec<Arc<PoolRuntime>>,
    pub frontends: Vec<PreparedFrontend>,
    /// Frontends that stop listening (their flows go on).
    pub removed: Vec<Arc<Frontend>>,
    pub duties: Vec<Duty>,
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

/// The probe duties of `config` (TLS set up), as generation `generation`.
pub(crate) fn duties(config: &Config, generation: u64) -> Result<Vec<Duty>, Error> {
    probe::duties(&config.pools, generation).map_err(|(pool, line, message)| Error::Probe {
        file: config.file.clone(),
        line,
        pool: config.pools[pool].name.clone(),
        message,
    })
}

/// Everything but the switch: plugins loaded, probes set up, new listeners
/// bound. Runs on any thread but the control thread.
pub(crate) fn prepare(shared: &Shared, config: Config) -> Result<Prepared, Error> {
    let current = shared.state.load_full();
    let restart_only = |c: &crate::config::RuntimeConfig| (c.workers, c.plugin_deadline, c.plugin_memory);
    if restart_only(&current.config.runtime) != restart_only(&config.runtime) && !current.pools.is_empty() {
        tracing::warn!("[runtime] workers and plugin limits take effect at the next restart");
    }
    let pools = load_pools(&config, Some(&current), &shared.runtime)?;
    let generation = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let duties = duties(&config, generation)?;
    let mut frontends = Vec::with_capacity(config.frontends.len());
    for f in &config.frontends {
        let pool = pools
            .iter()
            .find(|p| p.config.name == f.pool)
            .ok_or_else(|| Error::Internal(format!("frontend `{}`: pool `{}` vanished", f.name, f.pool)))?;
        let binding = Binding { config: f.clone(), pool: Arc::clone(pool) };
        let kept = current.frontend(&f.name).filter(|old| {
            let was = &old.binding.load().config;
            // The same address: as written before, or as resolved (port 0).
            (was.listen == f.listen || old.addr == f.listen) && was.protocol == f.protocol
        });
        frontends.push(match kept {
            Some(old) => PreparedFrontend::Kept(Arc::clone(old), binding),
            None => {
                let listen_error = |addr, error| Error::Listen { frontend: f.name.clone(), addr, error };
                // The first bind resolves port 0; the other workers join that port.
                let first = Listener::bind(f.protocol, f.listen).map_err(|e| listen_error(f.listen, e))?;
                let addr = first.local_addr().map_err(|e| listen_error(f.listen, e))?;
                let mut listeners = vec![first];
                for _ in 1..shared.workers.len() {
                    listeners.push(Listener::bind(f.protocol, addr).map_err(|e| listen_error(addr, e))?);
                }
                let frontend = Frontend {
                    id: shared.next_frontend_id.fetch_add(1, Ordering::Relaxed),
                    name: f.name.clone(),
                    addr,
                    flows: Arc::new(FlowTable::new(f.max_flows)),
                    binding: ArcSwap::from_pointee(binding),
                };
                PreparedFrontend::New(Arc::new(frontend), listeners)
            }
        });
    }
    let kept_ids: Vec<u64> = frontends
        .iter()
        .filter_map(|f| match f {
            PreparedFrontend::Kept(f, _) => Some(f.id),
            PreparedFrontend::New(..) => None,
        })
        .collect();
    let removed = current.frontends.iter().filter(|f| !kept_ids.contains(&f.id)).cloned().collect();
    Ok(Prepared { config, generation, pools, frontends, removed, duties })
}

/// Re-reads the config file and applies it; records and logs the outcome.
pub(crate) async fn run(shared: Arc<Shared>, trigger: &str) -> Result<ReloadResult, String> {
    let _one_at_a_time = shared.reload_lock.lock().await;
    let started = Instant::now();
    let outcome = async {
        let path = shared.config_path.clone().ok_or("this server was not started from a config file")?;
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
            .map_err(|e| format!("cannot start the reload thread: {e}"))?;
        let prepared = rx.await.map_err(|_| "the reload thread died".to_owned())?.map_err(|e| e.to_string())?;
        let (done, applied) = oneshot::channel();
        shared.control.send(ControlMsg::Apply(Box::new(prepared), done)).map_err(|_| "the control thread is gone")?;
        applied.await.map_err(|_| "the control thread is gone".to_owned())
    }
    .await;
    let result = ReloadResult {
        at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        trigger: trigger.to_owned(),
        ok: outcome.is_ok(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        error: outcome.as_ref().err().cloned(),
    };
    match &outcome {
        Ok(()) => {
            shared.reloads.ok.fetch_add(1, Ordering::Relaxed);
            tracing::info!(trigger, duration_ms = result.duration_ms, "reload applied");
        }
        Err(e) => {
            shared.reloads.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(trigger, "reload failed, the running config stays: {e}");
        }
    }
    *shared.reloads.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(result.clone());
    outcome.map(|()| result)
}
