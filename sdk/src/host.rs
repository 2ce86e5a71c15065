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

/// Established flows on backend `id`, across all of the host's workers.
#[cfg(any(not(target_arch = "wasm32"), feature = "balancer"))]
pub fn active_flows(id: u32) -> u32 {
    #[cfg(target_arch = "wasm32")]
    {
        crate::guest::balancer::fulcrum::plugin::load::active_flows(id)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::fake_active_flows(id)
    }
}
