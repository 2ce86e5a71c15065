//! # End-to-end test kit
//!
//! Real sockets on loopback, real plugins: named TCP backends that report how
//! each connection ended, config text to [`Server`], and the test plugins
//! compiled to Wasm by this crate's build script ([`plugins`]).

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fulcrum::Server;
use fulcrum::config::Config;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

pub mod probe_target;
pub mod process;

/// The test plugins, compiled to Wasm components (`*_PATH`: their files).
pub mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
}

/// How a backend saw one connection end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The peer closed its side (FIN).
    Eof,
    /// The peer reset the connection.
    Reset,
}

/// A TCP backend that greets every connection with `<name>\n`, echoes what it
/// receives, answers an EOF with `eof-seen\n` before closing, and reports how
/// each connection ended.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    endings: mpsc::UnboundedReceiver<Ending>,
    task: tokio::task::AbortHandle,
}

impl Backend {
    /// Starts a backend on `ip`, port 0.
    pub async fn start(name: &str, ip: &str) -> Backend {
        let ip: IpAddr = ip.parse().unwrap();
        Backend::start_on(name, SocketAddr::new(ip, 0)).await
    }

    /// Starts a backend on `addr` (a stopped backend's, to bring it back).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, endings) = mpsc::unbounded_channel();
        let greeting = format!("{name}\n");
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let (tx, greeting) = (tx.clone(), greeting.clone());
                tokio::spawn(async move {
                    let _ = stream.write_all(greeting.as_bytes()).await;
                    let mut buf = vec![0u8; 16 * 1024];
                    let ending = loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => {
                                let _ = stream.write_all(b"eof-seen\n").await;
                                let _ = stream.shutdown().await;
                                break Ending::Eof;
                            }
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    break Ending::Reset;
                                }
                            }
                            Err(_) => break Ending::Reset,
                        }
                    };
                    let _ = tx.send(ending);
                });
            }
        })
        .abort_handle();
        Backend { name: name.to_owned(), addr, accepted, endings, task }
    }

    /// Stops listening: its port refuses connections (established ones go on).
    pub async fn stop(&self) {
        self.task.abort();
        while TcpStream::connect(self.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits (at most 10 s) for the next connection to end, and says how.
    pub async fn next_ending(&mut self) -> Ending {
        tokio::time::timeout(Duration::from_secs(10), self.endings.recv()).await.unwrap().unwrap()
    }
}

/// A UDP echo backend: answers every datagram with `<name>|` and the
/// datagram itself, from the address it was sent to.
pub struct UdpBackend {
    pub name: String,
    pub addr: SocketAddr,
    received: Arc<AtomicUsize>,
    task: tokio::task::AbortHandle,
}

impl UdpBackend {
    pub async fn start(name: &str, ip: &str) -> UdpBackend {
        UdpBackend::start_on(name, SocketAddr::new(ip.parse().unwrap(), 0)).await
    }

    /// Starts a backend on `addr` (a stopped backend's, to bring it back).
    pub async fn start_on(name: &str, addr: SocketAddr) -> UdpBackend {
        let socket = tokio::net::UdpSocket::bind(addr).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let (count, prefix) = (Arc::clone(&received), format!("{name}|").into_bytes());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut reply = prefix.clone();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, from).await;
            }
        })
        .abort_handle();
        UdpBackend { name: name.to_owned(), addr, received, task }
    }

    /// Stops: its port answers "port unreachable" (once the task is gone).
    pub async fn stop(&self) {
        self.task.abort();
        // The socket closes when the aborted task is dropped, at its next poll.
        while tokio::net::UdpSocket::bind(self.addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

/// Sends `payload` from `socket` to `frontend`; the reply split into the
/// backend's name and the echoed payload, or `None` after `wait`.
pub async fn udp_ask(
    socket: &tokio::net::UdpSocket,
    frontend: SocketAddr,
    payload: &[u8],
    wait: Duration,
) -> Option<(String, Vec<u8>)> {
    socket.send_to(payload, frontend).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, from) = tokio::time::timeout(wait, socket.recv_from(&mut buf)).await.ok()?.ok()?;
    assert_eq!(from, frontend, "a reply must come from the frontend address");
    let split = buf[..n].iter().position(|&b| b == b'|')?;
    Some((String::from_utf8_lossy(&buf[..split]).into_owned(), buf[split + 1..n].to_vec()))
}

/// Starts `count` backends named `b0..` on `ip`.
pub async fn backends(count: usize, ip: &str) -> Vec<Backend> {
    let mut out = Vec::new();
    for i in 0..count {
        out.push(Backend::start(&format!("b{i}"), ip).await);
    }
    out
}

/// `backends = [...]` entries for a pool, with optional weights.
pub fn backend_list(backends: &[Backend], weights: Option<&[u32]>) -> String {
    let entries: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| match weights {
            Some(w) => format!("{{ address = \"{}\", weight = {} }}", b.addr, w[i]),
            None => format!("{{ address = \"{}\" }}", b.addr),
        })
        .collect();
    format!("[ {} ]", entries.join(", "))
}

