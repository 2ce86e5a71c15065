//! A health plugin that traps on every observation: the host must fall back
//! to the stock default (`stock:http-200`) for each one, and count it.

use fulcrum_sdk::{Backend, HealthCheck, Observation, Verdict};

#[derive(Default)]
pub struct HealthTrap;

impl HealthCheck for HealthTrap {
    fn evaluate(&mut self, _backend: &Backend, _observation: &Observation) -> Verdict {
        panic!("health-trap: trapping on purpose")
    }
}

fulcrum_sdk::export_health!(HealthTrap);
