//! TCP flows: accept -> select -> connect -> copy both ways -> close reason.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fulcrum_sdk::algo::fallback_pick_with;
use fulcrum_sdk::{BackendState, Flow, Selection};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{OnAllDown, Protocol};
use crate::flow::{Admission, CloseReason, FlowCounters, FlowKey, FlowObserver, IdleCheck, IdleTimer};
use crate::live::{Binding, Frontend};
use crate::net::{AcceptBackoff, connect_tcp, reset_on_close};
use crate::plugin::Selector;
use crate::pool::ActiveOnBackend;
use crate::pool::PoolSnapshot;

/// Bytes read at once in each direction (a buffer held only while bytes pass).
const BUFFER_SIZE: usize = 32 * 1024;

/// An accepted connection.
#[derive(Debug)]
pub struct Accepted {
    pub frontend: Arc<Frontend>,
    pub stream: TcpStream,
    /// The client: the peer, or the one its PROXY header names (`accept_proxy`).
    pub client: SocketAddr,
    /// What its PROXY header said: the address the client reached, and the
    /// bytes that came after the header.
    pub proxied: Option<Proxied>,
    /// Its place in the flow table, when it took one before its PROXY header
    /// came (a connection waiting for its header is a flow).
    pub admission: Option<Admission>,
}

/// What an upstream's PROXY header told about a connection.
#[derive(Debug)]
pub struct Proxied {
    pub destination: Option<SocketAddr>,
    pub early: Vec<u8>,
}

/// Connections of one accept loop waiting for their PROXY header at most;
/// past it, new ones are reset and counted (`proxy_header_slots_full`).
pub const PENDING_HEADERS: usize = 1024;
/// With `accept_proxy_from` empty (any peer may send a header), one peer
/// address holds at most this many of the [`PENDING_HEADERS`] slots.
pub const PENDING_HEADERS_PER_PEER: usize = PENDING_HEADERS / 8;

/// The header slots each peer address holds now (`accept_proxy_from` empty).
#[derive(Debug, Default)]
struct PeerSlots(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PeerSlots {
    /// A slot for `peer`, unless it holds its share already.
    fn take(self: &Arc<Self>, peer: std::net::IpAddr) -> Option<PeerSlot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(peer).or_default();
        if *count >= PENDING_HEADERS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot { slots: Arc::clone(self), peer })
    }
}

