//! Hitless binary upgrade (B17): `fulcrum run --takeover` receives the
//! running process's listening sockets over its control socket (a Unix
//! socket, `SCM_RIGHTS`), serves on them, and only then tells the old
//! process to drain.
//!
//! ```text
//!  new                                   old (serving)
//!   connect control_socket ───────────>  accept (its own thread)
//!   "takeover\n" ─────────────────────>
//!                          <───────────  header: one JSON line (frontends, socket counts, admin)
//!                          <───────────  one message per socket: 1 byte + the descriptor
//!   start serving on them (TCP; UDP waits)
//!   "serving\n" ──────────────────────>  stops listening on control_socket, removes it,
//!                                        stops reading, gives up its UDP flows
//!                          <───────────  "draining\n", then drains as on SIGTERM
//!                          <───────────  UDP flows: one JSON line, then each one's backend socket
//!   adopts them, then reads UDP
//!   listens on control_socket
//! ```
//!
//! The sockets are shared, not reopened: connections waiting in a listen
//! queue are accepted by whichever process accepts next, none is refused or
//! reset. UDP flows keep their backend and their backend socket (the
//! backend sees the same source port): the old process stops reading at the
//! switch and hands each flow over; the new one reads its UDP sockets only
//! once it has them, so datagrams wait in the sockets' buffers meanwhile and
//! none meets a process that does not know its flow. A takeover that fails (bad config, a plugin that does not load)
//! exits before "serving": the old process never stopped anything and goes on.
//! The socket file is owner-only (0600) from the start, and both sides deal
//! only with a peer that runs as root or as their own user (`SO_PEERCRED`);
//! every count read from the peer is bounded.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use super::Shared;
use crate::config::Protocol;
use crate::live::CarriedFlow;
use crate::net::Listener;

/// How long the old process waits for the new one to say it serves (the new
/// one loads and compiles every plugin first).
const SERVING_WAIT: Duration = Duration::from_secs(120);

/// Where the handed-over sockets go, as the new process finds them.
#[derive(Debug, Default)]
pub struct Inherited {
    frontends: Vec<(String, Protocol, Vec<Listener>)>,
    pub admin: Option<std::net::TcpListener>,
    /// Every backend's health in the old process (drains, probe states,
    /// ejections, slow starts), for the first apply.
    pub health: Vec<crate::probe::Carried>,
}

impl Inherited {
    /// The sockets of frontend `name` (same protocol, same address as
    /// configured: a moved frontend binds anew).
    pub fn take(&mut self, name: &str, protocol: Protocol, listen: SocketAddr) -> Option<Vec<Listener>> {
        let i = self.frontends.iter().position(|(n, p, sockets)| {
            n == name
                && *p == protocol
                && super::same_address(listen, sockets.first().and_then(|s| s.local_addr().ok()))
        })?;
        Some(self.frontends.swap_remove(i).2)
    }
}

impl Inherited {
    /// Closes what was not taken; returns the frontends they were.
    pub fn close(self) -> Vec<(String, Option<SocketAddr>)> {
        self.frontends
            .into_iter()
            .map(|(name, _, sockets)| (name, sockets.first().and_then(|s| s.local_addr().ok())))
            .collect()
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    frontends: Vec<HeaderFrontend>,
    admin: bool,
    /// An old process of an earlier version sends none.
    #[serde(default)]
    health: Vec<crate::probe::Carried>,
}

#[derive(Serialize, Deserialize)]
struct HeaderFrontend {
    name: String,
    udp: bool,
    sockets: usize,
}

/// What went wrong in a takeover, said to the operator.
#[derive(Debug)]
pub struct TakeoverError(pub String);

impl std::fmt::Display for TakeoverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "takeover: {}", self.0)
    }
}

impl std::error::Error for TakeoverError {}

fn error(what: &str, path: &Path, e: impl std::fmt::Display) -> TakeoverError {
    TakeoverError(format!("{what} ({}): {e}", path.display()))
}

