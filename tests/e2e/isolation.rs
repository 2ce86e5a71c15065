//! Plugin isolation (issue 10): nothing a plugin does can block, starve or
//! flood the host. Real plugins (`tests/plugins/misbehave`) that sleep, flood
//! their output, answer the client's own address or refuse their config with
//! a huge error.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fulcrum_tests::*;

/// A server whose pool `web` (three backends) is balanced by the misbehaving
/// plugin with `settings` (TOML inline-table body), one worker.
async fn misbehaving(settings: &str, runtime_extra: &str) -> (fulcrum::Server, Vec<Backend>) {
    misbehaving_with(settings, runtime_extra, "").await
}

/// [`misbehaving`], with `tail` appended to the config (more sections).
async fn misbehaving_with(settings: &str, runtime_extra: &str, tail: &str) -> (fulcrum::Server, Vec<Backend>) {
    let b = backends(3, "127.0.0.1").await;
    let text =
        config(1, plugins::MISBEHAVE_PATH, &backend_list(&b, None), "", &format!("balancer_config = {{ {settings} }}"))
            .replace("[runtime]\n", &format!("[runtime]\n{runtime_extra}\n"))
            + tail;
    (serve(&text), b)
}

/// Starts a server whose plugin refuses to start with `settings`; returns
/// the error and how long the refusal took.
fn refused_at_load(settings: &str) -> (String, Duration) {
    let text = config(
        1,
        plugins::MISBEHAVE_PATH,
        "[ { address = \"127.0.0.1:9\" } ]",
        "",
        &format!("balancer_config = {{ {settings} }}"),
    );
    let config = fulcrum::config::Config::parse(std::path::Path::new("test.toml"), &text).unwrap();
    let start = Instant::now();
    let error = fulcrum::Server::start(&config).map(drop).unwrap_err().to_string();
    (error, start.elapsed())
}

/// Echoes on `flow` every 20 ms until `stop`; returns the longest time one
/// echo took (the gap an established flow saw).
fn keep_echoing(
    mut flow: tokio::io::BufReader<tokio::net::TcpStream>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        let mut longest = Duration::ZERO;
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let start = Instant::now();
            assert_echoes(&mut flow, &format!("still here {i}")).await;
            longest = longest.max(start.elapsed());
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        longest
    })
}

