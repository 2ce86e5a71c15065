//! # The WASI a plugin gets: nothing that waits, no time of day
//!
//! A plugin built the plain way (`cargo build --target wasm32-wasip2`, std)
//! imports some of WASI: stdio, clocks, random, environment, `wasi:io`. It
//! gets those, from `wasmtime-wasi`, except that nothing it can call may
//! wait (R5): epoch deadlines interrupt running Wasm only, never a host call
//! that blocks, so a `poll` on a timer would hold a worker thread for as long
//! as the plugin likes.
//!
//! - `wasi:io/poll` (`poll`, `pollable.ready`, `pollable.block`) and the
//!   blocking calls of `wasi:io/streams` are answered *at once*: their future
//!   is polled (twice: a zero-length timer yields once) and, if it is still
//!   pending, the call traps with [`WouldWait`], which the host counts as a
//!   timeout, like a plugin that spins past its deadline.
//! - `wasi:clocks/monotonic-clock` subscriptions are timers of this module's
//!   own that never touch an async runtime: ready once their instant has
//!   passed, pending (so `poll` traps) before.
//! - `wasi:clocks/wall-clock` reads 1970-01-01: plugins get no time of day.
//! - Filesystem and sockets are linked with nothing granted (no preopened
//!   directory, no network): file calls that would wait trap, socket calls
//!   answer `access-denied` (no socket is ever made for a plugin).
//!   [`stubbed`] names what differs, for `fulcrum check`.
//!
//! None of this enters tokio: plugins may be called on a worker's runtime
//! thread, inside or outside `block_on`.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable, Val};
use wasmtime_wasi::clocks::HostWallClock;
use wasmtime_wasi::p2::bindings::clocks;
use wasmtime_wasi::p2::bindings::sync::io::{poll as sync_poll, streams as sync_streams};
use wasmtime_wasi::p2::{StreamError, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    Host as AsyncStreams, HostInputStream as AsyncInput, HostOutputStream as AsyncOutput,
};
use wasmtime_wasi_io::poll::{DynPollable, Pollable, subscribe};
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream};

use super::state::PluginState;

/// A plugin called something that would have waited (a timer, a blocking
/// stream operation): it traps, and the host counts a timeout.
#[derive(Debug)]
pub struct WouldWait(pub &'static str);

impl std::fmt::Display for WouldWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the plugin called {}, which would wait: plugins may not wait", self.0)
    }
}

impl std::error::Error for WouldWait {}

/// The WASI interfaces served (version-less names) and what differs from
/// plain WASI; any other import traps when called.
pub const SERVED: &[(&str, &str)] = &[
    ("wasi:io/poll", "answers at once, traps if it would wait"),
    ("wasi:io/streams", "blocking calls answer at once, trap if they would wait"),
    ("wasi:io/error", ""),
    ("wasi:clocks/monotonic-clock", "subscriptions never wait"),
    ("wasi:clocks/wall-clock", "always 1970-01-01: no time of day"),
    ("wasi:random/random", ""),
    ("wasi:random/insecure", ""),
    ("wasi:random/insecure-seed", ""),
    ("wasi:cli/environment", ""),
    ("wasi:cli/exit", "traps"),
    ("wasi:cli/stdin", ""),
    ("wasi:cli/stdout", ""),
    ("wasi:cli/stderr", ""),
    ("wasi:cli/terminal-input", ""),
    ("wasi:cli/terminal-output", ""),
    ("wasi:cli/terminal-stdin", ""),
    ("wasi:cli/terminal-stdout", ""),
    ("wasi:cli/terminal-stderr", ""),
    ("wasi:filesystem/types", "no directories: calls fail, those that would wait trap"),
    ("wasi:filesystem/preopens", "no directories"),
    ("wasi:sockets/network", "no network"),
    ("wasi:sockets/instance-network", "no network"),
    ("wasi:sockets/tcp", "no network: calls fail with access-denied"),
    ("wasi:sockets/tcp-create-socket", "no network: access-denied"),
    ("wasi:sockets/udp", "no network: calls fail with access-denied"),
    ("wasi:sockets/udp-create-socket", "no network: access-denied"),
    ("wasi:sockets/ip-name-lookup", "no network"),
];

/// The interface of an import name, without its version (`wasi:io/poll@0.2.6` -> `wasi:io/poll`).
fn interface(import: &str) -> &str {
    import.split('@').next().unwrap_or(import)
}

