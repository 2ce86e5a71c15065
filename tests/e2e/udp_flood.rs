//! R6: a flood of UDP sources (one datagram from each of 30,000 addresses,
//! as spoofed sources would be) cannot starve the process: backend-facing
//! UDP sockets stay under the documented cap, the TCP frontend of the same
//! process keeps serving, a new UDP client is answered, and the drops are
//! counted as local exhaustion (never as the backend's failure); a client of
//! another UDP frontend is answered too.
//!
//! A test binary of its own: it lowers the process's descriptor limit (soft
//! and hard, so that the server cannot raise it back) to 4096, which makes
//! the cap (4096 - 256) / 2 = 1920 sockets.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fulcrum::flow::CloseReason;
use fulcrum_tests::*;
use rustix::process::{Resource, Rlimit, setrlimit};

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_udp_sources_leaves_descriptors_bounded_and_the_rest_serving() {
    setrlimit(Resource::Nofile, Rlimit { current: Some(4096), maximum: Some(4096) }).unwrap();
    let cap = fulcrum::net::udp_socket_cap();
    assert_eq!(cap, (4096 - fulcrum::net::RESERVED_DESCRIPTORS) / 2);

    let tcp = backends(1, "127.0.0.1").await;
    let udp = UdpBackend::start("u0", "127.0.0.1").await;
    // The takeover tests' config (`web` on TCP, `dns` on UDP), and `other` on UDP too.
    let control = std::env::temp_dir().join(format!("fulcrum-udp-flood-{}.sock", std::process::id()));
    let text = fulcrum_tests::process::config_text(tcp[0].addr, udp.addr, &control, "stock:round-robin").replace(
        "[[pool]]\nname = \"web\"",
        "[[frontend]]\nname = \"other\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"dns\"\n\n[[pool]]\nname = \"web\"",
    );
    let server = serve(&text);
    let (web, dns) = (server.frontend_addr("web").unwrap(), server.frontend_addr("dns").unwrap());
    let flows = server.flows("dns").unwrap();
    let before = open_descriptors();

    // 30,000 sources: 127.0.a.b, each a socket of its own, one datagram, closed.
    let mut most = 0;
    for i in 0..30_000u32 {
        let source = Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8);
        let socket = std::net::UdpSocket::bind(SocketAddr::from((source, 0))).unwrap();
        let _ = socket.send_to(b"flood", dns);
        if i % 1000 == 999 {
            most = most.max(fulcrum::net::udp_sockets_open());
            // Paced on the server's progress, so the flood is not lost in a
            // full socket buffer before the server even sees it.
            let handled = || flows.started() + flows.closed(CloseReason::LocalExhaustion);
            wait_until(Duration::from_secs(20), "the server to keep up", || handled() + 2000 >= u64::from(i)).await;
        }
    }
    wait_until(Duration::from_secs(20), "the flood to be read", || {
        flows.started() + flows.closed(CloseReason::LocalExhaustion) >= 29_000
    })
    .await;
    let during = open_descriptors();
    most = most.max(fulcrum::net::udp_sockets_open());
    assert!(most <= cap, "{most} backend-facing UDP sockets, over the cap of {cap}");
    assert!(during <= before + cap + 64, "descriptors went from {before} to {during} (cap {cap})");
    let refused = flows.closed(CloseReason::LocalExhaustion);
    assert!(refused > 0, "no flow was refused at the cap");

    // The TCP frontend of the same process serves.
    assert_eq!(greeting(web, None).await, "b0");
    // A new UDP client is answered (it takes a quiet flood flow's place).
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut answered = None;
    for _ in 0..30 {
        if let Some(reply) = udp_ask(&client, dns, b"hello", Duration::from_millis(200)).await {
            answered = Some(reply);
            break;
        }
    }
    assert_eq!(answered.map(|(name, _)| name), Some("u0".to_owned()), "a new client got no answer");
    // A client of another UDP frontend of the same process too: the flood on
    // one frontend does not lock out the others.
    let other = server.frontend_addr("other").unwrap();
    let mut answered = None;
    for _ in 0..30 {
        if let Some(reply) = udp_ask(&client, other, b"hello", Duration::from_millis(200)).await {
            answered = Some(reply);
            break;
        }
    }
    assert_eq!(answered.map(|(name, _)| name), Some("u0".to_owned()), "a client of another frontend got no answer");
    assert!(flows.closed(CloseReason::Evicted) >= 2);
    // Never the backend's fault.
    let pool = server.pool("dns").unwrap().load();
    assert_eq!(pool.backends[0].stats.connect_failures.load(std::sync::atomic::Ordering::Relaxed), 0);
    eprintln!(
        "flood: cap {cap}, most sockets {most}, descriptors {before} -> {during}, refused {refused}, evicted {}, dropped {}",
        flows.closed(CloseReason::Evicted),
        flows.dropped()
    );
    server.shutdown();
}
