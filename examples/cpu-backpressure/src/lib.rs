//! CPU backpressure (B12): the backend reports its CPU load on a signal
//! endpoint (`GET /load` answering `cpu=NN` or `{"cpu": NN}`); above
//! `drain_above` percent (default 90) it is drained (no new flows, established
//! ones continue); below, its weight follows its headroom (100 - cpu, at least
//! `min_weight`, default 1).
//!
//! See README.md beside this file for the config.

use fulcrum_sdk::{Backend, Config, HealthCheck, Observation, Outcome, Verdict};

#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    drain_above: u32,
    min_weight: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { drain_above: 90, min_weight: 1 }
    }
}

#[derive(Default)]
pub struct CpuBackpressure {
    settings: Settings,
}

/// The CPU percentage in a body like `cpu=93`, `cpu: 93` or `{"cpu": 93.5}`.
pub fn parse_cpu(body: &str) -> Option<f64> {
    let at = body.find("cpu")?;
    let rest = body[at + 3..].trim_start_matches(|c: char| c == '"' || c == ':' || c == '=' || c.is_whitespace());
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl HealthCheck for CpuBackpressure {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.settings = config.parse()?;
        if self.settings.drain_above > 100 {
            return Err(format!("drain_above = {} is not a percentage", self.settings.drain_above));
        }
        Ok(())
    }

    fn evaluate(&mut self, _backend: &Backend, observation: &Observation) -> Verdict {
        if observation.outcome != Outcome::Ok {
            // No reading: leave the weight alone rather than guess.
            return Verdict::up();
        }
        let Some(cpu) = parse_cpu(&observation.body_text()) else {
            return Verdict::up();
        };
        let cpu = cpu.clamp(0.0, 100.0) as u32;
        if cpu > self.settings.drain_above {
            return Verdict::drain(format!("cpu {cpu}% > {}%", self.settings.drain_above));
        }
        Verdict::up().with_weight((100 - cpu).max(self.settings.min_weight))
    }
}

fulcrum_sdk::export_health!(CpuBackpressure);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, observation};
    use fulcrum_sdk::{Health, ProbeKind};

    fn reading(body: &str) -> Observation {
        let mut o = observation(ProbeKind::Signal, Outcome::Ok, Some(200));
        o.body = body.as_bytes().to_vec();
        o
    }

    #[test]
    fn parses_the_usual_shapes() {
        assert_eq!(parse_cpu("cpu=93"), Some(93.0));
        assert_eq!(parse_cpu("{\"cpu\": 12.5}"), Some(12.5));
        assert_eq!(parse_cpu("load: 3"), None);
    }

    #[test]
    fn drains_above_the_threshold_and_weights_by_headroom() {
        let b = backends(&[("10.0.0.1:80", 100)])[0];
        let mut p = CpuBackpressure::default();
        p.init(&Config::new("{}")).unwrap();
        assert_eq!(p.evaluate(&b, &reading("cpu=95")).health, Health::Drain);
        assert_eq!(p.evaluate(&b, &reading("cpu=20")), Verdict::up().with_weight(80));
        assert_eq!(p.evaluate(&b, &reading("cpu=60")), Verdict::up().with_weight(40));
        assert_eq!(p.evaluate(&b, &reading("cpu=100")).health, Health::Drain);
        p.init(&Config::new(r#"{"drain_above": 50}"#)).unwrap();
        assert_eq!(p.evaluate(&b, &reading("cpu=60")).health, Health::Drain);
        assert_eq!(p.evaluate(&b, &reading("garbage")).health, Health::Up);
    }
}
