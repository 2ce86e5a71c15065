//! `/diagnose`: the troubleshooter. Each finding names what it concerns (a
//! pool's backend, or a frontend), the evidence (counters, last errors) and
//! the fix in one sentence. The classic traps of an L4 load balancer:
//!
//! | kind | what |
//! |---|---|
//! | `probe_passes_data_fails` | the probe passes, the data port refuses or times out (B14) |
//! | `hairpin_clients` | clients that are themselves backends of the pool (B15) |
//! | `source_ports_exhausted`, `source_port_pressure` | out of (or near the end of) source ports toward a backend (B16) |
//! | `all_backends_down` | every backend of a pool is down (B7) |
//! | `probe_timeout`, `probe_refused` | a probe that gets no answer (silent drop, firewall-like) vs one refused |
//! | `certificate_invalid`, `certificate_expiring` | an HTTPS probe's certificate fails verification, or expires within 14 days |
//! | `idle_timeouts_high` | many TCP flows end by idle timeout (shorter than the clients' keep-alive) |
//! | `probe_through_proxy` | a probe answered by a proxy (`Via`): the health of a host in front of others |

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use fulcrum_sdk::{BackendState, Outcome};
use serde::{Deserialize, Serialize};

use crate::config::Protocol;
use crate::flow::CloseReason;
use crate::live::{PoolRuntime, State};
use crate::pool::Backend;

/// A certificate that expires within this many days is a finding.
pub const CERTIFICATE_WARNING_DAYS: i64 = 14;
/// Failures in a row on the data port, with a passing probe, that make a finding (B14).
const DATA_FAILURES: u32 = 3;
/// Idle-timeout endings that make a finding: at least this many ...
const IDLE_ENDINGS: u64 = 10;
/// ... and at least this share (%) of the flows that ended.
const IDLE_SHARE: u64 = 20;
/// Sockets toward one backend, as a share (%) of the source-port range, that make "pressure" (B16).
const PORT_PRESSURE: usize = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Flows fail or will: `fulcrum diagnose` exits non-zero.
    Error,
    Warning,
}

/// What a finding is about (the table above); JSON: its snake_case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    IdleTimeoutsHigh,
    AllBackendsDown,
    SourcePortsExhausted,
    ProbePassesDataFails,
    ProbeTimeout,
    ProbeRefused,
    CertificateInvalid,
    CertificateExpiring,
    ProbeThroughProxy,
    HairpinClients,
    SourcePortPressure,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::IdleTimeoutsHigh => "idle_timeouts_high",
            FindingKind::AllBackendsDown => "all_backends_down",
            FindingKind::SourcePortsExhausted => "source_ports_exhausted",
            FindingKind::ProbePassesDataFails => "probe_passes_data_fails",
            FindingKind::ProbeTimeout => "probe_timeout",
            FindingKind::ProbeRefused => "probe_refused",
            FindingKind::CertificateInvalid => "certificate_invalid",
            FindingKind::CertificateExpiring => "certificate_expiring",
            FindingKind::ProbeThroughProxy => "probe_through_proxy",
            FindingKind::HairpinClients => "hairpin_clients",
            FindingKind::SourcePortPressure => "source_port_pressure",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    pub kind: FindingKind,
    pub pool: Option<String>,
    pub frontend: Option<String>,
    pub backend: Option<String>,
    pub summary: String,
    pub evidence: Vec<String>,
    pub fix: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Diagnosis {
    /// Errors first.
    pub findings: Vec<Finding>,
    /// What cannot be seen from here and is worth a look by hand.
    pub checks: Vec<String>,
}

/// The findings of what runs now: the clock and the host's socket table
/// read here, judged by [`judge`].
pub fn diagnose(state: &State) -> Diagnosis {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    judge(state, now, &SocketCounts::read())
}