/// A one-frontend, one-pool config: frontend `web` on 127.0.0.1:0.
/// `frontend_extra` and `pool_extra` are extra TOML lines for each table.
pub fn config(workers: usize, balancer: &str, backends: &str, frontend_extra: &str, pool_extra: &str) -> String {
    format!(
        r#"
[runtime]
workers = {workers}

[[frontend]]
name = "web"
listen = "127.0.0.1:0"
pool = "web"
{frontend_extra}

[[pool]]
name = "web"
balancer = "{balancer}"
backends = {backends}
{pool_extra}
"#
    )
}

/// Starts a server from config text.
pub fn serve(text: &str) -> Server {
    let config = Config::parse(Path::new("test.toml"), text).unwrap_or_else(|e| panic!("{e}"));
    Server::start(&config).unwrap_or_else(|e| panic!("{e}"))
}

/// A config file in a folder of its own, rewritten atomically (write, then
/// rename) so that a file watcher never reads half a file.
pub struct ConfigFile {
    pub dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
}

impl ConfigFile {
    pub fn new(test: &str, text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("fulcrum-e2e-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = ConfigFile { path: dir.join("fulcrum.toml"), dir };
        file.write(text);
        file
    }

    pub fn write(&self, text: &str) {
        replace_file(&self.path, text.as_bytes());
    }
}

/// Replaces a file's content atomically.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Starts a server from a config file (so that it can reload it).
pub fn serve_file(file: &ConfigFile) -> Server {
    let config = Config::load(&file.path).unwrap_or_else(|e| panic!("{e}"));
    Server::start(&config).unwrap_or_else(|e| panic!("{e}"))
}

/// One admin API request (addressed to the API itself: `Host` is its
/// address); returns the status code and the body.
pub async fn admin(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    admin_with(addr, method, path, &format!("host: {addr}\r\n{auth}")).await
}

/// One admin API request with the header lines `headers` (each ending in
/// CRLF; `Host` included if wanted); returns the status code and the body.
pub async fn admin_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\n{headers}content-length: 0\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_string(&mut response)).await.unwrap().unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Connects (from `from`, if given) and reads the backend's greeting line.
pub async fn connect(frontend: SocketAddr, from: Option<SocketAddr>) -> (BufReader<TcpStream>, String) {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(from) = from {
        socket.set_reuseaddr(true).unwrap();
        socket.bind(from).unwrap();
    }
    let stream = socket.connect(frontend).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut name)).await.unwrap().unwrap();
    (reader, name.trim().to_owned())
}

/// Sends a line on an established flow and asserts that the backend echoes it.
pub async fn assert_echoes(flow: &mut BufReader<TcpStream>, line: &str) {
    flow.get_mut().write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut echoed = String::new();
    tokio::time::timeout(Duration::from_secs(10), flow.read_line(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, format!("{line}\n"), "the flow did not carry the line");
}

/// One short flow: connect, read the greeting, close with RST (so that no
/// TIME_WAIT is left behind and a fixed source port can be reused at once).
pub async fn greeting(frontend: SocketAddr, from: Option<SocketAddr>) -> String {
    let (reader, name) = connect(frontend, from).await;
    let stream = reader.into_inner();
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).unwrap();
    name
}

