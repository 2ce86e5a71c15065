//! Plugin platform v2: passive health, strict round robin across workers,
//! Maglev agreement between processes, p2c and slow start, and a plugin
//! built against the first contract. Real plugins, real sockets.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fulcrum_sdk::BackendState;
use fulcrum_tests::*;
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_rotates_strictly_across_2_workers() {
    let b = backends(3, "127.0.0.1").await;
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let mut names = Vec::new();
    for _ in 0..60 {
        names.push(greeting(addr, None).await);
    }
    // Whichever worker accepts a connection, the turns are shared.
    assert_strict_turns(&names, 3);
    server.shutdown();
}

/// A pool `web` of the given backends with passive health tuned for a test.
fn passive_pool(balancer: &str, backends: &str, frontend_extra: &str, backoff: &str) -> String {
    config(
        2,
        balancer,
        backends,
        frontend_extra,
        &format!("[pool.passive]\nfailures = 3\nbackoff = \"{backoff}\"\nmax_backoff = \"60s\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_tcp_backend_is_taken_out_after_a_few_failed_connects() {
    let b = backends(3, "127.0.0.1").await;
    let dead = b[1].addr;
    b[1].stop().await;
    let server = serve(&passive_pool("stock:round-robin", &backend_list(&b, None), "", "2s"));
    let addr = server.frontend_addr("web").unwrap();
    let stats = || server.pool("web").unwrap().load().backends[1].stats.connect_failures.load(Ordering::Relaxed);
    let mut names = Vec::new();
    for _ in 0..30 {
        // Every flow is served (a failed connect is retried elsewhere).
        names.push(greeting(addr, None).await);
    }
    assert!(!names.iter().any(|n| n == "b1"), "{names:?}");
    let snapshot = server.pool("web").unwrap().load();
    assert_eq!(snapshot.backends[1].state, BackendState::Down, "passive health took it out");
    let reason = snapshot.backends[1].reason.as_deref().unwrap_or_default().to_owned();
    assert!(reason.starts_with("passive: 3 data-path failures"), "{reason}");
    // After the first few, no flow paid a failed connect to it.
    let failed = stats();
    assert!((3..=4).contains(&failed), "{failed} connects failed");
    for _ in 0..30 {
        greeting(addr, None).await;
    }
    assert_eq!(stats(), failed, "a flow paid a failed connect to an ejected backend");

    // It answers again: back when its back-off ends, and it takes flows.
    let _back = Backend::start_on("b1", dead).await;
    wait_state(&server, 1, BackendState::Up, Duration::from_secs(5)).await;
    // New flows reach it again once every worker's balancer instance has
    // the new snapshot (prepared off the data path: soon, not at once).
    let mut names = Vec::new();
    let since = std::time::Instant::now();
    while !names.iter().any(|n| n == "b1") {
        assert!(since.elapsed() < Duration::from_secs(5), "back up, but no new flow in 5 s: {names:?}");
        names.push(greeting(addr, None).await);
    }
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_udp_backend_loses_under_1_percent_and_comes_back() {
    let b0 = UdpBackend::start("b0", "127.0.0.1").await;
    let b1 = UdpBackend::start("b1", "127.0.0.1").await;
    let list = format!("[ {{ address = \"{}\" }}, {{ address = \"{}\" }} ]", b0.addr, b1.addr);
    // A back-off longer than the queries below take, however loaded the host.
    let server = serve(&passive_pool("stock:round-robin", &list, "protocol = \"udp\"", "4s"));
    let addr = server.frontend_addr("web").unwrap();
    // 20 clients (flows), spread over both backends.
    let mut clients = Vec::new();
    for i in 0..20 {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (name, _) = udp_ask(&socket, addr, format!("hello {i}").as_bytes(), Duration::from_secs(2)).await.unwrap();
        clients.push((socket, name));
    }
    assert!(clients.iter().any(|(_, n)| n == "b1"), "no flow on b1");
    b1.stop().await;
    // 100 queries per client, in turns: 2,000 queries, 10 flows on the dead backend.
    let (mut sent, mut lost) = (0, 0);
    for round in 0..100 {
        for (socket, _) in &clients {
            sent += 1;
            let wait = Duration::from_millis(300);
            match udp_ask(socket, addr, format!("q{round}").as_bytes(), wait).await {
                Some((name, _)) => assert_eq!(name, "b0"),
                None => lost += 1,
            }
        }
    }
    // Each flow on the stopped backend loses its first datagram until
    // `failures` (3) of them take the backend out; the rest move at once.
    assert!(lost * 100 < sent, "{lost} of {sent} lost");
    assert!(lost <= 3 + 2, "{lost} lost: more than the 3 failures that take the backend out");
    assert!(lost >= 1, "the stopped backend lost nothing: was it stopped?");
    assert_eq!(state(&server, 1), BackendState::Down);

    // It answers again; when its back-off ends it takes new flows.
    let _back = UdpBackend::start_on("b1", b1.addr).await;
    wait_state(&server, 1, BackendState::Up, Duration::from_secs(10)).await;
    let (mut names, mut sockets) = (Vec::new(), Vec::new());
    let since = std::time::Instant::now();
    while !names.iter().any(|n| n == "b1") {
        assert!(since.elapsed() < Duration::from_secs(5), "back up, but no new flow in 5 s: {names:?}");
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let reply = udp_ask(&socket, addr, format!("new {}", names.len()).as_bytes(), Duration::from_secs(2)).await;
        names.push(reply.unwrap().0);
        sockets.push(socket);
    }
    println!("udp passive health: {lost} of {sent} datagrams lost");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_health_can_be_switched_off() {
    let b = backends(2, "127.0.0.1").await;
    b[1].stop().await;
    let text = config(2, "stock:round-robin", &backend_list(&b, None), "", "[pool.passive]\nenabled = false");
    let server = serve(&text);
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..20 {
        assert_eq!(greeting(addr, None).await, "b0");
    }
    assert_eq!(state(&server, 1), BackendState::Up, "no passive health: it stays in");
    let failed = server.pool("web").unwrap().load().backends[1].stats.connect_failures.load(Ordering::Relaxed);
    assert!(failed >= 9, "{failed}");
    server.shutdown();
}

/// Which backend (by name) each of `sources` reaches through `frontend`.
async fn udp_choices(frontend: SocketAddr, sources: &[SocketAddr]) -> Vec<String> {
    let mut names = Vec::with_capacity(sources.len());
    for &source in sources {
        let socket = UdpSocket::bind(source).await.unwrap();
        let (name, _) = udp_ask(&socket, frontend, b"which", Duration::from_secs(2)).await.unwrap();
        names.push(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_agrees_across_processes_and_removal_moves_a_tenth() {
    let mut b = Vec::new();
    for i in 0..10 {
        b.push(UdpBackend::start(&format!("b{i}"), "127.0.0.1").await);
    }
    let entries: Vec<String> = b.iter().map(|b| format!("{{ address = \"{}\" }}", b.addr)).collect();
    let pool = |entries: &[String]| {
        let backends = format!("[ {} ]", entries.join(", "));
        let text = config(2, "stock:maglev", &backends, "protocol = \"udp\"", "");
        // The frontends differ in port, so hash the client's address only.
        text.replace("backends =", "balancer_config = { hash = \"source-ip\" }\nbackends =")
    };
    let first = serve(&pool(&entries));
    // The same set in another order, in another instance.
    let mut reversed = entries.clone();
    reversed.reverse();
    let second = serve(&pool(&reversed));
    // And an instance without the last backend.
    let fewer = serve(&pool(&entries[..9]));
    // 2,000 flows from distinct client addresses (127.1.x.y).
    let sources: Vec<SocketAddr> =
        (0..2000u32).map(|i| SocketAddr::from(([127, 1, (i / 250) as u8, (i % 250 + 1) as u8], 0))).collect();
    let a = udp_choices(first.frontend_addr("web").unwrap(), &sources).await;
    let c = udp_choices(second.frontend_addr("web").unwrap(), &sources).await;
    assert_eq!(a, c, "two instances with the same backends chose differently");
    let spread = tally(&a);
    assert_eq!(spread.len(), 10, "{spread:?}");
    let d = udp_choices(fewer.frontend_addr("web").unwrap(), &sources).await;
    let moved = a.iter().zip(&d).filter(|(x, y)| x != y).count();
    let removed = a.iter().filter(|x| *x == "b9").count();
    // Only the removed backend's flows move, and at most 1 % more; its own
    // share is 1/10 give or take the spread's noise (binomial: 1 sigma is 13
    // flows of 2,000).
    assert!(moved >= removed, "the removed backend's flows must move");
    assert!(moved <= removed + 2000 / 100, "{moved} of 2000 flows moved (b9 had {removed})");
    assert!(removed <= 2000 / 10 + 40, "b9 had {removed} of 2000 flows");
    println!("maglev: removing 1 of 10 moved {moved} of 2000 flows (b9 had {removed}); spread {spread:?}");
    for server in [first, second, fewer] {
        server.shutdown();
    }
}

/// A backend whose connects are slow. Linux completes a handshake in the
/// kernel whether or not the program accepts, so a slow `accept` alone slows
/// nothing; a full accept queue does: a SYN that finds it full is dropped and
/// sent again by the kernel a second later. This backend has a queue of one
/// and accepts one connection every 500 ms, so most connects to it wait for
/// that retransmission. It greets with `slow`.
fn slow_backend() -> SocketAddr {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    socket.listen(0).unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let _ = stream.write_all(b"slow\n").await;
                    let _ = stream.read(&mut [0u8; 64]).await;
                });
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_shifts_flows_away_from_a_backend_with_slow_connects() {
    let fast = Backend::start("fast", "127.0.0.1").await;
    let slow = slow_backend();
    let list = format!("[ {{ address = \"{}\" }}, {{ address = \"{slow}\" }} ]", fast.addr);
    // Passive health off: a slow connect is no failure anyway; keep it out of the picture.
    let server = serve(&config(2, "stock:p2c", &list, "connect_timeout = \"20s\"", "[pool.passive]\nenabled = false"));
    let addr = server.frontend_addr("web").unwrap();
    // 4 clients at a time, 200 flows; a flow the slow backend has not
    // greeted within 3 s counts as its own.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut names = Vec::new();
            for _ in 0..50 {
                use tokio::io::AsyncBufReadExt;
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut reader = tokio::io::BufReader::new(stream);
                let mut name = String::new();
                let read = tokio::time::timeout(Duration::from_secs(3), reader.read_line(&mut name)).await;
                names.push(if matches!(read, Ok(Ok(n)) if n > 0) { name.trim().to_owned() } else { "slow".into() });
            }
            names
        }));
    }
    let mut names = Vec::new();
    for task in tasks {
        names.extend(task.await.unwrap());
    }
    let counts = tally(&names);
    let to_slow = counts.get("slow").copied().unwrap_or(0);
    let pool = server.pool("web").unwrap().load();
    let slow_us = pool.backends[1].stats.connect_time_us.load(Ordering::Relaxed);
    let fast_us = pool.backends[0].stats.connect_time_us.load(Ordering::Relaxed);
    println!("p2c: {counts:?}; connect time: fast {fast_us} µs, slow {slow_us} µs");
    // Round robin or random would send it half (100).
    assert!(to_slow * 5 < names.len(), "p2c sent {to_slow} of {} flows to the slow backend", names.len());
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_recovered_backends_share_over_the_window() {
    let b = backends(2, "127.0.0.1").await;
    let dead = b[1].addr;
    b[1].stop().await;
    let pool_extra = "slow_start = \"3s\"\n[pool.probe]\nprotocol = \"tcp\"\ninterval = \"200ms\"\nthreshold = 1";
    let server = serve(&config(2, "stock:random", &backend_list(&b, None), "", pool_extra));
    let addr = server.frontend_addr("web").unwrap();
    wait_state(&server, 1, BackendState::Down, Duration::from_secs(5)).await;
    let _back = Backend::start_on("b1", dead).await;
    wait_state(&server, 1, BackendState::Up, Duration::from_secs(5)).await;
    let weight = || server.pool("web").unwrap().load().backends[1].weight;
    let first = weight();
    assert!((10..=40).contains(&first), "a recovered backend starts low: {first}");
    // Its share of 100 flows now, and after the window.
    let share = async || {
        let mut n = 0;
        for _ in 0..100 {
            n += usize::from(greeting(addr, None).await == "b1");
        }
        n
    };
    let early = share().await;
    let mut weights = vec![first];
    wait_pool(&server, Duration::from_secs(6), "the ramp to end", |s| {
        weights.push(s.pool("web").unwrap().load().backends[1].weight);
        weights.last() == Some(&100)
    })
    .await;
    let late = share().await;
    assert!(weights.windows(2).all(|w| w[0] <= w[1]), "the weight must only grow: {weights:?}");
    assert!(weights.len() >= 4, "the ramp had too few steps: {weights:?}");
    assert!(early < late && late >= 35, "share early {early} %, after the window {late} %");
    println!("slow start: weights {weights:?}; share {early} % early, {late} % after");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_contract_0_1_0_loads_and_balances() {
    let b = backends(3, "127.0.0.1").await;
    let server = serve(&config(2, plugins::LEGACY_BALANCER_PATH, &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(greeting(addr, None).await);
    }
    let counts = tally(&names);
    assert_eq!(counts.len(), 3, "{counts:?}");
    let info = server.balancer("web").unwrap();
    assert_eq!(info.stats.fallbacks.load(Ordering::Relaxed), 0, "the built-in fallback served flows");
    assert!(info.stats.calls() >= 30);
    server.shutdown();
}