/// One peer's slot, given back when its header is read (or refused).
struct PeerSlot {
    slots: Arc<PeerSlots>,
    peer: std::net::IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

/// Accepts connections on one worker's listener, picks each one's backend
/// with `selector` right here (no hand-off: a plugin call cannot wait) and
/// spawns its flow, until `shutdown` turns true.
pub async fn accept_loop(
    frontend: Arc<Frontend>,
    listener: TcpListener,
    mut selector: Selector,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = AcceptBackoff::default();
    // `accept_proxy`: connections come back here once their header is read,
    // to be balanced by this loop's selector.
    let (headers_tx, mut headers_rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
    let pending = Arc::new(tokio::sync::Semaphore::new(PENDING_HEADERS));
    let peers = Arc::new(PeerSlots::default());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(ready) = headers_rx.recv() => {
                let binding = frontend.binding.load_full();
                if let Some(flow) = super::contained(|| start_flow(ready, binding, &mut selector)) {
                    tokio::spawn(flow);
                }
                continue;
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        match accepted {
            Ok((stream, client)) => {
                backoff.reset();
                let binding = frontend.binding.load_full();
                let accepted =
                    Accepted { frontend: Arc::clone(&frontend), stream, client, proxied: None, admission: None };
                if binding.config.accept_proxy {
                    wait_for_header(accepted, &binding, &pending, &peers, &headers_tx);
                    continue;
                }
                if let Some(flow) = super::contained(|| start_flow(accepted, binding, &mut selector)) {
                    tokio::spawn(flow);
                }
            }
            Err(e) => {
                // R1: never spin; established flows are untouched.
                if backoff.pause(&frontend.name, &e).await {
                    frontend.flows.count_accept_pause();
                }
            }
        }
    }
    // Stopped (drain, takeover, frontend removed): the port closes now; the
    // connections still sending their header are flows, served once it
    // comes (each waits at most `proxy_header_timeout`).
    drop(listener);
    drop(headers_tx);
    while let Some(ready) = headers_rx.recv().await {
        let binding = frontend.binding.load_full();
        if let Some(flow) = super::contained(|| start_flow(ready, binding, &mut selector)) {
            tokio::spawn(flow);
        }
    }
}

/// Takes a flow-table place and a header slot for a connection that must
/// send a PROXY header first, and reads it off the loop; the connection
/// comes back on `ready`. Refused (reset, counted) when it may not send one,
/// the table is full, or the slots are (in all, or this peer's share).
fn wait_for_header(
    mut accepted: Accepted,
    binding: &Binding,
    pending: &Arc<tokio::sync::Semaphore>,
    peers: &Arc<PeerSlots>,
    ready: &tokio::sync::mpsc::UnboundedSender<Accepted>,
) {
    let frontend = Arc::clone(&accepted.frontend);
    // Only the upstreams' headers are believed (`accept_proxy_from`).
    let from = &binding.config.accept_proxy_from;
    let peer = accepted.client.ip().to_canonical();
    if !from.is_empty() && !from.iter().any(|net| net.contains(&peer)) {
        tracing::debug!(frontend = %frontend.name, client = %accepted.client, "PROXY header from a peer not in accept_proxy_from");
        reset_on_close(&accepted.stream);
        frontend.flows.count_proxy_header_refused();
        return;
    }
    let Some(admission) = frontend.flows.admit() else {
        reset_on_close(&accepted.stream);
        frontend.flows.count_refused(CloseReason::LimitReached);
        return;
    };
    let peer_slot = if from.is_empty() { peers.take(peer).map(Some) } else { Some(None) };
    let (Ok(slot), Some(peer_slot)) = (Arc::clone(pending).try_acquire_owned(), peer_slot) else {
        reset_on_close(&accepted.stream);
        admission.close(CloseReason::LimitReached);
        frontend.flows.count_proxy_header_slots_full();
        return;
    };
    accepted.admission = Some(admission);
    let timeout = binding.config.proxy_header_timeout;
    let ready = ready.clone();
    tokio::spawn(async move {
        let _slots = (slot, peer_slot);
        if let Some(accepted) = read_proxy_header(accepted, timeout).await {
            let _ = ready.send(accepted);
        }
    });
}

/// Reads an accepted connection's PROXY header: the connection with the
/// client it names, or `None` when it was refused (reset and counted).
async fn read_proxy_header(mut accepted: Accepted, timeout: std::time::Duration) -> Option<Accepted> {
    match super::proxy_header::receive(&mut accepted.stream, timeout).await {
        Ok(received) => {
            let destination = received.addresses.map(|(client, destination)| {
                accepted.client = client;
                destination
            });
            accepted.proxied = Some(Proxied { destination, early: received.early });
            Some(accepted)
        }
        Err(why) => {
            tracing::debug!(frontend = %accepted.frontend.name, peer = %accepted.client, "PROXY header refused: {why}");
            reset_on_close(&accepted.stream);
            accepted.frontend.flows.count_proxy_header_refused();
            if let Some(admission) = accepted.admission.take() {
                admission.close(CloseReason::ClientError);
            }
            None
        }
    }
}

/// Admits and selects a flow; returns the task that serves it, or refuses
/// it at once (RST) when it cannot be served. `selector` is the accept
/// loop's (this worker's) balancer for the frontend.
pub fn start_flow(
    accepted: Accepted,
    binding: Arc<Binding>,
    selector: &mut Selector,
) -> Option<impl Future<Output = ()> + Send + use<>> {
    let Accepted { frontend, stream, client, proxied, admission } = accepted;
    let Some(admission) = admission.or_else(|| frontend.flows.admit()) else {
        reset_on_close(&stream);
        // Counted, not logged: a flood past the cap would be a line each.
        frontend.flows.count_refused(CloseReason::LimitReached);
        return None;
    };
    // Only a wildcard listener needs to ask which of its addresses was reached.
    let local =
        if frontend.addr.ip().is_unspecified() { stream.local_addr().unwrap_or(frontend.addr) } else { frontend.addr };
    let key = FlowKey { protocol: Protocol::Tcp, client, frontend: local };
    let flow = Flow::new(client, local, fulcrum_sdk::Protocol::Tcp);
    let pool = binding.pool.pool.load();
    super::count_hairpin(&pool, &flow);
    match selector.select(&binding.pool.balancer, &binding.pool.pool, &pool, &flow) {
        Selection::Backend(id) => {
            let (destination, early) = match proxied {
                Some(p) => (p.destination.unwrap_or(local), p.early),
                None => (local, Vec::new()),
            };
            let client = Client { stream, key, flow, destination, early, halt: frontend.halt.clone() };
            Some(run_flow(client, id, pool, binding, admission))
        }
        Selection::Reject => {
            reset_on_close(&stream);
            admission.close(CloseReason::NoBackend);
            // Refused at once: its line's duration is 0.
            binding.recorder.refused(&key, std::time::Instant::now(), CloseReason::NoBackend);
            None
        }
    }
}

/// The client side of a flow about to connect.
struct Client {
    stream: TcpStream,
    key: FlowKey,
    flow: Flow,
    /// The address the client reached (for a PROXY header to the backend).
    destination: SocketAddr,
    /// Bytes for the backend before any read from the client (those read
    /// with an upstream's PROXY header).
    early: Vec<u8>,
    /// The process's halt: reset at the end of a shutdown's grace (B17).
    halt: watch::Receiver<bool>,
}

async fn run_flow(
    client: Client,
    first: u32,
    pool: Arc<PoolSnapshot>,
    binding: Arc<Binding>,
    mut admission: Admission,
) {
    let Client { stream: client, key, flow, destination, early, halt } = client;
    // The clock is read for a failed connect's log line only when there is a log.
    let connecting = binding.recorder.log.as_ref().map(|_| std::time::Instant::now());
    let (mut backend, id, _active) = match connect(&binding, &pool, &flow, first).await {
        Ok(connected) => connected,
        Err(reason) => {
            reset_on_close(&client);
            admission.close(reason);
            if let Some(since) = connecting {
                binding.recorder.refused(&key, since, reason);
            }
            return;
        }
    };
    admission.observe(Arc::clone(&binding.recorder) as Arc<dyn FlowObserver>);
    let entry = admission.register(key, pool.backends[id as usize].addr, Instant::now().into_std());
    // The PROXY header to the backend, then what came with the upstream's.
    let header = binding.pool.config.proxy_protocol.map(|v| super::proxy_header::encode(v, key.client, destination));
    let first_bytes = [header.as_deref().unwrap_or_default(), &early].concat();
    if !first_bytes.is_empty() {
        if let Err(e) = backend.write_all(&first_bytes).await {
            tracing::debug!(backend = %entry.backend, "cannot send the first bytes: {e}");
            reset_on_close(&client);
            admission.close(CloseReason::BackendError);
            return;
        }
        entry.counters.record(true, early.len(), Instant::now().into_std());
    }
    let idle = IdleTimer { timeout: binding.config.idle_timeout };
    let pool_config = &binding.pool.config;
    let all_down = (pool_config.on_all_down == OnAllDown::ResetFlows).then(|| binding.pool.pool.watch_all_down());
    let reason = forward(client, backend, &entry.counters, idle, binding.config.tcp_reset, all_down, halt).await;
    tracing::trace!(client = %key.client, backend = %entry.backend, reason = reason.as_str(), "flow closed");
    admission.close(reason);
}

/// Connects to `first`, then to other eligible backends on failure (at most
/// `connect_retries` more), counting each failure on its backend (B14). Out
/// of source ports or descriptors here, it stops at once: that is this
/// host's exhaustion (counted as such, B16), not the backend's, and the
/// other backends would meet it too.
async fn connect(
    binding: &Binding,
    pool: &PoolSnapshot,
    flow: &Flow,
    first: u32,
) -> Result<(TcpStream, u32, ActiveOnBackend), CloseReason> {
    let config = &binding.config;
    let sources = &binding.pool.config.source_addresses;
    let shared = &binding.pool.pool;
    let mut id = first;
    let mut tried: Vec<u32> = Vec::new();
    for _ in 0..=config.connect_retries {
        let backend = &pool.backends[id as usize];
        let turn = shared.source_turn(sources);
        let started = Instant::now();
        let active = ActiveOnBackend::pending(&backend.stats);
        match tokio::time::timeout(config.connect_timeout, connect_tcp(backend.addr, sources, turn)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let elapsed = started.elapsed();
                backend.stats.connected(elapsed);
                shared.connect_seconds.record(elapsed);
                active.established();
                return Ok((stream, id, active));
            }
            Ok(Err(e)) => match super::local_exhaustion(shared, &e) {
                Some(reason) => return Err(reason),
                None => tracing::debug!(backend = %backend.addr, "connect failed: {e}"),
            },
            Err(_) => tracing::debug!(backend = %backend.addr, "connect timed out"),
        }
        backend.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        shared.data_path_failure(&backend.stats, &binding.pool.config.passive);
        tried.push(id);
        if tried.len() > config.connect_retries as usize {
            break;
        }
        backend.stats.connect_retries.fetch_add(1, Ordering::Relaxed);
        let mut others = pool.views.clone();
        for &t in &tried {
            others[t as usize].state = BackendState::Down;
        }
        id = fallback_pick_with(&others, flow, pool.allow_hairpin).ok_or(CloseReason::ConnectFailed)?;
    }
    Err(CloseReason::ConnectFailed)
}

/// Copies bytes both ways until both sides are done, one side fails, or the
/// flow idles out; then closes both sides the way the reason calls for.
async fn forward(
    mut client: TcpStream,
    mut backend: TcpStream,
    counters: &FlowCounters,
    idle: IdleTimer,
    tcp_reset: bool,
    mut all_down: Option<watch::Receiver<bool>>,
    mut halt: watch::Receiver<bool>,
) -> CloseReason {
    let _ = client.set_nodelay(true);
    let reason = {
        let (mut client_rx, mut client_tx) = client.split();
        let (mut backend_rx, mut backend_tx) = backend.split();
        let finished = AtomicBool::new(false);
        let up = copy_half(&mut client_rx, &mut backend_tx, counters, &finished, Direction::Up);
        let down = copy_half(&mut backend_rx, &mut client_tx, counters, &finished, Direction::Down);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        let timer = tokio::time::sleep_until(Instant::now() + idle.timeout);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                done = &mut up, if !up_done => match done {
                    Ok(()) => up_done = true,
                    Err(reason) => break reason,
                },
                done = &mut down, if !down_done => match done {
                    Ok(()) => down_done = true,
                    Err(reason) => break reason,
                },
                () = &mut timer => match idle.check(counters.last_activity(), Instant::now().into_std()) {
                    IdleCheck::Expired => break CloseReason::IdleTimeout,
                    IdleCheck::CheckAt(at) => timer.as_mut().reset(at.into()),
                },
                () = every_backend_down(&mut all_down) => break CloseReason::AllBackendsDown,
                _ = halt.wait_for(|halt| *halt) => break CloseReason::Shutdown,
            }
            if up_done && down_done {
                break CloseReason::Completed;
            }
        }
    };
    // B10 (idle with `tcp_reset`), B7 (`reset-flows`) and B17 (the shutdown
    // grace is over: a cut transfer must look cut): both sides learn at once.
    let reset_both = matches!(reason, CloseReason::AllBackendsDown | CloseReason::Shutdown)
        || (reason == CloseReason::IdleTimeout && tcp_reset);
    match reason {
        _ if reset_both => {
            reset_on_close(&client);
            reset_on_close(&backend);
        }
        CloseReason::IdleTimeout => {
            let _ = client.shutdown().await;
            let _ = backend.shutdown().await;
        }
        // An abort on one side is passed on to the other.
        CloseReason::ClientError => reset_on_close(&backend),
        CloseReason::BackendError => reset_on_close(&client),
        _ => {}
    }
    reason
}

