//! A worker thread: a single-threaded tokio runtime for its accept loops and
//! flows, and its own balancer instance per frontend (called outside the
//! runtime, see [`crate::threads::serve_outside_runtime`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, watch};

use super::tcp::{self, Accepted};
use super::udp::{self, Datagram, UdpPort};
use crate::live::{Binding, Frontend, WorkerCommand, WorkerLine};
use crate::net::Listener;
use crate::plugin::BalancerInstance;

/// What reaches a worker: connections its accept loops took, and listener
/// changes from the control thread (reloads).
#[derive(Debug)]
pub enum WorkerMsg {
    Accepted(Accepted),
    /// A UDP datagram that needs a (new) backend.
    Datagram(Datagram),
    Command(WorkerCommand),
}

/// Starts worker thread `index`, serving until `stop`; returns the line to it.
pub fn spawn(index: usize, stop: watch::Receiver<bool>) -> std::io::Result<(WorkerLine, JoinHandle<()>)> {
    let (tx, queue) = mpsc::unbounded_channel();
    let me = tx.clone();
    let thread =
        std::thread::Builder::new().name(format!("fulcrum-worker-{index}")).spawn(move || run(queue, me, stop))?;
    let line = WorkerLine::new(move |command| {
        let _ = tx.send(WorkerMsg::Command(command));
    });
    Ok((line, thread))
}

impl From<Accepted> for WorkerMsg {
    fn from(accepted: Accepted) -> Self {
        WorkerMsg::Accepted(accepted)
    }
}

impl From<Datagram> for WorkerMsg {
    fn from(datagram: Datagram) -> Self {
        WorkerMsg::Datagram(datagram)
    }
}

/// This worker's instance of the frontend's current balancer (a new one when
/// a reload changed the plugin).
fn selector<'a>(
    selectors: &'a mut HashMap<u64, BalancerInstance>,
    frontend: &Frontend,
    binding: &Binding,
) -> &'a mut BalancerInstance {
    let balancer = &binding.pool.balancer;
    let selector = selectors.entry(frontend.id).or_insert_with(|| balancer.instance());
    if !Arc::ptr_eq(selector.plugin(), balancer) {
        *selector = balancer.instance();
    }
    selector
}

fn run(
    mut queue: mpsc::UnboundedReceiver<WorkerMsg>,
    me: mpsc::UnboundedSender<WorkerMsg>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(runtime) = crate::threads::current_thread_runtime("worker") else { return };
    let handle = runtime.handle().clone();
    let mut listening: HashMap<u64, watch::Sender<bool>> = HashMap::new();
    let mut selectors: HashMap<u64, BalancerInstance> = HashMap::new();
    crate::threads::serve_outside_runtime(&runtime, &mut queue, &mut stop, |msg, tasks| match msg {
        WorkerMsg::Accepted(accepted) => {
            let binding = accepted.frontend.binding.load_full();
            let selector = selector(&mut selectors, &accepted.frontend, &binding);
            if let Some(flow) = tcp::start_flow(accepted, binding, selector) {
                tasks.push(flow);
            }
        }
        WorkerMsg::Datagram(datagram) => {
            let binding = datagram.frontend.binding.load_full();
            let selector = selector(&mut selectors, &datagram.frontend, &binding);
            udp::on_datagram(datagram, &binding, selector, &handle);
        }
        WorkerMsg::Command(WorkerCommand::Start(listener, frontend)) => {
            let _context = handle.enter();
            let (stop_serving, stopped) = watch::channel(false);
            let started = match listener {
                Listener::Tcp(listener) => tokio::net::TcpListener::from_std(listener).map(|listener| {
                    handle.spawn(tcp::accept_loop(Arc::clone(&frontend), listener, me.clone(), stopped));
                }),
                Listener::Udp(socket) => tokio::net::UdpSocket::from_std(socket).map(|socket| {
                    let port = UdpPort::new(socket);
                    handle.spawn(udp::sweep_loop(Arc::clone(&frontend), Arc::clone(&port), stopped.clone()));
                    handle.spawn(udp::recv_loop(Arc::clone(&frontend), port, me.clone(), stopped));
                }),
            };
            match started {
                Ok(()) => {
                    listening.insert(frontend.id, stop_serving);
                }
                Err(e) => tracing::error!(frontend = %frontend.name, "cannot register its socket: {e}"),
            }
        }
        WorkerMsg::Command(WorkerCommand::Stop(id)) => {
            if let Some(stop_accepting) = listening.remove(&id) {
                let _ = stop_accepting.send(true);
            }
            selectors.remove(&id);
        }
    });
}
