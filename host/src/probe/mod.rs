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

pub mod check;
pub mod monitor;
pub mod state;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use fulcrum_sdk::ProbeKind;
use fulcrum_sdk::algo::mix;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::Error;
use crate::config::{Config, ProbeConfig, ProbeProtocol};
pub use check::ProbeTarget;
pub use monitor::{Monitor, Report, Source};

/// One probing duty: a probe or signal of one backend.
#[derive(Debug)]
pub struct Duty {
    /// The reload generation it belongs to.
    pub generation: u64,
    pub pool: usize,
    pub backend: usize,
    pub source: Source,
    pub target: ProbeTarget,
}

/// Every probing duty of `config`'s pools, TLS set up, as generation
/// `generation`; an error names the probe's config line and what is wrong.
pub fn duties(config: &Config, generation: u64) -> Result<Vec<Duty>, Error> {
    let mut duties = Vec::new();
    for (p, pool) in config.pools.iter().enumerate() {
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
            for (b, backend) in pool.backends.iter().enumerate() {
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
                let target = ProbeTarget { addr, config: Arc::clone(&shared), kind, tls };
                duties.push(Duty { generation, pool: p, backend: b, source, target });
            }
        }
    }
    Ok(duties)
}

/// Where in its interval a duty starts: spread by a hash of who it is.
fn offset(duty: &Duty, interval: Duration) -> Duration {
    let source = match duty.source {
        Source::Probe => 0,
        Source::Signal(i) => i as u64 + 1,
    };
    let h = mix(mix(duty.pool as u64, duty.backend as u64), source);
    Duration::from_nanos(h % interval.as_nanos().max(1) as u64)
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
        let (generation, pool, backend, source) = (duty.generation, duty.pool, duty.backend, duty.source);
        tokio::spawn(async move {
            let observation = check::probe(&target).await;
            if observation.outcome == fulcrum_sdk::Outcome::Timeout {
                // No answer counts at the end of the probe's interval (B6).
                tokio::time::sleep_until(sent + interval).await;
            }
            let _ = reports.send(Report { generation, pool, backend, source, seq, observation }.into());
        });
    }
}
