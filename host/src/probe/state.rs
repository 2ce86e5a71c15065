//! The probe state machine (sans-io: time passed in, transitions out).
//!
//! - B4: every backend starts `Unknown` (eligible) and is up on its first
//!   success; from down it needs `threshold` consecutive successes.
//! - B3: a failure that is an *answer* (a non-200 status, a reset, a refused
//!   connect, a plugin's explicit "down" on an answer) marks it down at once;
//!   timeouts (and TLS failures) only after `threshold` consecutive ones.
//! - B5 flap damping: going down again within [`FLAP_WINDOW_INTERVALS`]
//!   intervals of coming back up (from down) is a flap; each flap doubles the successes needed
//!   to come up again (threshold x 2^flaps, flaps capped at [`MAX_FLAPS`], so
//!   at most 8 x threshold). A backend up for a whole window is forgiven.

use std::time::{Duration, Instant};

use fulcrum_sdk::{Health, Outcome, Verdict};

/// Up for less than this many probe intervals, then down again: a flap.
pub const FLAP_WINDOW_INTERVALS: u32 = 10;
/// Most flaps counted (the damping cap).
pub const MAX_FLAPS: u32 = 3;

/// What the probes say of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeHealth {
    Unknown,
    Up,
    Down,
}

/// A change of state, with the reason of the observation that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: ProbeHealth,
    pub to: ProbeHealth,
    pub reason: String,
}

/// A [`HealthMachine`]'s state without its configuration, as a takeover
/// hands it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub state: ProbeHealth,
    pub successes: u32,
    pub failures: u32,
    pub flaps: u32,
}

#[derive(Clone, Debug)]
pub struct HealthMachine {
    threshold: u32,
    flap_window: Duration,
    state: ProbeHealth,
    successes: u32,
    failures: u32,
    flaps: u32,
    /// When it last came back up from down (flaps are counted from there).
    recovered_at: Option<Instant>,
}

impl HealthMachine {
    pub fn new(threshold: u32, interval: Duration) -> Self {
        HealthMachine {
            threshold: threshold.max(1),
            flap_window: interval.saturating_mul(FLAP_WINDOW_INTERVALS),
            state: ProbeHealth::Unknown,
            successes: 0,
            failures: 0,
            flaps: 0,
            recovered_at: None,
        }
    }

    pub fn state(&self) -> ProbeHealth {
        self.state
    }

    /// Consecutive successes needed to come up from down now.
    pub fn successes_needed(&self) -> u32 {
        self.threshold.saturating_mul(1 << self.flaps.min(MAX_FLAPS))
    }

    /// Applies one verdict on an observation with `outcome`. A `drain`
    /// verdict counts as a success here (the backend answers; draining is
    /// applied apart).
    pub fn observe(&mut self, now: Instant, outcome: Outcome, verdict: &Verdict) -> Option<Transition> {
        let reason = || verdict.reason.clone().unwrap_or_else(|| outcome.as_str().to_owned());
        if verdict.health == Health::Down {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            let answered = !matches!(outcome, Outcome::Timeout | Outcome::TlsError);
            if self.state != ProbeHealth::Down && (answered || self.failures >= self.threshold) {
                if self.recovered_at.take().is_some_and(|t| now.saturating_duration_since(t) < self.flap_window) {
                    self.flaps = (self.flaps + 1).min(MAX_FLAPS);
                }
                return Some(self.go(ProbeHealth::Down, reason()));
            }
            return None;
        }
        self.failures = 0;
        self.successes = self.successes.saturating_add(1);
        match self.state {
            ProbeHealth::Unknown => Some(self.go(ProbeHealth::Up, reason())),
            ProbeHealth::Down if self.successes >= self.successes_needed() => {
                self.recovered_at = Some(now);
                Some(self.go(ProbeHealth::Up, reason()))
            }
            ProbeHealth::Down => None,
            ProbeHealth::Up => {
                if self.recovered_at.is_some_and(|t| now.saturating_duration_since(t) >= self.flap_window) {
                    self.flaps = 0; // stable for a whole window: forgiven
                    self.recovered_at = None;
                }
                None
            }
        }
    }

    /// What a takeover hands over of this machine (its configuration is the
    /// new config's): state, runs and flaps.
    pub fn export(&self) -> MachineState {
        MachineState { state: self.state, successes: self.successes, failures: self.failures, flaps: self.flaps }
    }

    /// Goes on from where an old process's machine was (a takeover).
    pub fn restore(&mut self, carried: &MachineState) {
        self.state = carried.state;
        self.successes = carried.successes;
        self.failures = carried.failures;
        self.flaps = carried.flaps.min(MAX_FLAPS);
    }

