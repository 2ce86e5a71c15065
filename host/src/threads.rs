//! # Threads with a runtime of their own
//!
//! Workers and the control thread each run a current-thread tokio runtime and
//! call plugins *between* `block_on`s (see [`serve_outside_runtime`]).

use tokio::sync::{mpsc, watch};

/// Runs `runtime` until `stop`, handing each item of `queue` to `handle`
/// *outside* the runtime (between `block_on`s). Plugins are called there:
/// WASI's synchronous host functions (a plugin's stdout, its panic message)
/// block on an async runtime of their own, which tokio forbids inside one.
///
/// The tasks `handle` pushes are spawned at the start of the next `block_on`,
/// from inside the runtime: there a spawn is a queue push, while a spawn from
/// outside also wakes the runtime's driver with a syscall (an eventfd write,
/// one per new flow).
pub fn serve_outside_runtime<T, F>(
    runtime: &tokio::runtime::Runtime,
    queue: &mut mpsc::UnboundedReceiver<T>,
    stop: &mut watch::Receiver<bool>,
    mut handle: impl FnMut(T, &mut Vec<F>),
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks: Vec<F> = Vec::new();
    loop {
        let next = runtime.block_on(async {
            for task in tasks.drain(..) {
                tokio::spawn(task);
            }
            tokio::select! {
                next = queue.recv() => next,
                _ = stop.wait_for(|stopped| *stopped) => None,
            }
        });
        let Some(first) = next else { break };
        let mut next = Some(first);
        while let Some(item) = next {
            handle(item, &mut tasks);
            next = queue.try_recv().ok();
        }
    }
}

pub fn current_thread_runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!("{what} cannot start its runtime: {e}");
            None
        }
    }
}
