//! # The data path
//!
//! - `tcp`: accept, select, connect (with retries), copy both ways with
//!   half-close, idle timeout with FIN or RST (B9, B10).
//! - `proxy_header`: the PROXY protocol, toward backends and from upstreams.
//! - `udp`: per-client flows, replies from the frontend address, re-balanced
//!   when their backend goes down (B8), idle timeout, flow cap.
//!
//! - `worker`: a data-path thread: its listeners, balancer instances, flows;
//!   the control plane reaches it through a [`crate::live::WorkerLine`].
//!
//! Each worker thread runs its own accept loop per frontend on its own
//! `SO_REUSEPORT` listener, with its own balancer plugin instance: the
//! per-flow path takes no lock and shares no plugin state between threads.

pub mod proxy_header;
pub mod tcp;
pub mod udp;
pub mod worker;

use crate::flow::CloseReason;
use crate::net::Exhausted;
use crate::pool::Pool;

/// Is a failed backend socket (TCP connect, UDP socket) this host's own
/// exhaustion (R6, B16)? Then it is `local_exhaustion`, source ports counted
/// on the pool, and never the backend's failure; `None`: the backend's.
fn local_exhaustion(pool: &Pool, e: &std::io::Error) -> Option<CloseReason> {
    let exhausted = Exhausted::of(e)?;
    if exhausted == Exhausted::SourcePorts {
        pool.source_ports_exhausted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::warn!(pool = %pool.name, "no local resources for a backend socket: {e}");
    Some(CloseReason::LocalExhaustion)
}

/// Counts a flow whose client is a backend of the pool (a hairpin attempt,
/// B15) on that backend, for the troubleshooter.
fn count_hairpin(pool: &crate::pool::PoolSnapshot, flow: &fulcrum_sdk::Flow) {
    for backend in pool.client_backends(flow) {
        backend.stats.hairpin_clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs one flow's set-up on an accept or receive loop so that a panic in it
/// (a bug: counted and logged by the panic hook) costs that flow only, never
/// the loop and every flow after it.
fn contained<T: Default>(set_up: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(set_up)).unwrap_or_default()
}
