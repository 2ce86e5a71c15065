//! # Plugin runtime
//!
//! One wasmtime [`Engine`] per process, one compiled component (behind an
//! `InstancePre`) per configured plugin ([`Plugin`], generic over its
//! [`World`]), one instance per worker accept loop (never shared, never
//! locked). Every call runs under an epoch deadline and every instance under
//! one budget (memories and tables together, counts, stack, WASI resources);
//! a plugin built the plain way (std, `wasm32-wasip2`) gets WASI where
//! nothing can wait (`wasi`), and its stdout/stderr as rate-limited log lines.
//!
//! A trap, a deadline overrun, a memory overrun or an answer that is not an
//! acceptable backend never costs a flow: the host serves it with the
//! built-in five-tuple hash ([`fulcrum_sdk::algo::fallback_pick`]), counts the
//! fault on the plugin (benching it when it faults too often) and drops a
//! dead instance; a new one is prepared off the data path ([`Selector`]).
//!
//! ```text
//!  PluginRef ──compile──> Component ──link──> BalancerPre
//!     ──Preparer / reload (off the data path)──> Ready (instance primed for a snapshot)
//!     ──per accept loop──> Selector::select(pool snapshot, flow)
//! ```

mod balancer;
mod bindings;
mod convert;
mod health;
mod log_sink;
mod selector;
mod state;
pub mod stock;
mod supervise;
mod wasi;
mod world;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Config, Engine};

pub use balancer::{BalancerInstance, BalancerPlugin, NotPrimed};
pub use health::{HealthInstance, HealthPlugin};
pub use selector::{HandOver, Preparer, Ready, Selector};
pub use world::{BalancerWorld, HealthWorld, Instance, Plugin, World};

use crate::config::PluginRef;

/// How often the engine's epoch advances: the granularity of deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Calls that set a plugin up (instantiate, init, backends-changed) may run
/// this many times the per-call deadline: they build tables, off the per-flow path.
const CONTROL_DEADLINE_FACTOR: u32 = 20;
/// The Wasm stack of a plugin call (wasmtime's default is 512 KiB).
pub const MAX_WASM_STACK: usize = 256 << 10;
/// Log lines a plugin may emit per second (the rest are counted, not shown).
const LOG_LINES_PER_SECOND: u32 = 20;
/// Log bytes a plugin may emit per second, all lines together.
const LOG_BYTES_PER_SECOND: usize = 16 << 10;
/// Longest log line kept; a longer one is cut and marked.
pub const MAX_LOG_LINE: usize = 1 << 10;
/// Longest string a plugin returns (an `init` error) that is kept, logged or shown.
pub const MAX_PLUGIN_STRING: usize = 1 << 10;

/// Limits applied to every plugin instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PluginLimits {
    /// Longest a single `select` may run.
    pub deadline: Duration,
    /// Linear-memory cap of an instance, in bytes.
    pub memory: u64,
}

/// Why a plugin could not be used, at load time.
#[derive(Debug)]
#[non_exhaustive]
pub enum PluginError {
    /// The file could not be read.
    Read { plugin: String, error: std::io::Error },
    /// `stock:<name>` names no stock plugin of this kind.
    UnknownStock { name: String, known: &'static [&'static str] },
    /// The bytes are not a valid component, or it does not fit the contract.
    Compile { plugin: String, error: String },
    /// It refused its config (`init` returned an error) or trapped setting up.
    Init { plugin: String, error: String },
    /// An instance could not be set up for the pool's backends (instantiate,
    /// `init`, `backends-changed`): it faulted, or ran past its set-up deadline.
    Prime { plugin: String, backends: usize, fault: Option<Fault> },
    /// The engine itself could not be set up (a bug, or the host lacks memory).
    Engine(String),
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginError::Read { plugin, error } => write!(f, "plugin {plugin}: cannot read it: {error}"),
            PluginError::UnknownStock { name, known } => {
                write!(f, "no stock plugin `{name}` here (expected one of: {})", known.join(", "))
            }
            PluginError::Compile { plugin, error } => {
                write!(f, "plugin {plugin}: not a Fulcrum plugin component (fulcrum:plugin@0.1.x): {error}")
            }
            PluginError::Init { plugin, error } => write!(f, "plugin {plugin}: refused to start: {error}"),
            PluginError::Prime { plugin, backends, fault } => {
                let why = match fault {
                    Some(Fault::Timeout) => "ran past its set-up deadline (20 x plugin_deadline)",
                    Some(Fault::Trap) => "trapped",
                    Some(Fault::Memory) => "ran out of its memory budget (plugin_memory)",
                    Some(Fault::InvalidAnswer | Fault::Instantiate) => "could not be instantiated",
                    None => "is backing off after earlier faults",
                };
                write!(f, "plugin {plugin}: an instance told the pool's {backends} backends (backends-changed) {why}")
            }
            PluginError::Engine(error) => write!(f, "the Wasm engine could not start: {error}"),
        }
    }
}