/// What a plugin's WASI imports get here that plain WASI would do
/// otherwise: `(import, note)` for each changed one. (An import that is not
/// served at all fails the plugin's load, naming it.)
pub fn stubbed<'a>(imports: impl IntoIterator<Item = &'a str>) -> Vec<(String, &'static str)> {
    imports
        .into_iter()
        .filter(|name| name.starts_with("wasi:"))
        .filter_map(|name| match SERVED.iter().find(|(served, _)| *served == interface(name)) {
            Some((_, "")) => None,
            Some((_, note)) => Some((name.to_owned(), *note)),
            None => Some((name.to_owned(), "not served: the plugin does not load")),
        })
        .collect()
}

/// The WASI version `wasmtime-wasi` serves (a plugin's older 0.2 imports match it).
const WASI: &str = "0.2.12";

/// `wasmtime-wasi`'s calls that wait in its sync mode (they enter an async
/// runtime), by interface, beyond `wasi:io`: with no preopened directory and
/// no network a plugin cannot reach them usefully, so they trap.
const WAITING: &[(&str, &[&str])] = &[(
    "wasi:filesystem/types",
    &[
        "[method]descriptor.advise",
        "[method]descriptor.create-directory-at",
        "[method]descriptor.get-flags",
        "[method]descriptor.get-type",
        "[method]descriptor.is-same-object",
        "[method]descriptor.link-at",
        "[method]descriptor.metadata-hash",
        "[method]descriptor.metadata-hash-at",
        "[method]descriptor.open-at",
        "[method]descriptor.read",
        "[method]descriptor.read-directory",
        "[method]descriptor.readlink-at",
        "[method]descriptor.remove-directory-at",
        "[method]descriptor.rename-at",
        "[method]descriptor.set-size",
        "[method]descriptor.set-times",
        "[method]descriptor.set-times-at",
        "[method]descriptor.stat",
        "[method]descriptor.stat-at",
        "[method]descriptor.symlink-at",
        "[method]descriptor.sync",
        "[method]descriptor.sync-data",
        "[method]descriptor.unlink-file-at",
        "[method]descriptor.write",
        "[method]directory-entry-stream.read-directory-entry",
    ],
)];

/// Socket calls, answered `access-denied` (as a file open is refused): a
/// plugin that tries the network gets an error it can handle, no socket is
/// ever made for it, and nothing waits.
const DENIED: &[(&str, &[&str])] = &[
    ("wasi:sockets/tcp-create-socket", &["create-tcp-socket"]),
    ("wasi:sockets/udp-create-socket", &["create-udp-socket"]),
    ("wasi:sockets/tcp", &["[method]tcp-socket.start-bind", "[method]tcp-socket.start-listen"]),
    ("wasi:sockets/udp", &["[method]udp-socket.start-bind", "[method]udp-socket.stream"]),
];

/// Adds the WASI described above to `linker`: `wasmtime-wasi`'s, then ours
/// over what could wait.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    let l = &mut *linker;
    clocks::monotonic_clock::add_to_linker::<PluginState, Timers>(l, |s| Timers(&mut s.table))?;
    sync_poll::add_to_linker::<PluginState, AtOnce>(l, |s| AtOnce(&mut s.table))?;
    sync_streams::add_to_linker::<PluginState, AtOnce>(l, |s| AtOnce(&mut s.table))?;
    for (interface, functions) in WAITING {
        let mut instance = l.instance(&format!("{interface}@{WASI}"))?;
        for &function in *functions {
            instance.func_new(function, move |_, _, _, _| Err(WouldWait(function).into()))?;
        }
    }
    for (interface, functions) in DENIED {
        let mut instance = l.instance(&format!("{interface}@{WASI}"))?;
        for &function in *functions {
            // Each returns `result<_, error-code>`.
            instance.func_new(function, |_, _, _, results| {
                let denied = Val::Enum("access-denied".into());
                if let Some(result) = results.first_mut() {
                    *result = Val::Result(Err(Some(Box::new(denied))));
                }
                Ok(())
            })?;
        }
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// The wall clock plugins read: the Unix epoch, always.
pub struct NoTimeOfDay;

impl HostWallClock for NoTimeOfDay {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// Runs `future` to its end if it ends at once (within two polls: a
/// zero-length timer yields once); else the call would wait, and traps.
fn at_once<F: Future>(what: &'static str, future: F) -> wasmtime::Result<F::Output> {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..2 {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Ok(output);
        }
    }
    Err(WouldWait(what).into())
}

