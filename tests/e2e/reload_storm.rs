//! Health survives reloads: under a SIGHUP every second, a backend that
//! hangs is still marked down within B6's window, and a reload that changes
//! nothing republishes nothing.
//!
//! A test binary of its own: it sends SIGHUP to its own process.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fulcrum_sdk::BackendState;
use fulcrum_tests::probe_target::{self, Mode};
use fulcrum_tests::*;
use rustix::process::{Signal, getpid, kill_process};

/// Sends SIGHUP to this process and waits until the reload it asks for is recorded.
async fn sighup(server: &fulcrum::Server) {
    let mut recorded = server.reloads().subscribe();
    recorded.borrow_and_update();
    kill_process(getpid(), Signal::HUP).unwrap();
    tokio::time::timeout(Duration::from_secs(10), recorded.changed()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_backend_is_marked_down_in_time_under_a_reload_every_second() {
    let b = vec![Backend::start("b0", "127.0.9.1").await, Backend::start("b1", "127.0.9.2").await];
    let (probe_port, controls) = probe_target::start_many(&[b[0].addr.ip(), b[1].addr.ip()]).await;
    let (interval, threshold) = (Duration::from_secs(2), 2u32);
    let probe = format!(
        "[pool.probe]\nprotocol = \"http\"\nport = {probe_port}\npath = \"/health\"\ninterval = \"2s\"\nthreshold = {threshold}\n"
    );
    let file = ConfigFile::new("reload-storm", &config(1, "stock:round-robin", &backend_list(&b, None), "", &probe));
    let server = serve_file(&file);
    wait_state(&server, 0, BackendState::Up, Duration::from_secs(10)).await;
    wait_state(&server, 1, BackendState::Up, Duration::from_secs(10)).await;

    // A reload that changes nothing publishes no new snapshot.
    let generation = server.pool("web").unwrap().load().generation;
    sighup(&server).await;
    assert!(server.reloads().last().unwrap().ok);
    assert_eq!(server.pool("web").unwrap().load().generation, generation, "a no-op reload republished the pool");

    // Backend 0 hangs; a reload every second, as a config-management loop might.
    controls[0].set_mode(Mode::Hang);
    let hung = Instant::now();
    let mut reloads = 0;
    let mut downs = server.pool("web").unwrap().subscribe();
    let detected = loop {
        if state(&server, 0) == BackendState::Down {
            break hung.elapsed();
        }
        assert!(hung.elapsed() < Duration::from_secs(12), "not marked down after {reloads} reloads in 12 s");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                sighup(&server).await;
                reloads += 1;
            }
            _ = downs.changed() => {}
        }
    };
    eprintln!("hanging backend marked down after {detected:?}, through {reloads} reloads");
    // B6: more than N x I, less than (N + 1) x I, plus a scheduling margin.
    let (low, high) = (interval * threshold, interval * (threshold + 1) + Duration::from_millis(500));
    assert!(
        detected > low - Duration::from_millis(100) && detected < high,
        "down after {detected:?} ({reloads} reloads)"
    );
    assert!(reloads >= 3, "only {reloads} reloads");
    assert_eq!(state(&server, 1), BackendState::Up);
    assert!(server.reloads().failed.load(std::sync::atomic::Ordering::Relaxed) == 0);
    server.shutdown();
}
