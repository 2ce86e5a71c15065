//! A worker thread: a single-threaded tokio runtime for its accept loops and
//! flows, and its own balancer instance per frontend (called outside the
//! runtime, see [`super::serve_outside_runtime`]).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::plugin::BalancerInstance;
use crate::proxy::Frontend;
use crate::proxy::tcp::{self, Accepted};

/// What reaches a worker: connections its accept loops took, and listener
/// changes from the control thread (reloads).
#[derive(Debug)]
pub enum WorkerMsg {
    Accepted(Accepted),
    /// Start accepting on this listener (this worker's `SO_REUSEPORT` socket).
    Start(std::net::TcpListener, Arc<Frontend>),
    /// Stop accepting for this frontend id; its established flows go on.
    Stop(u64),
}

impl From<Accepted> for WorkerMsg {
    fn from(accepted: Accepted) -> Self {
        WorkerMsg::Accepted(accepted)
    }
}

pub fn run(
    mut queue: mpsc::UnboundedReceiver<WorkerMsg>,
    me: mpsc::UnboundedSender<WorkerMsg>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(runtime) = super::current_thread_runtime("worker") else { return };
    let handle = runtime.handle().clone();
    let mut listening: HashMap<u64, watch::Sender<bool>> = HashMap::new();
    let mut selectors: HashMap<u64, BalancerInstance> = HashMap::new();
    super::serve_outside_runtime(&runtime, &mut queue, &mut stop, |msg| match msg {
        WorkerMsg::Accepted(accepted) => {
            let binding = accepted.frontend.binding.load_full();
            let balancer = &binding.pool.balancer;
            let selector = selectors.entry(accepted.frontend.id).or_insert_with(|| balancer.instance());
            if !Arc::ptr_eq(selector.plugin(), balancer) {
                *selector = balancer.instance(); // the pool's balancer was reloaded
            }
            tcp::start_flow(accepted, binding, selector, &handle);
        }
        WorkerMsg::Start(listener, frontend) => {
            let _context = handle.enter();
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let (stop_accepting, stopped) = watch::channel(false);
                    listening.insert(frontend.id, stop_accepting);
                    handle.spawn(tcp::accept_loop(frontend, listener, me.clone(), stopped));
                }
                Err(e) => tracing::error!(frontend = %frontend.name, "cannot register listener: {e}"),
            }
        }
        WorkerMsg::Stop(id) => {
            if let Some(stop_accepting) = listening.remove(&id) {
                let _ = stop_accepting.send(true);
            }
            selectors.remove(&id);
        }
    });
}
