//! UDP flows (B8, B9).
//!
//! A flow is a client's address toward the frontend. Each worker has its own
//! `SO_REUSEPORT` socket per frontend (the kernel keeps a client on one
//! worker) and its own flows ([`UdpPort`]). The receive loop forwards a
//! datagram of a known flow at once, through the flow's connected upstream
//! socket; for the first datagram of a new flow, or of a flow whose backend
//! went down or was removed, it selects a backend through its own selector
//! (protocol = udp) right there. Replies come back
//! on the upstream socket and leave from the frontend socket, so the client
//! sees them from the address it sent to.
//!
//! - A flow whose backend is down or removed ends (`backend_down`) and the
//!   client's datagram starts a new flow on a healthy backend; with no healthy
//!   backend the datagram is dropped and counted. Draining backends keep
//!   their flows until they idle out.
//! - Idle flows are forgotten after `udp_idle_timeout` (sweeper).
//! - The flow cap (`max_flows`) refuses new flows (datagram dropped, counted).
//! - Each flow holds one backend-facing socket (its own source port: that is
//!   how a reply finds its client), so a flood of sources could use up the
//!   process's descriptors and starve everything else in it (TCP accepts,
//!   probes, the admin API). R6's policy: the backend-facing UDP sockets of
//!   the whole process are capped at [`crate::net::udp_socket_cap`], half of what the
//!   descriptor limit leaves after [`crate::net::RESERVED_DESCRIPTORS`], in equal
//!   shares per worker ([`UdpWorker`]). At its share, a new flow takes the
//!   place of a quiet one of the same worker, of any UDP frontend (the least recently active of a few
//!   sampled at random, if quiet for [`EVICT_MIN_IDLE`]: a flood cannot push
//!   out flows that are talking), ended as `evicted`; with none to take, the
//!   datagram is dropped and counted as `local_exhaustion`, never as the
//!   backend's failure. A source never queues anything: a datagram is
//!   forwarded, or dropped, as it is read.
//! - Datagrams up to 64 KiB pass whole; buffers are per socket or per thread,
//!   never per datagram.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indexmap::IndexMap;

use fulcrum_sdk::{BackendState, Flow, Selection};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::config::Protocol;
use crate::flow::{Admission, CloseReason, FlowCounters, FlowEntry, FlowKey, FlowObserver, IdleCheck, IdleTimer};
use crate::live::{Binding, CarriedFlow, Frontend};
use crate::net::{SocketSlot, UdpBudget, connect_udp};
use crate::plugin::Selector;
use crate::pool::{ActiveOnBackend, Feedback};

