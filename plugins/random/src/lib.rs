//! `stock:random`: each new flow goes to an eligible backend drawn at random,
//! in proportion to its weight, never back to the client itself. No state is
//! shared between workers, and no flow waits for another: the choice that
//! spreads evenly without coordination.
//!
//! Config: `{ allow_hairpin = false }`.

use fulcrum_sdk::host::random;
use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    allow_hairpin: bool,
}

/// Draws before a flow whose draws keep hitting its own host scans instead.
const DRAWS: usize = 4;

#[derive(Default)]
pub struct Random {
    eligible: Vec<Backend>,
    /// Running sum of the eligible backends' weights (for a binary search).
    cumulative: Vec<u64>,
    allow_hairpin: bool,
}

impl Random {
    fn draw(&self) -> Option<&Backend> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let point = random() % total;
        let i = self.cumulative.partition_point(|&c| c <= point);
        self.eligible.get(i)
    }
}

impl Balancer for Random {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.allow_hairpin = config.parse::<Settings>()?.allow_hairpin;
        Ok(())
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.eligible = backends.iter().filter(|b| b.is_eligible()).copied().collect();
        let mut sum = 0u64;
        self.cumulative = self
            .eligible
            .iter()
            .map(|b| {
                sum += u64::from(b.weight);
                sum
            })
            .collect();
    }

    fn select(&mut self, flow: &Flow) -> Selection {
        let allowed = |b: &Backend| self.allow_hairpin || !b.is_client_of(flow);
        for _ in 0..DRAWS {
            match self.draw() {
                Some(b) if allowed(b) => return Selection::Backend(b.id),
                Some(_) => {}
                None => return Selection::Reject,
            }
        }
        self.eligible.iter().find(|b| allowed(b)).map_or(Selection::Reject, |b| Selection::Backend(b.id))
    }
}

fulcrum_sdk::export_balancer!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, flow};

    #[test]
    fn draws_in_proportion_to_weight() {
        let mut p = Random::default();
        p.init(&Config::new("{}")).unwrap();
        p.backends_changed(&backends(&[("10.0.0.1:80", 300), ("10.0.0.2:80", 100), ("10.0.0.3:80", 0)]));
        let mut counts = [0u32; 3];
        for _ in 0..4000 {
            match p.select(&flow("10.1.1.1:1000", "10.9.9.9:80")) {
                Selection::Backend(id) => counts[id as usize] += 1,
                Selection::Reject => panic!("rejected"),
            }
        }
        assert_eq!(counts[2], 0, "weight 0 takes nothing");
        assert!((2700..=3300).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn never_the_client_and_rejects_when_empty() {
        let mut p = Random::default();
        assert_eq!(p.select(&flow("10.1.1.1:1", "10.9.9.9:80")), Selection::Reject);
        p.backends_changed(&backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 1)]));
        for _ in 0..200 {
            assert_eq!(p.select(&flow("10.0.0.1:5000", "10.9.9.9:80")), Selection::Backend(1));
        }
        assert!(p.init(&Config::new(r#"{"bogus": 1}"#)).is_err());
    }
}
