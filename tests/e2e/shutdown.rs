//! B17, graceful shutdown of the real binary: SIGTERM closes the listeners
//! at once, established flows go on for `shutdown_grace`, then what remains
//! is reset and the process exits 0; a second signal ends at once.

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fulcrum_tests::*;
use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `fulcrum run` on a config of one frontend over `backend`, with the admin
/// API; the child and the frontend's address (read from what it prints).
fn start(test: &str, backend: SocketAddr, runtime: &str) -> (Child, SocketAddr, ConfigFile) {
    start_frontend(test, backend, runtime, "")
}

/// [`start`], with `frontend` added to the frontend's table.
fn start_frontend(test: &str, backend: SocketAddr, runtime: &str, frontend: &str) -> (Child, SocketAddr, ConfigFile) {
    let text = config(1, "stock:round-robin", &format!("[ {{ address = \"{backend}\" }} ]"), frontend, "")
        .replace("[runtime]\n", &format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n[runtime]\nwatch = false\n{runtime}\n"));
    let file = ConfigFile::new(test, &text);
    let mut child = Command::new(fulcrum_bin())
        .args(["run", "-c"])
        .arg(&file.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let addr = line.rsplit(' ').next().unwrap().parse().unwrap();
    let admin = lines.next().unwrap().unwrap();
    let admin = admin.trim_start_matches("admin API on http://").trim_end_matches('/').to_owned();
    std::fs::write(file.dir.join("admin"), admin).unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr, file)
}

fn signal(child: &Child, signal: Signal) {
    kill_process(Pid::from_child(child), signal).unwrap();
}

/// Waits (at most `limit`) for the child to exit; its exit code.
async fn exit_code(child: &mut Child, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(start.elapsed() < limit, "still running after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until a new connection to `addr` is refused.
async fn until_refused(addr: SocketAddr) {
    let start = Instant::now();
    while TcpStream::connect(addr).await.is_ok() {
        assert!(start.elapsed() < Duration::from_secs(5), "still accepting 5 s after the signal");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects and reads the backend's greeting.
async fn flow(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 3];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"b0\n");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_transfer_finish_byte_for_byte_and_refuses_new_connections() {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let (mut child, addr, file) = start("shutdown-transfer", backend.addr, "");
    let stream = flow(addr).await;
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (mut rx, mut tx) = stream.into_split();
    let sent = data.clone();
    let (first_mib, signalled) = (tokio::sync::oneshot::channel::<()>(), tokio::sync::oneshot::channel::<()>());
    let (first_tx, first_rx) = first_mib;
    let (signalled_tx, signalled_rx) = signalled;
    let writer = tokio::spawn(async move {
        tx.write_all(&sent[..1 << 20]).await.unwrap();
        let _ = first_tx.send(());
        // The rest only once the process is draining: the transfer straddles the signal.
        signalled_rx.await.unwrap();
        tx.write_all(&sent[1 << 20..]).await.unwrap();
        tx.shutdown().await.unwrap();
    });
    first_rx.await.unwrap();
    signal(&child, Signal::TERM);
    until_refused(addr).await;
    // The admin API still answers: draining, one flow left, time left.
    let api: SocketAddr = std::fs::read_to_string(file.dir.join("admin")).unwrap().parse().unwrap();
    let (code, status) = admin(api, "GET", "/status", None).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"], "draining", "{status}");
    assert_eq!(status["shutdown"]["flows_left"], 1, "{status}");
    assert!(status["shutdown"]["grace_left_ms"].as_u64().unwrap() > 20_000, "{status}");
    signalled_tx.send(()).unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), rx.read_to_end(&mut echoed)).await.unwrap().unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), data.len() + b"eof-seen\n".len());
    assert!(echoed[..data.len()] == data[..], "the transfer was not byte for byte");
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_a_silent_flow_is_reset_and_the_process_exits_0() {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let (mut child, addr, _file) = start("shutdown-grace", backend.addr, "shutdown_grace = \"1s\"");
    let mut silent = flow(addr).await;
    signal(&child, Signal::TERM);
    let signalled = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await.unwrap();
    let after = signalled.elapsed();
    assert!(matches!(read, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "not reset: {read:?}");
    assert!(after >= Duration::from_millis(900), "reset before the grace: {after:?}");
    eprintln!("silent flow reset {after:?} after SIGTERM (grace 1 s)");
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_at_once() {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let (mut child, addr, _file) = start("shutdown-second", backend.addr, "shutdown_grace = \"60s\"");
    let mut silent = flow(addr).await;
    signal(&child, Signal::TERM);
    until_refused(addr).await;
    let second = Instant::now();
    signal(&child, Signal::INT);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
    eprintln!("exited {:?} after the second signal (grace 60 s)", second.elapsed());
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await.unwrap();
    assert!(matches!(read, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "not reset: {read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_proxy_header_at_sigterm_is_served_once_it_completes() {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let extra = "accept_proxy = true\nproxy_header_timeout = \"20s\"\n";
    let (mut child, addr, file) = start_frontend("shutdown-proxy-header", backend.addr, "", extra);
    let api: SocketAddr = std::fs::read_to_string(file.dir.join("admin")).unwrap().parse().unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"PROXY TCP4 192.0.2.1 ").await.unwrap();
    // Accepted and waiting for the rest of its header: a flow of the frontend.
    let active = || async {
        let (_, status) = admin(api, "GET", "/status", None).await;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["frontends"][0]["active_flows"].as_u64()
    };
    let waited = Instant::now();
    while active().await != Some(1) {
        assert!(waited.elapsed() < Duration::from_secs(10), "the connection was never accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, Signal::TERM);
    until_refused(addr).await;
    let (_, status) = admin(api, "GET", "/status", None).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["shutdown"]["flows_left"], 1, "the waiting header is not counted: {status}");
    // The rest of the header, then data: served to its end.
    stream.write_all(b"192.0.2.2 40000 80\r\nhello\n").await.unwrap();
    let mut answer = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer)).await.unwrap().unwrap();
    assert_eq!(&answer, b"b0\nhello\n");
    drop(stream);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
}
