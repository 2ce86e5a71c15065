//! The flow table: every live flow with its key, backend and counters, plus
//! per-reason totals of the flows that ended. Sharded so that workers rarely
//! meet on a lock; the cap (R2) is checked before a flow is admitted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::{CloseReason, FlowCounters, FlowKey};

const SHARDS: usize = 16;

/// Identity of a flow in its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowId(u64);

/// One live flow.
#[derive(Clone, Debug)]
pub struct FlowEntry {
    pub id: FlowId,
    pub key: FlowKey,
    pub backend: SocketAddr,
    pub counters: Arc<FlowCounters>,
}

/// Told of every registered flow when it ends (the flow log, the flow
/// duration histogram): called on the flow's own thread, so it must not wait.
pub trait FlowObserver: Send + Sync + std::fmt::Debug {
    fn closed(&self, entry: &FlowEntry, reason: CloseReason);
}

/// The flows of one frontend.
#[derive(Debug)]
pub struct FlowTable {
    shards: Vec<Mutex<HashMap<u64, FlowEntry>>>,
    next_id: AtomicU64,
    active: AtomicUsize,
    limit: AtomicUsize,
    closed: [AtomicU64; CloseReason::ALL.len()],
    /// Flows admitted so far.
    started: AtomicU64,
    /// Bytes of the flows that ended (live flows hold theirs in their counters).
    ended_bytes_up: AtomicU64,
    ended_bytes_down: AtomicU64,
    /// UDP datagrams dropped (no backend, flow cap, full socket buffer).
    dropped: AtomicU64,
    /// Times an accept loop paused, out of descriptors (R1).
    accept_pauses: AtomicU64,
    /// PROXY headers refused (`accept_proxy`).
    proxy_headers_refused: AtomicU64,
    /// Connections refused because every PROXY header slot was taken (or the
    /// peer's share of them).
    proxy_header_slots_full: AtomicU64,
}

impl FlowTable {
    pub fn new(limit: usize) -> Self {
        FlowTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            closed: Default::default(),
            started: AtomicU64::new(0),
            ended_bytes_up: AtomicU64::new(0),
            ended_bytes_down: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            accept_pauses: AtomicU64::new(0),
            proxy_headers_refused: AtomicU64::new(0),
            proxy_header_slots_full: AtomicU64::new(0),
        }
    }

    /// Counts a UDP datagram dropped.
    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// UDP datagrams dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts a pause of an accept loop that found the process out of
    /// descriptors (R1).
    pub fn count_accept_pause(&self) {
        self.accept_pauses.fetch_add(1, Ordering::Relaxed);
    }

    /// Accept-loop pauses so far (R1).
    pub fn accept_pauses(&self) -> u64 {
        self.accept_pauses.load(Ordering::Relaxed)
    }

    /// Counts a PROXY header refused (malformed, too slow, too big).
    pub fn count_proxy_header_refused(&self) {
        self.proxy_headers_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn proxy_headers_refused(&self) -> u64 {
        self.proxy_headers_refused.load(Ordering::Relaxed)
    }

    /// Counts a connection refused with every PROXY header slot taken.
    pub fn count_proxy_header_slots_full(&self) {
        self.proxy_header_slots_full.fetch_add(1, Ordering::Relaxed);
    }

    pub fn proxy_header_slots_full(&self) -> u64 {
        self.proxy_header_slots_full.load(Ordering::Relaxed)
    }

    /// A new cap (reload); flows above it are not ended, new ones wait below it.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Flows admitted so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Bytes moved so far, (client to backend, backend to client), live flows included.
    pub fn bytes(&self) -> (u64, u64) {
        let mut up = self.ended_bytes_up.load(Ordering::Relaxed);
        let mut down = self.ended_bytes_down.load(Ordering::Relaxed);
        for shard in &self.shards {
            for entry in shard.lock().unwrap_or_else(|e| e.into_inner()).values() {
                up += entry.counters.bytes_up.load(Ordering::Relaxed);
                down += entry.counters.bytes_down.load(Ordering::Relaxed);
            }
        }
        (up, down)
    }

    fn shard(&self, id: u64) -> MutexGuard<'_, HashMap<u64, FlowEntry>> {
        // A poisoned shard only means a panic elsewhere; the map is still valid.
        self.shards[id as usize % SHARDS].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a flow unless the table is at its cap; `None` means refuse it.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let mut active = self.active.load(Ordering::Relaxed);
        let limit = self.limit.load(Ordering::Relaxed);
        loop {
            if active >= limit {
                return None;
            }
            match self.active.compare_exchange_weak(active, active + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    self.started.fetch_add(1, Ordering::Relaxed);
                    return Some(Admission { table: Arc::clone(self), entry: None, observer: None, done: false });
                }
                Err(now) => active = now,
            }
        }
    }

    /// Flows admitted and not yet ended.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Flows ended for `reason` so far.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()].load(Ordering::Relaxed)
    }

    /// Counts a flow that was refused before it was admitted.
    pub fn count_refused(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of up to `limit` live flows.
    pub fn sample(&self, limit: usize) -> Vec<FlowEntry> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(shard.values().take(limit - out.len()).cloned());
            if out.len() >= limit {
                break;
            }
        }
        out
    }
}

