//! `stock:http-200`, the default health plugin: an HTTP(S) answer of 200 (or a
//! TCP probe that connects) is up; anything else is down, with the reason.

use fulcrum_sdk::{Backend, HealthCheck, Observation, ProbeKind, Verdict};

#[derive(Default)]
pub struct Http200;

impl HealthCheck for Http200 {
    fn evaluate(&mut self, _backend: &Backend, observation: &Observation) -> Verdict {
        if let Some(failed) = observation.failure_verdict() {
            return failed;
        }
        match (observation.kind, observation.status) {
            (ProbeKind::Tcp, _) | (_, Some(200)) => Verdict::up(),
            (_, Some(status)) => Verdict::down(format!("HTTP {status}")),
            (_, None) => Verdict::down("no HTTP status"),
        }
    }
}

fulcrum_sdk::export_health!(Http200);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, observation};
    use fulcrum_sdk::{Health, Outcome};

    #[test]
    fn only_200_is_up() {
        let b = backends(&[("10.0.0.1:80", 100)])[0];
        let mut p = Http200;
        assert_eq!(p.evaluate(&b, &observation(ProbeKind::Http, Outcome::Ok, Some(200))).health, Health::Up);
        let v = p.evaluate(&b, &observation(ProbeKind::Http, Outcome::HttpStatus, Some(503)));
        assert_eq!((v.health, v.reason.as_deref()), (Health::Down, Some("HTTP 503")));
        assert_eq!(p.evaluate(&b, &observation(ProbeKind::Tcp, Outcome::Ok, None)).health, Health::Up);
        assert_eq!(p.evaluate(&b, &observation(ProbeKind::Tcp, Outcome::Refused, None)).health, Health::Down);
        assert_eq!(p.evaluate(&b, &observation(ProbeKind::Https, Outcome::TlsError, None)).health, Health::Down);
    }
}
