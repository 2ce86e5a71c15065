//! The host's one conversion between SDK types and contract (WIT) types, per
//! type and direction. (The guest's are in `fulcrum_sdk::guest`.)

use fulcrum_sdk as sdk;

use super::bindings::types as wit;

/// An address as the contract carries it: two 64-bit halves of IPv6 bits.
fn ip(bits: u128) -> wit::Ip {
    wit::Ip { hi: (bits >> 64) as u64, lo: bits as u64 }
}

impl From<&sdk::Backend> for wit::Backend {
    fn from(b: &sdk::Backend) -> Self {
        wit::Backend {
            id: b.id,
            ip: ip(b.ip),
            port: b.port,
            weight: b.weight,
            state: match b.state {
                sdk::BackendState::Unknown => wit::BackendState::Unknown,
                sdk::BackendState::Up => wit::BackendState::Up,
                sdk::BackendState::Down => wit::BackendState::Down,
                sdk::BackendState::Draining => wit::BackendState::Draining,
            },
        }
    }
}

impl From<&sdk::Flow> for wit::Flow {
    fn from(flow: &sdk::Flow) -> Self {
        wit::Flow {
            client_ip: ip(flow.client_ip),
            client_port: flow.client_port,
            frontend_ip: ip(flow.frontend_ip),
            frontend_port: flow.frontend_port,
            protocol: match flow.protocol {
                sdk::Protocol::Tcp => wit::Protocol::Tcp,
                sdk::Protocol::Udp => wit::Protocol::Udp,
            },
        }
    }
}

impl From<wit::Selection> for sdk::Selection {
    fn from(selection: wit::Selection) -> Self {
        match selection {
            wit::Selection::Backend(id) => sdk::Selection::Backend(id),
            wit::Selection::Reject => sdk::Selection::Reject,
        }
    }
}

impl From<&sdk::Observation> for wit::Observation {
    fn from(o: &sdk::Observation) -> Self {
        wit::Observation {
            kind: match o.kind {
                sdk::ProbeKind::Tcp => wit::ProbeKind::Tcp,
                sdk::ProbeKind::Http => wit::ProbeKind::Http,
                sdk::ProbeKind::Https => wit::ProbeKind::Https,
                sdk::ProbeKind::Signal => wit::ProbeKind::Signal,
            },
            outcome: match o.outcome {
                sdk::Outcome::Ok => wit::Outcome::Ok,
                sdk::Outcome::Refused => wit::Outcome::Refused,
                sdk::Outcome::Reset => wit::Outcome::Reset,
                sdk::Outcome::Timeout => wit::Outcome::Timeout,
                sdk::Outcome::TlsError => wit::Outcome::TlsError,
                sdk::Outcome::HttpStatus => wit::Outcome::HttpStatus,
            },
            latency_us: o.latency_us,
            status: o.status,
            headers: o.headers.clone(),
            body: o.body.clone(),
        }
    }
}

impl From<wit::Verdict> for sdk::Verdict {
    fn from(v: wit::Verdict) -> Self {
        sdk::Verdict {
            health: match v.health {
                wit::Health::Up => sdk::Health::Up,
                wit::Health::Down => sdk::Health::Down,
                wit::Health::Drain => sdk::Health::Drain,
            },
            weight: v.weight,
            reason: v.reason,
        }
    }
}
