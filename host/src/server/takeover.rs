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
//!   start serving on them
//!   "serving\n" ──────────────────────>  stops listening on control_socket, removes it
//!                          <───────────  "draining\n", then drains as on SIGTERM
//!   listens on control_socket
//! ```
//!
//! The sockets are shared, not reopened: connections waiting in a listen
//! queue are accepted by whichever process accepts next, none is refused or
//! reset. A takeover that fails (bad config, a plugin that does not load)
//! exits before "serving": the old process never stopped anything and goes on.
//! The socket file is made owner-only (0600).

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
use crate::net::Listener;

/// How long the old process waits for the new one to say it serves (the new
/// one loads and compiles every plugin first).
const SERVING_WAIT: Duration = Duration::from_secs(120);

/// Where the handed-over sockets go, as the new process finds them.
#[derive(Debug, Default)]
pub struct Inherited {
    frontends: Vec<(String, Protocol, Vec<Listener>)>,
    pub admin: Option<std::net::TcpListener>,
}

impl Inherited {
    /// The sockets of frontend `name` (same protocol, same address as
    /// configured: a moved frontend binds anew).
    pub fn take(&mut self, name: &str, protocol: Protocol, listen: SocketAddr) -> Option<Vec<Listener>> {
        let i = self.frontends.iter().position(|(n, p, sockets)| {
            n == name
                && *p == protocol
                && sockets
                    .first()
                    .and_then(|s| s.local_addr().ok())
                    .is_some_and(|a| listen.port() == 0 && listen.ip() == a.ip() || listen == a)
        })?;
        Some(self.frontends.swap_remove(i).2)
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    frontends: Vec<HeaderFrontend>,
    admin: bool,
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
    link.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| error("control socket", path, e))?;
    link.write_all(b"takeover\n").map_err(|e| error("cannot ask", path, e))?;
    let header = read_line(&mut link).map_err(|e| error("no answer", path, e))?;
    let header: Header = serde_json::from_str(&header).map_err(|e| error("a garbled answer", path, e))?;
    let mut inherited = Inherited::default();
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
/// waits until it has let go of the control socket.
pub fn confirm(mut link: UnixStream, path: &Path) -> Result<(), TakeoverError> {
    link.write_all(b"serving\n").map_err(|e| error("the old process is gone", path, e))?;
    let answer = read_line(&mut link).map_err(|e| error("the old process did not answer", path, e))?;
    if answer != "draining" {
        return Err(error("the old process answered", path, answer));
    }
    Ok(())
}

/// One line, read a byte at a time: nothing past it (a descriptor's
/// message) is taken from the socket.
fn read_line(link: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1 << 20 {
        if link.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return String::from_utf8(line).map_err(|_| std::io::ErrorKind::InvalidData.into());
        }
        line.push(byte[0]);
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
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot listen for a takeover: {e}");
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
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

/// Sends every listening socket; on "serving", lets go of the control
/// socket and asks the server to drain.
fn hand_over(shared: &Shared, mut link: UnixStream, path: &Path) -> std::io::Result<()> {
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
    let _ = shared.taken_over.send(true);
    let _ = link.write_all(b"draining\n");
    Ok(())
}
