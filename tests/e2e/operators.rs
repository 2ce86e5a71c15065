//! The operators' view: the dashboard in headless Chromium, the flow log
//! (one correct line per flow; a blocked writer never slows a flow), and
//! the histograms parsed as Prometheus text.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fulcrum_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// `tests/browser`, where `npm ci` put playwright-core (`scripts/test` does it).
fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Drives the dashboard at `admin_addr` in headless Chromium
/// (`tests/browser/dashboard.mjs`): lists the backends, drains `drained` of
/// `pool` through the API, and saves a screenshot as `shot`.
async fn drive_dashboard(
    admin_addr: SocketAddr,
    pool: &str,
    drained: SocketAddr,
    token: Option<&str>,
    shot: &str,
) -> Value {
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join(shot);
    let _ = std::fs::remove_file(&shot);
    assert!(
        browser_dir().join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run `npm ci` in tests/browser (scripts/test does)"
    );
    let mut node = std::process::Command::new("node");
    node.current_dir(browser_dir())
        .arg("dashboard.mjs")
        .arg(format!("http://{admin_addr}/"))
        .arg(&shot)
        .args([pool, &drained.to_string()])
        .args(token);
    let out = tokio::task::spawn_blocking(move || node.output()).await.unwrap().unwrap();
    assert!(out.status.success(), "dashboard.mjs: {}", String::from_utf8_lossy(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("dashboard: {result}\nscreenshot: {}", shot.display());
    assert_eq!(result.get("error"), None, "{result:#}");
    assert_eq!(result["drain_api_status"], 200);
    let seen_ms = result["drain_seen_ms"].as_u64().unwrap_or_else(|| panic!("the drain never showed: {result:#}"));
    assert!(seen_ms <= 2000, "the drain showed after {seen_ms} ms");
    assert_eq!(result["console_errors"], serde_json::json!([]), "{result:#}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "no screenshot at {}", shot.display());
    result
}

fn listed(result: &Value) -> HashSet<String> {
    result["backends"].as_array().unwrap().iter().map(|b| b["address"].as_str().unwrap().to_owned()).collect()
}

async fn demo_backends() -> Vec<SocketAddr> {
    let mut backends = Vec::new();
    for i in 1..=3 {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        backends.push(fulcrum::demo::http_backend(&format!("backend-{i}"), any).await.unwrap());
    }
    backends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_demos_backends_and_a_drain_in_chromium() {
    // The demo's own setup: three HTTP backends, round robin, the admin API.
    let backends = demo_backends().await;
    let config =
        fulcrum::demo::config("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap(), &backends).unwrap();
    let server = fulcrum::Server::start(&config).unwrap();
    let result = drive_dashboard(server.admin_addr().unwrap(), "demo", backends[1], None, "dashboard.png").await;
    let demo: HashSet<String> = backends.iter().map(ToString::to_string).collect();
    assert_eq!(listed(&result), demo, "the page lists the demo's three backends");
    // The page drained what the API did.
    let pool = server.pool("demo").unwrap();
    assert_eq!(pool.load().backends[1].state, fulcrum_sdk::BackendState::Draining);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_is_served_and_asks_for_it() {
    let backends = demo_backends().await;
    let list: Vec<String> = backends.iter().map(|b| format!("{{ address = \"{b}\" }}")).collect();
    let text = config(1, "stock:round-robin", &format!("[ {} ]", list.join(", ")), "", "")
        + "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"dashboard-secret\"\n";
    let server = serve(&text);
    let admin_addr = server.admin_addr().unwrap();
    // The page holds no data: served without the token; the data needs it.
    let (status, page) = admin(admin_addr, "GET", "/", None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>"));
    assert_eq!(admin(admin_addr, "GET", "/status", None).await.0, 401);
    assert_eq!(admin(admin_addr, "GET", "/diagnose", None).await.0, 401);
    assert_eq!(admin(admin_addr, "GET", "//status", None).await.0, 401);
    let result = drive_dashboard(admin_addr, "web", backends[2], Some("dashboard-secret"), "dashboard-token.png").await;
    assert_eq!(listed(&result).len(), 3);
    server.shutdown();
}

/// One flow: greeting, a line echoed, then FIN and the backend's `eof-seen`.
async fn one_flow(frontend: SocketAddr) -> SocketAddr {
    let (mut flow, _name) = connect(frontend, None).await;
    let client = flow.get_ref().local_addr().unwrap();
    flow.get_mut().write_all(b"x\n").await.unwrap();
    let mut rest = Vec::new();
    flow.get_mut().shutdown().await.unwrap();
    tokio::time::timeout(WAIT, flow.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(rest, b"x\neof-seen\n");
    client
}

/// `n` flows, `parallel` at a time; returns the clients' addresses.
async fn flows(frontend: SocketAddr, n: usize, parallel: usize) -> Vec<SocketAddr> {
    let mut tasks = Vec::new();
    for t in 0..parallel {
        tasks.push(tokio::spawn(async move {
            let mut clients = Vec::new();
            for _ in (t..n).step_by(parallel) {
                clients.push(one_flow(frontend).await);
            }
            clients
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.extend(t.await.unwrap());
    }
    clients
}

async fn flow_log_counts(server: &fulcrum::Server) -> (u64, u64) {
    let (_, body) = admin(server.admin_addr().unwrap(), "GET", "/status", None).await;
    let status: Value = serde_json::from_str(&body).unwrap();
    let log = &status["frontends"][0]["flow_log"];
    (log["written"].as_u64().unwrap(), log["dropped"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_log_has_one_correct_line_per_flow() {
    let b = backends(2, "127.0.0.1").await;
    let dir = std::env::temp_dir().join(format!("fulcrum-flowlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flows.jsonl");
    let _ = std::fs::remove_file(&path);
    let text = config(
        2,
        "stock:round-robin",
        &backend_list(&b, None),
        &format!("flow_log = {:?}", path.display().to_string()),
        "",
    ) + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let server = serve(&text);
    let frontend = server.frontend_addr("web").unwrap();
    let started = std::time::SystemTime::now();
    let clients = flows(frontend, 1000, 8).await;
    wait_until(WAIT, "1,000 lines written", || {
        std::fs::read_to_string(&path).map(|t| t.lines().count()).unwrap_or(0) >= 1000
    })
    .await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1000);
    let backends: HashSet<String> = b.iter().map(|b| b.addr.to_string()).collect();
    let mut logged = HashSet::new();
    for line in &lines {
        assert_eq!(line["frontend"], "web");
        assert_eq!(line["protocol"], "tcp");
        assert_eq!(line["frontend_address"], frontend.to_string());
        assert!(backends.contains(line["backend"].as_str().unwrap()), "{line}");
        assert_eq!((line["bytes_up"].as_u64(), line["bytes_down"].as_u64()), (Some(2), Some(14)), "{line}");
        assert_eq!(line["reason"], "completed", "{line}");
        let ms = line["duration_ms"].as_f64().unwrap();
        assert!((0.0..10_000.0).contains(&ms), "{line}");
        let start = humantime::parse_rfc3339(line["start"].as_str().unwrap()).unwrap();
        assert!(start + Duration::from_millis(5) >= started, "{line}");
        logged.insert(line["client"].as_str().unwrap().to_owned());
    }
    let ours: HashSet<String> = clients.iter().map(ToString::to_string).collect();
    assert_eq!(logged, ours, "one line per flow, each with its client");
    assert_eq!(flow_log_counts(&server).await, (1000, 0));
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_flow_log_drops_lines_and_never_stalls_a_flow() {
    // A FIFO whose reader never reads: once the pipe is full the writer
    // blocks, the queue fills, and lines are dropped.
    let dir = std::env::temp_dir().join(format!("fulcrum-flowlog-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("flows.fifo");
    let _ = std::fs::remove_file(&fifo);
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&fifo)
        .unwrap();
    let b = backends(2, "127.0.0.1").await;
    let text = config(
        2,
        "stock:round-robin",
        &backend_list(&b, None),
        &format!("flow_log = {:?}", fifo.display().to_string()),
        "",
    ) + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let server = serve(&text);
    let frontend = server.frontend_addr("web").unwrap();
    let n = fulcrum::flow_log::QUEUE + 2000;
    let began = Instant::now();
    // Short flows closed with RST (no TIME_WAIT left behind for 10,000 of them).
    let mut tasks = Vec::new();
    for t in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut served = 0;
            for _ in (t..n).step_by(8) {
                greeting(frontend, None).await;
                served += 1;
            }
            served
        }));
    }
    let mut served = 0;
    for t in tasks {
        served += t.await.unwrap();
    }
    let took = began.elapsed();
    assert_eq!(served, n, "every flow served");
    let (written, dropped) = flow_log_counts(&server).await;
    eprintln!(
        "blocked flow log: {n} flows in {took:?} ({:?} a flow), {written} lines written, {dropped} dropped",
        took / n as u32
    );
    assert!(dropped > 0, "nothing dropped: the writer was not blocked?");
    // Read the pipe: the writer goes on, and every line is accounted for.
    let mut reader = reader;
    let (mut read, mut buf) = (0u64, vec![0u8; 64 * 1024]);
    let start = Instant::now();
    loop {
        while let Ok(got) = std::io::Read::read(&mut reader, &mut buf) {
            if got == 0 {
                break;
            }
            read += buf[..got].iter().filter(|&&c| c == b'\n').count() as u64;
        }
        let (written, dropped) = flow_log_counts(&server).await;
        if written + dropped == n as u64 && read == written {
            break;
        }
        assert!(start.elapsed() < WAIT, "{written} written + {dropped} dropped of {n}; {read} read");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.shutdown();
}

fn histogram(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    pool: &str,
) -> (Vec<prometheus_parse::HistogramCount>, f64, f64) {
    let value = |metric: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && s.labels.get("pool") == Some(pool))
            .unwrap_or_else(|| panic!("no {metric}{{pool={pool}}}"))
            .value
            .clone()
    };
    let prometheus_parse::Value::Histogram(buckets) = value(name) else { panic!("{name} is no histogram") };
    let scalar = |metric: &str| match value(metric) {
        prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
        other => panic!("{metric}: {other:?}"),
    };
    (buckets, scalar(&format!("{name}_sum")), scalar(&format!("{name}_count")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_time_and_flow_duration_histograms_parse_as_prometheus() {
    let b = backends(2, "127.0.0.1").await;
    let server = serve(
        &(config(2, "stock:round-robin", &backend_list(&b, None), "", "") + "\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
    );
    let frontend = server.frontend_addr("web").unwrap();
    flows(frontend, 50, 4).await;
    // A flow that lasts at least 300 ms.
    let (mut long, _) = connect(frontend, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    long.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    long.read_to_end(&mut rest).await.unwrap();
    let flows = server.flows("web").unwrap();
    wait_until(WAIT, "51 flows ended", || flows.closed(fulcrum::flow::CloseReason::Completed) == 51).await;
    let (_, text) = admin(server.admin_addr().unwrap(), "GET", "/metrics", None).await;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let (connect, sum, count) = histogram(&scrape, "fulcrum_backend_connect_seconds", "web");
    assert_eq!(count, 51.0);
    assert!(sum > 0.0 && sum < 51.0, "{sum}");
    let inf = connect.iter().find(|b| b.less_than.is_infinite()).unwrap();
    assert_eq!(inf.count, 51.0);
    assert!(connect.windows(2).all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count), "cumulative");
    let (duration, sum, count) = histogram(&scrape, "fulcrum_flow_duration_seconds", "web");
    assert_eq!(count, 51.0);
    assert!(sum >= 0.3, "the long flow's 300 ms: {sum}");
    let below = |bound: f64| duration.iter().find(|b| b.less_than == bound).unwrap().count;
    assert_eq!(below(0.1), 50.0, "the short flows end within 100 ms, the long one after");
    assert_eq!(below(1.0), 51.0);
    assert!(scrape.docs.contains_key("fulcrum_flow_duration_seconds"));
    server.shutdown();
}

fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_flow_log_and_a_bad_path_changes_nothing() {
    let b = backends(1, "127.0.0.1").await;
    let list = backend_list(&b, None);
    let with_log = |path: &str| config(1, "stock:round-robin", &list, &format!("flow_log = {path:?}"), "");
    let file = ConfigFile::new("flow-log-reload", &config(1, "stock:round-robin", &list, "", ""));
    let server = serve_file(&file);
    let addr = server.frontend_addr("web").unwrap();
    let (mut held, _) = connect(addr, None).await; // open across every reload
    let first = file.dir.join("first.jsonl");
    file.write(&with_log(&first.display().to_string()));
    server.reload().unwrap();
    flows(addr, 3, 1).await;
    wait_until(WAIT, "3 lines in the first log", || lines_in(&first) == 3).await;
    // A path that cannot be opened fails the reload, names the key and the
    // path, and the running log goes on.
    file.write(&with_log("/nonexistent-fulcrum-dir/flows.jsonl"));
    let e = server.reload().unwrap_err().to_string();
    assert!(e.contains("frontend.flow_log") && e.contains("/nonexistent-fulcrum-dir/flows.jsonl"), "{e}");
    flows(addr, 2, 1).await;
    wait_until(WAIT, "5 lines in the first log", || lines_in(&first) == 5).await;
    // A new path: new flows' lines go there.
    let second = file.dir.join("second.jsonl");
    file.write(&with_log(&second.display().to_string()));
    server.reload().unwrap();
    flows(addr, 2, 1).await;
    wait_until(WAIT, "2 lines in the second log", || lines_in(&second) == 2).await;
    assert_eq!(lines_in(&first), 5);
    assert_echoes(&mut held, "still here after three reloads").await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_flow_has_a_line_without_a_backend() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("fulcrum-flowlog-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flows.jsonl");
    let _ = std::fs::remove_file(&path);
    let list = format!("[ {{ address = \"{dead}\" }} ]");
    let frontend_extra = format!("flow_log = {:?}\nconnect_retries = 0", path.display().to_string());
    let server = serve(&config(1, "stock:round-robin", &list, &frontend_extra, "[pool.passive]\nenabled = false"));
    let addr = server.frontend_addr("web").unwrap();
    expect_reset(addr).await;
    wait_until(WAIT, "the refused flow's line", || lines_in(&path) == 1).await;
    let line: Value = serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
    assert_eq!((line["reason"].as_str(), line["backend"].is_null()), (Some("connect_failed"), true), "{line}");
    assert_eq!((line["bytes_up"].as_u64(), line["bytes_down"].as_u64()), (Some(0), Some(0)));
    server.shutdown();
}