    fn go(&mut self, to: ProbeHealth, reason: String) -> Transition {
        let from = std::mem::replace(&mut self.state, to);
        self.successes = 0;
        self.failures = 0;
        Transition { from, to, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(1);

    struct Clock(Instant);

    impl Clock {
        fn tick(&mut self) -> Instant {
            self.0 += I;
            self.0
        }
    }

    fn ok() -> (Outcome, Verdict) {
        (Outcome::Ok, Verdict::up())
    }
    fn status_500() -> (Outcome, Verdict) {
        (Outcome::HttpStatus, Verdict::down("HTTP 500"))
    }
    fn timeout() -> (Outcome, Verdict) {
        (Outcome::Timeout, Verdict::down("timeout"))
    }

    fn run(m: &mut HealthMachine, clock: &mut Clock, steps: &[(Outcome, Verdict)]) -> Vec<Option<ProbeHealth>> {
        steps.iter().map(|(o, v)| m.observe(clock.tick(), *o, v).map(|t| t.to)).collect()
    }

    #[test]
    fn unknown_until_the_first_success() {
        let (mut m, mut c) = (HealthMachine::new(2, I), Clock(Instant::now()));
        assert_eq!(m.state(), ProbeHealth::Unknown);
        assert_eq!(run(&mut m, &mut c, &[ok(), ok()]), vec![Some(ProbeHealth::Up), None]);
    }

    #[test]
    fn an_answer_marks_down_at_once_a_timeout_after_threshold() {
        let (mut m, mut c) = (HealthMachine::new(3, I), Clock(Instant::now()));
        run(&mut m, &mut c, &[ok()]);
        assert_eq!(run(&mut m, &mut c, &[status_500()]), vec![Some(ProbeHealth::Down)]);
        let (mut m, mut c) = (HealthMachine::new(3, I), Clock(Instant::now()));
        run(&mut m, &mut c, &[ok()]);
        assert_eq!(run(&mut m, &mut c, &[timeout(), timeout(), timeout()]), vec![None, None, Some(ProbeHealth::Down)]);
        let (mut m, mut c) = (HealthMachine::new(3, I), Clock(Instant::now()));
        let reset = (Outcome::Reset, Verdict::down("reset"));
        assert_eq!(run(&mut m, &mut c, &[ok(), reset]), vec![Some(ProbeHealth::Up), Some(ProbeHealth::Down)]);
    }

    #[test]
    fn a_success_between_timeouts_restarts_the_count() {
        let (mut m, mut c) = (HealthMachine::new(2, I), Clock(Instant::now()));
        run(&mut m, &mut c, &[ok()]);
        assert_eq!(
            run(&mut m, &mut c, &[timeout(), ok(), timeout(), timeout()]),
            vec![None, None, None, Some(ProbeHealth::Down)]
        );
    }

    #[test]
    fn recovery_needs_threshold_successes_and_flapping_needs_more() {
        let (mut m, mut c) = (HealthMachine::new(2, I), Clock(Instant::now()));
        run(&mut m, &mut c, &[ok(), status_500()]);
        assert_eq!(run(&mut m, &mut c, &[ok(), ok()]), vec![None, Some(ProbeHealth::Up)]);
        // Down again right away: a flap; 4 successes now.
        run(&mut m, &mut c, &[status_500()]);
        assert_eq!(m.successes_needed(), 4);
        assert_eq!(run(&mut m, &mut c, &[ok(), ok(), ok(), ok()]), vec![None, None, None, Some(ProbeHealth::Up)]);
        // Flapping again: 8, then capped at 16 (threshold x 2^3).
        run(&mut m, &mut c, &[status_500()]);
        assert_eq!(m.successes_needed(), 8);
        for _ in 0..4 {
            run(&mut m, &mut c, &vec![ok(); 16]);
            run(&mut m, &mut c, &[status_500()]);
        }
        assert_eq!(m.successes_needed(), 16);
        // Up and stable for a whole window: forgiven.
        run(&mut m, &mut c, &vec![ok(); 16 + FLAP_WINDOW_INTERVALS as usize + 1]);
        assert_eq!(m.successes_needed(), 2);
    }

    #[test]
    fn drain_counts_as_an_answer() {
        let (mut m, mut c) = (HealthMachine::new(2, I), Clock(Instant::now()));
        let drain = (Outcome::Ok, Verdict::drain("cpu"));
        assert_eq!(run(&mut m, &mut c, &[drain]), vec![Some(ProbeHealth::Up)]);
    }
}
