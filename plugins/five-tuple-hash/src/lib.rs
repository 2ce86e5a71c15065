//! `stock:five-tuple-hash`: the cloud L4 default distribution. A flow's
//! 5-tuple (client ip/port, frontend ip/port, protocol) picks its backend
//! through a weighted Maglev table: a reconnect from the same source port lands
//! on the same backend, and few flows move when the backend set changes.
//!
//! Config: `{ allow_hairpin = false }`.

use fulcrum_sdk::algo::{HashRing, hash_five_tuple};
use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    allow_hairpin: bool,
}

#[derive(Default)]
pub struct FiveTupleHash {
    ring: HashRing,
}

impl Balancer for FiveTupleHash {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.ring.set_allow_hairpin(config.parse::<Settings>()?.allow_hairpin);
        Ok(())
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.ring.rebuild(backends);
    }

    fn select(&mut self, flow: &Flow) -> Selection {
        self.ring.pick(hash_five_tuple(flow), flow)
    }
}

fulcrum_sdk::export_balancer!(FiveTupleHash);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, flow};

    #[test]
    fn same_tuple_same_backend_and_ports_spread() {
        let mut p = FiveTupleHash::default();
        p.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100), ("10.0.0.3:80", 100)]));
        let first = p.select(&flow("10.1.1.1:40000", "10.9.9.9:80"));
        for _ in 0..50 {
            assert_eq!(p.select(&flow("10.1.1.1:40000", "10.9.9.9:80")), first);
        }
        let mut seen = std::collections::HashSet::new();
        for port in 40000..40100 {
            seen.insert(p.select(&flow(&format!("10.1.1.1:{port}"), "10.9.9.9:80")));
        }
        assert_eq!(seen.len(), 3);
    }
}
