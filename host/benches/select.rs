//! `select` per new flow: stock balancers through Wasm (the host's real path:
//! plugin call, answer validation) against the same plugin logic built natively.
//!
//! `cargo bench -p fulcrum --bench select`

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum::config::PluginRef;
use fulcrum::plugin::{BalancerPlugin, PluginLimits, PluginRuntime};
use fulcrum::pool::{Backend, PoolSnapshot};
use fulcrum_sdk::{BackendState, Balancer, Config, Flow, Protocol};

fn pool(n: usize) -> Arc<PoolSnapshot> {
    let backends = (0..n)
        .map(|i| {
            Backend::new(SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)), 100, BackendState::Up)
        })
        .collect();
    Arc::new(PoolSnapshot::new(1, backends))
}

fn flow(port: u16) -> Flow {
    Flow::new(SocketAddr::from(([192, 168, 1, 1], port)), SocketAddr::from(([10, 9, 9, 9], 80)), Protocol::Tcp)
}

fn native<B: Balancer>(c: &mut Criterion, group: &str, sizes: &[usize]) {
    let mut g = c.benchmark_group(group);
    for &n in sizes {
        let pool = pool(n);
        let mut plugin = B::default();
        plugin.init(&Config::new("{}")).unwrap();
        plugin.backends_changed(&pool.views);
        let mut port = 1024u16;
        g.bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
            b.iter(|| {
                port = port.wrapping_add(1);
                plugin.select(&flow(port))
            })
        });
    }
    g.finish();
}

fn wasm(c: &mut Criterion, group: &str, stock: &str, sizes: &[usize]) {
    let runtime =
        PluginRuntime::new(PluginLimits { deadline: std::time::Duration::from_millis(10), memory: 64 << 20 }).unwrap();
    let plugin = BalancerPlugin::load(&runtime, &PluginRef::Stock(stock.into()), "{}").unwrap();
    let mut g = c.benchmark_group(group);
    for &n in sizes {
        let pool = pool(n);
        let mut instance = plugin.instance();
        let mut port = 1024u16;
        g.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
            b.iter(|| {
                port = port.wrapping_add(1);
                instance.select(&pool, &flow(port))
            })
        });
    }
    g.finish();
}

fn select(c: &mut Criterion) {
    let sizes = [16, 256];
    wasm(c, "five-tuple-hash", "five-tuple-hash", &sizes);
    native::<fulcrum_plugin_five_tuple_hash::FiveTupleHash>(c, "five-tuple-hash", &sizes);
    wasm(c, "round-robin", "round-robin", &sizes);
    native::<fulcrum_plugin_round_robin::RoundRobin>(c, "round-robin", &sizes);
}

criterion_group!(benches, select);
criterion_main!(benches);
