//! # Health probes
//!
//! ```text
//!  control thread:  probe tasks (tokio) ──Report──> Monitor (outside tokio)
//!                   check::probe per interval      health plugin -> verdict
//!                                                  state::HealthMachine (sans-io)
//!                                                  -> new pool snapshot (ArcSwap)
//! ```
//!
//! Each backend of a pool with `[pool.probe]` is probed every `interval`
//! (starts spread over one interval, so a large pool does not probe in
//! bursts), and by each `[[pool.signal]]`. A probe that times out is reported
//! at the end of its interval, so that a backend that stops answering is
//! marked down after more than threshold x interval and less than
//! (threshold + 1) x interval (B6). The [`monitor::Monitor`] runs the health
//! plugins and the state machines and publishes new snapshots; the data path
//! only loads them.
//!
//! A duty is known by its pool, backend address and source ([`DutyKey`]),
//! not by where it sits in the config: a reload that leaves a duty's work
//! unchanged keeps its task running (its schedule, its probe in flight), so
//! that reloads, however often, never delay a verdict (B6 holds under a
//! reload every second). A changed or removed duty's task is stopped, and
//! its reports, late ones included, are dropped by its id.

pub mod check;
pub mod monitor;
pub mod state;
pub mod tls;

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_sdk::ProbeKind;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::Error;
use crate::config::{Config, ProbeConfig, ProbeProtocol};
pub use check::ProbeTarget;
pub use monitor::{Carried, Monitor, Report, Source};

/// Who a duty is: pool, backend (its configured address) and source.
pub type DutyKey = (Arc<str>, SocketAddr, Source);

/// One probing duty: a probe or signal of one backend.
#[derive(Clone, Debug)]
pub struct Duty {
    /// Its task's id (given when it is started), carried by its reports.
    pub id: u64,
    pub pool: Arc<str>,
    pub backend: SocketAddr,
    pub source: Source,
    pub target: ProbeTarget,
}

impl Duty {
    pub fn key(&self) -> DutyKey {
        (Arc::clone(&self.pool), self.backend, self.source)
    }

    /// Does `other` probe the same way (address, kind, every setting)? Then
    /// a running task of this duty can go on as `other`'s.
    pub fn same_work(&self, other: &Duty) -> bool {
        self.target.addr == other.target.addr
            && self.target.kind == other.target.kind
            && *self.target.config == *other.target.config
    }
}

/// Every probing duty of `config`'s pools, TLS set up; an error names the
/// probe's config line and what is wrong.
pub fn duties(config: &Config) -> Result<Vec<Duty>, Error> {
    let mut duties = Vec::new();
    for pool in &config.pools {
        let name: Arc<str> = Arc::from(pool.name.as_str());
        let probes = pool.probe.iter().map(|c| (Source::Probe, c));
        let signals = pool.signals.iter().enumerate().map(|(i, c)| (Source::Signal(i), c));
        for (source, probe) in probes.chain(signals) {
            let shared = Arc::new(probe.clone());
            let setup_error = |error| Error::Probe {
                file: config.file.clone(),
                line: probe.line,
                pool: pool.name.clone(),
                error: Box::new(error),
            };
            let connector = match probe.protocol {
                ProbeProtocol::Https => Some(tls::connector(&probe.tls).map_err(setup_error)?),
                _ => None,
            };
            for backend in &pool.backends {
                let ip = backend.address.ip();
                let tls = match &connector {
                    Some(c) => Some((c.clone(), tls::server_name(&probe.tls, ip).map_err(setup_error)?)),
                    None => None,
                };
                let kind = match (source, probe.protocol) {
                    (Source::Signal(_), _) => ProbeKind::Signal,
                    (_, ProbeProtocol::Tcp) => ProbeKind::Tcp,
                    (_, ProbeProtocol::Http) => ProbeKind::Http,
                    (_, ProbeProtocol::Https) => ProbeKind::Https,
                };
                let addr = std::net::SocketAddr::new(ip, probe.port.unwrap_or(backend.address.port()));
                // A backend that expects a PROXY header on its data port
                // expects one from a probe of that port too.
                let proxy_header = pool
                    .proxy_protocol
                    .filter(|_| addr.port() == backend.address.port() && probe.protocol != ProbeProtocol::Tcp)
                    .map(check::health_check_header);
                let target = ProbeTarget { addr, config: Arc::clone(&shared), kind, tls, proxy_header };
                duties.push(Duty { id: 0, pool: Arc::clone(&name), backend: backend.address, source, target });
            }
        }
    }
    Ok(duties)
}

/// Where in its interval a duty starts: spread by a hash of who it is.
fn offset(duty: &Duty, interval: Duration) -> Duration {
    let mut hasher = std::hash::DefaultHasher::new();
    duty.key().hash(&mut hasher);
    let nanos = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(hasher.finish() % nanos)
}

/// Probes one backend forever (until the control runtime stops), sending
/// every result to the monitor.
pub async fn run<M: From<Report> + Send + 'static>(duty: Duty, reports: mpsc::UnboundedSender<M>) {
    let config: &ProbeConfig = &duty.target.config;
    let interval = config.interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + offset(&duty, interval), interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        ticker.tick().await;
        seq += 1;
        let sent = Instant::now();
        let (target, reports) = (duty.target.clone(), reports.clone());
        let (id, pool, backend, source) = (duty.id, Arc::clone(&duty.pool), duty.backend, duty.source);
        tokio::spawn(async move {
            let check::Probed { observation, certificate_expires_at } = check::probe(&target).await;
            if observation.outcome == fulcrum_sdk::Outcome::Timeout {
                // No answer counts at the end of the probe's interval (B6).
                tokio::time::sleep_until(sent + interval).await;
            }
            let _ = reports
                .send(Report { duty: id, pool, backend, source, seq, observation, certificate_expires_at }.into());
        });
    }
}
