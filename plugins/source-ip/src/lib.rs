//! `stock:source-ip`: client-IP affinity (the cloud LB's "2-tuple"
//! distribution, or "3-tuple" with `with_protocol`): every flow from one client
//! address lands on the same backend while the backend set stays the same.
//!
//! Config: `{ with_protocol = false, allow_hairpin = false }`.

use fulcrum_sdk::algo::{HashRing, hash_source_ip};
use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    with_protocol: bool,
    allow_hairpin: bool,
}

#[derive(Default)]
pub struct SourceIp {
    ring: HashRing,
    with_protocol: bool,
}

impl Balancer for SourceIp {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings = config.parse::<Settings>()?;
        self.with_protocol = settings.with_protocol;
        self.ring.set_allow_hairpin(settings.allow_hairpin);
        Ok(())
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.ring.rebuild(backends);
    }

    fn select(&mut self, flow: &Flow) -> Selection {
        self.ring.pick(hash_source_ip(flow, self.with_protocol), flow)
    }
}

fulcrum_sdk::export_balancer!(SourceIp);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, flow};

    #[test]
    fn one_client_one_backend() {
        let mut p = SourceIp::default();
        p.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100), ("10.0.0.3:80", 100)]));
        let first = p.select(&flow("10.1.1.1:40000", "10.9.9.9:80"));
        for port in 40001..40100 {
            assert_eq!(p.select(&flow(&format!("10.1.1.1:{port}"), "10.9.9.9:80")), first);
        }
        let mut seen = std::collections::HashSet::new();
        for host in 1..100 {
            seen.insert(p.select(&flow(&format!("10.1.2.{host}:40000"), "10.9.9.9:80")));
        }
        assert_eq!(seen.len(), 3);
    }
}