impl std::error::Error for PluginError {}

/// What went wrong in one call (counted per plugin, never fatal to a flow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The plugin trapped (panic, unreachable, bad memory access).
    Trap,
    /// It ran past its deadline.
    Timeout,
    /// It tried to grow past its memory cap.
    Memory,
    /// It answered something that is not an eligible backend.
    InvalidAnswer,
    /// A new instance could not be made (or init failed).
    Instantiate,
}

impl Fault {
    pub const ALL: [Fault; 5] = [Fault::Trap, Fault::Timeout, Fault::Memory, Fault::InvalidAnswer, Fault::Instantiate];

    /// The name shown to users (status, metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Trap => "trap",
            Fault::Timeout => "timeout",
            Fault::Memory => "memory",
            Fault::InvalidAnswer => "invalid_answer",
            Fault::Instantiate => "instantiate",
        }
    }
}

/// Counters of one loaded plugin, shared by all its instances.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Calls of the instances that are gone (see [`PluginStats::calls`]).
    retired_calls: AtomicU64,
    /// The call counters of the live instances.
    live_calls: Mutex<Vec<Arc<CallCounter>>>,
    pub faults: AtomicU64,
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub memory_faults: AtomicU64,
    pub invalid_answers: AtomicU64,
    pub instantiate_failures: AtomicU64,
    pub instantiations: AtomicU64,
    /// Flows served by the built-in fallback instead of the plugin.
    pub fallbacks: AtomicU64,
    /// Log lines dropped by the rate limit.
    pub logs_dropped: AtomicU64,
    /// Log bytes not shown: dropped lines, and the cut-off tails of long lines.
    pub log_bytes_dropped: AtomicU64,
    /// Calls timed (one in [`CALL_SAMPLE_EVERY`]) and their total time.
    pub sampled_calls: AtomicU64,
    pub sampled_nanos: AtomicU64,
}

/// One plugin call in this many is timed (for the latency metric).
pub const CALL_SAMPLE_EVERY: u64 = 64;

/// The calls of one instance. Only the instance's own thread writes it, with
/// a plain load and store: the hot path does no locked read-modify-write and
/// touches no cache line another worker writes. Scrapes add them up.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct CallCounter(AtomicU64);

impl CallCounter {
    /// Counts a call; returns a start time when this call is to be timed.
    pub(crate) fn call(&self) -> Option<Instant> {
        let n = self.0.load(Ordering::Relaxed);
        self.0.store(n + 1, Ordering::Relaxed);
        n.is_multiple_of(CALL_SAMPLE_EVERY).then(Instant::now)
    }
}

impl PluginStats {
    /// Calls made so far, by all instances, live or gone.
    pub fn calls(&self) -> u64 {
        let live = self.live_calls.lock().unwrap_or_else(|e| e.into_inner());
        self.retired_calls.load(Ordering::Relaxed) + live.iter().map(|c| c.0.load(Ordering::Relaxed)).sum::<u64>()
    }

