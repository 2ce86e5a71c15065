//! `stock:http-status`: an HTTP(S) answer whose status is in one of the
//! accepted ranges is up; anything else is down.
//!
//! Config: `{ accept = ["200-399", "404"] }` (default `["200"]`).

use fulcrum_sdk::{Backend, Config, HealthCheck, Observation, ProbeKind, Verdict};

#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    accept: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { accept: vec!["200".into()] }
    }
}

#[derive(Default)]
pub struct HttpStatus {
    ranges: Vec<(u16, u16)>,
}

fn parse_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("accept: `{text}` is not a status or a range like \"200-399\"");
    let (lo, hi) = text.split_once('-').unwrap_or((text, text));
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

impl HealthCheck for HttpStatus {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings: Settings = config.parse()?;
        self.ranges = settings.accept.iter().map(|r| parse_range(r)).collect::<Result<_, _>>()?;
        Ok(())
    }

    fn evaluate(&mut self, _backend: &Backend, observation: &Observation) -> Verdict {
        if let Some(failed) = observation.failure_verdict() {
            return failed;
        }
        match (observation.kind, observation.status) {
            (ProbeKind::Tcp, _) => Verdict::up(),
            (_, Some(status)) if self.ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&status)) => Verdict::up(),
            (_, Some(status)) => Verdict::down(format!("HTTP {status} is not accepted")),
            (_, None) => Verdict::down("no HTTP status"),
        }
    }
}

fulcrum_sdk::export_health!(HttpStatus);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, observation};
    use fulcrum_sdk::{Health, Outcome};

    #[test]
    fn accepted_ranges() {
        let b = backends(&[("10.0.0.1:80", 100)])[0];
        let mut p = HttpStatus::default();
        p.init(&Config::new(r#"{"accept": ["200-399"]}"#)).unwrap();
        assert_eq!(p.evaluate(&b, &observation(ProbeKind::Http, Outcome::HttpStatus, Some(301))).health, Health::Up);
        assert_eq!(p.evaluate(&b, &observation(ProbeKind::Http, Outcome::HttpStatus, Some(404))).health, Health::Down);
        assert!(p.init(&Config::new(r#"{"accept": ["399-200"]}"#)).is_err());
        assert!(p.init(&Config::new(r#"{"accept": ["abc"]}"#)).is_err());
    }
}
