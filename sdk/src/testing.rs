//! Native test helpers: build flows and backend sets from strings, and fake
//! what the host would answer (load, clock, randomness).
//!
//! ```
//! use fulcrum_sdk::testing;
//! let backends = testing::backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 0)]);
//! assert!(backends[0].is_eligible() && !backends[1].is_eligible());
//! testing::set_active_flows(0, 7);
//! assert_eq!(fulcrum_sdk::host::active_flows(0), 7);
//! ```

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;

use crate::host::{Level, Signals};
use crate::types::{Backend, BackendState, Flow, Observation, Outcome, ProbeKind, Protocol, ip_to_bits};

thread_local! {
    static SIGNALS: RefCell<HashMap<u32, Signals>> = RefCell::new(HashMap::new());
    static TURN: Cell<u64> = const { Cell::new(0) };
    static NOW: Cell<u64> = const { Cell::new(0) };
    static RNG: Cell<u64> = const { Cell::new(0x9e37_79b9_7f4a_7c15) };
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
}

fn addr(text: &str) -> SocketAddr {
    match text.parse() {
        Ok(addr) => addr,
        Err(e) => panic!("testing: {text:?} is not an ip:port ({e})"),
    }
}

/// A TCP flow from `client` to `frontend` (both `ip:port`).
pub fn flow(client: &str, frontend: &str) -> Flow {
    Flow::new(addr(client), addr(frontend), Protocol::Tcp)
}

/// Backends with ids 0.. from `(ip:port, weight)` pairs, all up.
pub fn backends(list: &[(&str, u32)]) -> Vec<Backend> {
    list.iter()
        .enumerate()
        .map(|(id, (text, weight))| {
            let addr = addr(text);
            Backend {
                id: id as u32,
                ip: ip_to_bits(addr.ip()),
                port: addr.port(),
                weight: *weight,
                state: BackendState::Up,
            }
        })
        .collect()
}

/// A probe observation with no headers and no body.
pub fn observation(kind: ProbeKind, outcome: Outcome, status: Option<u16>) -> Observation {
    Observation { kind, outcome, latency_us: 1000, status, headers: Vec::new(), body: Vec::new() }
}

/// What [`crate::host::active_flows`] answers for `id` on this thread.
pub fn set_active_flows(id: u32, flows: u32) {
    SIGNALS.with(|a| a.borrow_mut().entry(id).or_default().active_flows = flows);
}

/// What the live reads of [`crate::host`] answer for backend `id` on this
/// thread ([`crate::host::active_flows`], [`crate::host::connect_time_us`], ...).
pub fn set_signals(id: u32, signals: Signals) {
    SIGNALS.with(|a| a.borrow_mut().insert(id, signals));
}

/// What [`crate::host::now`] answers on this thread.
pub fn set_now(nanos: u64) {
    NOW.with(|n| n.set(nanos));
}

/// The messages logged on this thread so far (and forgets them).
pub fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

pub(crate) fn fake_signals(id: u32) -> Signals {
    SIGNALS.with(|a| a.borrow().get(&id).copied().unwrap_or_default())
}

pub(crate) fn fake_next_turn() -> u64 {
    TURN.with(|t| {
        let turn = t.get();
        t.set(turn.wrapping_add(1));
        turn
    })
}

pub(crate) fn fake_now() -> u64 {
    NOW.with(Cell::get)
}

pub(crate) fn fake_random() -> u64 {
    RNG.with(|r| {
        // xorshift64*: deterministic per thread, good enough for tests.
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|l| l.borrow_mut().push((level, message.to_owned())));
}