    /// A call counter for a new instance.
    pub(crate) fn call_counter(&self) -> Arc<CallCounter> {
        let counter = Arc::new(CallCounter::default());
        self.live_calls.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(&counter));
        counter
    }

    /// The instance of `counter` is gone: its calls move to the retired total.
    pub(crate) fn retire(&self, counter: &Arc<CallCounter>) {
        let mut live = self.live_calls.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|c| !Arc::ptr_eq(c, counter));
        self.retired_calls.fetch_add(counter.0.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Records the time of a sampled call.
    pub fn timed(&self, started: Option<Instant>) {
        if let Some(started) = started {
            self.sampled_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.sampled_calls.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn sampled_mean_seconds(&self) -> f64 {
        let calls = self.sampled_calls.load(Ordering::Relaxed);
        if calls == 0 { 0.0 } else { self.sampled_nanos.load(Ordering::Relaxed) as f64 / calls as f64 / 1e9 }
    }

    fn counter_of(&self, fault: Fault) -> &AtomicU64 {
        match fault {
            Fault::Trap => &self.traps,
            Fault::Timeout => &self.timeouts,
            Fault::Memory => &self.memory_faults,
            Fault::InvalidAnswer => &self.invalid_answers,
            Fault::Instantiate => &self.instantiate_failures,
        }
    }

    /// Faults of one kind so far.
    pub fn faults_of(&self, fault: Fault) -> u64 {
        self.counter_of(fault).load(Ordering::Relaxed)
    }

    pub fn count(&self, fault: Fault) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.counter_of(fault).fetch_add(1, Ordering::Relaxed);
    }
}

/// Faults within [`BENCH_WINDOW`] that bench a plugin.
pub const BENCH_FAULTS: u32 = 10;
/// The window in which [`BENCH_FAULTS`] bench a plugin.
pub const BENCH_WINDOW: Duration = Duration::from_secs(10);
/// The first bench; each next one is twice as long, up to [`BENCH_MAX`].
pub const BENCH_FIRST: Duration = Duration::from_secs(1);
pub const BENCH_MAX: Duration = Duration::from_secs(60);

/// A plugin's fault history, for benching it.
#[derive(Debug)]
struct Bench {
    window_start: Instant,
    faults_in_window: u32,
    /// Benches in a row (the next one lasts 2^times x [`BENCH_FIRST`]).
    times: u32,
    last_fault: Option<(Fault, Instant, std::time::SystemTime)>,
}

/// A plugin's last fault, as `/status` shows it.
#[derive(Clone, Copy, Debug)]
pub struct LastFault {
    pub fault: Fault,
    /// When, as wall-clock time.
    pub at: std::time::SystemTime,
}

/// Identity and counters of a loaded plugin, plus its log rate limit.
#[derive(Debug)]
pub struct PluginInfo {
    /// As configured: `stock:<name>` or the file path.
    pub name: String,
    /// SHA-256 of the component, hex: which build of the plugin runs.
    pub digest: String,
    pub stats: PluginStats,
    /// WASI imports of the plugin that do not behave as plain WASI here:
    /// `(import, what it does)`, e.g. stubbed ones that trap (`fulcrum check`).
    pub wasi_notes: Vec<(String, &'static str)>,
    epoch: Instant,
    /// This second's start, and the lines and bytes logged in it.
    log_window: Mutex<(Instant, u32, usize)>,
    fault_window: Mutex<Option<Instant>>,
    bench: Mutex<Bench>,
    /// While benched: until when, in nanoseconds since `epoch` (0: serving).
    /// Read on every new flow: one atomic load.
    benched_until: AtomicU64,
}

impl PluginInfo {
    fn new(name: String, digest: String) -> Self {
        let now = Instant::now();
        PluginInfo {
            name,
            digest,
            stats: PluginStats::default(),
            wasi_notes: Vec::new(),
            epoch: now,
            log_window: Mutex::new((now, 0, 0)),
            fault_window: Mutex::new(None),
            bench: Mutex::new(Bench { window_start: now, faults_in_window: 0, times: 0, last_fault: None }),
            benched_until: AtomicU64::new(0),
        }
    }

    /// Logs a line of the plugin's: at most [`LOG_LINES_PER_SECOND`] lines
    /// and [`LOG_BYTES_PER_SECOND`] bytes a second, each line cut at
    /// [`MAX_LOG_LINE`] bytes (and marked). What is not shown is counted.
    fn log(&self, level: tracing::Level, message: &str) {
        let kept = message.floor_char_boundary(MAX_LOG_LINE);
        self.log_line(level, &message[..kept], message.len() - kept);
    }

    /// Logs `text`, a line whose last `cut` bytes were cut, within the rate limits.
    fn log_line(&self, level: tracing::Level, text: &str, cut: usize) {
        let now = Instant::now();
        let kept = text.len();
        let mut window = self.log_window.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            *window = (now, 0, 0);
        }
        if window.1 >= LOG_LINES_PER_SECOND || window.2 + kept > LOG_BYTES_PER_SECOND {
            drop(window);
            self.stats.logs_dropped.fetch_add(1, Ordering::Relaxed);
            self.stats.log_bytes_dropped.fetch_add((kept + cut) as u64, Ordering::Relaxed);
            return;
        }
        window.1 += 1;
        window.2 += kept;
        drop(window);
        if cut > 0 {
            self.stats.log_bytes_dropped.fetch_add(cut as u64, Ordering::Relaxed);
        }
        let text = inert(text);
        let message = Cut(&text, cut);
        let plugin = self.name.as_str();
        match level {
            tracing::Level::ERROR => tracing::error!(plugin, "{message}"),
            tracing::Level::WARN => tracing::warn!(plugin, "{message}"),
            tracing::Level::INFO => tracing::info!(plugin, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(plugin, "{message}"),
            tracing::Level::TRACE => tracing::trace!(plugin, "{message}"),
        }
    }

    /// Is the plugin benched (faulting too often): flows go to the fallback
    /// without calling it, and no instance is prepared, until the bench ends.
    #[inline]
    pub fn benched(&self) -> bool {
        let until = self.benched_until.load(Ordering::Relaxed);
        until != 0 && self.since_epoch(Instant::now()) < until
    }

    /// How long the bench still lasts, if benched.
    pub fn benched_for(&self) -> Option<Duration> {
        let until = self.benched_until.load(Ordering::Relaxed);
        let now = self.since_epoch(Instant::now());
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// The last fault, if any.
    pub fn last_fault(&self) -> Option<LastFault> {
        let bench = self.bench.lock().unwrap_or_else(|e| e.into_inner());
        bench.last_fault.map(|(fault, _, at)| LastFault { fault, at })
    }

    fn since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records a fault for benching: [`BENCH_FAULTS`] within [`BENCH_WINDOW`]
    /// bench the plugin for [`BENCH_FIRST`], doubling each time in a row
    /// (up to [`BENCH_MAX`]); a minute without faults forgives.
    fn bench_on(&self, fault: Fault, now: Instant) {
        let mut bench = self.bench.lock().unwrap_or_else(|e| e.into_inner());
        if bench.last_fault.is_some_and(|(_, at, _)| now.duration_since(at) > 6 * BENCH_WINDOW) {
            bench.times = 0;
        }
        bench.last_fault = Some((fault, now, std::time::SystemTime::now()));
        if now.duration_since(bench.window_start) > BENCH_WINDOW {
            bench.window_start = now;
            bench.faults_in_window = 0;
        }
        bench.faults_in_window += 1;
        if bench.faults_in_window < BENCH_FAULTS {
            return;
        }
        let length = crate::backoff::Backoff::new(BENCH_FIRST, BENCH_MAX).after(bench.times).delay();
        bench.times += 1;
        bench.window_start = now;
        bench.faults_in_window = 0;
        self.benched_until.store(self.since_epoch(now + length), Ordering::Relaxed);
        tracing::warn!(plugin = %self.name, ?length, "plugin benched: {BENCH_FAULTS} faults within {BENCH_WINDOW:?}; flows go to the built-in fallback");
    }

    /// Counts a fault and logs it, at most once a second per plugin.
    fn fault(&self, fault: Fault, detail: &dyn fmt::Display) {
        self.stats.count(fault);
        let now = Instant::now();
        self.bench_on(fault, now);
        let mut last = self.fault_window.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            let faults = self.stats.faults.load(Ordering::Relaxed);
            tracing::warn!(plugin = %self.name, fault = fault.as_str(), faults, "plugin fault, flow served by the built-in fallback: {detail}");
        }
    }
}

/// A log line, marked when its tail was cut.
struct Cut<'a>(&'a str, usize);

impl fmt::Display for Cut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)?;
        if self.1 > 0 {
            write!(f, " [... {} bytes cut]", self.1)?;
        }
        Ok(())
    }
}

