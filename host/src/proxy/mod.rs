//! # The data path
//!
//! `tcp`: accept, select, connect (with retries), copy both ways with
//! half-close, idle timeout with FIN or RST (B9, B10).
//!
//! Each worker thread runs its own accept loop per frontend on its own
//! `SO_REUSEPORT` listener, with its own balancer plugin instance: the
//! per-flow path takes no lock and shares no plugin state between threads.

pub mod tcp;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, SockRef, Socket, Type};

use arc_swap::ArcSwap;

use crate::config::{FrontendConfig, PoolConfig};
use crate::flow::FlowTable;
use crate::plugin::{BalancerPlugin, HealthPlugin};
use crate::pool::Pool;

/// Pending connections a listener queues before the kernel refuses more.
const LISTEN_BACKLOG: i32 = 4096;

/// A pool with its loaded plugins, as the current config has it. A reload
/// that changes a pool's plugins or backends makes a new one around the same
/// [`Pool`] (so health and counters carry over).
#[derive(Debug)]
pub struct PoolRuntime {
    pub config: PoolConfig,
    pub pool: Arc<Pool>,
    pub balancer: Arc<BalancerPlugin>,
    /// The probe's health plugin.
    pub probe: Option<Arc<HealthPlugin>>,
    /// Each signal's health plugin.
    pub signals: Vec<Arc<HealthPlugin>>,
}

/// What a frontend serves with, swapped whole by a reload: new flows load it
/// once at accept; established flows keep the one they started with.
#[derive(Debug)]
pub struct Binding {
    pub config: FrontendConfig,
    pub pool: Arc<PoolRuntime>,
}

/// A listening frontend: its identity, flow table and current binding.
#[derive(Debug)]
pub struct Frontend {
    /// Unique in the process (a frontend re-created by a reload gets a new one).
    pub id: u64,
    pub name: String,
    /// The address it listens on (port 0 resolved).
    pub addr: SocketAddr,
    pub flows: Arc<FlowTable>,
    pub binding: ArcSwap<Binding>,
}

/// A listening socket that other workers may bind too (`SO_REUSEPORT`).
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Closes a TCP socket with RST instead of FIN (zero linger), so the peer
/// learns at once.
pub fn reset_on_close<S: std::os::fd::AsFd>(socket: &S) {
    // Best effort: if it fails the close is a FIN, which is still a close.
    let _ = SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
}
