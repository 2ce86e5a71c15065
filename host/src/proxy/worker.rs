//! A worker thread: a single-threaded tokio runtime for its accept loops,
//! receive loops and flows. Each loop owns its [`crate::plugin::Selector`]
//! and picks backends inline, inside the runtime: no plugin call can wait
//! (see `plugin::wasi`), and no set-up runs on this thread (the selector's
//! instances are prepared elsewhere and handed over).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, watch};

use super::tcp;
use super::udp::{self, UdpPort, UdpWorker};
use crate::live::{WorkerCommand, WorkerLine};
use crate::net::Listener;

/// Starts worker thread `index` of `workers`, serving until `stop`; returns
/// the line to it.
pub fn spawn(
    index: usize,
    workers: usize,
    stop: watch::Receiver<bool>,
) -> std::io::Result<(WorkerLine, JoinHandle<()>)> {
    let (tx, queue) = mpsc::unbounded_channel();
    let udp = UdpWorker::new(workers);
    let thread =
        std::thread::Builder::new().name(format!("fulcrum-worker-{index}")).spawn(move || run(queue, udp, stop))?;
    let line = WorkerLine::new(move |command| {
        let _ = tx.send(command);
    });
    Ok((line, thread))
}

fn run(mut queue: mpsc::UnboundedReceiver<WorkerCommand>, udp: Arc<UdpWorker>, mut stop: watch::Receiver<bool>) {
    let Some(runtime) = crate::threads::current_thread_runtime("worker") else { return };
    runtime.block_on(async {
        let mut listening: HashMap<u64, watch::Sender<bool>> = HashMap::new();
        loop {
            let command = tokio::select! {
                command = queue.recv() => command,
                _ = stop.wait_for(|stopped| *stopped) => None,
            };
            match command {
                None => break,
                Some(WorkerCommand::Start(listener, frontend, selector)) => {
                    // Every socket of the frontend on this worker stops together.
                    let stopped = listening.entry(frontend.id).or_insert_with(|| watch::channel(false).0).subscribe();
                    let started = match listener {
                        Listener::Tcp(listener) => tokio::net::TcpListener::from_std(listener).map(|listener| {
                            tokio::spawn(tcp::accept_loop(Arc::clone(&frontend), listener, selector, stopped));
                        }),
                        Listener::Udp(socket) => tokio::net::UdpSocket::from_std(socket).map(|socket| {
                            let port = UdpPort::new(socket, &frontend, &udp);
                            tokio::spawn(udp::sweep_loop(Arc::clone(&frontend), Arc::clone(&port), stopped.clone()));
                            tokio::spawn(udp::recv_loop(Arc::clone(&frontend), port, selector, stopped));
                        }),
                    };
                    if let Err(e) = started {
                        tracing::error!(frontend = %frontend.name, "cannot register its socket: {e}");
                    }
                }
                Some(WorkerCommand::Stop(id)) => {
                    if let Some(stop_accepting) = listening.remove(&id) {
                        let _ = stop_accepting.send(true);
                    }
                }
                Some(WorkerCommand::Close(id, closed)) => {
                    if let Some(stop_accepting) = listening.remove(&id) {
                        let _ = stop_accepting.send(true);
                    }
                    udp.end_flows_of(id);
                    // Its loops (told to stop) and its flows' reply tasks
                    // (aborted) run on this thread: once they have had their
                    // turn, they are gone, and their sockets with them.
                    for _ in 0..4 {
                        tokio::task::yield_now().await;
                    }
                    let _ = closed.send(());
                }
                Some(WorkerCommand::HandOverUdp(reply)) => {
                    // The loops stop before the flows go: they run on this
                    // thread, so none is in the middle of a datagram now, and
                    // once stopped none reads another. Only the frontends that
                    // serve now hand theirs over (one a reload removed keeps
                    // its flows here until they idle out).
                    let serving: Vec<u64> = listening.keys().copied().collect();
                    for (_, stop_accepting) in listening.drain() {
                        let _ = stop_accepting.send(true);
                    }
                    let _ = reply.send(udp.hand_over(&serving));
                }
                Some(WorkerCommand::AdoptUdp(flows, reply)) => {
                    let _ = reply.send(udp.adopt(flows));
                }
            }
        }
    });
}