/// [`at_once`] for stream calls, whose errors are [`StreamError`]s.
fn stream_at_once<T>(what: &'static str, future: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
    at_once(what, future).map_err(StreamError::Trap)?
}

/// `wasi:io` served from the instance's resource table, at once.
pub struct AtOnce<'a>(&'a mut ResourceTable);

impl HasData for AtOnce<'static> {
    type Data<'a> = AtOnce<'a>;
}

impl sync_poll::Host for AtOnce<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        at_once("wasi:io/poll.poll", async_poll::Host::poll(self.0, pollables))?
    }
}

impl sync_poll::HostPollable for AtOnce<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        at_once("wasi:io/poll.pollable.ready", async_poll::HostPollable::ready(self.0, pollable))?
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        at_once("wasi:io/poll.pollable.block", async_poll::HostPollable::block(self.0, pollable))?
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}

impl sync_streams::Host for AtOnce<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<sync_streams::StreamError> {
        Ok(match AsyncStreams::convert_stream_error(self.0, err)? {
            wasmtime_wasi_io::bindings::wasi::io::streams::StreamError::LastOperationFailed(e) => {
                sync_streams::StreamError::LastOperationFailed(e)
            }
            wasmtime_wasi_io::bindings::wasi::io::streams::StreamError::Closed => sync_streams::StreamError::Closed,
        })
    }
}

impl sync_streams::HostOutputStream for AtOnce<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        at_once("wasi:io/streams.output-stream.drop", AsyncOutput::drop(self.0, stream))?
    }

    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        AsyncOutput::check_write(self.0, stream)
    }

    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        AsyncOutput::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        stream_at_once(
            "wasi:io/streams.blocking-write-and-flush",
            AsyncOutput::blocking_write_and_flush(self.0, stream, bytes),
        )
    }

    fn blocking_write_zeroes_and_flush(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        stream_at_once(
            "wasi:io/streams.blocking-write-zeroes-and-flush",
            AsyncOutput::blocking_write_zeroes_and_flush(self.0, stream, len),
        )
    }

    fn subscribe(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncOutput::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        AsyncOutput::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        AsyncOutput::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        stream_at_once("wasi:io/streams.blocking-flush", AsyncOutput::blocking_flush(self.0, stream))
    }

    fn splice(&mut self, dst: Resource<DynOutputStream>, src: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        AsyncOutput::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        stream_at_once("wasi:io/streams.blocking-splice", AsyncOutput::blocking_splice(self.0, dst, src, len))
    }
}

impl sync_streams::HostInputStream for AtOnce<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        at_once("wasi:io/streams.input-stream.drop", AsyncInput::drop(self.0, stream))?
    }

    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        AsyncInput::read(self.0, stream, len)
    }

    fn blocking_read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        stream_at_once("wasi:io/streams.blocking-read", AsyncInput::blocking_read(self.0, stream, len))
    }

    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        AsyncInput::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        stream_at_once("wasi:io/streams.blocking-skip", AsyncInput::blocking_skip(self.0, stream, len))
    }

    fn subscribe(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncInput::subscribe(self.0, stream)
    }
}

/// `wasi:clocks/monotonic-clock` with timers that never enter an async runtime.
pub struct Timers<'a>(&'a mut ResourceTable);

impl HasData for Timers<'static> {
    type Data<'a> = Timers<'a>;
}

/// Process-wide origin of the monotonic clock plugins read.
fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// A timer: ready once its instant has passed, pending before (so a `poll`
/// on it traps); `None`: an instant too far to hold, never.
struct NotBefore(Option<Instant>);

#[async_trait::async_trait]
impl Pollable for NotBefore {
    async fn ready(&mut self) {
        if self.0.is_none_or(|at| Instant::now() < at) {
            std::future::pending::<()>().await;
        }
    }
}

impl Timers<'_> {
    fn timer(&mut self, at: Option<Instant>) -> wasmtime::Result<Resource<DynPollable>> {
        let timer = self.0.push(NotBefore(at))?;
        subscribe(self.0, timer)
    }
}

impl clocks::monotonic_clock::Host for Timers<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1)
    }

    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.timer(origin().checked_add(Duration::from_nanos(when)))
    }

    fn subscribe_duration(&mut self, duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.timer(Instant::now().checked_add(Duration::from_nanos(duration)))
    }
}
