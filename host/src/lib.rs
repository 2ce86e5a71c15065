//! # Fulcrum
//!
//! A programmable layer-4 load balancer: a native host does the fast,
//! safety-critical work; sandboxed Wasm components decide which backend gets
//! each new flow.
//!
//! # Layout
//! Rooms from the bottom up; each imports only rooms above it in this list,
//! never one below (`tests/layers.rs` checks it):
//! - [`backoff`]: the one doubling back-off (accept pauses, passive
//!   ejections, instance rebuilds, plugin benches).
//! - [`config`]: TOML -> validated [`config::Config`], errors with file, line and key.
//! - [`flow`]: the flow table, idle timers and close reasons (sans-io).
//! - [`pool`]: backend-set snapshots (ArcSwap), per-backend counters.
//! - [`net`]: socket set-up (`SO_REUSEPORT` listeners, close with RST).
//! - [`flow_log`]: a JSON line per closed flow, through a bounded queue.
//! - [`threads`]: threads with a tokio runtime of their own that call plugins.
//! - [`plugin`]: the wasmtime engine, plugin instances, limits, fallback.
//! - `error`: the crate's errors ([`Error`], [`ReloadError`], [`DrainError`]).
//! - [`live`]: what runs now: frontends, bindings, pools with their plugins,
//!   the lines to the workers, reload history.
//! - [`probe`]: TCP/HTTP/HTTPS probes, the probe state machine, the health monitor.
//! - [`telemetry`]: the metrics registry (Prometheus text).
//! - [`proxy`]: the data path (TCP, UDP) and its worker threads.
//! - [`admin`]: the admin API, over a narrow [`admin::Handle`].
//! - [`server`]: start, the control thread, reloads; implements the handle.
//! - [`demo`]: `fulcrum demo`, three HTTP backends behind a balancer.
//! - [`authoring`]: `fulcrum plugin new` and `fulcrum plugin check`.
//!
//! The life of a flow, from accept to close, is told in `LIFECYCLE.md`.

pub mod admin;
pub mod authoring;
pub mod backoff;
pub mod config;
pub mod demo;
mod error;
pub mod flow;
pub mod flow_log;
pub mod live;
pub mod net;
pub mod plugin;
pub mod pool;
pub mod probe;
pub mod proxy;
pub mod server;
pub mod telemetry;
pub mod threads;

pub use error::{DrainError, Error, ReloadError, TlsSetupError};
pub use server::{Server, check};
