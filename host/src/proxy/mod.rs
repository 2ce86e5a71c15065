//! # The data path
//!
//! - `tcp`: accept, select, connect (with retries), copy both ways with
//!   half-close, idle timeout with FIN or RST (B9, B10).
//! - `udp`: per-client flows, replies from the frontend address, re-balanced
//!   when their backend goes down (B8), idle timeout, flow cap.
//!
//! - `worker`: a data-path thread: its listeners, balancer instances, flows;
//!   the control plane reaches it through a [`crate::live::WorkerLine`].
//!
//! Each worker thread runs its own accept loop per frontend on its own
//! `SO_REUSEPORT` listener, with its own balancer plugin instance: the
//! per-flow path takes no lock and shares no plugin state between threads.

pub mod tcp;
pub mod udp;
pub mod worker;
