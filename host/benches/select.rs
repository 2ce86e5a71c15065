//! `select` per new flow, three ways:
//!
//! - `wasm`: a stock balancer through the host's real path ([`BalancerInstance::select`]
//!   on a primed instance: call counting, deadline, the component call, answer validation);
//! - `native`: the same plugin crate built natively, its answer validated the
//!   way the host validates every answer;
//! - `wasm-2-workers`: two threads picking at once, each through its own
//!   instance of the same plugin (as two workers do): the time per pick when
//!   they run side by side;
//! - `boundary/core-nop`: a no-op core Wasm function called through wasmtime,
//!   with the host's engine settings: the least any call into Wasm costs;
//! - `instance/first-select`: a new instance's first pick (instantiate with
//!   wasmtime's default on-demand allocator, `init`, `backends-changed` of 16
//!   backends, `select`): what a worker pays once per plugin (re)load.
//!
//! `cargo bench -p fulcrum --bench select`

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum::config::PluginRef;
use fulcrum::plugin::{BalancerPlugin, PluginLimits, PluginRuntime};
use fulcrum::pool::{Backend, PoolSnapshot};
use fulcrum_sdk::{BackendState, Balancer, Config, Flow, Protocol, Selection};

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
                match plugin.select(&flow(port)) {
                    Selection::Backend(id) if pool.is_eligible(id) => Selection::Backend(id),
                    _ => Selection::Reject,
                }
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
        instance.prime(&pool).unwrap();
        let mut port = 1024u16;
        g.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
            b.iter(|| {
                port = port.wrapping_add(1);
                instance.select(&pool, &pool, &flow(port))
            })
        });
        let mut instances = [plugin.instance(), plugin.instance()];
        for instance in &mut instances {
            instance.prime(&pool).unwrap();
        }
        g.bench_with_input(BenchmarkId::new("wasm-2-workers", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for instance in &mut instances {
                        let pool = &pool;
                        s.spawn(move || {
                            for i in 0..iters {
                                black_box(instance.select(pool, pool, &flow(i as u16)));
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

/// A core module (not a component) with one function that takes what a
/// flow flattens to and does nothing with it.
const CORE_NOP: &str =
    r#"(module (func (export "select") (param i64 i64 i32 i64 i64 i32 i32) (result i32) i32.const 0))"#;

fn boundary(c: &mut Criterion) {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    config.concurrency_support(false);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let module = wasmtime::Module::new(&engine, wat::parse_str(CORE_NOP).unwrap()).unwrap();
    let mut store = wasmtime::Store::new(&engine, ());
    store.set_epoch_deadline(u64::MAX / 2);
    let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
    let select = instance.get_typed_func::<(i64, i64, i32, i64, i64, i32, i32), i32>(&mut store, "select").unwrap();
    let mut port = 1024i32;
    c.benchmark_group("boundary").bench_function("core-nop", |b| {
        b.iter(|| {
            port = port.wrapping_add(1);
            select.call(&mut store, black_box((0, 1, port, 0, 2, 80, 0))).unwrap()
        })
    });
}

fn instantiate(c: &mut Criterion) {
    let runtime =
        PluginRuntime::new(PluginLimits { deadline: std::time::Duration::from_millis(10), memory: 64 << 20 }).unwrap();
    // Round robin: its `backends-changed` is trivial (five-tuple-hash builds a Maglev table there).
    let plugin = BalancerPlugin::load(&runtime, &PluginRef::Stock("round-robin".into()), "{}").unwrap();
    let pool = pool(16);
    c.benchmark_group("instance").bench_function("first-select", |b| {
        b.iter(|| {
            let mut instance = plugin.instance();
            instance.prime(&pool).unwrap();
            instance.select(&pool, &pool, &flow(1024))
        })
    });
}

fn select(c: &mut Criterion) {
    let sizes = [16, 256];
    wasm(c, "five-tuple-hash", "five-tuple-hash", &sizes);
    native::<fulcrum_plugin_five_tuple_hash::FiveTupleHash>(c, "five-tuple-hash", &sizes);
    wasm(c, "round-robin", "round-robin", &sizes);
    native::<fulcrum_plugin_round_robin::RoundRobin>(c, "round-robin", &sizes);
    wasm(c, "p2c", "p2c", &sizes);
    wasm(c, "maglev", "maglev", &sizes);
    wasm(c, "random", "random", &sizes);
    boundary(c);
    instantiate(c);
}

criterion_group!(benches, select);
criterion_main!(benches);
