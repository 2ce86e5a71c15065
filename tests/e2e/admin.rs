//! The admin API: status, flows, drain/undrain, the bearer token, metrics.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use fulcrum_sdk::BackendState;
use fulcrum_tests::*;

fn with_admin(text: &str, token: &str) -> String {
    text.replace("[runtime]\n", &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n\n[runtime]\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_undrain_through_the_api_with_a_token() {
    let b = backends(2, "127.0.0.1").await;
    let server = serve(&with_admin(&config(2, "stock:round-robin", &backend_list(&b, None), "", ""), "s3cret"));
    let addr = server.frontend_addr("web").unwrap();
    let api = server.admin_addr().unwrap();
    let token = Some("s3cret");
    assert_eq!(admin(api, "GET", "/status", None).await.0, 401);
    assert_eq!(admin(api, "GET", "/status", Some("wrong")).await.0, 401);
    assert_eq!(admin(api, "POST", &format!("/backends/web/{}/drain", b[0].addr), None).await.0, 403);

    let (mut established, _) = loop {
        let (flow, name) = connect(addr, None).await;
        if name == "b0" {
            break (flow, name);
        }
    };
    let (code, body) = admin(api, "POST", &format!("/backends/web/{}/drain", b[0].addr), token).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(server.pool("web").unwrap().load().backends[0].state, BackendState::Draining);
    for _ in 0..10 {
        assert_eq!(greeting(addr, None).await, "b1");
    }
    assert_echoes(&mut established, "drained, not dropped").await;
    let (_, status) = admin(api, "GET", "/status", token).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let backend = &status["pools"][0]["backends"][0];
    assert_eq!(backend["state"], "draining", "{status}");
    assert_eq!(backend["active_flows"], 1, "{status}");
    assert_eq!(status["pools"][0]["balancer"]["name"], "stock:round-robin");
    assert_eq!(status["pools"][0]["balancer"]["sha256"].as_str().unwrap().len(), 64);

    let (code, _) = admin(api, "POST", &format!("/backends/web/{}/undrain", b[0].addr), token).await;
    assert_eq!(code, 200);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(greeting(addr, None).await);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(admin(api, "POST", "/backends/web/127.0.0.1:1/drain", token).await.0, 404);
    assert_eq!(admin(api, "POST", "/backends/nope/127.0.0.1:1/drain", token).await.0, 404);
    assert_eq!(admin(api, "GET", "/backends/web/127.0.0.1:1/drain", token).await.0, 405);

    let (code, flows) = admin(api, "GET", "/flows?limit=5", token).await;
    assert_eq!(code, 200);
    let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
    assert!(flows.as_array().unwrap().iter().any(|f| f["backend"] == b[0].addr.to_string()), "{flows}");
    server.shutdown();
}

fn sample(metrics: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = metrics
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0]
}

async fn scrape(api: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let (code, text) = admin(api, "GET", "/metrics", None).await;
    assert_eq!(code, 200);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_and_move_with_traffic() {
    let b = backends(2, "127.0.0.1").await;
    let server = serve(
        &with_admin(&config(2, "stock:round-robin", &backend_list(&b, None), "", ""), "x")
            .replace("token = \"x\"\n", ""),
    );
    let addr = server.frontend_addr("web").unwrap();
    let api = server.admin_addr().unwrap();
    let before = scrape(api).await;
    assert_eq!(sample(&before, "fulcrum_flows_started_total", &[("frontend", "web")]), 0.0);
    for _ in 0..10 {
        let (mut flow, _) = connect(addr, None).await;
        assert_echoes(&mut flow, "0123456789").await;
    }
    let flows = server.flows("web").unwrap();
    wait_until(Duration::from_secs(10), "flows to end", || flows.active() == 0).await;
    let after = scrape(api).await;
    assert_eq!(sample(&after, "fulcrum_flows_started_total", &[("frontend", "web")]), 10.0);
    let ended: f64 = fulcrum::flow::CloseReason::ALL
        .iter()
        .map(|r| sample(&after, "fulcrum_flows_ended_total", &[("frontend", "web"), ("reason", r.as_str())]))
        .sum();
    assert_eq!(ended, 10.0);
    assert_eq!(
        sample(&after, "fulcrum_bytes_total", &[("frontend", "web"), ("direction", "client_to_backend")]),
        110.0
    );
    assert!(sample(&after, "fulcrum_bytes_total", &[("frontend", "web"), ("direction", "backend_to_client")]) >= 110.0);
    let per_backend: f64 = b
        .iter()
        .map(|x| sample(&after, "fulcrum_backend_flows_total", &[("pool", "web"), ("backend", &x.addr.to_string())]))
        .sum();
    assert_eq!(per_backend, 10.0);
    assert_eq!(sample(&after, "fulcrum_plugin_calls_total", &[("pool", "web"), ("role", "balancer")]), 10.0);
    assert_eq!(sample(&after, "fulcrum_backend_up", &[("pool", "web"), ("backend", &b[0].addr.to_string())]), 1.0);
    let types: HashMap<_, _> = after.docs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert!(types.contains_key("fulcrum_flows_started_total"), "no HELP for the counters");
    server.shutdown();
}
