//! # Sockets: how listeners and backend sockets are set up
//!
//! Binding with `SO_REUSEPORT` (every worker binds a frontend's address, the
//! kernel spreads clients over them) and closing with RST. Below both the
//! data path (`proxy`) and the control plane (`server`), which binds new
//! listeners while it prepares a reload.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, SockRef, Socket, Type};

use crate::config::Protocol;

/// Pending connections a listener queues before the kernel refuses more.
const LISTEN_BACKLOG: i32 = 4096;

/// A frontend's socket on one worker.
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Listener {
    /// Binds `addr` for `protocol` (`SO_REUSEPORT`: every worker binds it).
    pub fn bind(protocol: Protocol, addr: SocketAddr) -> io::Result<Listener> {
        match protocol {
            Protocol::Tcp => bind_tcp(addr).map(Listener::Tcp),
            Protocol::Udp => bind_udp(addr).map(Listener::Udp),
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