/// Resolves when every backend of the pool is down; never, without a watch.
async fn every_backend_down(all_down: &mut Option<watch::Receiver<bool>>) {
    if let Some(rx) = all_down
        && rx.wait_for(|down| *down).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

/// Copies one direction until EOF, then passes the EOF on (half-close).
/// Fails with the close reason naming the side at fault. `finished` is set
/// by the first direction to end.
async fn copy_half(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    counters: &FlowCounters,
    finished: &AtomicBool,
    dir: Direction,
) -> Result<(), CloseReason> {
    let (read_fault, write_fault) = match dir {
        Direction::Up => (CloseReason::ClientError, CloseReason::BackendError),
        Direction::Down => (CloseReason::BackendError, CloseReason::ClientError),
    };
    let mut buf = CopyBuffer::default();
    loop {
        from.readable().await.map_err(|_| read_fault)?;
        let n = match from.try_read_buf(buf.empty()) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.release();
                continue;
            }
            Err(_) => return Err(read_fault),
        };
        if n == 0 {
            // The first direction to end passes its EOF on. After the second,
            // both sockets close at once, and the close sends that FIN: each
            // was read to EOF, so neither holds unread bytes (which would
            // make the close a reset).
            if !finished.swap(true, Ordering::Relaxed) {
                to.shutdown().await.map_err(|_| write_fault)?;
            }
            return Ok(());
        }
        counters.record(dir == Direction::Up, n, Instant::now().into_std());
        to.write_all(buf.filled()).await.map_err(|_| write_fault)?;
    }
}

