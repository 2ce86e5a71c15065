//! B17, hitless binary upgrade: `fulcrum run --takeover` receives the running
//! process's sockets and serves on them; the old one drains. A client that
//! connects all along sees no failure, long flows held by the old process
//! complete byte for byte, UDP keeps answering; a takeover that cannot start
//! leaves the old process serving and exits non-zero.

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fulcrum_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Fulcrum {
    child: Child,
    web: SocketAddr,
    dns: SocketAddr,
}

/// Starts `fulcrum run -c <file> [--takeover]`; returns once it serves (it
/// prints its listeners then).
fn fulcrum(file: &std::path::Path, takeover: bool) -> Result<Fulcrum, i32> {
    let mut command = Command::new(fulcrum_bin());
    command.args(["run", "-c"]).arg(file).stdout(Stdio::piped()).stderr(Stdio::null());
    if takeover {
        command.arg("--takeover");
    }
    let mut child = command.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addrs = std::collections::HashMap::new();
    for line in lines.by_ref().take(2) {
        let line = line.unwrap();
        let mut words = line.split(' ');
        let (Some(name), Some(addr)) = (words.nth(1), words.next_back()) else { continue };
        addrs.insert(name.to_owned(), addr.parse::<SocketAddr>().unwrap());
    }
    std::thread::spawn(move || lines.for_each(drop));
    match (addrs.get("web"), addrs.get("dns")) {
        (Some(&web), Some(&dns)) => Ok(Fulcrum { child, web, dns }),
        _ => Err(child.wait().unwrap().code().unwrap_or(-1)),
    }
}

fn config_text(tcp: SocketAddr, udp: SocketAddr, control: &std::path::Path, balancer: &str) -> String {
    format!(
        r#"
[runtime]
workers = 2
watch = false
shutdown_grace = "60s"
control_socket = "{}"

[[frontend]]
name = "web"
listen = "127.0.0.1:0"
pool = "web"

[[frontend]]
name = "dns"
listen = "127.0.0.1:0"
protocol = "udp"
pool = "dns"

[[pool]]
name = "web"
balancer = "{balancer}"
backends = [ {{ address = "{tcp}" }} ]

[[pool]]
name = "dns"
backends = [ {{ address = "{udp}" }} ]
"#,
        control.display()
    )
}