/// The largest UDP payload (IPv4: 65,507; IPv6 jumbograms aside, 65,535).
pub const MAX_DATAGRAM: usize = 65_536;
/// Longest pause between idle sweeps.
const SWEEP_MAX: Duration = Duration::from_secs(1);
thread_local! {
    /// Scratch buffer of the reply path: one per worker thread, not per flow.
    static REPLY_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// A flow quiet for this long may be ended for a new one at the cap.
pub const EVICT_MIN_IDLE: Duration = Duration::from_secs(1);
/// Flows sampled for the quietest when one must make room.
const EVICT_SAMPLE: usize = 8;

/// One UDP flow.
#[derive(Debug)]
struct UdpFlow {
    backend: SocketAddr,
    /// The pool, and its generation, in which the backend was last seen
    /// usable (a generation number alone would match another pool's).
    pool: Arc<crate::pool::Pool>,
    generation: u64,
    upstream: Arc<UdpSocket>,
    /// Passive health: a port unreachable counts against the backend.
    feedback: Feedback,
    entry: FlowEntry,
    admission: Option<Admission>,
    reply: AbortHandle,
    _active: ActiveOnBackend,
    _slot: SocketSlot,
}

impl UdpFlow {
    fn close(mut self, reason: CloseReason) {
        self.reply.abort();
        if let Some(admission) = self.admission.take() {
            admission.close(reason);
        }
    }

    /// Is the backend still up (draining is fine) in the pool the frontend uses now?
    fn usable(&mut self, binding: &Binding) -> bool {
        let pool = &binding.pool.pool;
        let snapshot = pool.load();
        if Arc::ptr_eq(pool, &self.pool) && snapshot.generation == self.generation {
            return true;
        }
        let up = snapshot.backends.iter().any(|b| b.addr == self.backend && b.state != BackendState::Down);
        if up {
            self.pool = Arc::clone(pool);
            self.generation = snapshot.generation;
        }
        up
    }
}

/// What the UDP ports of one worker share: their share of the socket cap,
/// and each other (a new flow at the cap may take a quiet flow's place on
/// any of them: a flood on one frontend cannot lock out another's clients).
#[derive(Debug)]
pub struct UdpWorker {
    budget: Arc<UdpBudget>,
    ports: Mutex<Vec<std::sync::Weak<UdpPort>>>,
}

impl UdpWorker {
    /// One of `workers` workers.
    pub fn new(workers: usize) -> Arc<UdpWorker> {
        Arc::new(UdpWorker { budget: Arc::new(UdpBudget::new(workers)), ports: Mutex::default() })
    }

    fn ports(&self) -> Vec<Arc<UdpPort>> {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.retain(|p| p.strong_count() > 0);
        ports.iter().filter_map(std::sync::Weak::upgrade).collect()
    }

    /// Ends a quiet flow on one of this worker's ports other than `except`.
    fn evict_elsewhere(&self, except: &UdpPort, now: Instant) -> bool {
        // Only this worker's thread locks its ports' flows: no lock order to keep.
        self.ports().iter().filter(|p| !std::ptr::eq(&***p, except)).any(|p| evict_one(&mut p.flows(), now))
    }

    /// Ends the flows of frontend `id` on this worker (a new frontend took
    /// its address): once its loops stop too, its sockets close and leave
    /// the address to the new one's alone.
    pub fn end_flows_of(&self, id: u64) {
        for port in self.ports().iter().filter(|p| p.frontend == id) {
            port.close_all(CloseReason::Shutdown);
        }
    }

    /// A takeover (B17): gives up every flow of this worker's ports of
    /// `frontends` (the ones serving), each with a duplicate of its backend
    /// socket, and ends it here as `handed_over`.
    /// Its receive loops must have stopped: no datagram is between the two
    /// processes (what waits in a socket's buffer waits for the new one).
    pub fn hand_over(&self, frontends: &[u64]) -> Vec<CarriedFlow> {
        let mut carried = Vec::new();
        for port in self.ports().into_iter().filter(|p| frontends.contains(&p.frontend)) {
            for (client, flow) in port.flows().drain(..) {
                match std::os::fd::AsFd::as_fd(&*flow.upstream).try_clone_to_owned() {
                    Ok(upstream) => {
                        carried.push(CarriedFlow { socket: port.inode, client, backend: flow.backend, upstream })
                    }
                    Err(e) => tracing::warn!(%client, "a UDP flow cannot be handed over: {e}"),
                }
                flow.close(CloseReason::HandedOver);
            }
        }
        carried
    }

    /// The flows a takeover handed over (see [`UdpWorker::hand_over`]), on
    /// this worker's ports of the same sockets, each on its backend if the
    /// frontend's pool still has it up. Returns how many it took.
    pub fn adopt(&self, flows: Vec<(Arc<Frontend>, CarriedFlow)>) -> usize {
        let ports = self.ports();
        let mut adopted = 0;
        for (frontend, carried) in flows {
            let Some(port) = ports.iter().find(|p| p.inode == carried.socket) else { continue };
            let binding = frontend.binding.load_full();
            let pool = binding.pool.pool.load();
            let Some(backend) =
                pool.backends.iter().find(|b| b.addr == carried.backend && b.state != BackendState::Down)
            else {
                continue;
            };
            let upstream = std::net::UdpSocket::from(carried.upstream);
            let Ok(upstream) = upstream.set_nonblocking(true).and_then(|()| UdpSocket::from_std(upstream)) else {
                continue;
            };
            let Some(slot) = self.budget.take() else { continue };
            let Some(admission) = frontend.flows.admit() else { continue };
            let opened = Opened { upstream: Arc::new(upstream), admission, slot };
            let flow = open(&frontend, port, &binding, pool.generation, backend, carried.client, opened);
            port.flows().insert(carried.client, flow);
            adopted += 1;
        }
        adopted
    }
}

/// A frontend's socket on one worker, and the flows it carries.
#[derive(Debug)]
pub struct UdpPort {
    socket: Arc<UdpSocket>,
    /// The socket's inode: the same in every process holding it, so a flow
    /// handed over in a takeover finds the port its client's datagrams reach.
    inode: u64,
    /// The frontend's id ([`Frontend::id`]).
    frontend: u64,
    flows: Mutex<IndexMap<SocketAddr, UdpFlow>>,
    worker: Arc<UdpWorker>,
}

impl UdpPort {
    pub fn new(socket: UdpSocket, frontend: &Frontend, worker: &Arc<UdpWorker>) -> Arc<UdpPort> {
        let inode = rustix::fs::fstat(&socket).map_or(0, |stat| stat.st_ino);
        let port = Arc::new(UdpPort {
            socket: Arc::new(socket),
            inode,
            frontend: frontend.id,
            flows: Mutex::new(IndexMap::new()),
            worker: Arc::clone(worker),
        });
        worker.ports.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&port));
        port
    }

    fn flows(&self) -> MutexGuard<'_, IndexMap<SocketAddr, UdpFlow>> {
        // Only this worker's thread takes it; a poisoned map is still a map.
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forwards `data` if `client` has a flow on a usable backend; `false`
    /// when the worker must select one.
    fn forward(&self, frontend: &Frontend, client: SocketAddr, data: &[u8]) -> bool {
        let mut flows = self.flows();
        let Some(flow) = flows.get_mut(&client) else { return false };
        if !flow.usable(&frontend.binding.load()) {
            return false;
        }
        send_upstream(frontend, flow, data);
        true
    }

    fn close_all(&self, reason: CloseReason) {
        for (_, flow) in self.flows().drain(..) {
            flow.close(reason);
        }
    }
}

