//! A balancer written in JavaScript (`examples/js-balancer`, built with
//! componentize-js by `scripts/test`) loads and balances: strict turns through
//! the host's shared counter, no fallback.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use fulcrum_tests::*;

/// Where `npm run build` in `examples/js-balancer` writes the component.
const JS_BALANCER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/js-balancer/balancer.wasm");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_balancer_balances() {
    assert!(
        std::path::Path::new(JS_BALANCER).is_file(),
        "{JS_BALANCER} is missing: build it with `cd examples/js-balancer && npm ci && npm run build` (scripts/test does)"
    );
    let b = backends(3, "127.0.0.1").await;
    let started = std::time::Instant::now();
    let server = serve(&config(2, JS_BALANCER, &backend_list(&b, None), "", ""));
    let load = started.elapsed();
    let addr = server.frontend_addr("web").unwrap();
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(greeting(addr, None).await);
    }
    assert_strict_turns(&names, 3);
    let info = server.balancer("web").unwrap();
    assert_eq!(info.stats.fallbacks.load(Ordering::Relaxed), 0, "the built-in fallback served flows");
    assert!(info.stats.calls() >= 30);
    println!("javascript balancer: loaded in {load:?}, {} calls", info.stats.calls());
    server.shutdown();
}