/// A string a plugin wrote, made inert before it reaches a terminal, a log
/// line or JSON: control characters (newlines, escapes, C1) and the Unicode
/// controls that reorder text are shown as `\u{..}` escapes, so a plugin can
/// neither forge a log line nor drive the operator's terminal.
pub fn inert(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut clean = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            clean.extend(c.escape_unicode());
        } else {
            clean.push(c);
        }
    }
    std::borrow::Cow::Owned(clean)
}

/// Cuts a string a plugin returned to [`MAX_PLUGIN_STRING`] bytes, marked,
/// and makes it [`inert`].
pub(crate) fn bounded(text: String) -> String {
    let mut text = match inert(&text) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(clean) => clean,
    };
    if text.len() > MAX_PLUGIN_STRING {
        let cut = text.len() - text.floor_char_boundary(MAX_PLUGIN_STRING);
        text.truncate(text.floor_char_boundary(MAX_PLUGIN_STRING));
        text.push_str(&format!(" [... {cut} bytes cut]"));
    }
    text
}

/// The process's Wasm engine, its epoch ticker and the limits for instances.
pub struct PluginRuntime {
    engine: Engine,
    limits: PluginLimits,
    stop_ticker: Arc<AtomicBool>,
    /// Components compiled so far, by digest: a stock plugin used by many
    /// pools, or a plugin a reload keeps, is compiled once.
    compiled: std::sync::Mutex<std::collections::HashMap<String, Component>>,
}