/// Ends the quietest of a few flows sampled at random, if it has been quiet
/// for [`EVICT_MIN_IDLE`], to free a place under the UDP socket cap.
fn evict_one(flows: &mut IndexMap<SocketAddr, UdpFlow>, now: Instant) -> bool {
    if flows.is_empty() {
        return false;
    }
    let quietest = (0..EVICT_SAMPLE.min(flows.len()))
        .map(|_| fastrand::usize(..flows.len()))
        .min_by_key(|&i| flows[i].entry.counters.last_activity());
    let Some(i) = quietest else { return false };
    if now.saturating_duration_since(flows[i].entry.counters.last_activity()) < EVICT_MIN_IDLE {
        return false;
    }
    match flows.swap_remove_index(i) {
        Some((_, flow)) => {
            flow.close(CloseReason::Evicted);
            true
        }
        None => false,
    }
}

/// Sends right away on a non-blocking socket: a raw `send`, not tokio's
/// `try_send`, which refuses until the reactor has seen the socket writable.
fn send_upstream(frontend: &Frontend, flow: &UdpFlow, data: &[u8]) {
    match socket2::SockRef::from(&*flow.upstream).send(data) {
        Ok(_) => flow.entry.counters.record(true, data.len(), Instant::now()),
        Err(e) => {
            // An earlier datagram was answered "port unreachable".
            if e.kind() == io::ErrorKind::ConnectionRefused {
                flow.feedback.failed();
            }
            // A full socket buffer drops the datagram, as the network would.
            frontend.flows.count_dropped();
        }
    }
}

/// A datagram the receive loop could not forward: a new flow, or a flow to move.
#[derive(Debug)]
pub struct Datagram<'a> {
    pub frontend: &'a Arc<Frontend>,
    pub port: &'a Arc<UdpPort>,
    pub client: SocketAddr,
    pub data: &'a [u8],
}

