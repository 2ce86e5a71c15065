//! What the host gives a plugin: logging, a monotonic clock, randomness and
//! (for balancers) the live load of each backend. Nothing else: no files, no
//! network, no clock of day.
//!
//! Natively (unit tests) these read the fakes set up by [`crate::testing`].

/// Log level of a plugin's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[cfg(all(target_arch = "wasm32", feature = "balancer"))]
use crate::guest::balancer::fulcrum::plugin::host as imports;
#[cfg(all(target_arch = "wasm32", not(feature = "balancer"), feature = "health"))]
use crate::guest::health::fulcrum::plugin::host as imports;

/// Logs a message through the host (rate-limited there).
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        let level = match level {
            Level::Trace => imports::Level::Trace,
            Level::Debug => imports::Level::Debug,
            Level::Info => imports::Level::Info,
            Level::Warn => imports::Level::Warn,
            Level::Error => imports::Level::Error,
        };
        imports::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_log(level, message);
}

/// Monotonic nanoseconds since an arbitrary start.
pub fn now() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        imports::now()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::fake_now()
    }
}

/// A random 64-bit number (not for cryptography).
pub fn random() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        imports::random()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::fake_random()
    }
}

/// What the host knows of one backend, live: read on demand from `select`
/// (a host call each, ~20 ns; no list is copied per flow). Natively, the
/// values set with [`crate::testing::set_signals`].
///
/// ```
/// use fulcrum_sdk::host::{self, Signals};
/// # fulcrum_sdk::testing::set_signals(1, Signals { connect_time_us: 900, ..Signals::default() });
/// // Prefer the backend that connects faster (peak-EWMA style):
/// let cost = |id| (u64::from(host::active_flows(id)) + 1) * u64::from(host::connect_time_us(id).max(1));
/// assert!(cost(0) < cost(1));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// Established flows, all workers together ([`active_flows`]).
    pub active_flows: u32,
    /// Moving average of the data path's connect time, µs ([`connect_time_us`]).
    pub connect_time_us: u32,
    /// Data-path failures since its last success ([`recent_failures`]).
    pub recent_failures: u32,
    /// Milliseconds since its last change of state ([`since_change_ms`]).
    pub since_change_ms: u64,
    /// The newest signal verdict's weight % ([`signal`]).
    pub signal: Option<u32>,
}

/// Reads one live value of backend `id` from the host (wasm32), or from the
/// fakes of [`crate::testing`] (native).
macro_rules! live {
    ($(#[$doc:meta])* $name:ident -> $ty:ty) => {
        $(#[$doc])*
        #[cfg(any(not(target_arch = "wasm32"), feature = "balancer"))]
        pub fn $name(id: u32) -> $ty {
            #[cfg(target_arch = "wasm32")]
            {
                crate::guest::balancer::fulcrum::plugin::load::$name(id)
            }
            #[cfg(not(target_arch = "wasm32"))]
            {
                crate::testing::fake_signals(id).$name
            }
        }
    };
}

live!(
    /// Established flows on backend `id`, across all of the host's workers.
    ///
    /// ```
    /// fulcrum_sdk::testing::set_active_flows(0, 7);
    /// assert_eq!(fulcrum_sdk::host::active_flows(0), 7);
    /// ```
    active_flows -> u32
);
live!(
    /// (contract 0.1.1) A moving average of the data path's TCP connect time
    /// to backend `id`, in microseconds; 0 before its first connect.
    ///
    /// ```
    /// use fulcrum_sdk::{host, testing};
    /// testing::set_signals(0, host::Signals { connect_time_us: 250, ..Default::default() });
    /// assert_eq!(host::connect_time_us(0), 250);
    /// ```
    connect_time_us -> u32
);
live!(
    /// (contract 0.1.1) Data-path failures toward backend `id` since its
    /// last success (TCP connects refused or timed out, UDP port unreachable).
    ///
    /// ```
    /// use fulcrum_sdk::{host, testing};
    /// testing::set_signals(2, host::Signals { recent_failures: 3, ..Default::default() });
    /// // Skip a backend that is failing right now:
    /// assert!(host::recent_failures(2) > 0);
    /// ```
    recent_failures -> u32
);
live!(
    /// (contract 0.1.1) Milliseconds since backend `id` last changed state,
    /// or was added: what slow start ramps over.
    ///
    /// ```
    /// use fulcrum_sdk::{host, testing};
    /// testing::set_signals(0, host::Signals { since_change_ms: 15_000, ..Default::default() });
    /// let ramp = (host::since_change_ms(0) as f64 / 30_000.0).min(1.0);
    /// assert_eq!(ramp, 0.5);
    /// ```
    since_change_ms -> u64
);
live!(
    /// (contract 0.1.1) The weight (0..=100 %) that the newest
    /// `[[pool.signal]]` verdict gave backend `id` (a CPU-backpressure
    /// plugin's answer, say); `None` when no signal has judged it.
    ///
    /// ```
    /// use fulcrum_sdk::{host, testing};
    /// testing::set_signals(0, host::Signals { signal: Some(40), ..Default::default() });
    /// assert_eq!(host::signal(0), Some(40));
    /// assert_eq!(host::signal(9), None);
    /// ```
    signal -> Option<u32>
);

/// (contract 0.1.1) The next value of a counter shared by every worker's
/// instance of the pool's balancer: 0, 1, 2, ... in strict order across
/// workers (stock round robin takes its turns from it).
///
/// ```
/// let first = fulcrum_sdk::host::next_turn();
/// assert_eq!(fulcrum_sdk::host::next_turn(), first + 1);
/// ```
#[cfg(any(not(target_arch = "wasm32"), feature = "balancer"))]
pub fn next_turn() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        crate::guest::balancer::fulcrum::plugin::load::next_turn()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::fake_next_turn()
    }
}
