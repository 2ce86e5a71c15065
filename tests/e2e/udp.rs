//! UDP load balancing (B8, B9): flows, stickiness, replies from the frontend
//! address, re-balancing off a dead backend, idle timeout, the flow cap,
//! 64 KiB datagrams.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fulcrum::flow::CloseReason;
use fulcrum_sdk::BackendState::{Down, Up};
use fulcrum_tests::probe_target;
use fulcrum_tests::*;
use tokio::net::UdpSocket;

const REPLY: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(10);

fn udp_backend_list(backends: &[UdpBackend]) -> String {
    let entries: Vec<String> = backends.iter().map(|b| format!("{{ address = \"{}\" }}", b.addr)).collect();
    format!("[ {} ]", entries.join(", "))
}

fn udp_config(workers: usize, backends: &str, frontend_extra: &str, pool_extra: &str) -> String {
    config(workers, "stock:round-robin", backends, &format!("protocol = \"udp\"\n{frontend_extra}"), pool_extra)
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_300_flows_and_every_reply_finds_its_client() {
    let mut b = Vec::new();
    for i in 0..3 {
        b.push(UdpBackend::start(&format!("b{i}"), "127.0.0.1").await);
    }
    let server = serve(&udp_config(1, &udp_backend_list(&b), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let mut names = Vec::new();
    // All kept open: a closed socket's port could come back as a "new" client.
    let mut sockets = Vec::new();
    for i in 0..300 {
        let socket = client().await;
        let payload = format!("flow {i}");
        let (name, echo) = udp_ask(&socket, addr, payload.as_bytes(), REPLY).await.expect("no reply");
        assert_eq!(echo, payload.as_bytes(), "a reply reached the wrong client");
        names.push(name);
        sockets.push(socket);
    }
    let counts = tally(&names);
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![100, 100, 100], "{counts:?}");
    assert_eq!(server.flows("web").unwrap().started(), 300);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_sticks_to_its_backend() {
    let mut b = Vec::new();
    for i in 0..3 {
        b.push(UdpBackend::start(&format!("b{i}"), "127.0.0.1").await);
    }
    let server = serve(&udp_config(2, &udp_backend_list(&b), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let socket = client().await;
    let mut names = Vec::new();
    for i in 0..100 {
        names.push(udp_ask(&socket, addr, format!("{i}").as_bytes(), REPLY).await.unwrap().0);
    }
    assert_eq!(tally(&names).len(), 1, "{:?}", tally(&names));
    assert_eq!(server.flows("web").unwrap().started(), 1);
    server.shutdown();
}

/// UDP backends on 127.0.0.(base+i) with HTTP probe endpoints on one port.
async fn probed(n: usize, base: u8) -> (Vec<UdpBackend>, String, Vec<std::sync::Arc<probe_target::Control>>) {
    let ips: Vec<IpAddr> = (0..n).map(|i| format!("127.0.0.{}", base + i as u8).parse().unwrap()).collect();
    let mut backends = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        backends.push(UdpBackend::start(&format!("b{i}"), &ip.to_string()).await);
    }
    let (port, controls) = probe_target::start_many(&ips).await;
    let probe = format!("[pool.probe]\nprotocol = \"http\"\nport = {port}\ninterval = \"100ms\"\nthreshold = 1\n");
    (backends, probe, controls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_moves_off_a_backend_marked_down() {
    let (b, probe, controls) = probed(2, 151).await;
    let server = serve(&udp_config(2, &udp_backend_list(&b), "", &probe));
    for i in 0..2 {
        wait_state(&server, i, Up, WAIT).await;
    }
    let addr = server.frontend_addr("web").unwrap();
    let socket = client().await;
    let (first, _) = udp_ask(&socket, addr, b"before", REPLY).await.unwrap();
    let i: usize = first[1..].parse().unwrap();
    controls[i].set_status(500);
    wait_state(&server, i, Down, WAIT).await;
    for n in 0..10 {
        let (name, echo) =
            udp_ask(&socket, addr, format!("after {n}").as_bytes(), REPLY).await.expect("replies stopped");
        assert_ne!(name, first, "the flow stayed on a dead backend");
        assert_eq!(echo, format!("after {n}").as_bytes());
    }
    assert_eq!(server.flows("web").unwrap().closed(CloseReason::BackendDown), 1);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_down_drops_datagrams_and_recovery_resumes_flows() {
    let (b, probe, controls) = probed(2, 161).await;
    let server = serve(&udp_config(2, &udp_backend_list(&b), "", &probe));
    for i in 0..2 {
        wait_state(&server, i, Up, WAIT).await;
    }
    let addr = server.frontend_addr("web").unwrap();
    let socket = client().await;
    assert!(udp_ask(&socket, addr, b"up", REPLY).await.is_some());
    for c in &controls {
        c.set_status(500);
    }
    for i in 0..2 {
        wait_state(&server, i, Down, WAIT).await;
    }
    let flows = server.flows("web").unwrap();
    let dropped = flows.dropped();
    for _ in 0..3 {
        assert!(udp_ask(&socket, addr, b"anyone?", Duration::from_millis(200)).await.is_none());
    }
    assert!(flows.dropped() >= dropped + 3, "drops not counted");
    assert_eq!(flows.active(), 0, "the flow did not end");
    for c in &controls {
        c.set_status(200);
    }
    wait_state(&server, 0, Up, WAIT).await;
    assert!(udp_ask(&socket, addr, b"back", REPLY).await.is_some());
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flow_is_forgotten() {
    let b = vec![UdpBackend::start("b0", "127.0.0.1").await];
    let server = serve(&udp_config(2, &udp_backend_list(&b), "udp_idle_timeout = \"300ms\"", ""));
    let addr = server.frontend_addr("web").unwrap();
    let socket = client().await;
    assert!(udp_ask(&socket, addr, b"one", REPLY).await.is_some());
    let flows = server.flows("web").unwrap();
    assert_eq!(flows.active(), 1);
    wait_until(WAIT, "the idle flow to be forgotten", || flows.active() == 0).await;
    assert_eq!(flows.closed(CloseReason::IdleTimeout), 1);
    assert!(udp_ask(&socket, addr, b"two", REPLY).await.is_some());
    assert_eq!(flows.started(), 2, "the datagram after the timeout is a new flow");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_cap_refuses_new_flows_and_keeps_the_others() {
    let b = vec![UdpBackend::start("b0", "127.0.0.1").await];
    let server = serve(&udp_config(2, &udp_backend_list(&b), "max_flows = 5", ""));
    let addr = server.frontend_addr("web").unwrap();
    let mut sockets = Vec::new();
    for _ in 0..5 {
        let socket = client().await;
        assert!(udp_ask(&socket, addr, b"in", REPLY).await.is_some());
        sockets.push(socket);
    }
    let late = client().await;
    assert!(udp_ask(&late, addr, b"over the cap", Duration::from_millis(300)).await.is_none());
    let flows = server.flows("web").unwrap();
    assert_eq!(flows.closed(CloseReason::LimitReached), 1);
    assert!(flows.dropped() >= 1);
    for socket in &sockets {
        assert!(udp_ask(socket, addr, b"still in", REPLY).await.is_some());
    }
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60000_byte_datagram_round_trips_unchanged() {
    let b = vec![UdpBackend::start("b0", "127.0.0.1").await];
    let server = serve(&udp_config(2, &udp_backend_list(&b), "", ""));
    let addr: SocketAddr = server.frontend_addr("web").unwrap();
    let socket = client().await;
    let payload: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (name, echo) = udp_ask(&socket, addr, &payload, REPLY).await.expect("no reply");
    assert_eq!(name, "b0");
    assert_eq!(echo.len(), payload.len());
    assert!(echo == payload, "the datagram changed on the way");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_keeps_its_udp_flows_and_gets_no_new_ones() {
    let b = vec![UdpBackend::start("b0", "127.0.0.1").await, UdpBackend::start("b1", "127.0.0.1").await];
    let text = udp_config(2, &udp_backend_list(&b), "", "")
        .replace("[runtime]\n", "[admin]\nlisten = \"127.0.0.1:0\"\n\n[runtime]\n");
    let server = serve(&text);
    let addr = server.frontend_addr("web").unwrap();
    let established = client().await;
    let (name, _) = udp_ask(&established, addr, b"hello", REPLY).await.unwrap();
    let i: usize = name[1..].parse().unwrap();
    let (code, body) =
        admin(server.admin_addr().unwrap(), "POST", &format!("/backends/web/{}/drain", b[i].addr), None).await;
    assert_eq!(code, 200, "{body}");
    for _ in 0..5 {
        assert_eq!(udp_ask(&established, addr, b"still here", REPLY).await.unwrap().0, name);
    }
    for _ in 0..5 {
        let fresh = client().await;
        assert_ne!(udp_ask(&fresh, addr, b"new", REPLY).await.unwrap().0, name, "a new flow went to a drained backend");
    }
    let (_, flows) = admin(server.admin_addr().unwrap(), "GET", "/flows", None).await;
    assert!(flows.contains("\"protocol\": \"udp\""), "{flows}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_frontend_renamed_on_its_address_answers_every_new_client() {
    // A fixed port, so that the renamed frontend binds the very same address.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let b = vec![UdpBackend::start("b0", "127.0.0.1").await];
    let text = udp_config(2, &udp_backend_list(&b), "", "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let file = ConfigFile::new("udp-rename", &text);
    let server = serve_file(&file);
    let addr = server.frontend_addr("web").unwrap();
    // Flows of the old frontend, on both workers.
    let mut old = Vec::new();
    for _ in 0..8 {
        let socket = client().await;
        udp_ask(&socket, addr, b"before", REPLY).await.expect("no reply before the rename");
        old.push(socket);
    }
    // `web` becomes `www` on the same address: a new frontend in its place.
    file.write(&text.replace("[[frontend]]\nname = \"web\"", "[[frontend]]\nname = \"www\""));
    server.reload().unwrap();
    assert_eq!(server.frontend_addr("www"), Some(addr));
    // The old frontend's sockets left the address: no new client is lost to
    // them. (A client may lose one datagram to the switch itself, so each
    // asks twice; one that a left-over socket took would lose both.)
    let mut sockets = Vec::new();
    for i in 0..64 {
        let socket = client().await;
        let mut answer = udp_ask(&socket, addr, b"after", REPLY).await;
        if answer.is_none() {
            answer = udp_ask(&socket, addr, b"after", REPLY).await;
        }
        let www = server.flows("www").unwrap();
        assert!(
            answer.is_some(),
            "new client {i} got no answer: a socket of the old frontend took it (www: {} started, {} dropped, {} no backend, {} local exhaustion)",
            www.started(),
            www.dropped(),
            www.closed(CloseReason::NoBackend),
            www.closed(CloseReason::LocalExhaustion)
        );
        sockets.push(socket);
    }
    // The old flows' clients are answered too, by the new frontend.
    for socket in &old {
        let answered = udp_ask(socket, addr, b"again", REPLY).await.is_some()
            || udp_ask(socket, addr, b"again", REPLY).await.is_some();
        assert!(answered, "an old flow's client is not answered by the new frontend");
    }
    server.shutdown();
}