/// The new process's side: asks the process listening on `path` for its
/// sockets. The link stays open for [`confirm`].
pub fn request(path: &Path) -> Result<(Inherited, UnixStream), TakeoverError> {
    let mut link = UnixStream::connect(path).map_err(|e| error("no running process answers", path, e))?;
    trusted(&link).map_err(|e| error("refused to take over", path, e))?;
    link.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| error("control socket", path, e))?;
    link.write_all(b"takeover\n").map_err(|e| error("cannot ask", path, e))?;
    let header = read_line(&mut link).map_err(|e| error("no answer", path, e))?;
    let header: Header = serde_json::from_str(&header).map_err(|e| error("a garbled answer", path, e))?;
    let total: usize = header.frontends.iter().map(|f| f.sockets).fold(0, usize::saturating_add);
    if header.frontends.len() > MAX_SOCKETS || total > MAX_SOCKETS {
        let what = format!("{} frontends, {total} sockets (at most {MAX_SOCKETS})", header.frontends.len());
        return Err(error("an answer past the limits", path, what));
    }
    let mut health = header.health;
    health.truncate(crate::probe::monitor::MAX_CARRIED);
    let mut inherited = Inherited { health, ..Inherited::default() };
    for f in header.frontends {
        let mut sockets = Vec::with_capacity(f.sockets);
        for _ in 0..f.sockets {
            let fd = receive_fd(&link).map_err(|e| error("a socket went missing", path, e))?;
            sockets.push(if f.udp {
                Listener::Udp(std::net::UdpSocket::from(fd))
            } else {
                Listener::Tcp(std::net::TcpListener::from(fd))
            });
        }
        let protocol = if f.udp { Protocol::Udp } else { Protocol::Tcp };
        inherited.frontends.push((f.name, protocol, sockets));
    }
    if header.admin {
        let fd = receive_fd(&link).map_err(|e| error("the admin socket went missing", path, e))?;
        inherited.admin = Some(std::net::TcpListener::from(fd));
    }
    Ok((inherited, link))
}

/// The new process's side, once it serves: tells the old one to drain and
/// waits for its word. From the moment "serving" is sent the new process
/// serves whatever happens to the old one (it holds every socket): an old
/// process that dies or breaks off now is logged, never a reason to stop.
///
/// Returns the old process's UDP flows, each with its backend socket, for
/// [`crate::Server::adopt_udp`] (none from an old process that sends none).
pub fn confirm(mut link: UnixStream, path: &Path) -> Vec<CarriedFlow> {
    if let Err(e) = link.write_all(b"serving\n") {
        tracing::warn!(path = %path.display(), "the old process went away before the switch ({e}); serving on its sockets");
        return Vec::new();
    }
    match read_line(&mut link) {
        Ok(answer) if answer == "draining" => {}
        Ok(answer) => {
            tracing::warn!(path = %path.display(), "the old process answered {answer:?} to the switch; serving");
            return Vec::new();
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "the old process did not confirm it drains ({e}); serving");
            return Vec::new();
        }
    }
    let _ = link.set_read_timeout(Some(Duration::from_secs(5)));
    match receive_flows(&mut link) {
        Ok(flows) => flows,
        Err(e) => {
            tracing::warn!(path = %path.display(), "the old process's UDP flows did not come ({e}); they start anew");
            Vec::new()
        }
    }
}

/// Most UDP flows one takeover carries (each is a descriptor).
fn max_flows() -> usize {
    crate::net::udp_socket_cap()
}

/// One UDP flow on the link: a line entry, then its backend socket.
#[derive(Serialize, Deserialize)]
struct FlowLine {
    socket: u64,
    client: SocketAddr,
    backend: SocketAddr,
}

fn receive_flows(link: &mut UnixStream) -> std::io::Result<Vec<CarriedFlow>> {
    let line = read_line(link)?;
    let lines: Vec<FlowLine> = serde_json::from_str(&line).map_err(std::io::Error::other)?;
    if lines.len() > max_flows() {
        return Err(std::io::Error::other(format!("{} flows (at most {})", lines.len(), max_flows())));
    }
    let mut flows = Vec::with_capacity(lines.len());
    for FlowLine { socket, client, backend } in lines {
        let upstream = receive_fd(link)?;
        flows.push(CarriedFlow { socket, client, backend, upstream });
    }
    Ok(flows)
}