/// The findings of `state` at `now` (Unix seconds), given the host's
/// sockets: pure, no clock, no I/O.
pub fn judge(state: &State, now: u64, sockets: &SocketCounts) -> Diagnosis {
    let mut findings = Vec::new();
    for p in &state.pools {
        pool_findings(p, now, sockets, &mut findings);
    }
    for f in &state.frontends {
        let binding = f.binding.load();
        if binding.config.protocol != Protocol::Tcp {
            continue; // a UDP flow ending by idle timeout is the normal end
        }
        let idle = f.flows.closed(CloseReason::IdleTimeout);
        let served = [
            CloseReason::Completed,
            CloseReason::ClientError,
            CloseReason::BackendError,
            CloseReason::IdleTimeout,
            CloseReason::AllBackendsDown,
            CloseReason::Shutdown,
        ];
        let ended: u64 = served.iter().map(|r| f.flows.closed(*r)).sum();
        if idle >= IDLE_ENDINGS && idle.saturating_mul(100) >= ended.saturating_mul(IDLE_SHARE) {
            let timeout = humantime::format_duration(binding.config.idle_timeout);
            findings.push(Finding {
                severity: Severity::Warning,
                kind: FindingKind::IdleTimeoutsHigh,
                pool: Some(binding.config.pool.clone()),
                frontend: Some(f.name.clone()),
                backend: None,
                summary: format!(
                    "{idle} of {ended} flows ended by idle timeout ({} %)",
                    idle.saturating_mul(100) / ended.max(1)
                ),
                evidence: vec![
                    format!("flows_ended{{reason=idle_timeout}} = {idle}"),
                    format!("idle_timeout = {timeout}, tcp_reset = {}", binding.config.tcp_reset),
                ],
                fix: format!(
                    "Raise the frontend's idle_timeout ({timeout}) above the clients' keep-alive interval, or have clients send keep-alives more often."
                ),
            });
        }
    }
    findings.sort_by_key(|f| f.severity);
    let checks = vec![
        "Probe through an appliance: a proxy that adds no `Via` header cannot be seen from here. Check that each probe reaches the backend itself, not a VIP or proxy in front of other hosts (their health would become this backend's).".to_owned(),
    ];
    Diagnosis { findings, checks }
}