/// Most compiled components kept for reuse (each holds its machine code).
const COMPILED_KEPT: usize = 64;

impl fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginRuntime").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl PluginRuntime {
    pub fn new(limits: PluginLimits) -> Result<Arc<Self>, PluginError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Synchronous calls only: no component-model-async bookkeeping per call.
        config.concurrency_support(false);
        // Stock plugins are built with it (the hash mixer's 128-bit product).
        config.wasm_wide_arithmetic(true);
        // A plugin's stack: deep enough for table building, bounded (a
        // runaway recursion is a trap, counted).
        config.max_wasm_stack(MAX_WASM_STACK);
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.clone(), Arc::clone(&stop_ticker));
        std::thread::Builder::new()
            .name("fulcrum-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Arc::new(PluginRuntime { engine, limits, stop_ticker, compiled: std::sync::Mutex::default() }))
    }

    pub fn limits(&self) -> PluginLimits {
        self.limits
    }

    /// The per-call deadline of `select` and `evaluate`.
    fn call_deadline(&self) -> Duration {
        self.limits.deadline
    }

    /// The deadline of set-up calls (instantiate, init, backends-changed).
    fn control_deadline(&self) -> Duration {
        self.limits.deadline * CONTROL_DEADLINE_FACTOR
    }

    /// The component bytes of a plugin, from where the config says it is.
    fn bytes(&self, source: &PluginRef) -> Result<std::borrow::Cow<'static, [u8]>, PluginError> {
        let plugin = source.to_string();
        match source {
            PluginRef::Stock(name) => stock::component(name)
                .map(std::borrow::Cow::Borrowed)
                .ok_or_else(|| PluginError::UnknownStock { name: name.clone(), known: &stock::ALL }),
            PluginRef::File(path) => {
                std::fs::read(path).map(std::borrow::Cow::Owned).map_err(|error| PluginError::Read { plugin, error })
            }
        }
    }

    /// SHA-256 (hex) of a plugin's component as it is now (on disk, for files).
    pub fn digest(&self, source: &PluginRef) -> Result<String, PluginError> {
        self.bytes(source).map(|bytes| sha256_hex(&bytes))
    }

    /// Compiles a plugin whose stock plugins are `stock`; returns it with its digest.
    fn compile(&self, source: &PluginRef, stock: &'static [&'static str]) -> Result<(Component, String), PluginError> {
        if let PluginRef::Stock(name) = source
            && !stock.contains(&name.as_str())
        {
            return Err(PluginError::UnknownStock { name: name.clone(), known: stock });
        }
        let bytes = self.bytes(source)?;
        let digest = sha256_hex(&bytes);
        let cached = self.compiled.lock().unwrap_or_else(|e| e.into_inner()).get(&digest).cloned();
        if let Some(component) = cached {
            return Ok((component, digest));
        }
        let component = Component::new(&self.engine, &bytes)
            .map_err(|e| PluginError::Compile { plugin: source.to_string(), error: format!("{e:#}") })?;
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if compiled.len() >= COMPILED_KEPT {
            compiled.clear();
        }
        compiled.insert(digest.clone(), component.clone());
        Ok((component, digest))
    }
}