fn send_flows(link: &mut UnixStream, flows: &[CarriedFlow]) -> std::io::Result<()> {
    let lines: Vec<FlowLine> =
        flows.iter().map(|f| FlowLine { socket: f.socket, client: f.client, backend: f.backend }).collect();
    let mut line = serde_json::to_vec(&lines).map_err(std::io::Error::other)?;
    line.push(b'\n');
    link.write_all(&line)?;
    for flow in flows {
        send_fd(link, &flow.upstream)?;
    }
    Ok(())
}

/// Stops every worker's loops and takes their UDP flows (at most 2 s).
fn udp_flows_of(shared: &Shared) -> Vec<CarriedFlow> {
    let hand_over = |_, reply| Some(crate::live::WorkerCommand::HandOverUdp(reply));
    let mut flows: Vec<CarriedFlow> =
        crate::live::ask_workers(&shared.workers, hand_over, Duration::from_secs(2)).into_iter().flatten().collect();
    flows.truncate(max_flows());
    flows
}

/// Longest line read from the peer (the header carries every backend's health).
const MAX_LINE: usize = 32 << 20;

/// Most sockets one takeover hands over (every frontend's, one per worker).
const MAX_SOCKETS: usize = 1 << 14;

/// The peer of a control link may take part in a takeover when it runs as
/// root or as this process's own user (`SO_PEERCRED`); returns its pid.
fn trusted(link: &UnixStream) -> Result<u32, String> {
    let peer =
        rustix::net::sockopt::socket_peercred(link).map_err(|e| format!("cannot tell who is at the other end: {e}"))?;
    let me = rustix::process::geteuid();
    let pid = peer.pid.as_raw_nonzero().get() as u32;
    if peer.uid.is_root() || peer.uid == me {
        Ok(pid)
    } else {
        Err(format!(
            "the process at the other end (pid {pid}) runs as uid {}, neither root nor this process's uid {}",
            peer.uid.as_raw(),
            me.as_raw()
        ))
    }
}

/// The pid of a Fulcrum serving the control socket at `path`, if one answers.
pub fn running(path: &Path) -> Option<Result<u32, String>> {
    let link = UnixStream::connect(path).ok()?;
    Some(trusted(&link))
}

/// Makes the directory of a default control socket (a private one of
/// Fulcrum's own, see [`crate::config::default_control_socket`]) and checks
/// that whatever directory holds the socket is not one others may write to.
fn private_parent(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else { return Ok(()) };
    if crate::config::is_private_default_dir(dir) {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot make {}: {e}", dir.display())),
        }
        let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let me = rustix::process::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{} is not a private directory of uid {me} (owner {}, mode {:o}): remove it or set control_socket",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
        return Ok(());
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if meta.mode() & 0o002 != 0 {
        return Err(format!(
            "{} is writable by every user: anyone could put a socket there; set control_socket in a private directory",
            dir.display()
        ));
    }
    Ok(())
}

/// Binds the control socket owner-only from the start: bound in a fresh
/// 0700 directory beside `path`, made 0600 there, then renamed into place.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = parent.join(format!(".fulcrum-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let inner = staging.join("control.sock");
    let bound = UnixListener::bind(&inner).and_then(|listener| {
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

/// One line: the bytes up to the newline are peeked, then read exactly, so
/// nothing past the line (a descriptor's message) is taken from the socket.
fn read_line(link: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut peeked = vec![0u8; 64 << 10];
    while line.len() < MAX_LINE {
        let n = rustix::net::recv(&*link, &mut peeked[..], rustix::net::RecvFlags::PEEK)?.0;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let end = peeked[..n].iter().position(|&b| b == b'\n');
        let take = end.map_or(n, |i| i + 1);
        let mut chunk = vec![0u8; take];
        link.read_exact(&mut chunk)?;
        line.extend_from_slice(&chunk);
        if end.is_some() {
            line.pop();
            return String::from_utf8(line).map_err(|_| std::io::ErrorKind::InvalidData.into());
        }
    }
    Err(std::io::ErrorKind::InvalidData.into())
}

fn send_fd(link: &UnixStream, fd: impl AsFd) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd.as_fd()];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(link, &[IoSlice::new(b"F")], &mut control, SendFlags::empty())?;
    Ok(())
}