fn pool_findings(p: &PoolRuntime, now: u64, sockets: &SocketCounts, out: &mut Vec<Finding>) {
    let pool = &p.config.name;
    let snapshot = p.pool.load();
    let finding =
        |severity, kind: FindingKind, backend: Option<&Backend>, summary: String, evidence, fix: String| Finding {
            severity,
            kind,
            pool: Some(pool.clone()),
            frontend: None,
            backend: backend.map(|b| b.addr.to_string()),
            summary,
            evidence,
            fix,
        };
    if !snapshot.backends.is_empty() && snapshot.backends.iter().all(|b| b.state == BackendState::Down) {
        let evidence = snapshot
            .backends
            .iter()
            .map(|b| format!("{}: down ({})", b.addr, b.reason.as_deref().unwrap_or("no reason given")))
            .collect();
        out.push(finding(
            Severity::Error,
            FindingKind::AllBackendsDown,
            None,
            format!("every backend of pool `{pool}` is down: new flows are refused"),
            evidence,
            "Bring at least one backend back (each one's reason is listed); until then every new flow is refused."
                .into(),
        ));
    }
    let exhausted = p.pool.source_ports_exhausted.load(Ordering::Relaxed);
    if exhausted > 0 {
        out.push(finding(
            Severity::Error,
            FindingKind::SourcePortsExhausted,
            None,
            format!("{exhausted} backend connects of pool `{pool}` found no free source port on this host"),
            vec![
                format!("fulcrum_source_ports_exhausted_total{{pool={pool}}} = {exhausted}"),
                format!("source_addresses = {:?}", p.config.source_addresses),
                sockets.range_text(),
            ],
            "Add source addresses (source_addresses) or widen net.ipv4.ip_local_port_range; backends that keep connections open longer need fewer new ones.".into(),
        ));
    }
    let probe = p.config.probe.as_ref();
    for b in &snapshot.backends {
        let stats = &b.stats;
        let last = stats.last_probe();
        let probe_port = probe.and_then(|c| c.port).unwrap_or(b.addr.port());
        let ago = |at: u64| format!("{} s ago", now.saturating_sub(at));
        if let Some(lp) = &last {
            let failures = stats.recent_failures.load(Ordering::Relaxed);
            let passive = b.cause == Some(crate::pool::Cause::Passive);
            if lp.outcome == Outcome::Ok && (failures >= DATA_FAILURES || passive) {
                out.push(finding(
                    Severity::Error,
                    FindingKind::ProbePassesDataFails,
                    Some(b),
                    format!(
                        "{} passes its probe (port {probe_port}) but its data port {} refuses or times out",
                        b.addr,
                        b.addr.port()
                    ),
                    vec![
                        format!("last probe: ok, {}", ago(lp.at)),
                        format!(
                            "data port: {failures} failed connects in a row, {} in all",
                            stats.connect_failures.load(Ordering::Relaxed)
                        ),
                        format!("state: {} ({})", b.state.as_str(), b.reason.as_deref().unwrap_or("-")),
                    ],
                    if probe_port == b.addr.port() {
                        format!(
                            "The probe reaches port {probe_port} but data connects fail: check what differs for them (source_addresses a firewall does not allow, a connection limit on the backend)."
                        )
                    } else {
                        format!(
                            "Start the service on port {} or point the probe at the port that serves (probe.port = {}): a probe of another port proves nothing about the data port.",
                            b.addr.port(),
                            b.addr.port()
                        )
                    },
                ));
            }
            match lp.outcome {
                Outcome::Timeout => out.push(finding(
                    if b.state == BackendState::Down { Severity::Error } else { Severity::Warning },
                    FindingKind::ProbeTimeout,
                    Some(b),
                    format!(
                        "probes of {} (port {probe_port}) get no answer in time: dropped on the way (as a firewall does), or a service that accepts and never answers",
                        b.addr
                    ),
                    vec![format!("last probe: timeout after {:.0} ms, {}", lp.latency_ms, ago(lp.at)), format!("state: {}", b.state.as_str())],
                    format!("Let this host's address through the backend's firewall or security group to port {probe_port} and check that the host is up; if connects succeed, the service hangs (or waits for a PROXY header the pool does not send)."),
                )),
                Outcome::Refused => out.push(finding(
                    if b.state == BackendState::Down { Severity::Error } else { Severity::Warning },
                    FindingKind::ProbeRefused,
                    Some(b),
                    format!("probes of {} are refused: nothing listens on port {probe_port}", b.addr),
                    vec![format!("last probe: refused, {}", ago(lp.at)), format!("state: {}", b.state.as_str())],
                    format!("Start the health endpoint on port {probe_port}, or set probe.port to a port that listens."),
                )),
                Outcome::TlsError => out.push(finding(
                    Severity::Error,
                    FindingKind::CertificateInvalid,
                    Some(b),
                    format!("the HTTPS probe of {} fails its TLS handshake (certificate not trusted, expired, or for another name)", b.addr),
                    vec![format!("last probe: tls_error, {}", ago(lp.at))],
                    "Renew or fix the backend's certificate, or name its CA (tls_ca_file) and name (tls_server_name); tls_verify = false only for self-signed backends.".into(),
                )),
                _ => {}
            }
            if let Some(expires) = lp.certificate_expires_at {
                let left = expires.saturating_sub(i64::try_from(now).unwrap_or(i64::MAX));
                // With verification off (a self-signed backend, on purpose), an
                // expired certificate is no outage: a warning.
                let verified = probe.is_some_and(|c| c.tls.verify);
                if left < CERTIFICATE_WARNING_DAYS * 86_400 {
                    let when = humantime::format_rfc3339_seconds(
                        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(expires.max(0) as u64),
                    );
                    out.push(finding(
                        if left <= 0 && verified { Severity::Error } else { Severity::Warning },
                        FindingKind::CertificateExpiring,
                        Some(b),
                        if left <= 0 {
                            format!("the certificate of {} (port {probe_port}) expired at {when}", b.addr)
                        } else {
                            format!(
                                "the certificate of {} (port {probe_port}) expires in {} days ({when})",
                                b.addr,
                                left / 86_400
                            )
                        },
                        vec![format!("certificate notAfter: {when}")],
                        format!("Renew the certificate of {} before {when}.", b.addr),
                    ));
                }
            }
            if let Some(via) = &lp.via {
                out.push(finding(
                    Severity::Warning,
                    FindingKind::ProbeThroughProxy,
                    Some(b),
                    format!("the probe of {} was answered by a proxy (Via: {via})", b.addr),
                    vec![format!("last probe: {} with `Via: {via}`, {}", lp.outcome.as_str(), ago(lp.at))],
                    "Probe the backend itself (its own address and port), not a proxy or appliance in front of other hosts.".into(),
                ));
            }
        }
        let hairpins = stats.hairpin_clients.load(Ordering::Relaxed);
        if hairpins > 0 && !p.config.allow_hairpin {
            out.push(finding(
                Severity::Warning,
                FindingKind::HairpinClients,
                Some(b),
                format!("{hairpins} flows to pool `{pool}` came from backend {}'s own host", b.addr),
                vec![
                    format!("client address {} is this backend's", b.addr.ip()),
                    "allow_hairpin = false: they go to other backends, never back to it (B15)".to_owned(),
                ],
                "Have the backend reach the service directly, not through its own load balancer: with one backend left such flows fail.".into(),
            ));
        }
        // Each source address has a range of its own toward a backend.
        let sources = p.config.source_addresses.len().max(1);
        if let Some(open) = sockets.toward(b.addr)
            && let Some(range) = sockets.range.map(|r| r * sources)
            && open.saturating_mul(100) >= range.saturating_mul(PORT_PRESSURE)
        {
            out.push(finding(
                Severity::Warning,
                FindingKind::SourcePortPressure,
                Some(b),
                format!("{open} sockets toward {} use {} % of this host's {range} source ports", b.addr, open * 100 / range.max(1)),
                vec![format!("{open} TCP sockets to {} (TIME_WAIT included)", b.addr), sockets.range_text()],
                "Add source addresses (source_addresses) or widen net.ipv4.ip_local_port_range before new connects fail.".into(),
            ));
        }
    }
}

