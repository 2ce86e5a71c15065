//! `stock:p2c`: power of two choices over load and latency (as Envoy's
//! least-request and linkerd's peak-EWMA balancers). Each new flow draws two
//! eligible backends at random and takes the cheaper, where a backend's cost
//! is `(active flows + 1) x connect time / weight`: the host's live count of
//! established flows, and its moving average of the data path's connect
//! time (a backend not connected to yet costs as the fastest known, so it is
//! tried). A backend whose connects slow down gets fewer new flows, without
//! every worker herding to the same one.
//!
//! Config: `{ allow_hairpin = false }`.

use fulcrum_sdk::host::{active_flows, connect_time_us, random};
use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    allow_hairpin: bool,
}

#[derive(Default)]
pub struct PowerOfTwo {
    eligible: Vec<Backend>,
    allow_hairpin: bool,
}

/// What the host says of one candidate: (connect time µs, active flows).
type Reading = (u64, u64);

impl PowerOfTwo {
    /// Two host calls: the candidate's connect time and active flows.
    fn read(&self, i: usize) -> Reading {
        let id = self.eligible[i].id;
        (u64::from(connect_time_us(id)), u64::from(active_flows(id)))
    }

    /// Cost of eligible backend `i` with `reading`, scaled so that weights
    /// compare; a backend not connected to yet costs as `floor`.
    fn cost(&self, i: usize, (latency, active): Reading, floor: u64) -> u128 {
        let latency = if latency == 0 { floor } else { latency };
        // Divide by weight without losing precision: cross-multiply by 100.
        u128::from(active + 1) * u128::from(latency) * 100 / u128::from(self.eligible[i].weight.max(1))
    }

    fn allowed(&self, i: usize, flow: &Flow) -> bool {
        self.allow_hairpin || !self.eligible[i].is_client_of(flow)
    }
}

impl Balancer for PowerOfTwo {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.allow_hairpin = config.parse::<Settings>()?.allow_hairpin;
        Ok(())
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.eligible = backends.iter().filter(|b| b.is_eligible() && b.weight > 0).copied().collect();
    }

    fn select(&mut self, flow: &Flow) -> Selection {
        let n = self.eligible.len();
        if n == 0 {
            return Selection::Reject;
        }
        let r = random();
        let a = (r % n as u64) as usize;
        // A second, distinct backend when there is one.
        let b = if n > 1 { (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n } else { a };
        let (a_ok, b_ok) = (self.allowed(a, flow), self.allowed(b, flow));
        let pick = match (a_ok, b_ok) {
            (true, true) if a != b => {
                let (ra, rb) = (self.read(a), self.read(b));
                let floor = [ra.0, rb.0].into_iter().filter(|&t| t > 0).min().unwrap_or(1);
                if self.cost(b, rb, floor) < self.cost(a, ra, floor) { b } else { a }
            }
            (true, _) => a,
            (false, true) => b,
            (false, false) => match (0..n).find(|&i| self.allowed(i, flow)) {
                Some(i) => i,
                None => return Selection::Reject,
            },
        };
        Selection::Backend(self.eligible[pick].id)
    }
}

fulcrum_sdk::export_balancer!(PowerOfTwo);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::host::Signals;
    use fulcrum_sdk::testing::{backends, flow, set_signals};

    fn share_of(p: &mut PowerOfTwo, id: u32, n: usize) -> usize {
        (0..n).filter(|_| p.select(&flow("10.1.1.1:1000", "10.9.9.9:80")) == Selection::Backend(id)).count()
    }

    #[test]
    fn slow_connects_lose_flows() {
        let mut p = PowerOfTwo::default();
        p.init(&Config::new("{}")).unwrap();
        p.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)]));
        set_signals(0, Signals { connect_time_us: 100, active_flows: 3, ..Signals::default() });
        set_signals(1, Signals { connect_time_us: 5000, active_flows: 0, ..Signals::default() });
        // 4 x 100 < 1 x 5000: the fast one wins while its load is light.
        assert_eq!(share_of(&mut p, 0, 100), 100);
        // Heavier load on the fast one tips it over.
        set_signals(0, Signals { connect_time_us: 100, active_flows: 80, ..Signals::default() });
        assert_eq!(share_of(&mut p, 1, 100), 100);
    }

    #[test]
    fn untried_backends_are_tried_and_weights_count() {
        let mut p = PowerOfTwo::default();
        p.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)]));
        set_signals(0, Signals { connect_time_us: 100, active_flows: 1, ..Signals::default() });
        set_signals(1, Signals::default());
        assert_eq!(share_of(&mut p, 1, 50), 50, "no connect yet: costs as the fastest, and is less loaded");
        p.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 10)]));
        set_signals(1, Signals { connect_time_us: 100, active_flows: 0, ..Signals::default() });
        // 2 x 100 / 100 < 1 x 100 / 10.
        assert_eq!(share_of(&mut p, 0, 50), 50);
    }

    #[test]
    fn never_the_client_and_rejects_when_empty() {
        let mut p = PowerOfTwo::default();
        assert_eq!(p.select(&flow("10.1.1.1:1", "10.9.9.9:80")), Selection::Reject);
        p.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)]));
        for _ in 0..50 {
            assert_eq!(p.select(&flow("10.0.0.1:5000", "10.9.9.9:80")), Selection::Backend(1));
        }
        assert!(p.init(&Config::new(r#"{"bogus": 1}"#)).is_err());
    }
}
