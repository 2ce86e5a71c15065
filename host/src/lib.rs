//! # Fulcrum
//!
//! A programmable layer-4 load balancer: a native host does the fast,
//! safety-critical work; sandboxed Wasm components decide which backend gets
//! each new flow.
//!
//! # Layout
//! - [`config`]: TOML -> validated [`config::Config`], errors with file, line and key.
//! - [`flow`]: the flow table, idle timers and close reasons (sans-io).
//! - [`pool`]: backend-set snapshots (ArcSwap), per-backend counters.
//! - [`probe`]: TCP/HTTP/HTTPS probes, the probe state machine, the health monitor.
//! - [`plugin`]: the wasmtime engine, plugin instances, limits, fallback.
//! - [`proxy`]: the data path (TCP): accept, select, connect, copy, close.
//! - [`server`]: workers, the control thread, reloads.
//! - [`admin`]: the admin API (status, flows, drain, reload, metrics).
//! - [`demo`]: `fulcrum demo`, three HTTP backends behind a balancer.
//!
//! The life of a flow, from accept to close, is told in `LIFECYCLE.md`.

pub mod admin;
pub mod config;
pub mod demo;
mod error;
pub mod flow;
pub mod plugin;
pub mod pool;
pub mod probe;
pub mod proxy;
pub mod server;

pub use error::Error;
pub use server::{Server, check};
