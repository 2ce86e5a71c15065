//! The plugin's view of the world: flows, backends and selections.
//!
//! Addresses are kept as 128-bit integers (IPv4 mapped into IPv6), the way the
//! contract carries them: comparing and hashing them costs nothing on the hot
//! path; [`Flow::client`] and [`Backend::addr`] give `SocketAddr`s when needed.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Transport protocol of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The name shown to users (status, metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// An IP address as the contract carries it: IPv6 bits, IPv4 mapped.
pub fn ip_to_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The inverse of [`ip_to_bits`]: mapped IPv4 comes back as IPv4.
pub fn bits_to_ip(bits: u128) -> IpAddr {
    let v6 = Ipv6Addr::from(bits);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// A new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub client_ip: u128,
    pub client_port: u16,
    pub frontend_ip: u128,
    pub frontend_port: u16,
    pub protocol: Protocol,
}

impl Flow {
    pub fn new(client: SocketAddr, frontend: SocketAddr, protocol: Protocol) -> Self {
        Flow {
            client_ip: ip_to_bits(client.ip()),
            client_port: client.port(),
            frontend_ip: ip_to_bits(frontend.ip()),
            frontend_port: frontend.port(),
            protocol,
        }
    }

    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(bits_to_ip(self.client_ip), self.client_port)
    }

    pub fn frontend(&self) -> SocketAddr {
        SocketAddr::new(bits_to_ip(self.frontend_ip), self.frontend_port)
    }
}

/// Health of a backend as the host believes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Not probed yet, or no probe configured: eligible.
    Unknown,
    Up,
    Down,
    /// No new flows; established flows continue.
    Draining,
}

impl BackendState {
    /// The name shown to users (status, metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Unknown => "unknown",
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
        }
    }
}

/// One backend of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Index in the list last given to `backends_changed`; what `select` returns.
    pub id: u32,
    pub ip: u128,
    pub port: u16,
    /// Effective weight, 0..=100; 0 takes no new flows.
    pub weight: u32,
    pub state: BackendState,
}

impl Backend {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(bits_to_ip(self.ip), self.port)
    }

    /// May take new flows: up (or not yet probed), not draining, weight above 0.
    pub fn is_eligible(&self) -> bool {
        matches!(self.state, BackendState::Up | BackendState::Unknown) && self.weight > 0
    }

    /// The hairpin trap (B15): is this backend the very host the flow comes
    /// from? A client coming from the frontend's own address is the balancer's
    /// host itself (every local process shares that address, loopback
    /// included), so it is never taken for a backend.
    pub fn is_client_of(&self, flow: &Flow) -> bool {
        self.ip == flow.client_ip && flow.client_ip != flow.frontend_ip
    }
}

/// A balancer's answer for one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Selection {
    /// The id of the chosen backend.
    Backend(u32),
    /// No backend may take this flow.
    Reject,
}

/// What kind of probe produced an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Tcp,
    Http,
    Https,
    /// A custom signal (`[[pool.signal]]`), e.g. a backend's CPU load.
    Signal,
}

impl ProbeKind {
    /// The name shown to users (status, metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http => "http",
            ProbeKind::Https => "https",
            ProbeKind::Signal => "signal",
        }
    }
}

/// How a probe ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Connected (TCP) or answered (HTTP: see `status`).
    Ok,
    /// The connection was refused.
    Refused,
    /// The connection was reset.
    Reset,
    /// No answer within the probe's timeout.
    Timeout,
    /// The TLS handshake failed (certificate not trusted, wrong name, ...).
    TlsError,
    /// An HTTP answer whose status is not 200 (see `status`).
    HttpStatus,
}

impl Outcome {
    /// The name shown to users (status, metrics, logs), snake_case.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
            Outcome::TlsError => "tls_error",
            Outcome::HttpStatus => "http_status",
        }
    }
}

/// One probe result, as a health plugin sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub kind: ProbeKind,
    pub outcome: Outcome,
    pub latency_us: u64,
    /// The HTTP status, for HTTP(S) probes and signals that got an answer.
    pub status: Option<u16>,
    /// Selected response headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The first bytes of the response body.
    pub body: Vec<u8>,
}

impl Observation {
    /// The stock verdict for a probe that got no HTTP answer at all (refused,
    /// reset, timeout, TLS failure): down, with the reason. `None` when it
    /// did get an answer (judge the status then).
    pub fn failure_verdict(&self) -> Option<Verdict> {
        let reason = match self.outcome {
            Outcome::Ok | Outcome::HttpStatus => return None,
            Outcome::Refused => "connection refused",
            Outcome::Reset => "connection reset",
            Outcome::Timeout => "no answer within the timeout",
            Outcome::TlsError => "TLS handshake failed",
        };
        Some(Verdict::down(reason))
    }

    /// The body as text (lossy).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A health plugin's judgement of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    Up,
    Down,
    /// No new flows; established flows continue (backpressure).
    Drain,
}

/// A health plugin's answer for one observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub health: Health,
    /// 0..=100 percent of the configured weight.
    pub weight: Option<u32>,
    pub reason: Option<String>,
}

impl Verdict {
    pub fn up() -> Self {
        Verdict { health: Health::Up, weight: None, reason: None }
    }

    pub fn down(reason: impl Into<String>) -> Self {
        Verdict { health: Health::Down, weight: None, reason: Some(reason.into()) }
    }

    pub fn drain(reason: impl Into<String>) -> Self {
        Verdict { health: Health::Drain, weight: None, reason: Some(reason.into()) }
    }

    /// The same verdict with a weight (percent, clamped to 0..=100).
    pub fn with_weight(mut self, percent: u32) -> Self {
        self.weight = Some(percent.min(100));
        self
    }
}

/// A plugin's configuration: the pool's `*_config` TOML table, as JSON.
#[derive(Clone, Debug, Default)]
pub struct Config {
    json: String,
}

impl Config {
    pub fn new(json: impl Into<String>) -> Self {
        Config { json: json.into() }
    }

    /// The raw JSON text.
    pub fn as_str(&self) -> &str {
        &self.json
    }

    /// Deserializes the config; an empty config reads as `{}`.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let text = if self.json.trim().is_empty() { "{}" } else { &self.json };
        serde_json::from_str(text).map_err(|e| format!("invalid plugin config: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_bits_round_trip() {
        for text in ["127.0.0.1", "::1", "10.1.2.3", "2001:db8::7"] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(bits_to_ip(ip_to_bits(ip)), ip);
        }
    }

    #[test]
    fn hairpin_only_when_client_is_a_remote_backend() {
        let flow = Flow::new("127.0.0.2:5000".parse().unwrap(), "127.0.0.1:80".parse().unwrap(), Protocol::Tcp);
        let backend = |addr: &str| {
            let addr: SocketAddr = addr.parse().unwrap();
            Backend { id: 0, ip: ip_to_bits(addr.ip()), port: addr.port(), weight: 100, state: BackendState::Up }
        };
        assert!(backend("127.0.0.2:9000").is_client_of(&flow));
        assert!(!backend("127.0.0.3:9000").is_client_of(&flow));
        let local = Flow::new("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:80".parse().unwrap(), Protocol::Tcp);
        assert!(!backend("127.0.0.1:9000").is_client_of(&local));
    }

    #[test]
    fn empty_config_parses_as_empty_table() {
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct C {
            x: u32,
        }
        assert_eq!(Config::new("").parse::<C>().unwrap().x, 0);
        assert_eq!(Config::new(r#"{"x":3}"#).parse::<C>().unwrap().x, 3);
        assert!(Config::new(r#"{"x":"no"}"#).parse::<C>().is_err());
    }
}