/// Connects and expects the balancer to reset the connection at once: before
/// the connect completes, or on the first read.
pub async fn expect_reset(frontend: SocketAddr) {
    let result = match TcpStream::connect(frontend).await {
        Ok(mut client) => {
            let mut buf = [0u8; 8];
            tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.unwrap()
        }
        Err(e) => Err(e),
    };
    assert!(matches!(result, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "not reset: {result:?}");
}

/// Waits until `condition` holds, polling every 5 ms, at most `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The state of backend `i` of pool `web`.
pub fn state(server: &Server, i: usize) -> fulcrum_sdk::BackendState {
    server.pool("web").unwrap().load().backends[i].state
}

/// Waits (at most `limit`) until pool `web` satisfies `condition`, checking
/// at each new snapshot (the pool's change notification, no polling).
pub async fn wait_pool(server: &Server, limit: Duration, what: &str, mut condition: impl FnMut(&Server) -> bool) {
    let mut changes = server.pool("web").unwrap().subscribe();
    let reached = tokio::time::timeout(limit, async {
        // Subscribed first, then checked: a change in between is not missed.
        while !condition(server) {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    })
    .await;
    assert!(reached.is_ok(), "timed out waiting for {what}");
}

/// Waits (at most `limit`) until backend `i` of pool `web` is in `want`;
/// returns how long that took.
pub async fn wait_state(server: &Server, i: usize, want: fulcrum_sdk::BackendState, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_pool(server, limit, &format!("backend {i} to be {want:?}"), |s| state(s, i) == want).await;
    start.elapsed()
}

/// Asserts that sequential flows went round backends `b0..` in strict turns
/// from `b0` (b0, b1, b2, b0, b1, b2, ... for three).
pub fn assert_strict_turns(names: &[String], backends: usize) {
    for (i, name) in names.iter().enumerate() {
        assert_eq!(name, &format!("b{}", i % backends), "connection {i} broke the rotation: {names:?}");
    }
}

/// Counts of each name in `names`.
pub fn tally(names: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for n in names {
        *counts.entry(n.clone()).or_insert(0) += 1;
    }
    counts
}

/// The built `fulcrum` binary (next to this test's own executable; `cargo
/// test --workspace` builds it).
pub fn fulcrum_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("fulcrum");
    assert!(bin.is_file(), "{} is missing: build the workspace first (cargo test --workspace)", bin.display());
    bin
}

/// The troubleshooter's findings as `GET /diagnose` gives them.
pub async fn diagnose(admin_addr: SocketAddr) -> serde_json::Value {
    let (status, body) = admin(admin_addr, "GET", "/diagnose", None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The finding of `kind` (about `backend`, if given), if there is one.
pub fn finding<'a>(
    diagnosis: &'a serde_json::Value,
    kind: &str,
    backend: Option<SocketAddr>,
) -> Option<&'a serde_json::Value> {
    diagnosis["findings"]
        .as_array()?
        .iter()
        .find(|f| f["kind"] == kind && backend.is_none_or(|b| f["backend"].as_str() == Some(b.to_string().as_str())))
}

/// Runs `fulcrum diagnose -c FILE --json` against the instance whose admin
/// API is `admin_addr` (the file names it); returns its exit code and output.
pub fn diagnose_cli(admin_addr: SocketAddr) -> (i32, serde_json::Value, String) {
    let file = ConfigFile::new(
        &format!("diagnose-{}", admin_addr.port()),
        &format!(
            "[admin]\nlisten = \"{admin_addr}\"\n\n[[frontend]]\nname = \"x\"\nlisten = \"127.0.0.1:0\"\npool = \"x\"\n\n[[pool]]\nname = \"x\"\nbackends = [ {{ address = \"127.0.0.1:1\" }} ]\n"
        ),
    );
    let run = |json: bool| {
        let mut command = std::process::Command::new(fulcrum_bin());
        command.args(["diagnose", "-c"]).arg(&file.path);
        if json {
            command.arg("--json");
        }
        command.output().unwrap()
    };
    let (json, text) = (run(true), run(false));
    assert_eq!(json.status.code(), text.status.code());
    let parsed = serde_json::from_slice(&json.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&json.stdout), String::from_utf8_lossy(&json.stderr))
    });
    (json.status.code().unwrap_or(-1), parsed, String::from_utf8_lossy(&text.stdout).into_owned())
}

/// An HTTPS server on 127.0.0.1 with certificate `cert` (and its `key`,
/// PKCS#8 DER) that answers every request `200 ok`.
pub async fn https_server(cert: rustls::pki_types::CertificateDer<'static>, key: Vec<u8>) -> SocketAddr {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}