/// TCP sockets of this host by remote address (from `/proc/net/tcp{,6}`),
/// and the size of the source-port range.
/// The host's TCP sockets by remote address, and its source-port range (from `/proc`).
#[derive(Debug, Default)]
pub struct SocketCounts {
    by_remote: std::collections::HashMap<SocketAddr, usize>,
    range: Option<usize>,
}

impl SocketCounts {
    pub fn read() -> Self {
        let mut by_remote = std::collections::HashMap::new();
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|t| {
            let mut ends = t.split_whitespace().filter_map(|n| n.parse::<usize>().ok());
            let (low, high) = (ends.next()?, ends.next()?);
            Some(high.saturating_sub(low) + 1)
        });
        // The per-socket table only when the host holds enough TCP sockets
        // (in use and in TIME_WAIT, `/proc/net/sockstat`) for pressure to be
        // possible: it is long on a busy host.
        let total = std::fs::read_to_string("/proc/net/sockstat").ok().and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("TCP:"))?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let value =
                |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)?.parse::<usize>().ok());
            Some(value("inuse")? + value("tw")?)
        });
        if range.is_none_or(|range| total.is_some_and(|total| total * 100 < range * PORT_PRESSURE)) {
            return SocketCounts { by_remote, range };
        }
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(file) else { continue };
            for line in text.lines().skip(1) {
                if let Some(remote) = line.split_whitespace().nth(2).and_then(proc_address) {
                    *by_remote.entry(remote).or_insert(0) += 1;
                }
            }
        }
        SocketCounts { by_remote, range }
    }

    fn toward(&self, addr: SocketAddr) -> Option<usize> {
        let mapped = match addr.ip() {
            std::net::IpAddr::V4(v4) => Some(SocketAddr::new(v4.to_ipv6_mapped().into(), addr.port())),
            std::net::IpAddr::V6(_) => None,
        };
        let count = |a: &SocketAddr| self.by_remote.get(a).copied().unwrap_or(0);
        let open = count(&addr) + mapped.as_ref().map_or(0, count);
        (open > 0).then_some(open)
    }

    fn range_text(&self) -> String {
        match self.range {
            Some(range) => format!("source-port range: {range} ports (net.ipv4.ip_local_port_range)"),
            None => "source-port range: unknown".to_owned(),
        }
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), as the kernel prints
/// them: each 32-bit word in host byte order.
fn proc_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| ip.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()))
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// `fulcrum diagnose`: asks the running instance at `admin` (with `token`)
/// for its findings.
pub async fn fetch(admin: SocketAddr, token: Option<&str>) -> Result<Diagnosis, String> {
    use http_body_util::BodyExt;
    // A wildcard listener is asked on loopback.
    let addr = match admin.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => SocketAddr::from(([127, 0, 0, 1], admin.port())),
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, admin.port())),
        _ => admin,
    };
    let ask = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(connection);
        let mut request = hyper::Request::get("/diagnose").header(hyper::header::HOST, addr.to_string());
        if let Some(token) = token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request =
            request.body(http_body_util::Empty::<bytes::Bytes>::new()).map_err(|e| format!("bad request: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("{addr}: {e}"))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| format!("{addr}: {e}"))?.to_bytes();
        if !status.is_success() {
            return Err(format!("{addr} answered {status}: {}", String::from_utf8_lossy(&body).trim()));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{addr}: not a diagnosis: {e}"))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), ask)
        .await
        .unwrap_or_else(|_| Err(format!("{addr} did not answer within 10 s")))
}

impl Diagnosis {
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// For a terminal: a finding per paragraph, errors first.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.findings.is_empty() {
            out += "No findings.\n";
        }
        for f in &self.findings {
            let severity = match f.severity {
                Severity::Error => "ERROR",
                Severity::Warning => "WARNING",
            };
            let at: Vec<String> = [("pool", &f.pool), ("backend", &f.backend), ("frontend", &f.frontend)]
                .iter()
                .filter_map(|(what, name)| name.as_ref().map(|n| format!("{what} {n}")))
                .collect();
            out += &format!("{severity} {} [{}]\n  {}\n", f.kind, at.join(", "), f.summary);
            for e in &f.evidence {
                out += &format!("  - {e}\n");
            }
            out += &format!("  fix: {}\n\n", f.fix);
        }
        for check in &self.checks {
            out += &format!("check by hand: {check}\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, PluginRef};
    use crate::plugin::{BalancerPlugin, PluginLimits, PluginRuntime};
    use crate::pool::{Cause, LastProbe, Pool};

    /// What runs for a config of one pool `web` over `backends`: no sockets.
    fn state(backends: &[&str]) -> State {
        let list: Vec<String> = backends.iter().map(|b| format!("{{ address = \"{b}\" }}")).collect();
        let text = format!(
            "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\npool = \"web\"\n\n\
             [[pool]]\nname = \"web\"\nbackends = [ {} ]\n",
            list.join(", ")
        );
        let config = Config::parse(std::path::Path::new("diagnose.toml"), &text).unwrap();
        let runtime =
            PluginRuntime::new(PluginLimits { deadline: Duration::from_millis(50), memory: 16 << 20 }).unwrap();
        let balancer = BalancerPlugin::load(&runtime, &PluginRef::Stock("round-robin".into()), "{}").unwrap();
        let pool = PoolRuntime {
            config: config.pools[0].clone(),
            pool: Arc::new(Pool::new(&config.pools[0])),
            balancer,
            probe: None,
            signals: Vec::new(),
        };
        State { config, frontends: Vec::new(), pools: vec![Arc::new(pool)] }
    }

    fn probe(outcome: Outcome, at: u64) -> LastProbe {
        LastProbe { outcome, status: None, latency_ms: 1.0, at, via: None, certificate_expires_at: None }
    }

    fn kinds(diagnosis: &Diagnosis) -> Vec<FindingKind> {
        diagnosis.findings.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn a_passive_ejection_with_a_passing_probe_is_probe_passes_data_fails_by_its_cause() {
        let state = state(&["10.0.0.1:80", "10.0.0.2:80"]);
        let pool = &state.pools[0].pool;
        let mut backends = pool.load().backends.clone();
        backends[0].state = BackendState::Down;
        backends[0].cause = Some(Cause::Passive);
        // Whatever the reason's words: the cause is what is judged.
        backends[0].reason = Some(Arc::from("out for a while"));
        backends[0].stats.set_last_probe(probe(Outcome::Ok, 100));
        backends[1].stats.set_last_probe(probe(Outcome::Ok, 100));
        pool.publish(backends);
        let diagnosis = judge(&state, 130, &SocketCounts::default());
        assert_eq!(kinds(&diagnosis), [FindingKind::ProbePassesDataFails], "{diagnosis:?}");
        let f = &diagnosis.findings[0];
        assert_eq!((f.severity, f.backend.as_deref()), (Severity::Error, Some("10.0.0.1:80")));
        assert!(f.evidence.iter().any(|e| e.contains("30 s ago")), "{f:?}");
    }

    #[test]
    fn every_backend_down_and_probe_outcomes_are_findings_of_their_kind() {
        let state = state(&["10.0.0.1:80", "10.0.0.2:80"]);
        let pool = &state.pools[0].pool;
        let mut backends = pool.load().backends.clone();
        for b in &mut backends {
            b.state = BackendState::Down;
            b.cause = Some(Cause::Probe);
        }
        backends[0].stats.set_last_probe(probe(Outcome::Timeout, 10));
        backends[1].stats.set_last_probe(probe(Outcome::Refused, 10));
        pool.publish(backends);
        let diagnosis = judge(&state, 20, &SocketCounts::default());
        assert_eq!(
            kinds(&diagnosis),
            [FindingKind::AllBackendsDown, FindingKind::ProbeTimeout, FindingKind::ProbeRefused],
            "{diagnosis:?}"
        );
        assert!(diagnosis.findings.iter().all(|f| f.severity == Severity::Error));
        // The JSON names are the kinds' snake_case names.
        let json = serde_json::to_value(&diagnosis.findings[0]).unwrap();
        assert_eq!(json["kind"], "all_backends_down");
    }

    #[test]
    fn proc_addresses_read_as_the_kernel_prints_them() {
        assert_eq!(proc_address("0100007F:1F90"), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(proc_address("00000000000000000000000001000000:0050"), Some("[::1]:80".parse().unwrap()));
        assert_eq!(proc_address("zz:1"), None);
        assert_eq!(proc_address("0100007F"), None);
    }

    #[test]
    fn a_healthy_pool_has_no_findings() {
        let state = state(&["10.0.0.1:80"]);
        state.pools[0].pool.load().backends[0].stats.set_last_probe(probe(Outcome::Ok, 5));
        assert!(judge(&state, 6, &SocketCounts::default()).findings.is_empty());
    }
}
