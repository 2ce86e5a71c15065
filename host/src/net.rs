//! # Sockets: how listeners and backend sockets are set up
//!
//! Binding with `SO_REUSEPORT` (every worker binds a frontend's address, the
//! kernel spreads clients over them) and closing with RST. Below both the
//! data path (`proxy`) and the control plane (`server`), which binds new
//! listeners while it prepares a reload.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

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

    /// A second descriptor of the same socket (to hand over in a takeover).
    pub fn dup(&self) -> io::Result<std::os::fd::OwnedFd> {
        match self {
            Listener::Tcp(l) => l.try_clone().map(Into::into),
            Listener::Udp(s) => s.try_clone().map(Into::into),
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
///
/// Port 0 is a port no socket holds: the kernel would pick one of another
/// `SO_REUSEPORT` UDP socket of this user for it (a removed frontend's,
/// still answering its flows), and the two would split its datagrams.
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    if addr.port() != 0 {
        return bind_udp_shared(addr);
    }
    let mut last = None;
    for _ in 0..8 {
        // Without SO_REUSEPORT the kernel picks a port nothing is bound to.
        let probe = std::net::UdpSocket::bind(addr)?;
        let free = probe.local_addr()?;
        drop(probe);
        match bind_udp_shared(free) {
            Ok(socket) => return Ok(socket),
            // Taken in between by someone else: another one.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::ErrorKind::AddrInUse.into()))
}

fn bind_udp_shared(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
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

/// The one accept policy of every listener (R1): out of descriptors
/// (EMFILE, ENFILE), pause, 5 ms doubling to 500 ms, instead of spinning on
/// an accept that fails at once; the first success resets it. Established
/// flows are untouched, and accepting resumes within half a second of
/// descriptors freeing.
#[derive(Debug)]
pub struct AcceptBackoff {
    backoff: crate::backoff::Backoff,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_millis(500);

    pub fn reset(&mut self) {
        self.backoff.reset();
    }

    /// After a failed accept on the listener `what`: pauses and returns
    /// `true` (count it) when the process is out of descriptors; `false` for
    /// an error of that one connection (aborted before it was accepted).
    pub async fn pause(&mut self, what: &str, e: &io::Error) -> bool {
        if !is_out_of_descriptors(e) {
            tracing::debug!(listener = what, "accept: {e}");
            return false;
        }
        let pause = self.backoff.step();
        tracing::warn!(listener = what, "accept: {e}; pausing {pause:?}");
        tokio::time::sleep(pause).await;
        true
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { backoff: crate::backoff::Backoff::new(Self::FIRST, Self::MAX) }
    }
}

/// EMFILE (the process) or ENFILE (the system) is out of descriptors.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE)
}

/// What this host ran out of when a backend socket could not be made or
/// connected: its own resources, not the backend's fault (R6, B16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    /// No free source port toward the backend (EADDRNOTAVAIL at connect).
    SourcePorts,
    /// Out of descriptors or socket memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    Descriptors,
}

impl Exhausted {
    /// Is `e` a local exhaustion, and of what?
    pub fn of(e: &io::Error) -> Option<Exhausted> {
        use nix::libc;
        match e.raw_os_error()? {
            libc::EADDRNOTAVAIL => Some(Exhausted::SourcePorts),
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => Some(Exhausted::Descriptors),
            _ => None,
        }
    }
}

/// Connects to a backend (B16). Without `sources` the kernel picks the
/// source address and port. With them, the connect comes from each in turn,
/// starting at `turn`: bound with `IP_BIND_ADDRESS_NO_PORT`, so the port is
/// picked at connect time and shared across different backends (a port is
/// only used up per source, backend pair); one source out of ports
/// (EADDRNOTAVAIL) passes to the next.
pub async fn connect_tcp(backend: SocketAddr, sources: &[IpAddr], turn: usize) -> io::Result<tokio::net::TcpStream> {
    let mut order = in_turn(sources, backend, turn).peekable();
    if order.peek().is_none() {
        return new_tcp(backend)?.connect(backend).await;
    }
    let mut last = None;
    for source in order {
        let socket = new_tcp(backend)?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(backend).await {
            Err(e) if Exhausted::of(&e) == Some(Exhausted::SourcePorts) => last = Some(e),
            done => return done,
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable)))
}

/// The source addresses of `backend`'s family, each once, from the one whose
/// `turn` it is (no allocation: this runs per connect).
fn in_turn(sources: &[IpAddr], backend: SocketAddr, turn: usize) -> impl Iterator<Item = IpAddr> + '_ {
    let family = move |ip: &&IpAddr| ip.is_ipv4() == backend.is_ipv4();
    let n = sources.iter().filter(family).count();
    sources.iter().filter(family).copied().cycle().skip(turn % n.max(1)).take(n)
}

