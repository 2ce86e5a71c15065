//! Hot reload (B13): policy, pools and frontends change live; established
//! flows keep their backend; a bad reload changes nothing.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fulcrum_tests::probe_target;
use fulcrum_tests::*;
use tokio::io::AsyncBufReadExt;

const WAIT: Duration = Duration::from_secs(10);

#[path = "reload_sim.rs"]
mod sim;

/// A config with an admin API, one frontend `web` on `listen`, pool `web`.
fn text(balancer: &str, backends: &str, listen: &str, extra_frontends: &str) -> String {
    format!(
        r#"[runtime]
workers = 2

[admin]
listen = "127.0.0.1:0"

[[frontend]]
name = "web"
listen = "{listen}"
pool = "web"
{extra_frontends}
[[pool]]
name = "web"
balancer = "{balancer}"
backends = {backends}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_through_twenty_balancer_swaps_all_succeed() {
    let b = backends(3, "127.0.0.1").await;
    let list = backend_list(&b, None);
    let file = ConfigFile::new("swaps", &text("stock:round-robin", &list, "127.0.0.1:0", ""));
    let server = Arc::new(serve_file(&file));
    let addr = server.frontend_addr("web").unwrap();
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (failures, done) = (Arc::clone(&failures), Arc::clone(&done));
        clients.push(tokio::spawn(async move {
            for _ in 0..500 {
                let ok = tokio::time::timeout(Duration::from_secs(5), async {
                    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
                    let mut reader = tokio::io::BufReader::new(&mut stream);
                    let mut line = String::new();
                    reader.read_line(&mut line).await.ok()?;
                    line.starts_with('b').then_some(())
                })
                .await;
                if !matches!(ok, Ok(Some(()))) {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let balancers = ["stock:five-tuple-hash", "stock:least-connections", "stock:source-ip", "stock:round-robin"];
    for i in 0..20 {
        file.write(&text(balancers[i % 4], &list, &addr.to_string(), ""));
        let result = tokio::task::spawn_blocking({
            let server = Arc::clone(&server);
            move || server.reload()
        })
        .await
        .unwrap();
        assert!(result.is_ok(), "reload {i} failed: {result:?}");
        assert_eq!(server.balancer("web").unwrap().name, balancers[i % 4]);
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 2000);
    assert_eq!(failures.load(Ordering::SeqCst), 0, "connections failed during reloads");
    Arc::try_unwrap(server).unwrap().shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_keeps_its_backend_when_a_reload_removes_it() {
    let b = backends(2, "127.0.0.1").await;
    let file =
        ConfigFile::new("remove-backend", &text("stock:round-robin", &backend_list(&b, None), "127.0.0.1:0", ""));
    let server = serve_file(&file);
    let addr = server.frontend_addr("web").unwrap();
    let (mut flow, name) = connect(addr, None).await;
    let (keep, gone) = if name == "b0" { (&b[1], &b[0]) } else { (&b[0], &b[1]) };
    file.write(&text("stock:round-robin", &backend_list(std::slice::from_ref(keep), None), &addr.to_string(), ""));
    server.reload().unwrap();
    assert_echoes(&mut flow, "after the reload").await;
    for _ in 0..20 {
        assert_eq!(greeting(addr, None).await, keep.name);
    }
    assert_eq!(gone.accepted(), 1);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_plugin_takes_over_and_replacing_its_file_reloads_it() {
    let b = backends(3, "127.0.0.1").await;
    let list = backend_list(&b, None);
    let file = ConfigFile::new("plugin-file", &text("stock:round-robin", &list, "127.0.0.1:0", ""));
    let server = serve_file(&file);
    let addr = server.frontend_addr("web").unwrap();
    // Switch to a plugin file that pins every flow to backend 0.
    let plugin = file.dir.join("policy.wasm");
    replace_file(&plugin, plugins::MISBEHAVE);
    file.write(&text(plugin.to_str().unwrap(), &list, &addr.to_string(), ""));
    let started = Instant::now();
    server.reload().unwrap();
    let mut names = Vec::new();
    for _ in 0..20 {
        names.push(greeting(addr, None).await);
    }
    assert_eq!(tally(&names).len(), 1, "{:?}", tally(&names));
    eprintln!("reload (API) to new policy in effect: {:?}", started.elapsed());
    // Replace the .wasm on disk, no signal: round robin takes over. Each
    // reload (the config file's own change may still bring one) is an event;
    // wait for the one that loaded the new file.
    let pinned = server.balancer("web").unwrap().digest.clone();
    let mut reloads = server.reloads().subscribe();
    let swapped = Instant::now();
    replace_file(&plugin, fulcrum::plugin::stock::component("round-robin").unwrap());
    while server.balancer("web").unwrap().digest == pinned {
        let next = tokio::time::timeout(WAIT.saturating_sub(swapped.elapsed()), reloads.changed()).await;
        assert!(matches!(next, Ok(Ok(()))), "the replaced plugin file was not reloaded");
    }
    let reloaded = swapped.elapsed();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(greeting(addr, None).await);
    }
    assert_eq!(seen.len(), 3, "round robin after the file was replaced: {seen:?}");
    eprintln!("file replaced to new policy in effect: {reloaded:?}");
    let last = server.state();
    assert_eq!(last.pool("web").unwrap().balancer.info.digest.len(), 64);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_changes_nothing_and_status_says_why() {
    let b = backends(2, "127.0.0.1").await;
    let list = backend_list(&b, None);
    let good = text("stock:round-robin", &list, "127.0.0.1:0", "");
    let file = ConfigFile::new("broken", &good);
    let server = serve_file(&file);
    let addr = server.frontend_addr("web").unwrap();
    let admin_addr = server.admin_addr().unwrap();
    let good = text("stock:round-robin", &list, &addr.to_string(), "");

    file.write(&good.replace("pool = \"web\"\n", "pool = \"web\"\nidle = \"1s\"\n"));
    let (code, body) = admin(admin_addr, "POST", "/reload", None).await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("fulcrum.toml:11: key `frontend.idle`: unknown field"), "{body}");
    let (_, status) = admin(admin_addr, "GET", "/status", None).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["reloads"]["last"]["ok"], false);
    assert!(status["reloads"]["last"]["error"].as_str().unwrap().contains(":11: key `frontend.idle`"), "{status}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(greeting(addr, None).await);
    }
    assert_eq!(seen.len(), 2, "the old round robin stopped: {seen:?}");

    let bogus = file.dir.join("bogus.wasm");
    replace_file(&bogus, b"not a component");
    file.write(&text(bogus.to_str().unwrap(), &list, &addr.to_string(), ""));
    let (code, body) = admin(admin_addr, "POST", "/reload", None).await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("pool `web` key `balancer`") && body.contains("not a Fulcrum plugin component"), "{body}");
    assert_eq!(server.balancer("web").unwrap().name, "stock:round-robin");
    assert_eq!(greeting(addr, None).await.len(), 2);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontends_added_and_removed_by_reload_start_and_stop_listening() {
    let b = backends(1, "127.0.0.1").await;
    let list = backend_list(&b, None);
    let file = ConfigFile::new("frontends", &text("stock:round-robin", &list, "127.0.0.1:0", ""));
    let server = serve_file(&file);
    let web = server.frontend_addr("web").unwrap();
    let api = "[[frontend]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\npool = \"web\"\n";
    file.write(&text("stock:round-robin", &list, &web.to_string(), api));
    server.reload().unwrap();
    let api_addr = server.frontend_addr("api").unwrap();
    assert_eq!(greeting(api_addr, None).await, "b0");
    let (mut established, _) = connect(web, None).await;
    // Remove `web`: its listener closes, its flow goes on.
    let only_api = text("stock:round-robin", &list, &api_addr.to_string(), "")
        .replace("name = \"web\"\nlisten", "name = \"api\"\nlisten");
    file.write(&only_api);
    server.reload().unwrap();
    assert!(server.frontend_addr("web").is_none());
    let start = Instant::now();
    while tokio::net::TcpStream::connect(web).await.is_ok() {
        assert!(start.elapsed() < WAIT, "web still listens");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(greeting(api_addr, None).await, "b0");
    assert_echoes(&mut established, "old frontend, live flow").await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_counters_of_a_staying_backend_survive_a_reload() {
    let ips: Vec<std::net::IpAddr> = vec!["127.0.0.171".parse().unwrap(), "127.0.0.172".parse().unwrap()];
    let b = vec![Backend::start("b0", "127.0.0.171").await, Backend::start("b1", "127.0.0.172").await];
    let (port, controls) = probe_target::start_many(&ips).await;
    let probe = format!("[pool.probe]\nprotocol = \"http\"\nport = {port}\ninterval = \"100ms\"\nthreshold = 1\n");
    let list = backend_list(&b, None);
    let file = ConfigFile::new("keep-health", &(text("stock:round-robin", &list, "127.0.0.1:0", "") + &probe));
    let server = serve_file(&file);
    let addr = server.frontend_addr("web").unwrap();
    wait_state(&server, 0, fulcrum_sdk::BackendState::Up, WAIT).await;
    wait_state(&server, 1, fulcrum_sdk::BackendState::Up, WAIT).await;
    for _ in 0..4 {
        greeting(addr, None).await;
    }
    controls[0].set_status(500);
    wait_state(&server, 0, fulcrum_sdk::BackendState::Down, WAIT).await;
    let flows_before = server.pool("web").unwrap().load().backends[0].stats.flows_total.load(Ordering::SeqCst);
    // Same pool, another balancer: b0 stays down, its counters stay.
    file.write(&(text("stock:least-connections", &list, &addr.to_string(), "") + &probe));
    server.reload().unwrap();
    let after = server.pool("web").unwrap().load();
    assert_eq!(after.backends[0].state, fulcrum_sdk::BackendState::Down);
    assert_eq!(after.backends[0].stats.flows_total.load(Ordering::SeqCst), flows_before);
    assert_eq!(after.backends[1].state, fulcrum_sdk::BackendState::Up);
    server.shutdown();
}

/// Frontends `web` (TCP) and `dns` (UDP) on `web_pool` and `dns_pool`;
/// pools `a`/`u` (round robin) and `slow`/`uslow` (a balancer whose
/// `backends-changed` computes for a second: past its set-up deadline).
fn moving_text(tcp: &[Backend], udp: &[UdpBackend], web_pool: &str, dns_pool: &str) -> String {
    let list = |addrs: Vec<SocketAddr>| {
        format!("[ {} ]", addrs.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect::<Vec<_>>().join(", "))
    };
    let slow =
        format!("balancer = \"{}\"\nbalancer_config = {{ mode = \"slow\", millis = 1000 }}", plugins::MISBEHAVE_PATH);
    format!(
        r#"[runtime]
workers = 2
plugin_deadline = "10ms"

[admin]
listen = "127.0.0.1:0"

[[frontend]]
name = "web"
listen = "127.0.0.1:0"
pool = "{web_pool}"

[[frontend]]
name = "dns"
listen = "127.0.0.1:0"
protocol = "udp"
pool = "{dns_pool}"

[[pool]]
name = "a"
backends = {a}

[[pool]]
name = "slow"
{slow}
backends = {slow_backends}

[[pool]]
name = "u"
backends = {u}

[[pool]]
name = "uslow"
{slow}
backends = {uslow}
"#,
        a = list(tcp[..2].iter().map(|b| b.addr).collect()),
        slow_backends = list(tcp[2..].iter().map(|b| b.addr).collect()),
        u = list(vec![udp[0].addr]),
        uslow = list(udp[1..].iter().map(|b| b.addr).collect()),
    )
}

/// Issue 20, case 1: a reload that moves frontends to pools whose balancer
/// cannot be primed in time fails whole and names the pool and plugin;
/// nothing panics, every connection is served by the pools that ran before,
/// UDP keeps answering, `/status` records the failed reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_pool_whose_balancer_stalls_fails_whole_and_serves_on() {
    let tcp = backends(5, "127.0.0.1").await;
    let mut udp = Vec::new();
    for i in 0..3 {
        udp.push(UdpBackend::start(&format!("u{i}"), "127.0.0.1").await);
    }
    let file = ConfigFile::new("stall", &moving_text(&tcp, &udp, "a", "u"));
    let server = serve_file(&file);
    let (web, dns) = (server.frontend_addr("web").unwrap(), server.frontend_addr("dns").unwrap());
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(udp_ask(&socket, dns, b"q", WAIT).await.unwrap().0, "u0");

    file.write(&moving_text(&tcp, &udp, "slow", "uslow"));
    let error = server.reload().unwrap_err().to_string();
    assert!(error.contains("pool `slow`") && error.contains("key `balancer`"), "{error}");
    assert!(error.contains("misbehave") && error.contains("backends-changed") && error.contains("deadline"), "{error}");

    // Nothing changed: the old pools serve every connection and datagram.
    for _ in 0..30 {
        let name = greeting(web, None).await;
        assert!(name == "b0" || name == "b1", "{name}: a backend of a pool the frontend is not on");
    }
    for _ in 0..10 {
        assert_eq!(udp_ask(&socket, dns, b"q", WAIT).await.unwrap().0, "u0");
    }
    let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(udp_ask(&other, dns, b"q", WAIT).await.unwrap().0, "u0", "a new UDP flow is served too");
    let (code, status) = admin(server.admin_addr().unwrap(), "GET", "/status", None).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let text = status.to_string();
    assert!(
        text.contains("pool `slow`") && text.contains("backends-changed"),
        "the failed reload is not shown: {text}"
    );

    // The pools that can be primed: the move goes through, and serves.
    let extra = format!("\n[[pool]]\nname = \"b4\"\nbackends = [ {{ address = \"{}\" }} ]\n", tcp[4].addr);
    file.write(&(moving_text(&tcp, &udp, "b4", "u") + &extra));
    server.reload().unwrap();
    for _ in 0..10 {
        assert_eq!(greeting(web, None).await, "b4");
    }
    drop(udp);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_event_that_changes_no_content_reloads_nothing() {
    let b = backends(2, "127.0.0.1").await;
    let text = config(1, "stock:round-robin", &backend_list(&b[..1], None), "", "");
    let file = ConfigFile::new("reload-same-content", &text);
    let server = serve_file(&file);
    let mut recorded = server.reloads().subscribe();
    recorded.borrow_and_update();
    // The same bytes written again (as a deploy tool might), and the file read
    // (as a takeover's new process does): no reload. Absence has no event to
    // wait for: three debounce periods.
    file.write(&text);
    let _ = std::fs::read_to_string(&file.path).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!recorded.has_changed().unwrap(), "a reload for unchanged content: {:?}", server.reloads().last());
    // A real change reloads.
    file.write(&config(1, "stock:round-robin", &backend_list(&b, None), "", ""));
    tokio::time::timeout(WAIT, recorded.changed()).await.unwrap().unwrap();
    let last = server.reloads().last().unwrap();
    assert!(last.ok && !last.changes.is_empty(), "{last:?}");
    assert_eq!(server.reloads().ok.load(Ordering::Relaxed), 1);
    server.shutdown();
}
