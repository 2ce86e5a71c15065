//! The one back-off of the host: a delay that doubles with each step in a
//! row, from `first` up to `max`, until reset. Pure (no clock): the users
//! add the delay to their own `now`. Used for accept pauses (R1), passive
//! ejections (B18), rebuilding a faulting plugin instance and benching a
//! plugin.

use std::time::Duration;

/// A doubling back-off: step `n` (from 0) waits `first x 2^n`, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    steps: u32,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max, steps: 0 }
    }

    /// The same back-off, `steps` in a row already (carried over, say).
    pub const fn after(self, steps: u32) -> Backoff {
        Backoff { steps, ..self }
    }

    /// The delay of the next step, without taking it.
    pub fn delay(&self) -> Duration {
        // 2^30 x any first delay is past any max the config allows.
        self.first.saturating_mul(1u32 << self.steps.min(30)).min(self.max)
    }

    /// Takes the next step: its delay.
    pub fn step(&mut self) -> Duration {
        let delay = self.delay();
        self.steps = self.steps.saturating_add(1);
        delay
    }

    /// Steps taken in a row.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.steps = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_doubles_up_to_the_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(5), Duration::from_millis(500));
        let delays: Vec<u128> = (0..9).map(|_| b.step().as_millis()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 500, 500]);
        assert_eq!(b.steps(), 9);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(5));
        // Carried over, and far past any exponent: still the max, no overflow.
        let far = Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).after(u32::MAX);
        assert_eq!(far.delay(), Duration::from_secs(60));
        let huge = Backoff::new(Duration::MAX, Duration::MAX).after(40);
        assert_eq!(huge.delay(), Duration::MAX);
    }
}
