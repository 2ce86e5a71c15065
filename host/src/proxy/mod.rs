//! # The data path
//!
//! - `tcp`: accept, select, connect (with retries), copy both ways with
//!   half-close, idle timeout with FIN or RST (B9, B10).
//! - `udp`: per-client flows, replies from the frontend address, re-balanced
//!   when their backend goes down (B8), idle timeout, flow cap.
//!
//! Each worker thread runs its own accept loop per frontend on its own
//! `SO_REUSEPORT` listener, with its own balancer plugin instance: the
//! per-flow path takes no lock and shares no plugin state between threads.

pub mod tcp;
pub mod udp;

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

/// A frontend's socket on one worker.
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Listener {
    /// Binds `addr` for `protocol` (`SO_REUSEPORT`: every worker binds it).
    pub fn bind(protocol: crate::config::Protocol, addr: SocketAddr) -> io::Result<Listener> {
        match protocol {
            crate::config::Protocol::Tcp => bind_tcp(addr).map(Listener::Tcp),
            crate::config::Protocol::Udp => bind_udp(addr).map(Listener::Udp),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Udp(s) => s.local_addr(),
        }
    }
}

/// A UDP socket that other workers may bind too (`SO_REUSEPORT`: the kernel
/// keeps each client on one worker).
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Room for bursts: a worker busy for a moment should not drop them.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Counts a flow on its backend for as long as it lives.
#[derive(Debug)]
pub struct ActiveOnBackend(Arc<crate::pool::BackendStats>);

impl ActiveOnBackend {
    pub fn new(stats: &Arc<crate::pool::BackendStats>) -> Self {
        use std::sync::atomic::Ordering;
        stats.active_flows.fetch_add(1, Ordering::Relaxed);
        stats.flows_total.fetch_add(1, Ordering::Relaxed);
        ActiveOnBackend(Arc::clone(stats))
    }
}

impl Drop for ActiveOnBackend {
    fn drop(&mut self) {
        self.0.active_flows.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
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