/// A plugin that sleeps 30 s (a WASI clock subscription and a `poll`) in
/// `at`: every flow is served through the fallback at once, an established
/// flow on the same (only) worker keeps echoing, and each sleep is counted as
/// a timeout.
async fn a_sleeping_plugin_costs_no_flow_and_no_gap(at: &str) {
    let (server, _b) =
        misbehaving(&format!("mode = \"sleep\", at = \"{at}\", every = 2"), "plugin_deadline = \"20ms\"").await;
    let addr = server.frontend_addr("web").unwrap();
    // Established before the sleeping calls (it may itself have been served by the fallback).
    let (flow, _) = connect(addr, None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let echoer = keep_echoing(flow, Arc::clone(&stop));
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let start = Instant::now();
        let name = greeting(addr, None).await;
        slowest = slowest.max(start.elapsed());
        assert!(name.starts_with('b'), "{name}");
    }
    stop.store(true, Ordering::SeqCst);
    let gap = echoer.await.unwrap();
    let stats = &server.balancer("web").unwrap().stats;
    eprintln!("plugin sleeping in {at}: slowest new flow {slowest:?}, longest echo on the same worker {gap:?}");
    // Not speed checks: a plugin that really slept would hold both for 30 s.
    assert!(slowest < Duration::from_secs(5), "a new flow waited {slowest:?}");
    assert!(gap < Duration::from_secs(5), "an established flow stalled {gap:?}");
    assert!(stats.timeouts.load(Ordering::SeqCst) >= 1, "{stats:?}");
    assert_eq!(stats.traps.load(Ordering::SeqCst), 0, "a wait is a timeout, not a trap: {stats:?}");
    assert!(stats.fallbacks.load(Ordering::SeqCst) >= 1, "{stats:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_sleeping_in_select_is_stopped_and_counted() {
    a_sleeping_plugin_costs_no_flow_and_no_gap("select").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_sleeping_in_backends_changed_is_refused_at_start_at_once() {
    // It could never be primed: the start fails, naming pool, key and call,
    // instead of serving every flow through the fallback (issue 20).
    let (error, took) = refused_at_load("mode = \"sleep\", at = \"backends-changed\"");
    assert!(took < Duration::from_secs(10), "starting waited {took:?}");
    assert!(error.contains("pool `web` key `balancer`") && error.contains("backends-changed"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_sleeping_in_init_is_refused_at_load_at_once() {
    let (error, took) = refused_at_load("mode = \"sleep\", at = \"init\"");
    assert!(took < Duration::from_secs(10), "loading waited {took:?}");
    assert!(error.contains("which would wait"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hairpin_answer_is_refused_and_counted() {
    // Backends on 127.0.0.2 and 127.0.0.3; the client comes from 127.0.0.2,
    // and the plugin answers that very host.
    let b = vec![Backend::start("self", "127.0.0.2").await, Backend::start("other", "127.0.0.3").await];
    let text =
        config(1, plugins::MISBEHAVE_PATH, &backend_list(&b, None), "", "balancer_config = { mode = \"hairpin\" }");
    let server = serve(&text);
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..10 {
        let from = "127.0.0.2:0".parse().unwrap();
        assert_eq!(greeting(addr, Some(from)).await, "other", "a client was sent to itself");
    }
    let stats = &server.balancer("web").unwrap().stats;
    assert_eq!(stats.invalid_answers.load(Ordering::SeqCst), 10, "{stats:?}");
    // From elsewhere the same plugin is well-behaved: no fault.
    greeting(addr, None).await;
    assert_eq!(stats.invalid_answers.load(Ordering::SeqCst), 10, "{stats:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_megabyte_init_error_is_cut_before_it_is_kept() {
    let (error, _) = refused_at_load("mode = \"init-error\", bytes = 10485760");
    assert!(error.len() < 4096, "an error of {} bytes", error.len());
    assert!(error.contains("bytes cut]"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_flooding_its_output_stays_under_the_cap_and_status_stays_small() {
    // 100 MiB to stdout and a 1 MiB log line per call (every call).
    let admin = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let (server, _b) = misbehaving_with("mode = \"flood\", bytes = 104857600", "plugin_deadline = \"5s\"", admin).await;
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..3 {
        assert!(greeting(addr, None).await.starts_with('b'));
    }
    let stats = &server.balancer("web").unwrap().stats;
    let dropped = stats.log_bytes_dropped.load(Ordering::SeqCst);
    assert_eq!(stats.faults.load(Ordering::SeqCst), 0, "{stats:?}");
    // 3 calls x (100 lines of 1 MiB + a 1 MiB log line): everything past
    // 1 KiB a line, and every line past 20 a second, is dropped and counted.
    assert!(dropped >= 3 * 100 * ((1 << 20) - 1024), "only {dropped} bytes counted as dropped");
    let (status, body) = fulcrum_tests::admin(server.admin_addr().unwrap(), "GET", "/status", None).await;
    assert_eq!(status, 200);
    assert!(body.len() < 64 << 10, "/status is {} bytes", body.len());
    server.shutdown();
}

/// A `backends-changed` that takes 2 s, and a pool that changes every
/// 500 ms (a backend drained and undrained through the admin API): every new
/// flow is served without waiting for the plugin's set-up, which runs off the
/// data path. A flow that waited for it would wait up to 2 s; the bound below
/// is half that, so a loaded host (other tests side by side) cannot fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backends_changed_never_delays_a_flow() {
    let admin = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    // The set-up deadline (20 x 200 ms) leaves the 2 s computation be.
    let (server, b) = misbehaving_with("mode = \"slow\", millis = 2000", "plugin_deadline = \"200ms\"", admin).await;
    let addr = server.frontend_addr("web").unwrap();
    let api = server.admin_addr().unwrap();
    let drained = format!("/backends/web/{}/drain", b[2].addr);
    let undrained = format!("/backends/web/{}/undrain", b[2].addr);
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut flows = 0;
    let mut toggled = Instant::now();
    let mut drain = true;
    while start.elapsed() < Duration::from_secs(10) {
        if toggled.elapsed() >= Duration::from_millis(500) {
            let path = if drain { &drained } else { &undrained };
            assert_eq!(fulcrum_tests::admin(api, "POST", path, None).await.0, 200);
            drain = !drain;
            toggled = Instant::now();
        }
        let began = Instant::now();
        assert!(greeting(addr, None).await.starts_with('b'));
        slowest = slowest.max(began.elapsed());
        flows += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = &server.balancer("web").unwrap().stats;
    eprintln!("{flows} flows over 10 s of pool changes, slowest {slowest:?}; {stats:?}");
    assert!(slowest < Duration::from_secs(1), "a new flow waited {slowest:?}: for the set-up?");
    assert!(stats.instantiations.load(Ordering::SeqCst) >= 3, "the pool changes were not prepared: {stats:?}");
    assert_eq!(stats.faults.load(Ordering::SeqCst), 0, "{stats:?}");
    server.shutdown();
}

/// A plugin faulting on every other call is benched (the fallback serves
/// without calling it, `/status` says so), and a reload with a fixed plugin
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_faulting_often_is_benched_and_a_fixed_one_serves_after_a_reload() {
    let b = backends(3, "127.0.0.1").await;
    let text = |settings: &str, listen: &str, admin: &str| {
        config(1, plugins::MISBEHAVE_PATH, &backend_list(&b, None), "", &format!("balancer_config = {{ {settings} }}"))
            .replace("listen = \"127.0.0.1:0\"\npool", &format!("listen = \"{listen}\"\npool"))
            + &format!("\n[admin]\nlisten = \"{admin}\"\n")
    };
    let file = ConfigFile::new("benched", &text("mode = \"trap\", every = 2", "127.0.0.1:0", "127.0.0.1:0"));
    let server = serve_file(&file);
    let addr = server.frontend_addr("web").unwrap();
    let api = server.admin_addr().unwrap();
    // Until it is benched (how many flows that takes depends on how soon each
    // trapped instance is rebuilt; the fallback serves meanwhile): none lost.
    let info = server.balancer("web").unwrap();
    let since = Instant::now();
    while !info.benched() {
        assert!(since.elapsed() < Duration::from_secs(8), "not benched: {:?}", info.stats);
        assert!(greeting(addr, None).await.starts_with('b'), "a flow was lost");
    }
    let traps = info.stats.traps.load(Ordering::SeqCst);
    assert_eq!(traps, u64::from(fulcrum::plugin::BENCH_FAULTS), "{:?}", info.stats);
    for _ in 0..20 {
        assert!(greeting(addr, None).await.starts_with('b'), "a flow was lost");
    }
    assert_eq!(info.stats.traps.load(Ordering::SeqCst), traps, "a benched plugin is not called");
    let (_, status) = fulcrum_tests::admin(api, "GET", "/status", None).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let balancer = &status["pools"][0]["balancer"];
    assert_eq!(balancer["state"], "benched", "{balancer}");
    assert_eq!(balancer["last_fault"]["kind"], "trap", "{balancer}");
    // Fixed: pin every flow to b1.
    file.write(&text("mode = \"pin\", backend = 1", &addr.to_string(), &api.to_string()));
    server.reload().unwrap();
    for _ in 0..10 {
        assert_eq!(greeting(addr, None).await, "b1");
    }
    let (_, status) = fulcrum_tests::admin(api, "GET", "/status", None).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["pools"][0]["balancer"]["state"], "serving", "{status}");
    server.shutdown();
}

/// A plugin that grows a table without bound faults on its budget (the
/// memory cap covers tables too), every flow is served by the fallback, and
/// the host's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_growing_a_table_faults_on_its_budget_and_memory_stays_bounded() {
    let component = wat::parse_str(include_str!("../plugins/wat/grow-table.wat")).unwrap();
    let dir = std::env::temp_dir().join(format!("fulcrum-e2e-{}-grow-table", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("grow-table.wasm");
    replace_file(&plugin, &component);
    let b = backends(2, "127.0.0.1").await;
    let text = config(1, plugin.to_str().unwrap(), &backend_list(&b, None), "", "")
        .replace("[runtime]\n", "[runtime]\nplugin_memory = \"16MiB\"\nplugin_deadline = \"500ms\"\n");
    let server = serve(&text);
    let addr = server.frontend_addr("web").unwrap();
    let rss_before = rss_kib();
    for _ in 0..20 {
        assert!(greeting(addr, None).await.starts_with('b'), "a flow was lost");
    }
    let rss_after = rss_kib();
    let stats = &server.balancer("web").unwrap().stats;
    eprintln!("table-growing plugin: RSS {rss_before} KiB -> {rss_after} KiB; {stats:?}");
    assert!(stats.memory_faults.load(Ordering::SeqCst) >= 1, "{stats:?}");
    assert_eq!(stats.timeouts.load(Ordering::SeqCst), 0, "{stats:?}");
    // Each instance's table stays within its 16 MiB budget, and a dead
    // instance's memory is freed: far from 20 x 16 MiB.
    assert!(rss_after < rss_before + 128 * 1024, "RSS grew from {rss_before} to {rss_after} KiB");
    server.shutdown();
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pools_allow_hairpin_is_followed_by_stock_balancers_and_the_fallback() {
    // One backend, on 127.0.0.4; the client comes from that very host.
    let b = vec![Backend::start("self", "127.0.0.4").await];
    let from = || Some("127.0.0.4:0".parse().unwrap());
    for stock in ["round-robin", "five-tuple-hash", "least-connections", "random", "p2c", "maglev", "source-ip"] {
        let balancer = format!("stock:{stock}");
        // Not allowed: nowhere to go, the client is refused (reset).
        let server = serve(&config(1, &balancer, &backend_list(&b, None), "", ""));
        let addr = server.frontend_addr("web").unwrap();
        expect_reset_from(addr, "127.0.0.4").await;
        server.shutdown();
        // The pool allows it: the stock balancer sends the client to itself, no fault, no fallback.
        let server = serve(&config(1, &balancer, &backend_list(&b, None), "", "allow_hairpin = true"));
        let addr = server.frontend_addr("web").unwrap();
        for _ in 0..5 {
            assert_eq!(greeting(addr, from()).await, "self", "{stock}");
        }
        let stats = &server.balancer("web").unwrap().stats;
        assert_eq!(stats.faults.load(Ordering::SeqCst), 0, "{stock}: {stats:?}");
        assert_eq!(stats.fallbacks.load(Ordering::SeqCst), 0, "{stock}: {stats:?}");
        server.shutdown();
    }
    // The built-in fallback follows the switch too (a balancer that always traps).
    let text = config(
        1,
        plugins::MISBEHAVE_PATH,
        &backend_list(&b, None),
        "",
        "allow_hairpin = true\nbalancer_config = { mode = \"trap\" }",
    );
    let server = serve(&text);
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..5 {
        assert_eq!(greeting(addr, from()).await, "self");
    }
    assert!(server.balancer("web").unwrap().stats.fallbacks.load(Ordering::SeqCst) >= 5);
    server.shutdown();
}

/// Connects from `ip` and expects the connection to be reset (refused by the balancer).
async fn expect_reset_from(addr: std::net::SocketAddr, ip: &str) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    // Reset before the connect completes, or on the first read.
    let Ok(mut stream) = socket.connect(addr).await else { return };
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut stream, &mut buf)).await;
    assert!(matches!(read, Ok(Err(_)) | Ok(Ok(0))), "not refused: {read:?}");
}