/// Receives on one worker's socket until `stop`. The port's flows go on
/// (their replies still reach their clients) until they idle out or the
/// process halts: a frontend removed by a reload, or a graceful shutdown,
/// cuts no flow.
/// Datagrams are read in batches (`recvmmsg`, with GRO where the kernel
/// offers it, via `quinn-udp`) into buffers of this loop's own.
pub async fn recv_loop(
    frontend: Arc<Frontend>,
    port: Arc<UdpPort>,
    mut selector: Selector,
    mut stop: watch::Receiver<bool>,
) {
    let state = match quinn_udp::UdpSocketState::new((&*port.socket).into()) {
        Ok(state) => state,
        Err(e) => {
            tracing::error!(frontend = %frontend.name, "udp socket setup: {e}");
            return;
        }
    };
    let mut bufs: Vec<Vec<u8>> = (0..quinn_udp::BATCH_SIZE).map(|_| vec![0u8; MAX_DATAGRAM]).collect();
    let mut meta = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
    // In a takeover, not before the old process's flows are here (B17).
    let mut gate = frontend.udp_gate.clone();
    tokio::select! {
        biased;
        _ = stop.wait_for(|stop| *stop) => return,
        _ = gate.wait_for(|open| *open) => {}
    }
    loop {
        // Stop first: once told, not one more datagram (a takeover counts on it).
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            ready = port.socket.readable() => if ready.is_err() { break },
        }
        let received = port.socket.try_io(tokio::io::Interest::READABLE, || {
            let mut slices = bufs.iter_mut();
            let mut slices: [io::IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
                std::array::from_fn(|_| io::IoSliceMut::new(slices.next().map_or(&mut [][..], |b| &mut b[..])));
            state.recv((&*port.socket).into(), &mut slices, &mut meta)
        });
        let count = match received {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(frontend = %frontend.name, "udp receive: {e}");
                continue;
            }
        };
        for (m, buf) in meta.iter().zip(&bufs).take(count) {
            // With GRO one buffer holds several datagrams of one sender, `stride` apart.
            for datagram in buf[..m.len].chunks(m.stride.max(1)) {
                if port.forward(&frontend, m.addr, datagram) {
                    continue;
                }
                let binding = frontend.binding.load_full();
                let new = Datagram { frontend: &frontend, port: &port, client: m.addr, data: datagram };
                // A panic (a bug) costs this datagram, never the loop.
                super::contained(|| on_datagram(new, &binding, &mut selector));
            }
        }
    }
}

/// Forgets flows idle for the frontend's `udp_idle_timeout`; after `stop`,
/// until the port has no flow left. At a halt, ends them all.
pub async fn sweep_loop(frontend: Arc<Frontend>, port: Arc<UdpPort>, mut stop: watch::Receiver<bool>) {
    let mut halt = frontend.halt.clone();
    let mut stopped = false;
    loop {
        let timeout = frontend.binding.load().config.udp_idle_timeout;
        let pause = (timeout / 4).clamp(Duration::from_millis(10), SWEEP_MAX);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = halt.wait_for(|halt| *halt) => {
                port.close_all(CloseReason::Shutdown);
                return;
            }
            // At the stop at once: a port with no flow left closes its socket now.
            _ = stop.wait_for(|stop| *stop), if !stopped => stopped = true,
        }
        if *stop.borrow() && port.flows().is_empty() {
            return;
        }
        let idle = IdleTimer { timeout };
        let now = Instant::now();
        let mut flows = port.flows();
        let expired: Vec<SocketAddr> = flows
            .iter()
            .filter(|(_, f)| idle.check(f.entry.counters.last_activity(), now) == IdleCheck::Expired)
            .map(|(client, _)| *client)
            .collect();
        for client in expired {
            if let Some(flow) = flows.swap_remove(&client) {
                flow.close(CloseReason::IdleTimeout);
            }
        }
    }
}

/// Handles a datagram the receive loop could not forward: moves or starts
/// the client's flow (selecting through `selector`) and forwards it, or
/// drops it when no backend may take it. Runs in the receive loop.
pub fn on_datagram(datagram: Datagram<'_>, binding: &Binding, selector: &mut Selector) {
    let Datagram { frontend, port, client, data } = datagram;
    let mut flows = port.flows();
    if let Some(flow) = flows.get_mut(&client) {
        if flow.usable(binding) {
            send_upstream(frontend, flow, data);
            return;
        }
        if let Some(flow) = flows.swap_remove(&client) {
            flow.close(CloseReason::BackendDown); // B8: the next flow goes elsewhere
        }
    }
    // R6: a place in this worker's share of the UDP socket cap, or a quiet flow's.
    let slot = port.worker.budget.take().or_else(|| {
        let now = Instant::now();
        let evicted = evict_one(&mut flows, now) || port.worker.evict_elsewhere(port, now);
        evicted.then(|| port.worker.budget.take()).flatten()
    });
    let Some(slot) = slot else {
        frontend.flows.count_refused(CloseReason::LocalExhaustion);
        frontend.flows.count_dropped();
        return;
    };
    let Some(admission) = frontend.flows.admit() else {
        frontend.flows.count_refused(CloseReason::LimitReached);
        frontend.flows.count_dropped();
        return;
    };
    let local = frontend.addr;
    let pool = binding.pool.pool.load();
    let flow = Flow::new(client, local, fulcrum_sdk::Protocol::Udp);
    super::count_hairpin(&pool, &flow);
    let id = match selector.select(&binding.pool.balancer, &binding.pool.pool, &pool, &flow) {
        Selection::Backend(id) => id,
        Selection::Reject => {
            admission.close(CloseReason::NoBackend);
            frontend.flows.count_dropped();
            return;
        }
    };
    let backend = &pool.backends[id as usize];
    let sources = &binding.pool.config.source_addresses;
    let upstream = match connect_udp(backend.addr, sources, binding.pool.pool.source_turn(sources)) {
        Ok(socket) => Arc::new(socket),
        Err(e) => {
            let reason = super::local_exhaustion(&binding.pool.pool, &e).unwrap_or_else(|| {
                backend.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                CloseReason::ConnectFailed
            });
            tracing::debug!(backend = %backend.addr, "udp upstream socket: {e}");
            admission.close(reason);
            frontend.flows.count_dropped();
            return;
        }
    };
    let flow = open(frontend, port, binding, pool.generation, backend, client, Opened { upstream, admission, slot });
    send_upstream(frontend, &flow, data);
    flows.insert(client, flow);
}

