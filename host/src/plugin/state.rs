//! The data of one plugin instance's store: WASI granting nothing, the
//! memory cap, the host imports (log, clock, random, live load).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::PluginInfo;
use super::bindings::balancer::fulcrum::plugin::{host, load, types};
use super::log_sink::LogSink;
use crate::pool::PoolSnapshot;

/// Core instances a plugin instance may make (a component of one module
/// and WASI's shims needs a handful).
pub const MAX_INSTANCES: usize = 32;
/// Linear memories of one plugin instance (a Rust plugin has one).
pub const MAX_MEMORIES: usize = 4;
/// Tables of one plugin instance.
pub const MAX_TABLES: usize = 16;
/// Bytes a table element is counted for in the budget (a function reference).
const TABLE_ELEMENT_BYTES: usize = 16;
/// WASI resources (streams, pollables) one instance may hold at once.
pub const MAX_WASI_RESOURCES: usize = 256;

/// One budget per plugin instance: all its memories and tables together stay
/// within `max` bytes (`[runtime] plugin_memory`), and it may make at most
/// [`MAX_INSTANCES`], [`MAX_MEMORIES`] and [`MAX_TABLES`]. A refusal is
/// remembered, so that the trap that follows is counted as a memory fault.
pub struct MemoryCap {
    max: usize,
    used: usize,
    pub denied: bool,
}

impl MemoryCap {
    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let used = self.used.saturating_sub(current).saturating_add(desired);
        if used > self.max {
            self.denied = true;
            return false;
        }
        self.used = used;
        true
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(self.grow(current, desired))
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let bytes = |elements: usize| elements.saturating_mul(TABLE_ELEMENT_BYTES);
        Ok(self.grow(bytes(current), bytes(desired)))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// The deadline of the call in progress, checked against the thread's CPU
/// time: epochs are wall-clock, and a worker thread that the OS set aside
/// for a moment must not be taken for a plugin that loops.
#[derive(Default)]
pub struct DeadlineCheck {
    /// Ticks of one window (half the deadline).
    pub window_ticks: u64,
    /// CPU time that, spent in one window, proves the plugin is running.
    pub window_cpu: std::time::Duration,
    /// Thread CPU time when the first window ended.
    pub checkpoint: Option<std::time::Duration>,
    pub extensions: u32,
}

pub struct PluginState {
    pub deadline: DeadlineCheck,
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub memory: MemoryCap,
    /// The pool snapshot whose backends the instance last saw.
    pub pool: Option<Arc<PoolSnapshot>>,
    info: Arc<PluginInfo>,
    rng: u64,
}

impl PluginState {
    pub fn new(info: Arc<PluginInfo>, memory_cap: usize) -> Self {
        let sink = LogSink::new(Arc::clone(&info));
        let wasi = WasiCtxBuilder::new()
            .stdout(sink.clone())
            .stderr(sink)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(super::wasi::NoTimeOfDay)
            .build();
        let seed = info.epoch.elapsed().as_nanos() as u64 ^ (Arc::as_ptr(&info) as u64);
        PluginState {
            deadline: DeadlineCheck::default(),
            wasi,
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_WASI_RESOURCES);
                table
            },
            memory: MemoryCap { max: memory_cap, used: 0, denied: false },
            pool: None,
            info,
            rng: seed | 1,
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for PluginState {}

impl host::Host for PluginState {
    fn log(&mut self, level: host::Level, message: String) {
        let level = match level {
            host::Level::Trace => tracing::Level::TRACE,
            host::Level::Debug => tracing::Level::DEBUG,
            host::Level::Info => tracing::Level::INFO,
            host::Level::Warn => tracing::Level::WARN,
            host::Level::Error => tracing::Level::ERROR,
        };
        self.info.log(level, &message);
    }

    fn now(&mut self) -> u64 {
        Instant::now().saturating_duration_since(self.info.epoch).as_nanos() as u64
    }

    fn random(&mut self) -> u64 {
        // splitmix64: fast, and the plugin may not use it for secrets anyway.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl PluginState {
    /// Backend `id` of the snapshot the instance was last told about.
    #[inline]
    fn backend(&self, id: u32) -> Option<&crate::pool::Backend> {
        self.pool.as_ref().and_then(|p| p.backends.get(id as usize))
    }
}

impl load::Host for PluginState {
    fn active_flows(&mut self, id: u32) -> u32 {
        self.backend(id).map_or(0, |b| b.stats.active_flows.load(Ordering::Relaxed))
    }

    fn connect_time_us(&mut self, id: u32) -> u32 {
        self.backend(id).map_or(0, |b| b.stats.connect_time_us.load(Ordering::Relaxed))
    }

    fn recent_failures(&mut self, id: u32) -> u32 {
        self.backend(id).map_or(0, |b| b.stats.recent_failures.load(Ordering::Relaxed))
    }

    fn since_change_ms(&mut self, id: u32) -> u64 {
        self.backend(id).map_or(0, |b| b.since.elapsed().as_millis().try_into().unwrap_or(u64::MAX))
    }

    fn signal(&mut self, id: u32) -> Option<u32> {
        self.backend(id).map(|b| b.stats.signal.load(Ordering::Relaxed)).filter(|&s| s != crate::pool::NO_SIGNAL)
    }

    fn next_turn(&mut self) -> u64 {
        self.pool.as_ref().map_or(0, |p| p.turns.fetch_add(1, Ordering::Relaxed))
    }
}
