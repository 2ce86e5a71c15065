//! The stock balancers, through real `.wasm` plugins and real sockets.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fulcrum_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_300_connections_evenly_over_2_workers() {
    let b = backends(3, "127.0.0.1").await;
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let mut names = Vec::new();
    for _ in 0..300 {
        names.push(greeting(addr, None).await);
    }
    let counts = tally(&names);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (name, n) in &counts {
        assert!((99..=101).contains(n), "{name} got {n}: {counts:?}");
    }
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_weights_3_1_0() {
    let b = backends(3, "127.0.0.1").await;
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, Some(&[3, 1, 0])), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let mut names = Vec::new();
    for _ in 0..400 {
        names.push(greeting(addr, None).await);
    }
    let counts = tally(&names);
    let (heavy, light) = (counts["b0"] as f64, counts["b1"] as f64);
    assert!(!counts.contains_key("b2"), "weight 0 got flows: {counts:?}");
    assert!((heavy / light - 3.0).abs() <= 0.3, "not 3:1 within 10 %: {counts:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_tuple_hash_sticks_per_source_port_and_spreads_over_ports() {
    let b = backends(3, "127.0.0.1").await;
    let server = serve(&config(2, "stock:five-tuple-hash", &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    // A free source port on an address no other test uses (the tests of
    // this binary run side by side), then 50 reconnects from it.
    let port = std::net::TcpListener::bind("127.0.5.5:0").unwrap().local_addr().unwrap().port();
    let from = SocketAddr::from(([127, 0, 5, 5], port));
    let mut names = Vec::new();
    for _ in 0..50 {
        names.push(greeting(addr, Some(from)).await);
    }
    assert_eq!(tally(&names).len(), 1, "same 5-tuple moved: {:?}", tally(&names));
    let mut spread = Vec::new();
    for _ in 0..60 {
        spread.push(greeting(addr, None).await);
    }
    assert_eq!(tally(&spread).len(), 3, "ports did not reach every backend: {:?}", tally(&spread));
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ip_keeps_a_client_on_one_backend() {
    let b = backends(3, "127.0.0.1").await;
    let server = serve(&config(2, "stock:source-ip", &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let from = SocketAddr::from(([127, 0, 0, 2], 0));
    let mut names = Vec::new();
    for _ in 0..100 {
        names.push(greeting(addr, Some(from)).await);
    }
    assert_eq!(tally(&names).len(), 1, "{:?}", tally(&names));
    // Other client addresses reach the other backends.
    let mut others = Vec::new();
    for host in 3..60u8 {
        others.push(greeting(addr, Some(SocketAddr::from(([127, 0, 0, host], 0)))).await);
    }
    assert_eq!(tally(&others).len(), 3, "{:?}", tally(&others));
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_the_backend_holding_long_flows() {
    let b = backends(3, "127.0.0.1").await;
    let server = serve(&config(2, "stock:least-connections", &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let pool = server.pool("web").unwrap().load();
    let active = |i: usize| pool.backends[i].stats.active_flows.load(Ordering::SeqCst);
    // Open flows until one backend holds two, then close the others.
    let mut held = Vec::new();
    let loaded = loop {
        let (stream, name) = connect(addr, None).await;
        held.push((stream, name.clone()));
        if held.iter().filter(|(_, n)| *n == name).count() == 2 {
            break name;
        }
    };
    held.retain(|(_, n)| *n == loaded);
    let loaded_index: usize = loaded[1..].parse().unwrap();
    wait_until(Duration::from_secs(5), "other flows to close", || {
        (0..3).all(|i| active(i) == if i == loaded_index { 2 } else { 0 })
    })
    .await;
    for _ in 0..30 {
        let name = greeting(addr, None).await;
        assert_ne!(name, loaded, "a new flow went to the backend holding 2 flows");
        wait_until(Duration::from_secs(5), "the short flow to close", || {
            (0..3).filter(|&i| i != loaded_index).all(|i| active(i) == 0)
        })
        .await;
    }
    assert_eq!(held.len(), 2);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_balancers_never_send_a_client_back_to_itself() {
    // B15: backends on 127.0.0.2 and .3, frontend on .1, client on .2.
    let b = vec![Backend::start("b0", "127.0.0.2").await, Backend::start("b1", "127.0.0.3").await];
    for balancer in ["stock:round-robin", "stock:five-tuple-hash", "stock:source-ip", "stock:least-connections"] {
        let server = serve(&config(2, balancer, &backend_list(&b, None), "", ""));
        let addr = server.frontend_addr("web").unwrap();
        for _ in 0..20 {
            let name = greeting(addr, Some(SocketAddr::from(([127, 0, 0, 2], 0)))).await;
            assert_eq!(name, "b1", "{balancer} sent a client to itself");
        }
        server.shutdown();
    }
}
