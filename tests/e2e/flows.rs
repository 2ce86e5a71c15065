//! Flow handling: idle timeout (B9) with and without reset (B10), keep-alive,
//! half-close, the flow cap (R2) and connect retries (B14 counters).

#![allow(clippy::unwrap_used)]

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fulcrum::flow::CloseReason;
use fulcrum_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_with_tcp_reset_resets_both_sides() {
    let mut b = backends(1, "127.0.0.1").await;
    let server =
        serve(&config(1, "stock:round-robin", &backend_list(&b, None), "idle_timeout = \"1s\"\ntcp_reset = true", ""));
    let addr = server.frontend_addr("web").unwrap();
    let (mut client, _) = connect(addr, None).await;
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await.unwrap().unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "reset after {waited:?}");
    assert_eq!(b[0].next_ending().await, Ending::Reset);
    let flows = server.flows("web").unwrap();
    wait_until(Duration::from_secs(5), "the flow to be counted", || flows.closed(CloseReason::IdleTimeout) == 1).await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_without_reset_closes_quietly() {
    let mut b = backends(1, "127.0.0.1").await;
    let server =
        serve(&config(1, "stock:round-robin", &backend_list(&b, None), "idle_timeout = \"1s\"\ntcp_reset = false", ""));
    let addr = server.frontend_addr("web").unwrap();
    let (mut client, _) = connect(addr, None).await;
    let mut rest = Vec::new();
    // The backend sees EOF and says so; the client then sees EOF.
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(b[0].next_ending().await, Ending::Eof);
    assert!(String::from_utf8_lossy(&rest).is_empty() || rest == b"eof-seen\n", "{rest:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_keeps_an_idle_timer_from_firing() {
    let b = backends(1, "127.0.0.1").await;
    let server =
        serve(&config(1, "stock:round-robin", &backend_list(&b, None), "idle_timeout = \"1s\"\ntcp_reset = true", ""));
    let addr = server.frontend_addr("web").unwrap();
    let (mut client, _) = connect(addr, None).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3300) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_echoes(&mut client, "ping").await;
    }
    assert_eq!(server.flows("web").unwrap().closed(CloseReason::IdleTimeout), 0);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_reaches_the_backend_and_its_reply_still_arrives() {
    let mut b = backends(1, "127.0.0.1").await;
    let server = serve(&config(1, "stock:round-robin", &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let (mut client, _) = connect(addr, None).await;
    client.get_mut().write_all(b"last words\n").await.unwrap();
    client.get_mut().shutdown().await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut rest)).await.unwrap().unwrap();
    assert_eq!(rest, "last words\neof-seen\n");
    assert_eq!(b[0].next_ending().await, Ending::Eof);
    let flows = server.flows("web").unwrap();
    wait_until(Duration::from_secs(5), "the flow to complete", || flows.closed(CloseReason::Completed) == 1).await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_cap_refuses_new_flows_and_keeps_established_ones() {
    let b = backends(1, "127.0.0.1").await;
    let server = serve(&config(1, "stock:round-robin", &backend_list(&b, None), "max_flows = 2", ""));
    let addr = server.frontend_addr("web").unwrap();
    let (mut first, _) = connect(addr, None).await;
    let (_second, _) = connect(addr, None).await;
    expect_reset(addr).await;
    assert_eq!(server.flows("web").unwrap().closed(CloseReason::LimitReached), 1);
    assert_echoes(&mut first, "still here").await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_is_retried_elsewhere_and_counted() {
    let live = Backend::start("live", "127.0.0.1").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connects are refused
    let list = format!("[ {{ address = \"{dead}\" }}, {{ address = \"{}\" }} ]", live.addr);
    let server = serve(&config(1, "stock:round-robin", &list, "", ""));
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..10 {
        assert_eq!(greeting(addr, None).await, "live");
    }
    let pool = server.pool("web").unwrap().load();
    assert_eq!(pool.backends[0].stats.connect_failures.load(Ordering::SeqCst), 5);
    assert_eq!(pool.backends[1].stats.connect_failures.load(Ordering::SeqCst), 0);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_backend_resets_the_client_at_once() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let list = format!("[ {{ address = \"{dead}\" }} ]");
    let server = serve(&config(1, "stock:round-robin", &list, "", ""));
    let addr = server.frontend_addr("web").unwrap();
    expect_reset(addr).await;
    let flows = server.flows("web").unwrap();
    wait_until(Duration::from_secs(5), "the failure to be counted", || flows.closed(CloseReason::ConnectFailed) == 1)
        .await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_records_the_address_the_client_reached() {
    let b = backends(1, "127.0.0.1").await;
    for listen in ["127.0.0.1:0", "0.0.0.0:0"] {
        let text = config(1, "stock:round-robin", &backend_list(&b, None), "", "").replace("127.0.0.1:0", listen);
        let server = serve(&text);
        let port = server.frontend_addr("web").unwrap().port();
        let reached = SocketAddr::from(([127, 0, 0, 1], port));
        let (mut flow, _) = connect(reached, None).await;
        assert_echoes(&mut flow, "where am I").await;
        let flows = server.flows("web").unwrap().sample(10);
        assert_eq!(flows.len(), 1, "{listen}");
        assert_eq!(flows[0].key.frontend, reached, "listening on {listen}");
        assert_eq!(flows[0].key.client, flow.get_ref().local_addr().unwrap(), "listening on {listen}");
        server.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabytes_pass_both_ways_byte_for_byte_on_concurrent_flows() {
    const SIZE: usize = 8 << 20;
    let b = backends(2, "127.0.0.1").await;
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", ""));
    let addr = server.frontend_addr("web").unwrap();
    let flows: Vec<_> = (0..4u8)
        .map(|seed| {
            tokio::spawn(async move {
                let (flow, greeting) = connect(addr, None).await;
                let (mut rx, mut tx) = flow.into_inner().into_split();
                // Bytes no two flows share, so that a buffer crossing flows would show.
                let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37)).collect();
                let sent = data.clone();
                let writer = tokio::spawn(async move {
                    for chunk in sent.chunks(100_000) {
                        tx.write_all(chunk).await.unwrap();
                    }
                    tx.shutdown().await.unwrap();
                });
                let mut echoed = Vec::with_capacity(SIZE + 16);
                tokio::time::timeout(Duration::from_secs(20), rx.read_to_end(&mut echoed)).await.unwrap().unwrap();
                writer.await.unwrap();
                assert_eq!(echoed.len(), SIZE + "eof-seen\n".len(), "flow {seed}");
                assert!(echoed[..SIZE] == data[..], "flow {seed}: the echo differs from what was sent");
                assert_eq!(&echoed[SIZE..], b"eof-seen\n");
                greeting.len() as u64 + 1
            })
        })
        .collect();
    let mut greetings = 0;
    for flow in flows {
        greetings += flow.await.unwrap();
    }
    let table = server.flows("web").unwrap();
    wait_until(Duration::from_secs(5), "the flows to complete", || table.closed(CloseReason::Completed) == 4).await;
    let (up, down) = table.bytes();
    assert_eq!(up, 4 * SIZE as u64);
    assert_eq!(down, greetings + 4 * (SIZE + "eof-seen\n".len()) as u64);
    server.shutdown();
}
