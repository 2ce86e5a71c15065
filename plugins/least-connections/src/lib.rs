//! `stock:least-connections`: the eligible backend with the fewest established
//! flows relative to its weight (weighted least connections), read live from
//! the host. Up to 32 backends it scans them all; above that it compares two
//! random ones (power of two choices), which stays O(1) and avoids herding.
//! Ties rotate so that equal backends share new flows.
//!
//! Config: `{ allow_hairpin = false }`.

use fulcrum_sdk::host::{active_flows, random};
use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    allow_hairpin: bool,
}

/// Above this many eligible backends, use two random choices instead of a scan.
const FULL_SCAN_MAX: usize = 32;

#[derive(Default)]
pub struct LeastConnections {
    eligible: Vec<Backend>,
    cursor: usize,
    allow_hairpin: bool,
}

impl LeastConnections {
    fn allowed(&self, b: &Backend, flow: &Flow) -> bool {
        self.allow_hairpin || !b.is_client_of(flow)
    }

    /// Is `a` less loaded than `b`, weights considered? (flows+1)/weight compared.
    fn lighter(a: (u64, &Backend), b: (u64, &Backend)) -> bool {
        (a.0 + 1) * u64::from(b.1.weight) < (b.0 + 1) * u64::from(a.1.weight)
    }
}

impl Balancer for LeastConnections {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.allow_hairpin = config.parse::<Settings>()?.allow_hairpin;
        Ok(())
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.eligible = backends.iter().filter(|b| b.is_eligible()).copied().collect();
    }

    fn select(&mut self, flow: &Flow) -> Selection {
        let n = self.eligible.len();
        if n == 0 {
            return Selection::Reject;
        }
        self.cursor = self.cursor.wrapping_add(1);
        let mut best: Option<(u64, usize)> = None;
        if n <= FULL_SCAN_MAX {
            for i in 0..n {
                self.consider((self.cursor + i) % n, flow, &mut best);
            }
        } else {
            let r = random();
            self.consider((r % n as u64) as usize, flow, &mut best);
            self.consider(((r >> 32) % n as u64) as usize, flow, &mut best);
            if best.is_none() {
                // Both random picks were the client itself: scan.
                for i in 0..n {
                    self.consider(i, flow, &mut best);
                }
            }
        }
        best.map_or(Selection::Reject, |(_, i)| Selection::Backend(self.eligible[i].id))
    }
}

impl LeastConnections {
    /// Makes eligible backend `i` the best so far if it is allowed and lighter.
    fn consider(&self, i: usize, flow: &Flow, best: &mut Option<(u64, usize)>) {
        let b = &self.eligible[i];
        if !self.allowed(b, flow) {
            return;
        }
        let flows = u64::from(active_flows(b.id));
        if best.is_none_or(|(f, j)| Self::lighter((flows, b), (f, &self.eligible[j]))) {
            *best = Some((flows, i));
        }
    }
}

fulcrum_sdk::export_balancer!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, flow, set_active_flows};

    #[test]
    fn avoids_the_loaded_backend_and_rotates_ties() {
        let mut p = LeastConnections::default();
        p.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100), ("10.0.0.3:80", 100)]));
        set_active_flows(0, 2);
        let picks: Vec<_> = (0..6).map(|_| p.select(&flow("10.1.1.1:1", "10.9.9.9:80"))).collect();
        assert!(!picks.contains(&Selection::Backend(0)));
        assert!(picks.contains(&Selection::Backend(1)) && picks.contains(&Selection::Backend(2)));
    }

    #[test]
    fn weights_scale_load_and_large_sets_use_two_choices() {
        let list: Vec<String> = (0..64).map(|i| format!("10.0.1.{i}:80")).collect();
        let pairs: Vec<(&str, u32)> = list.iter().map(|s| (s.as_str(), 100)).collect();
        let mut p = LeastConnections::default();
        p.backends_changed(&backends(&pairs));
        for id in 0..64 {
            set_active_flows(id, if id == 5 { 0 } else { 1000 });
        }
        // Never picks a heavily loaded backend over an idle one it compared.
        for _ in 0..100 {
            assert!(matches!(p.select(&flow("10.1.1.1:1", "10.9.9.9:80")), Selection::Backend(_)));
        }
        let mut w = LeastConnections::default();
        w.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 25)]));
        set_active_flows(0, 3);
        set_active_flows(1, 1);
        // 4/100 < 2/25: the heavier-weighted backend still wins.
        assert_eq!(w.select(&flow("10.1.1.1:1", "10.9.9.9:80")), Selection::Backend(0));
    }
}
