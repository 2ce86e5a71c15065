//! Plugins that trap, spin, grow without bound or answer nonsense never cost
//! a flow: the built-in fallback serves it, and the fault is counted.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fulcrum_tests::*;

/// Serves 40 connections through the misbehaving plugin in `mode` (every
/// other call misbehaves) and returns the plugin's counters' view.
async fn run(mode: &str, runtime_extra: &str) -> (fulcrum::Server, Vec<Duration>) {
    let b = backends(3, "127.0.0.1").await;
    let text = config(
        2,
        plugins::MISBEHAVE_PATH,
        &backend_list(&b, None),
        "",
        &format!("balancer_config = {{ mode = \"{mode}\", every = 2 }}"),
    )
    .replace("[runtime]\n", &format!("[runtime]\n{runtime_extra}\n"));
    let server = serve(&text);
    let addr = server.frontend_addr("web").unwrap();
    let mut setup = Vec::new();
    for _ in 0..40 {
        let start = Instant::now();
        let name = greeting(addr, None).await;
        setup.push(start.elapsed());
        assert!(name.starts_with('b'), "{name}");
    }
    // Keep the backends alive until here.
    drop(b);
    (server, setup)
}

fn balancer(server: &fulcrum::Server) -> std::sync::Arc<fulcrum::plugin::PluginInfo> {
    server.balancer("web").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_costs_no_flow() {
    let (server, _) = run("trap", "").await;
    let info = balancer(&server);
    let stats = &info.stats;
    assert!(stats.traps.load(Ordering::SeqCst) >= 5, "{stats:?}");
    assert!(stats.fallbacks.load(Ordering::SeqCst) >= 5, "{stats:?}");
    assert!(stats.instantiations.load(Ordering::SeqCst) >= 3, "dead instances were not rebuilt: {stats:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_plugin_is_stopped_at_its_deadline() {
    let (server, setup) = run("spin", "plugin_deadline = \"20ms\"").await;
    let info = balancer(&server);
    let stats = &info.stats;
    assert!(stats.timeouts.load(Ordering::SeqCst) >= 5, "{stats:?}");
    assert_eq!(stats.traps.load(Ordering::SeqCst), 0, "{stats:?}");
    // Not a speed check: a flow held by a spinning plugin would wait forever.
    let slowest = setup.iter().max().unwrap();
    eprintln!("spinning plugin, deadline 20 ms: slowest connection setup {slowest:?}");
    assert!(*slowest < Duration::from_secs(2), "a flow waited {slowest:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_growing_without_bound_hits_its_memory_cap() {
    // A deadline well past the time to touch 16 MiB: this test is about the memory budget.
    let (server, _) = run("grow", "plugin_memory = \"16MiB\"\nplugin_deadline = \"500ms\"").await;
    let info = balancer(&server);
    let stats = &info.stats;
    assert!(stats.memory_faults.load(Ordering::SeqCst) >= 5, "{stats:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_answer_is_refused_and_counted() {
    let (server, _) = run("bogus", "").await;
    let info = balancer(&server);
    let stats = &info.stats;
    assert!(stats.invalid_answers.load(Ordering::SeqCst) >= 10, "{stats:?}");
    // An invalid answer does not kill the instance.
    assert!(stats.instantiations.load(Ordering::SeqCst) <= 3, "{stats:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_using_wasi_stdio_loads_with_nothing_granted() {
    let (server, _) = run("print", "").await;
    let info = balancer(&server);
    let stats = &info.stats;
    assert_eq!(stats.faults.load(Ordering::SeqCst), 0, "{stats:?}");
    assert!(stats.calls() >= 40, "{stats:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_trying_the_network_gets_an_error_not_a_trap() {
    // UDP bind, TCP connect and TCP listen on every other call: each fails
    // (access-denied), the plugin handles it and keeps answering.
    let (server, _) = run("socket", "").await;
    let info = balancer(&server);
    let stats = &info.stats;
    assert_eq!(stats.faults.load(Ordering::SeqCst), 0, "{stats:?}");
    assert_eq!(stats.fallbacks.load(Ordering::SeqCst), 0, "{stats:?}");
    assert!(stats.calls() >= 40, "{stats:?}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinning_plugin_from_a_path_sends_every_flow_to_its_backend() {
    let b = backends(3, "127.0.0.1").await;
    let text = config(
        1,
        plugins::MISBEHAVE_PATH,
        &backend_list(&b, None),
        "",
        "balancer_config = { mode = \"pin\", backend = 2 }",
    );
    let server = serve(&text);
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..20 {
        assert_eq!(greeting(addr, None).await, "b2");
    }
    assert_eq!(balancer(&server).stats.faults.load(Ordering::SeqCst), 0);
    server.shutdown();
}