fn receive_fd(link: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(link, &mut [IoSliceMut::new(&mut byte)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok(fd);
        }
    }
    Err(std::io::Error::other("a message without its descriptor"))
}

/// The old process's side: listens on `path` on a thread of its own and
/// hands its sockets to whoever asks (owner only), until one takes over.
pub(crate) fn listen(shared: &Arc<Shared>, path: PathBuf) {
    // A file left by a process that is gone is removed; a live one is not stolen.
    if UnixStream::connect(&path).is_ok() {
        tracing::warn!(path = %path.display(), "another process serves this control socket: no takeover into this one");
        return;
    }
    if let Err(e) = private_parent(&path) {
        tracing::warn!(path = %path.display(), "no takeover into this process: {e}");
        return;
    }
    let listener = match bind_private(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot listen for a takeover: {e}");
            return;
        }
    };
    let shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new().name("fulcrum-takeover".into()).spawn(move || {
        for link in listener.incoming() {
            let Ok(link) = link else { continue };
            match hand_over(&shared, link, &path) {
                Ok(()) => return,
                Err(e) => tracing::warn!("takeover refused or failed, serving on: {e}"),
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the takeover thread: {e}");
    }
}

/// The health of every backend, from the control thread (none if it does
/// not answer within 5 s: the new process then starts afresh).
fn health_of(shared: &Shared) -> Vec<crate::probe::Carried> {
    let (reply, answer) = std::sync::mpsc::channel();
    if shared.control.send(super::control::ControlMsg::ExportHealth(reply)).is_err() {
        return Vec::new();
    }
    answer.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
}

/// Sends every listening socket; on "serving", lets go of the control
/// socket and asks the server to drain.
fn hand_over(shared: &Shared, mut link: UnixStream, path: &Path) -> std::io::Result<()> {
    trusted(&link).map_err(std::io::Error::other)?;
    link.set_read_timeout(Some(Duration::from_secs(10)))?;
    if read_line(&mut link)? != "takeover" {
        return Err(std::io::Error::other("not a takeover request"));
    }
    let state = shared.state.load_full();
    let header = Header {
        frontends: state
            .frontends
            .iter()
            .map(|f| HeaderFrontend {
                name: f.name.clone(),
                udp: f.binding.load().config.protocol == Protocol::Udp,
                sockets: 0,
            })
            .collect(),
        admin: shared.admin_socket.is_some(),
        health: health_of(shared),
    };
    let mut header = header;
    let mut sockets = Vec::with_capacity(state.frontends.len());
    for (f, h) in state.frontends.iter().zip(&mut header.frontends) {
        let dups = f.socket_dups()?;
        h.sockets = dups.len();
        sockets.push(dups);
    }
    let mut line = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    line.push(b'\n');
    link.write_all(&line)?;
    for socket in sockets.iter().flatten() {
        send_fd(&link, socket)?;
    }
    if let Some(admin) = &shared.admin_socket {
        send_fd(&link, admin)?;
    }
    tracing::info!("sockets handed to a new process; waiting for it to serve");
    link.set_read_timeout(Some(SERVING_WAIT))?;
    let answer = read_line(&mut link)?;
    if answer != "serving" {
        return Err(std::io::Error::other(format!("the new process answered {answer:?}")));
    }
    let _ = std::fs::remove_file(path);
    tracing::info!("the new process serves: draining");
    // UDP flows go to the new process with their backend sockets: this one
    // stops reading first, and the new one reads once it has them.
    let flows = udp_flows_of(shared);
    // The word and the flows first, then the drain: an old process with
    // nothing to drain may exit at once, and the new one must have them by then.
    let _ = link.write_all(b"draining\n");
    match send_flows(&mut link, &flows) {
        Ok(()) if !flows.is_empty() => tracing::info!(flows = flows.len(), "UDP flows handed to the new process"),
        Ok(()) => {}
        Err(e) => tracing::warn!("the UDP flows did not reach the new process ({e}): they start anew there"),
    }
    let _ = shared.taken_over.send(true);
    Ok(())
}
