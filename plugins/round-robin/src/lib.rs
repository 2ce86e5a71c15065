//! `stock:round-robin`: weighted round robin (nginx's smooth variant), over
//! backends that are up and not draining, never back to the client itself.
//! Turns come from the host's counter shared by every worker's instance
//! (`load.next-turn`), so the rotation is strict across workers: sequential
//! connections go 1, 2, 3, 1, 2, 3 whichever worker accepts them.
//!
//! Config: `{ allow_hairpin = false }`.

use fulcrum_sdk::algo::weighted_schedule;
use fulcrum_sdk::host::next_turn;
use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    allow_hairpin: bool,
}

#[derive(Default)]
pub struct RoundRobin {
    schedule: Vec<u32>,
    backends: Vec<Backend>,
    allow_hairpin: bool,
}

impl Balancer for RoundRobin {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.allow_hairpin = config.parse::<Settings>()?.allow_hairpin;
        Ok(())
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.schedule = weighted_schedule(backends);
        self.backends = backends.to_vec();
    }

    fn select(&mut self, flow: &Flow) -> Selection {
        let len = self.schedule.len() as u64;
        for _ in 0..len {
            let id = self.schedule[(next_turn() % len) as usize];
            let hairpin = self.backends.get(id as usize).is_some_and(|b| b.is_client_of(flow));
            if self.allow_hairpin || !hairpin {
                return Selection::Backend(id);
            }
        }
        Selection::Reject
    }
}

fulcrum_sdk::export_balancer!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, flow};

    fn picks(rr: &mut RoundRobin, client: &str, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| match rr.select(&flow(client, "10.9.9.9:80")) {
                Selection::Backend(id) => id,
                Selection::Reject => u32::MAX,
            })
            .collect()
    }

    #[test]
    fn weighted_rotation() {
        let mut rr = RoundRobin::default();
        rr.init(&Config::new("{}")).unwrap();
        rr.backends_changed(&backends(&[("10.0.0.1:80", 3), ("10.0.0.2:80", 1), ("10.0.0.3:80", 0)]));
        assert_eq!(picks(&mut rr, "10.1.1.1:1000", 8), vec![0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn skips_the_client_unless_allowed() {
        let set = backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)]);
        let mut rr = RoundRobin::default();
        rr.backends_changed(&set);
        assert_eq!(picks(&mut rr, "10.0.0.1:5000", 4), vec![1, 1, 1, 1]);
        rr.init(&Config::new(r#"{"allow_hairpin": true}"#)).unwrap();
        assert_eq!(picks(&mut rr, "10.0.0.1:5000", 2), vec![0, 1]);
    }

    #[test]
    fn rejects_without_backends_and_bad_config() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.select(&flow("10.1.1.1:1", "10.9.9.9:80")), Selection::Reject);
        assert!(rr.init(&Config::new(r#"{"bogus": 1}"#)).is_err());
    }
}