/// A slot in the table, held from admission to the end of the flow. Dropping
/// it without [`Admission::close`] ends the flow too, so no entry outlives
/// its flow: counted as ended by shutdown, or as `panicked` (and logged) when
/// the drop comes from a panic unwinding the flow's task.
#[derive(Debug)]
pub struct Admission {
    table: Arc<FlowTable>,
    entry: Option<FlowEntry>,
    observer: Option<Arc<dyn FlowObserver>>,
    done: bool,
}

impl Admission {
    /// Registers the flow once its backend is known.
    pub fn register(&mut self, key: FlowKey, backend: SocketAddr, now: Instant) -> FlowEntry {
        let id = self.table.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = FlowEntry { id: FlowId(id), key, backend, counters: Arc::new(FlowCounters::new(now)) };
        self.table.shard(id).insert(id, entry.clone());
        self.entry = Some(entry.clone());
        entry
    }

    /// Tells `observer` of the flow's end (once registered).
    pub fn observe(&mut self, observer: Arc<dyn FlowObserver>) {
        self.observer = Some(observer);
    }

    /// Ends the flow: forgets it (if registered) and counts its close reason.
    pub fn close(mut self, reason: CloseReason) {
        self.finish(reason);
    }

    fn finish(&mut self, reason: CloseReason) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(entry) = self.entry.take() {
            self.table.shard(entry.id.0).remove(&entry.id.0);
            let bytes = |c: &AtomicU64| c.load(Ordering::Relaxed);
            self.table.ended_bytes_up.fetch_add(bytes(&entry.counters.bytes_up), Ordering::Relaxed);
            self.table.ended_bytes_down.fetch_add(bytes(&entry.counters.bytes_down), Ordering::Relaxed);
            if let Some(observer) = &self.observer {
                observer.closed(&entry, reason);
            }
        }
        self.table.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.table.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if std::thread::panicking() {
            let flow = self.entry.as_ref().map(|e| (e.key.client, e.backend));
            tracing::error!(?flow, "a flow's task panicked: flow ended, entry removed");
            self.finish(CloseReason::Panicked);
        } else {
            self.finish(CloseReason::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            protocol: Protocol::Tcp,
            client: SocketAddr::from(([10, 0, 0, 1], port)),
            frontend: SocketAddr::from(([10, 0, 0, 2], 80)),
        }
    }

    #[test]
    fn cap_refuses_new_flows_and_frees_on_close() {
        let table = Arc::new(FlowTable::new(2));
        let mut a = table.admit().unwrap();
        let b = table.admit().unwrap();
        assert!(table.admit().is_none());
        let now = Instant::now();
        let _entry = a.register(key(1), SocketAddr::from(([10, 0, 0, 9], 80)), now);
        assert_eq!(table.sample(10).len(), 1);
        a.close(CloseReason::Completed);
        assert_eq!((table.active(), table.sample(10).len()), (1, 0));
        assert!(table.admit().is_some());
        drop(b);
        assert_eq!(table.closed(CloseReason::Completed), 1);
        assert_eq!(table.closed(CloseReason::Shutdown), 2);
        assert_eq!(table.active(), 0);
    }

    /// No ghosts: a flow whose task panics leaves no entry behind, and the
    /// panic is counted as the flow's close reason.
    #[test]
    fn a_panicking_flow_leaves_no_entry() {
        let table = Arc::new(FlowTable::new(10));
        let t = Arc::clone(&table);
        let outcome = std::panic::catch_unwind(move || {
            let mut admission = t.admit().unwrap();
            admission.register(key(7), SocketAddr::from(([10, 0, 0, 9], 80)), Instant::now());
            assert_eq!(t.sample(10).len(), 1);
            panic!("a bug in a flow's task");
        });
        assert!(outcome.is_err());
        assert_eq!((table.active(), table.sample(10).len()), (0, 0), "no ghost entry");
        assert_eq!(table.closed(CloseReason::Panicked), 1);
        // A plain drop (shutdown) forgets a registered entry too.
        let mut admission = table.admit().unwrap();
        admission.register(key(8), SocketAddr::from(([10, 0, 0, 9], 80)), Instant::now());
        drop(admission);
        assert_eq!((table.sample(10).len(), table.closed(CloseReason::Shutdown)), (0, 1));
    }
}
