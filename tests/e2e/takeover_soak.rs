//! Issue 20: 50 takeovers of an idle process in a row, each leaving exactly
//! one process serving (a binary of its own: alone, not beside the other
//! takeover tests on two cores).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fulcrum_tests::process::*;
use fulcrum_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_idle_takeovers_each_leave_exactly_one_process_serving() {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let udp_backend = UdpBackend::start("u0", "127.0.0.1").await;
    let dir = ConfigFile::new("takeover-fifty", "");
    let control = dir.dir.join("control.sock");
    dir.write(
        &config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin")
            .replace("workers = 2", "workers = 1"),
    );
    let mut current = fulcrum(&dir.path, false).unwrap();
    let started = Instant::now();
    for i in 0..50 {
        let path = dir.path.clone();
        let next = tokio::task::spawn_blocking(move || fulcrum(&path, true))
            .await
            .unwrap()
            .unwrap_or_else(|code| panic!("takeover {i} failed (exit {code})"));
        assert_eq!((next.web, next.dns), (current.web, current.dns));
        // The old one, idle, ends cleanly; the new one serves alone.
        let code = exit_of(&mut current.child, Duration::from_secs(10)).await;
        assert_eq!(code, Some(0), "takeover {i}: the old process did not end cleanly");
        assert!(one_connection(next.web).await, "takeover {i}: nothing serves");
        current = next;
    }
    eprintln!("50 idle takeovers in {:?}", started.elapsed());
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert!(udp_ask(&socket, current.dns, b"q", Duration::from_secs(2)).await.is_some());
    kill_all([current.child]);
}