/// What a flow needs before it opens: its backend socket, its place in the
/// flow table and under the socket cap.
struct Opened {
    upstream: Arc<UdpSocket>,
    admission: Admission,
    slot: SocketSlot,
}

/// `client`'s flow on `backend` (of `binding`'s pool at `generation`),
/// registered, with its reply loop running.
fn open(
    frontend: &Frontend,
    port: &UdpPort,
    binding: &Binding,
    generation: u64,
    backend: &crate::pool::Backend,
    client: SocketAddr,
    opened: Opened,
) -> UdpFlow {
    let Opened { upstream, mut admission, slot } = opened;
    let key = FlowKey { protocol: Protocol::Udp, client, frontend: frontend.addr };
    admission.observe(Arc::clone(&binding.recorder) as Arc<dyn FlowObserver>);
    let entry = admission.register(key, backend.addr, Instant::now());
    let feedback = Feedback::new(&binding.pool.pool, backend, binding.pool.config.passive);
    let reply = Reply { upstream: Arc::clone(&upstream), frontend: Arc::clone(&port.socket), client };
    let reply = tokio::spawn(reply_loop(reply, Arc::clone(&entry.counters), feedback.clone())).abort_handle();
    UdpFlow {
        backend: backend.addr,
        pool: Arc::clone(&binding.pool.pool),
        generation,
        upstream,
        feedback,
        entry,
        admission: Some(admission),
        reply,
        _active: ActiveOnBackend::new(&backend.stats),
        _slot: slot,
    }
}

/// The sockets of a flow's replies.
struct Reply {
    upstream: Arc<UdpSocket>,
    frontend: Arc<UdpSocket>,
    client: SocketAddr,
}

/// Backend replies to the client, from the frontend's socket. A reply
/// counts as the backend's answer, a "port unreachable" as its failure
/// (passive health).
async fn reply_loop(reply: Reply, counters: Arc<FlowCounters>, feedback: Feedback) {
    let Reply { upstream, frontend, client } = reply;
    // An ICMP "port unreachable" is an error on the socket, not a readable
    // datagram: it wakes the loop only when errors are asked for too, and
    // its readiness is cleared by taking the error (`SO_ERROR`).
    let interest = tokio::io::Interest::READABLE | tokio::io::Interest::ERROR;
    loop {
        let Ok(ready) = upstream.ready(interest).await else { return };
        if ready.is_error() {
            let _ = upstream.try_io(tokio::io::Interest::ERROR, || {
                if let Ok(Some(e)) = upstream.take_error()
                    && e.kind() == io::ErrorKind::ConnectionRefused
                {
                    feedback.failed();
                }
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
        if !ready.is_readable() {
            continue;
        }
        REPLY_BUFFER.with_borrow_mut(|buf| {
            // Until nothing more is waiting (or an error).
            loop {
                match upstream.try_recv(buf) {
                    Ok(n) => {
                        counters.record(false, n, Instant::now());
                        feedback.answered();
                        // Dropped if the socket buffer is full, as the network would.
                        let _ = socket2::SockRef::from(&*frontend).send_to(&buf[..n], &client.into());
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        feedback.failed();
                        break;
                    }
                    Err(_) => break,
                }
            }
        });
    }
}