/// Epoch ticks for a deadline: rounded up, plus one because the next tick may
/// come right after the deadline is set.
fn ticks(deadline: Duration) -> u64 {
    deadline.as_micros().div_ceil(EPOCH_TICK.as_micros()) as u64 + 1
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

impl PluginRuntime {
    /// The engine every plugin is compiled with.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for PluginRuntime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use fulcrum_sdk::{BackendState, Flow, Protocol, Selection};

    use super::*;
    use crate::pool::{Backend, PoolSnapshot};

    #[test]
    fn calls_of_every_instance_count_including_dropped_ones() {
        let runtime =
            PluginRuntime::new(PluginLimits { deadline: Duration::from_millis(50), memory: 16 << 20 }).unwrap();
        let plugin = BalancerPlugin::load(&runtime, &PluginRef::Stock("round-robin".into()), "{}").unwrap();
        let backends = (1..=3).map(|i| Backend::new(SocketAddr::from(([10, 0, 0, i], 80)), 100, BackendState::Up));
        let pool = Arc::new(PoolSnapshot::new(1, backends.collect()));
        let flow =
            Flow::new(SocketAddr::from(([10, 1, 1, 1], 4000)), SocketAddr::from(([10, 9, 9, 9], 80)), Protocol::Tcp);
        let (mut a, mut b) = (plugin.instance(), plugin.instance());
        a.prime(&pool).unwrap();
        b.prime(&pool).unwrap();
        for _ in 0..130 {
            assert!(matches!(a.select(&pool, &pool, &flow), Selection::Backend(_)));
        }
        for _ in 0..7 {
            b.select(&pool, &pool, &flow);
        }
        assert_eq!(plugin.info.stats.calls(), 137);
        drop(a);
        assert_eq!(plugin.info.stats.calls(), 137, "a dropped instance's calls are kept");
        b.select(&pool, &pool, &flow);
        assert_eq!(plugin.info.stats.calls(), 138);
        // One call in CALL_SAMPLE_EVERY is timed, per instance: calls 0, 64 and 128 of
        // the first, call 0 of the second.
        assert_eq!(plugin.info.stats.sampled_calls.load(Ordering::Relaxed), 4);
    }
}