/// Most spare copy buffers a worker keeps for its next busy flows.
const MAX_SPARE_BUFFERS: usize = 64;

thread_local! {
    /// This worker's copy buffers that no flow holds right now.
    static SPARE_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// One direction's copy buffer, held only while bytes are passing: a quiet
/// flow holds none (nor does a flow woken for nothing), so idle flows cost no
/// buffer memory. A released buffer goes back to the worker's spares, so a
/// busy flow pays no malloc and free per burst; reads go into its spare
/// capacity, so a buffer is never zeroed.
#[derive(Default)]
struct CopyBuffer(Vec<u8>);

impl CopyBuffer {
    /// The buffer, emptied, with `BUFFER_SIZE` bytes of room.
    fn empty(&mut self) -> &mut Vec<u8> {
        if self.0.capacity() == 0 {
            self.0 = SPARE_BUFFERS.with_borrow_mut(Vec::pop).unwrap_or_else(|| Vec::with_capacity(BUFFER_SIZE));
        }
        self.0.clear();
        &mut self.0
    }

    /// What the last read put in.
    fn filled(&self) -> &[u8] {
        &self.0
    }

    /// Hands the buffer back to the worker's spares (or frees it).
    fn release(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() > 0 {
            SPARE_BUFFERS.with_borrow_mut(|spare| {
                if spare.len() < MAX_SPARE_BUFFERS {
                    spare.push(buf);
                }
            });
        }
    }
}

impl Drop for CopyBuffer {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_buffer_is_held_only_between_release_and_reuse() {
        let mut a = CopyBuffer::default();
        assert_eq!(a.0.capacity(), 0, "a new flow holds no buffer");
        let first = a.empty().as_ptr();
        assert!(a.0.capacity() >= BUFFER_SIZE);
        a.release();
        assert_eq!(a.0.capacity(), 0, "a quiet flow holds no buffer");
        let mut b = CopyBuffer::default();
        assert_eq!(b.empty().as_ptr(), first, "the spare is reused, not allocated anew");
        drop(b);
        let held: Vec<CopyBuffer> = (0..MAX_SPARE_BUFFERS + 10)
            .map(|_| {
                let mut c = CopyBuffer::default();
                c.empty();
                c
            })
            .collect();
        drop(held);
        assert_eq!(SPARE_BUFFERS.with_borrow(Vec::len), MAX_SPARE_BUFFERS, "spares are capped");
    }
}
