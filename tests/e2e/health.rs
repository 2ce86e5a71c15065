//! Health probes and health plugins (B1..B7, B11, B12, B14), with probe
//! endpoints whose status, hanging, resetting and CPU report switch while the
//! test runs.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fulcrum::flow::CloseReason;
use fulcrum_sdk::BackendState::{Down, Draining, Up};
use fulcrum_tests::probe_target::{self, Control, Mode};
use fulcrum_tests::*;
use tokio::io::AsyncBufReadExt;

const INTERVAL_MS: u64 = 200;
const WAIT: Duration = Duration::from_secs(10);

/// `n` backends on 127.0.0.(base+i), each with a probe endpoint on a shared port.
async fn setup(n: usize, base: u8) -> (Vec<Backend>, u16, Vec<Arc<Control>>) {
    let ips: Vec<IpAddr> = (0..n).map(|i| format!("127.0.0.{}", base + i as u8).parse().unwrap()).collect();
    let mut data = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        data.push(Backend::start(&format!("b{i}"), &ip.to_string()).await);
    }
    let (port, controls) = probe_target::start_many(&ips).await;
    (data, port, controls)
}

fn probe(port: u16, extra: &str) -> String {
    format!(
        "[pool.probe]\nprotocol = \"http\"\nport = {port}\npath = \"/health\"\ninterval = \"{INTERVAL_MS}ms\"\nthreshold = 2\n{extra}\n"
    )
}

async fn all_up(server: &fulcrum::Server, n: usize) {
    for i in 0..n {
        wait_state(server, i, Up, WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_stops_new_flows_within_one_interval() {
    let (b, port, controls) = setup(3, 11).await;
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &probe(port, "")));
    all_up(&server, 3).await;
    controls[0].set_status(500);
    let took = wait_state(&server, 0, Down, WAIT).await;
    assert!(took < Duration::from_millis(INTERVAL_MS + 300), "down after {took:?}");
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..30 {
        assert_ne!(greeting(addr, None).await, "b0");
    }
    assert!(server.pool("web").unwrap().load().backends[0].reason.as_deref().unwrap().contains("HTTP 500"));
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_marks_down_within_one_interval() {
    let (b, port, controls) = setup(2, 21).await;
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &probe(port, "")));
    all_up(&server, 2).await;
    controls[1].set_mode(Mode::Reset);
    let took = wait_state(&server, 1, Down, WAIT).await;
    assert!(took < Duration::from_millis(INTERVAL_MS + 300), "down after {took:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_backend_is_down_within_the_b6_window() {
    // B6: interval I = 300 ms, threshold N = 2: down after > N*I, < (N+1)*I.
    let (b, port, controls) = setup(2, 31).await;
    let probe = format!(
        "[pool.probe]\nprotocol = \"http\"\nport = {port}\ninterval = \"300ms\"\ntimeout = \"100ms\"\nthreshold = 2\n"
    );
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &probe));
    all_up(&server, 2).await;
    controls[0].set_mode(Mode::Hang);
    let took = wait_state(&server, 0, Down, WAIT).await;
    let margin = Duration::from_millis(150);
    assert!(took >= Duration::from_millis(600) - Duration::from_millis(20), "down too early: {took:?}");
    assert!(took < Duration::from_millis(900) + margin, "down too late: {took:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_needs_threshold_successes_and_a_flapping_backend_waits_longer() {
    let (b, port, controls) = setup(2, 41).await;
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &probe(port, "")));
    all_up(&server, 2).await;
    let c = &controls[0];
    // Probes answered 200 between the switch and the backend counted up.
    async fn recovery(server: &fulcrum::Server, c: &Control) -> usize {
        c.set_status(500);
        wait_state(server, 0, Down, WAIT).await;
        let before = c.answered();
        c.set_status(200);
        wait_state(server, 0, Up, WAIT).await;
        c.answered() - before
    }
    let first = recovery(&server, c).await;
    let second = recovery(&server, c).await; // went down again right after coming up: a flap
    assert!((2..=3).contains(&first), "first recovery took {first} probes");
    assert!(second >= first + 2, "flapping did not wait longer: {first} then {second} probes");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_flows_continue_when_their_backend_goes_down() {
    let (b, port, controls) = setup(2, 51).await;
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &probe(port, "")));
    all_up(&server, 2).await;
    let addr = server.frontend_addr("web").unwrap();
    let (mut flow, name) = connect(addr, None).await;
    let i: usize = name[1..].parse().unwrap();
    controls[i].set_status(503);
    wait_state(&server, i, Down, WAIT).await;
    assert_echoes(&mut flow, "still flowing").await;
    for _ in 0..10 {
        assert_ne!(greeting(addr, None).await, name);
    }
    server.shutdown();
}

