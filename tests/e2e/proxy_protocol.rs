//! PROXY protocol with real third-party parsers: nginx (`listen ...
//! proxy_protocol`) as the backend reports the client Fulcrum names in v1
//! and v2; HAProxy (`send-proxy`, `send-proxy-v2`) in front of a frontend
//! with `accept_proxy` has its client passed on; bad headers are refused
//! and counted.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fulcrum_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// A third-party server run for one test, killed on drop.
struct Daemon(Child, PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fulcrum-pp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loopback port free now (the daemons cannot bind port 0 and tell).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_listening(addr: SocketAddr, what: &str) {
    let start = std::time::Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(start.elapsed() < WAIT, "{what} does not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// nginx on 127.0.0.1 whose server reads a PROXY header (v1 or v2) and
/// answers every request with the client it names: `addr:port`.
async fn nginx() -> (Daemon, SocketAddr) {
    let dir = scratch("nginx");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 128; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen {addr} proxy_protocol;\n    location / {{ return 200 \"client=$proxy_protocol_addr:$proxy_protocol_port server=$proxy_protocol_server_addr:$proxy_protocol_server_port\\n\"; }}\n  }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .args(["-p"])
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is not installed: scripts/test installs it");
    let daemon = Daemon(child, dir);
    wait_listening(addr, "nginx").await;
    (daemon, addr)
}

/// HAProxy in TCP mode: one frontend per `(send-proxy option)`, each in
/// front of `target`; returns their addresses in order.
async fn haproxy(target: SocketAddr, options: &[&str]) -> (Daemon, Vec<SocketAddr>) {
    let dir = scratch("haproxy");
    let mut conf = String::from(
        "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n",
    );
    let mut addrs = Vec::new();
    for (i, option) in options.iter().enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        conf += &format!(
            "frontend f{i}\n  bind {addr}\n  default_backend b{i}\nbackend b{i}\n  server s{i} {target} {option}\n"
        );
        addrs.push(addr);
    }
    std::fs::write(dir.join("haproxy.cfg"), conf).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy is not installed: scripts/test installs it");
    let daemon = Daemon(child, dir);
    for addr in &addrs {
        wait_listening(*addr, "haproxy").await;
    }
    (daemon, addrs)
}

/// An HTTP/1.0 GET through `to`, from a socket of our own; returns our
/// address and the answer's body.
async fn get(to: SocketAddr) -> (SocketAddr, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    let me = stream.local_addr().unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    (me, answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_owned())
}

fn pool_to(backend: SocketAddr, version: &str, frontend_extra: &str) -> String {
    config(
        1,
        "stock:round-robin",
        &format!("[ {{ address = \"{backend}\" }} ]"),
        frontend_extra,
        &format!("proxy_protocol = \"{version}\""),
    ) + "\n[admin]\nlisten = \"127.0.0.1:0\"\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_as_the_backend_sees_the_real_client_through_v1_and_v2() {
    let (_nginx, backend) = nginx().await;
    for version in ["v1", "v2"] {
        // An HTTP probe of the data port sends a health-check header too
        // (v1 UNKNOWN, v2 LOCAL): nginx answers it, the backend is up.
        let probe = "\n[pool.probe]\nprotocol = \"http\"\npath = \"/\"\ninterval = \"100ms\"\nthreshold = 1\n";
        let server = serve(&pool_to(backend, version, "").replace("[admin]", &format!("{probe}\n[admin]")));
        wait_state(&server, 0, fulcrum_sdk::BackendState::Up, WAIT).await;
        assert_eq!(server.pool("web").unwrap().load().backends[0].stats.last_probe().unwrap().status, Some(200));
        let frontend = server.frontend_addr("web").unwrap();
        for _ in 0..3 {
            let (me, body) = get(frontend).await;
            assert_eq!(body, format!("client={me} server={frontend}"), "{version}");
        }
        server.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_proxy_passes_haproxys_client_on_to_nginx() {
    // client -> HAProxy (send-proxy / send-proxy-v2) -> Fulcrum (accept_proxy,
    // then proxy_protocol v1) -> nginx: nginx sees the client and the address
    // it reached (HAProxy's), as HAProxy told Fulcrum.
    let (_nginx, backend) = nginx().await;
    let server = serve(&pool_to(backend, "v1", "accept_proxy = true"));
    let frontend = server.frontend_addr("web").unwrap();
    let (_haproxy, fronts) = haproxy(frontend, &["send-proxy", "send-proxy-v2"]).await;
    for front in &fronts {
        for _ in 0..3 {
            let (me, body) = get(*front).await;
            assert_eq!(body, format!("client={me} server={front}"));
        }
    }
    // Every flow had a header Fulcrum accepted (these six, and the ones of
    // the connects that waited for HAProxy to listen, which HAProxy may abort).
    let flows = server.flows("web").unwrap();
    let ended = || fulcrum::flow::CloseReason::ALL.iter().map(|r| flows.closed(*r)).sum::<u64>();
    wait_until(WAIT, "every flow ended", || ended() == flows.started() && flows.started() >= 6).await;
    assert!(flows.closed(fulcrum::flow::CloseReason::Completed) >= 6);
    assert_eq!(flows.proxy_headers_refused(), 0);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_are_refused_and_counted() {
    let b = Backend::start("b0", "127.0.0.1").await;
    let text = config(
        1,
        "stock:round-robin",
        &backend_list(std::slice::from_ref(&b), None),
        "accept_proxy = true\nproxy_header_timeout = \"300ms\"",
        "",
    ) + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let server = serve(&text);
    let frontend = server.frontend_addr("web").unwrap();
    let refused = |bytes: Vec<u8>| async move {
        let mut stream = TcpStream::connect(frontend).await.unwrap();
        let _ = stream.write_all(&bytes).await;
        let mut buf = [0u8; 64];
        let outcome = tokio::time::timeout(WAIT, stream.read(&mut buf)).await.unwrap();
        assert!(matches!(outcome, Err(_) | Ok(0)), "not refused: {outcome:?}");
    };
    // No header at all; a v1 line that lacks a part; a v2 header announcing
    // 65,535 bytes (past the bound); a header that never completes (slow).
    refused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
    refused(b"PROXY TCP4 192.0.2.1 192.0.2.2 5000\r\n".to_vec()).await;
    let mut big = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    big.resize(6000, 0);
    refused(big).await;
    refused(b"PROXY TCP4 192.0.2.1".to_vec()).await;
    let flows = server.flows("web").unwrap();
    wait_until(WAIT, "4 refused headers", || flows.proxy_headers_refused() == 4).await;
    assert_eq!(b.accepted(), 0, "nothing reached the backend");
    // A good one still works, with bytes right behind the header; a v2
    // LOCAL header (an upstream's health check) keeps the peer's address.
    let mut stream = TcpStream::connect(frontend).await.unwrap();
    stream.write_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 80\r\nhello\n").await.unwrap();
    let mut got = vec![0u8; "b0\nhello\n".len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"b0\nhello\n");
    let sample = fulcrum::proxy::proxy_header::encode(
        fulcrum::config::ProxyProtocol::V2,
        "10.0.0.1:1".parse().unwrap(),
        "[::1]:2".parse().unwrap(),
    );
    let mut local = TcpStream::connect(frontend).await.unwrap();
    let me = local.local_addr().unwrap();
    local.write_all(&sample).await.unwrap();
    let mut line = vec![0u8; 3];
    tokio::time::timeout(WAIT, local.read_exact(&mut line)).await.unwrap().unwrap();
    let clients: Vec<SocketAddr> = flows.sample(10).iter().map(|e| e.key.client).collect();
    assert!(clients.contains(&"192.0.2.1:5000".parse().unwrap()) && clients.contains(&me), "{clients:?}");
    let (_, metrics) = admin(server.admin_addr().unwrap(), "GET", "/metrics", None).await;
    assert!(metrics.contains("fulcrum_proxy_headers_refused_total{frontend=\"web\"} 4"), "{metrics}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_upstreams_in_accept_proxy_from_are_believed() {
    // The upstream is 127.0.0.2; a peer on 127.0.0.3 that forges a header is
    // reset before its header is read (no slot held), and counted.
    let b = Backend::start("b0", "127.0.0.1").await;
    let text = config(
        1,
        "stock:round-robin",
        &backend_list(std::slice::from_ref(&b), None),
        "accept_proxy = true\naccept_proxy_from = [\"127.0.0.2/32\"]",
        "",
    );
    let server = serve(&text);
    let frontend = server.frontend_addr("web").unwrap();
    let from = |ip: [u8; 4]| async move {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((ip, 0))).unwrap();
        // A refused peer may be reset before its connect returns, or it writes.
        let mut stream = socket.connect(frontend).await?;
        let _ = stream.write_all(b"PROXY TCP4 203.0.113.9 192.0.2.2 4444 80\r\n").await;
        let mut got = vec![0u8; 3];
        tokio::time::timeout(WAIT, stream.read_exact(&mut got)).await.unwrap().map(|_| got)
    };
    assert_eq!(from([127, 0, 0, 2]).await.unwrap(), b"b0\n");
    assert!(from([127, 0, 0, 3]).await.is_err(), "a header from outside accept_proxy_from is refused");
    let flows = server.flows("web").unwrap();
    assert_eq!(flows.proxy_headers_refused(), 1);
    assert_eq!(b.accepted(), 1);
    server.shutdown();
}