fn new_tcp(backend: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    if backend.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
}

/// A UDP socket connected to `backend`, from an ephemeral port of its own
/// (of `source`, when the pool names source addresses).
pub fn connect_udp(backend: SocketAddr, sources: &[IpAddr], turn: usize) -> io::Result<tokio::net::UdpSocket> {
    let any =
        if backend.is_ipv4() { IpAddr::from([0, 0, 0, 0]) } else { IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) };
    let source = in_turn(sources, backend, turn).next().unwrap_or(any);
    let socket = std::net::UdpSocket::bind(SocketAddr::new(source, 0))?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket)
}

/// Can this host send from `ip` (is it one of its addresses)?
pub fn check_source(ip: IpAddr) -> io::Result<()> {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0)).map(drop)
}

/// Raises the soft descriptor limit (`RLIMIT_NOFILE`) to the hard limit, as
/// HAProxy and nginx do at start; returns the limit in effect.
pub fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise the descriptor limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("cannot read the descriptor limit: {e}");
            1024
        }
    }
}

/// Descriptors left out of the UDP socket cap: listeners, probes, the admin
/// API, plugin files, the runtime's own.
pub const RESERVED_DESCRIPTORS: usize = 256;
/// The UDP socket cap is never below this (a tiny descriptor limit still
/// serves some UDP flows).
const MIN_UDP_SOCKETS: usize = 64;
/// Backend-facing UDP sockets open in this process.
static UDP_SOCKETS: AtomicUsize = AtomicUsize::new(0);

/// The most backend-facing UDP sockets this process opens (R6): half of the
/// descriptor limit (`RLIMIT_NOFILE`, read once) after the reserved ones,
/// leaving the other half to TCP flows (two descriptors each) and the rest.
pub fn udp_socket_cap() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX));
        (limit.saturating_sub(RESERVED_DESCRIPTORS) / 2).max(MIN_UDP_SOCKETS)
    })
}

/// Backend-facing UDP sockets open in this process now.
pub fn udp_sockets_open() -> usize {
    UDP_SOCKETS.load(Ordering::Relaxed)
}

/// A worker's share of the UDP socket cap: each worker gets an equal part,
/// so that a flood whose sources all hash to one worker cannot take the
/// places of the others.
#[derive(Debug)]
pub struct UdpBudget {
    open: AtomicUsize,
    cap: usize,
}

impl UdpBudget {
    /// The share of one of `workers` workers.
    pub fn new(workers: usize) -> UdpBudget {
        UdpBudget { open: AtomicUsize::new(0), cap: (udp_socket_cap() / workers.max(1)).max(1) }
    }

    /// A place for one more socket, if the share has one.
    pub fn take(self: &Arc<Self>) -> Option<SocketSlot> {
        let cap = self.cap;
        self.open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < cap).then_some(n + 1)).ok()?;
        UDP_SOCKETS.fetch_add(1, Ordering::Relaxed);
        Some(SocketSlot(Arc::clone(self)))
    }
}

/// One place under the UDP socket cap, held by a flow with its socket.
#[derive(Debug)]
pub struct SocketSlot(Arc<UdpBudget>);

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        UDP_SOCKETS.fetch_sub(1, Ordering::Relaxed);
    }
}
