//! # fulcrum-sdk
//!
//! Write Fulcrum plugins in Rust: implement a trait, call one export macro,
//! build with `cargo build --target wasm32-wasip2 --release`.
//!
//! A hello-world balancer (first eligible backend wins):
//!
//! ```
//! use fulcrum_sdk::{Backend, Balancer, Flow, Selection};
//!
//! #[derive(Default)]
//! struct First(Vec<u32>);
//!
//! impl Balancer for First {
//!     fn backends_changed(&mut self, backends: &[Backend]) {
//!         self.0 = backends.iter().filter(|b| b.is_eligible()).map(|b| b.id).collect();
//!     }
//!     fn select(&mut self, _flow: &Flow) -> Selection {
//!         self.0.first().map_or(Selection::Reject, |&id| Selection::Backend(id))
//!     }
//! }
//! fulcrum_sdk::export_balancer!(First);
//! ```
//!
//! The same logic runs natively, so plugins are unit-tested with plain
//! `cargo test` (see [`testing`]).
//!
//! # Layout
//! - [`types`]: flows, backends, selections: the plugin's view of the world.
//! - [`algo`]: hashing, Maglev and weighted schedules shared by the stock
//!   plugins and the host's built-in fallback.
//! - [`host`]: what the host gives a plugin: logging, clock, randomness, load.
//! - [`testing`]: helpers to drive a plugin natively in unit tests.
//! - `export_balancer!` / the `guest` module: the Wasm glue (wasm32 only).

pub mod algo;
pub mod host;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod types;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

pub use types::{
    Backend, BackendState, Config, Flow, Health, Observation, Outcome, ProbeKind, Protocol, Selection, Verdict,
};

/// A balancer plugin: chooses the backend of every new flow.
///
/// One value lives per plugin instance (the host runs one instance per worker
/// thread). It starts as `Default`, `init` configures it from the pool's
/// `balancer_config`, `backends_changed` is called whenever the backend set,
/// its health or its weights change (never per flow), and `select` is the hot
/// path.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Fulcrum balancer",
    label = "this type must implement `fulcrum_sdk::Balancer`",
    note = "implement `select` (and optionally `init` and `backends_changed`) for it, and derive `Default`"
)]
pub trait Balancer: Default + 'static {
    /// Applies the plugin's config (the pool's `balancer_config`, as JSON).
    /// An `Err` refuses the config: the host does not load the plugin.
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// The pool's backends changed (membership, health or weight).
    /// Backend ids are indexes into `backends`.
    fn backends_changed(&mut self, backends: &[Backend]) {
        let _ = backends;
    }

    /// Chooses the backend for a new flow.
    fn select(&mut self, flow: &Flow) -> Selection;
}

/// A health plugin: turns a probe result or a custom signal into a verdict
/// (up, down or drain; optionally a weight and a reason).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Fulcrum health plugin",
    label = "this type must implement `fulcrum_sdk::HealthCheck`",
    note = "implement `evaluate` (and optionally `init`) for it, and derive `Default`"
)]
pub trait HealthCheck: Default + 'static {
    /// Applies the plugin's config (the probe's `health_config`, as JSON).
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Judges one observation of `backend`.
    fn evaluate(&mut self, backend: &Backend, observation: &Observation) -> Verdict;
}

/// Exports a [`HealthCheck`] implementation as the plugin's entry points
/// (the `health` world); natively it only type-checks.
#[macro_export]
macro_rules! export_health {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        $crate::__export_health_wasm!($ty);
        const _: () = {
            fn __fulcrum_assert_health<T: $crate::HealthCheck>() {}
            let _ = __fulcrum_assert_health::<$ty>;
        };
    };
}

/// Exports a [`Balancer`] implementation as the plugin's entry points.
///
/// On `wasm32` this generates the component exports; natively it only checks
/// that the type is a balancer, so the crate still builds and tests natively.
#[macro_export]
macro_rules! export_balancer {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        $crate::__export_balancer_wasm!($ty);
        const _: () = {
            fn __fulcrum_assert_balancer<T: $crate::Balancer>() {}
            let _ = __fulcrum_assert_balancer::<$ty>;
        };
    };
}