/// Connects and reads the backend's greeting; `false` on any failure.
async fn one_connection(addr: SocketAddr) -> bool {
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await else {
        return false;
    };
    let mut greeting = [0u8; 3];
    matches!(tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut greeting)).await, Ok(Ok(_)))
        && &greeting == b"b0\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_takeovers_in_a_row_refuse_nothing_and_cut_nothing() {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let udp_backend = UdpBackend::start("u0", "127.0.0.1").await;
    let dir = ConfigFile::new("takeover", "");
    let control = dir.dir.join("control.sock");
    dir.write(&config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin"));
    let first = fulcrum(&dir.path, false).unwrap();
    let (web, dns) = (first.web, first.dns);

    // Long flows, held by the first process through every takeover.
    let mut long = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(web).await.unwrap();
        let mut greeting = [0u8; 3];
        stream.read_exact(&mut greeting).await.unwrap();
        long.push(stream);
    }
    // A client connecting all along, and UDP queries all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (attempted, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let connector = {
        let (stop, attempted, failed) = (Arc::clone(&stop), Arc::clone(&attempted), Arc::clone(&failed));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                attempted.fetch_add(1, Ordering::Relaxed);
                if !one_connection(web).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let (asked, answered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let querier = {
        let (stop, asked, answered) = (Arc::clone(&stop), Arc::clone(&asked), Arc::clone(&answered));
        tokio::spawn(async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                asked.fetch_add(1, Ordering::Relaxed);
                if udp_ask(&socket, dns, b"q", Duration::from_secs(1)).await.is_some() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut processes = vec![first.child];
    let mut took = Vec::new();
    for _ in 0..10 {
        // Some traffic on the current process first.
        let before = attempted.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(10), "connections", || attempted.load(Ordering::Relaxed) >= before + 200).await;
        let started = Instant::now();
        let next = tokio::task::spawn_blocking({
            let path = dir.path.clone();
            move || fulcrum(&path, true)
        })
        .await
        .unwrap()
        .unwrap_or_else(|code| panic!("a takeover failed (exit {code})"));
        took.push(started.elapsed());
        assert_eq!((next.web, next.dns), (web, dns), "the same addresses, the same sockets");
        processes.push(next.child);
    }
    let more = attempted.load(Ordering::Relaxed) + 200;
    wait_until(Duration::from_secs(10), "connections", || attempted.load(Ordering::Relaxed) >= more).await;
    stop.store(true, Ordering::Relaxed);
    connector.await.unwrap();
    querier.await.unwrap();

    // The long flows, on the first process all along, complete byte for byte.
    for (i, stream) in long.iter_mut().enumerate() {
        let data: Vec<u8> = (0..1 << 20).map(|b: u32| (b.wrapping_mul(31).wrapping_add(i as u32) >> 3) as u8).collect();
        let (mut rx, mut tx) = stream.split();
        let (_, echoed) = tokio::join!(async { tx.write_all(&data).await.unwrap() }, async {
            let mut echoed = vec![0u8; data.len()];
            rx.read_exact(&mut echoed).await.unwrap();
            echoed
        });
        assert!(echoed == data, "long flow {i} was not echoed byte for byte");
    }
    let (attempted, failed) = (attempted.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let (asked, answered) = (asked.load(Ordering::Relaxed), answered.load(Ordering::Relaxed));
    eprintln!(
        "10 takeovers: {attempted} connections attempted, {failed} failed; UDP {answered}/{asked} answered; \
         --takeover start to serving: {took:?}"
    );
    assert_eq!(failed, 0, "{failed} of {attempted} connections failed");
    assert!(attempted >= 2000, "only {attempted} connections");
    assert_eq!(answered, asked, "UDP queries went unanswered");

    // The first process still holds the long flows: it has not exited.
    let mut first = processes.remove(0);
    assert!(first.try_wait().unwrap().is_none(), "the first process left its flows");
    drop(long);
    for mut p in std::iter::once(first).chain(processes) {
        // Clean-up, not under test (`shutdown.rs` tests the signals).
        let _ = p.kill();
        let _ = p.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_cannot_start_leaves_the_old_process_serving() {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let udp_backend = UdpBackend::start("u0", "127.0.0.1").await;
    let dir = ConfigFile::new("takeover-broken", "");
    let control = dir.dir.join("control.sock");
    dir.write(&config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin"));
    let old = fulcrum(&dir.path, false).unwrap();
    // A plugin that does not exist: the new process cannot start.
    let broken = dir.dir.join("broken.toml");
    std::fs::write(&broken, config_text(backend.addr, udp_backend.addr, &control, "stock:no-such-plugin")).unwrap();
    let code = tokio::task::spawn_blocking(move || fulcrum(&broken, true).err()).await.unwrap();
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    // No process answering: non-zero too.
    let elsewhere = dir.dir.join("elsewhere.toml");
    std::fs::write(
        &elsewhere,
        config_text(backend.addr, udp_backend.addr, &dir.dir.join("none.sock"), "stock:round-robin"),
    )
    .unwrap();
    let code = tokio::task::spawn_blocking(move || fulcrum(&elsewhere, true).err()).await.unwrap();
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    // The old process serves on, and a good takeover still works after.
    for _ in 0..20 {
        assert!(one_connection(old.web).await);
    }
    let path = dir.path.clone();
    let next = tokio::task::spawn_blocking(move || fulcrum(&path, true)).await.unwrap().unwrap();
    assert!(one_connection(next.web).await);
    for mut p in [old.child, next.child] {
        // Clean-up, not under test (`shutdown.rs` tests the signals).
        let _ = p.kill();
        let _ = p.wait();
    }
}