/// Every backend down: established flows reset (`reset-flows`) or kept; new
/// connections refused at once.
async fn all_down(on_all_down: &str, base: u8) -> (fulcrum::Server, BufFlow) {
    let (b, port, controls) = setup(2, base).await;
    let pool_extra = format!("on_all_down = \"{on_all_down}\"\n{}", probe(port, ""));
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &pool_extra));
    all_up(&server, 2).await;
    let addr = server.frontend_addr("web").unwrap();
    let (flow, _) = connect(addr, None).await;
    for c in &controls {
        c.set_status(500);
    }
    wait_state(&server, 0, Down, WAIT).await;
    wait_state(&server, 1, Down, WAIT).await;
    let start = Instant::now();
    expect_reset(addr).await;
    let refused_in = start.elapsed();
    assert!(refused_in < Duration::from_millis(100), "a new connection took {refused_in:?} to be refused");
    (server, flow)
}

type BufFlow = tokio::io::BufReader<tokio::net::TcpStream>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_down_with_reset_flows_resets_established_flows() {
    let (server, mut flow) = all_down("reset-flows", 61).await;
    let mut line = String::new();
    let read = tokio::time::timeout(WAIT, flow.read_line(&mut line)).await.unwrap();
    assert!(matches!(read, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{read:?}");
    let flows = server.flows("web").unwrap();
    wait_until(WAIT, "the reset to be counted", || flows.closed(CloseReason::AllBackendsDown) == 1).await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_down_with_keep_flows_keeps_established_flows() {
    let (server, mut flow) = all_down("keep-flows", 71).await;
    assert_echoes(&mut flow, "alive").await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_accepting_200_399_keeps_a_301_backend_up() {
    let (b, port, controls) = setup(2, 81).await;
    let extra = "health = \"stock:http-status\"\nhealth_config = { accept = [\"200-399\"] }";
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &probe(port, extra)));
    all_up(&server, 2).await;
    controls[0].set_status(301);
    controls[1].set_status(404);
    wait_state(&server, 1, Down, WAIT).await;
    let answered = controls[0].answered();
    wait_until(WAIT, "three more probes", || controls[0].answered() >= answered + 3).await;
    assert_eq!(state(&server, 0), Up);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_health_plugin_falls_back_to_the_stock_default_and_is_counted() {
    let (b, port, controls) = setup(2, 91).await;
    let extra = format!("health = \"{}\"", plugins::HEALTH_TRAP_PATH);
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &probe(port, &extra)));
    all_up(&server, 2).await;
    controls[0].set_status(500);
    wait_state(&server, 0, Down, WAIT).await;
    controls[0].set_status(200);
    wait_state(&server, 0, Up, WAIT).await;
    let info = server.probe_health("web").unwrap();
    let stats = &info.stats;
    assert!(stats.traps.load(Ordering::SeqCst) >= 4, "{stats:?}");
    assert!(stats.fallbacks.load(Ordering::SeqCst) >= 4, "{stats:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_backpressure_drains_a_hot_backend_and_weights_by_headroom() {
    let (b, port, controls) = setup(2, 101).await;
    let signal = format!(
        "[[pool.signal]]\nprotocol = \"http\"\nport = {port}\npath = \"/load\"\ninterval = \"{INTERVAL_MS}ms\"\nhealth = \"{}\"\nhealth_config = {{ drain_above = 90 }}\n",
        plugins::CPU_BACKPRESSURE_PATH
    );
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &signal));
    let addr = server.frontend_addr("web").unwrap();
    let (mut established, name) = connect(addr, None).await;
    let hot: usize = name[1..].parse().unwrap();
    controls[hot].set_cpu(95);
    wait_state(&server, hot, Draining, WAIT).await;
    for _ in 0..20 {
        assert_ne!(greeting(addr, None).await, name, "a drained backend got a new flow");
    }
    assert_echoes(&mut established, "draining but alive").await;
    // 20 % vs 60 % CPU: weights 80 and 40.
    controls[0].set_cpu(20);
    controls[1].set_cpu(60);
    wait_pool(&server, WAIT, "weights 80/40", |server| {
        let s = server.pool("web").unwrap().load();
        s.backends[0].weight == 80 && s.backends[1].weight == 40 && s.backends.iter().all(|b| b.state == Up)
    })
    .await;
    let mut names = Vec::new();
    for _ in 0..120 {
        names.push(greeting(addr, None).await);
    }
    let counts = tally(&names);
    assert!(counts["b0"] as f64 >= 1.5 * counts["b1"] as f64, "split not toward the idle backend: {counts:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_but_not_serving_is_visible_in_connect_failures() {
    // B14: probes on their own port pass, the data port refuses.
    let (mut b, port, _controls) = setup(2, 111).await;
    let dead = std::net::TcpListener::bind("127.0.0.111:0").unwrap().local_addr().unwrap();
    b[0].addr = dead; // nothing listens there any more
    let server = serve(&config(2, "stock:round-robin", &backend_list(&b, None), "", &probe(port, "")));
    all_up(&server, 2).await;
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..20 {
        assert_eq!(greeting(addr, None).await, "b1");
    }
    // The probes pass, but passive health saw the data port refuse: out,
    // with the reason, the failed connects counted, and the last probe ok.
    let snapshot = server.pool("web").unwrap().load();
    let b0 = &snapshot.backends[0];
    assert_eq!(b0.state, Down);
    assert!(b0.reason.as_deref().unwrap_or_default().starts_with("passive: 5 data-path failures"), "{:?}", b0.reason);
    // Out after its run of 5 (flows served meanwhile paid a retry each, how
    // many depends on how soon the ejection lands); once out, no flow pays.
    let failed = b0.stats.connect_failures.load(Ordering::SeqCst);
    assert!(failed >= 5, "{failed} failed connects");
    for _ in 0..20 {
        assert_eq!(greeting(addr, None).await, "b1");
    }
    assert_eq!(b0.stats.connect_failures.load(Ordering::SeqCst), failed, "a flow tried the ejected backend");
    assert_eq!(b0.stats.last_probe().unwrap().outcome, fulcrum_sdk::Outcome::Ok);
    // A passing probe of another port does not bring it back (B14): the back-off does.
    tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS)).await;
    assert_eq!(state(&server, 0), Down);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_probe_follows_whether_the_backend_port_accepts() {
    // B1: TCP probe on the backend's own port (no `port`): connect = up.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let list = format!("[ {{ address = \"{addr}\" }} ]");
    let probe = format!("[pool.probe]\nprotocol = \"tcp\"\ninterval = \"{INTERVAL_MS}ms\"\nthreshold = 2\n");
    let server = serve(&config(1, "stock:round-robin", &list, "", &probe));
    wait_state(&server, 0, Up, WAIT).await;
    drop(listener); // refused from now on: down at once (B3)
    let took = wait_state(&server, 0, Down, WAIT).await;
    assert!(took < Duration::from_millis(INTERVAL_MS + 300), "down after {took:?}");
    let last = server.pool("web").unwrap().load().backends[0].stats.last_probe().unwrap();
    assert_eq!(last.outcome, fulcrum_sdk::Outcome::Refused);
    server.shutdown();
}
