//! A health plugin that misbehaves on purpose:
//! - with no config: traps on every observation (the host must fall back to
//!   the stock default, `stock:http-200`, for each one, and count it);
//! - `{ mode = "hostile-reason" }`: judges every backend down with a reason
//!   full of terminal escapes, newlines and a forged log line, which the host
//!   must show inert everywhere.

use fulcrum_sdk::{Backend, Config, HealthCheck, Observation, Verdict};

/// The reason of `hostile-reason`.
pub const HOSTILE_REASON: &str =
    "\u{1b}[2J\u{1b}[31mred\u{1b}[0m\r\n2026-01-01T00:00:00Z  INFO fulcrum: forged line\u{7}\u{202e}gnp.exe";

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    mode: String,
}

#[derive(Default)]
pub struct HealthTrap {
    hostile: bool,
}

impl HealthCheck for HealthTrap {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings: Settings = config.parse()?;
        match settings.mode.as_str() {
            "" => Ok(()),
            "hostile-reason" => {
                self.hostile = true;
                Ok(())
            }
            other => Err(format!("unknown mode {other:?}")),
        }
    }

    fn evaluate(&mut self, _backend: &Backend, _observation: &Observation) -> Verdict {
        if self.hostile {
            return Verdict::down(HOSTILE_REASON);
        }
        panic!("health-trap: trapping on purpose")
    }
}

fulcrum_sdk::export_health!(HealthTrap);
