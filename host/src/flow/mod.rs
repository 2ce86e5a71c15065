//! # Flows: the table, idle timers and close reasons (sans-io)
//!
//! Nothing here owns a socket or reads a clock: time is passed in, decisions
//! come out. The proxy layer (`proxy::tcp`, later UDP) does the I/O and asks
//! this module what to do.
//!
//! A flow is keyed by its protocol and addresses ([`FlowKey`]), so TCP and
//! UDP flows share one table shape. Its byte counts and last activity live in
//! [`FlowCounters`] (atomics), updated by the copy loops and read by the table
//! and the admin API without locks.

mod table;

pub use table::{Admission, FlowEntry, FlowId, FlowObserver, FlowTable};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::Protocol;

/// Identity of a flow: protocol, client and frontend addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub protocol: Protocol,
    pub client: SocketAddr,
    pub frontend: SocketAddr,
}

/// Why a flow ended. Every flow ends with exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// Both sides closed (FIN both ways).
    Completed,
    /// The client reset or errored.
    ClientError,
    /// The backend reset or errored.
    BackendError,
    /// No bytes either way for the idle timeout (B9).
    IdleTimeout,
    /// No backend could be reached (every attempt failed).
    ConnectFailed,
    /// No eligible backend: refused at once (B7).
    NoBackend,
    /// The frontend's flow cap was reached (R2).
    LimitReached,
    /// The process is shutting down.
    Shutdown,
    /// Every backend of the pool went down, with `on_all_down = "reset-flows"` (B7).
    AllBackendsDown,
    /// UDP: the flow's backend went down or was removed; the client's next
    /// datagram starts a new flow on a healthy backend (B8).
    BackendDown,
    /// This host ran out of source ports or descriptors for the backend
    /// connection (R6, B16): the client is reset; never the backend's fault.
    LocalExhaustion,
    /// UDP: a quiet flow ended to make room for a new one at the process's
    /// UDP socket cap (R6).
    Evicted,
    /// The flow's task panicked (a bug): counted and logged, its entry removed.
    Panicked,
    /// UDP: handed to the process that took over (B17), which carries it on.
    HandedOver,
}

impl CloseReason {
    pub const ALL: [CloseReason; 14] = [
        CloseReason::Completed,
        CloseReason::ClientError,
        CloseReason::BackendError,
        CloseReason::IdleTimeout,
        CloseReason::ConnectFailed,
        CloseReason::NoBackend,
        CloseReason::LimitReached,
        CloseReason::Shutdown,
        CloseReason::AllBackendsDown,
        CloseReason::BackendDown,
        CloseReason::LocalExhaustion,
        CloseReason::Evicted,
        CloseReason::Panicked,
        CloseReason::HandedOver,
    ];

    /// Stable snake_case name (metrics labels, logs, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Completed => "completed",
            CloseReason::ClientError => "client_error",
            CloseReason::BackendError => "backend_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::NoBackend => "no_backend",
            CloseReason::LimitReached => "limit_reached",
            CloseReason::Shutdown => "shutdown",
            CloseReason::AllBackendsDown => "all_backends_down",
            CloseReason::BackendDown => "backend_down",
            CloseReason::LocalExhaustion => "local_exhaustion",
            CloseReason::Evicted => "evicted",
            CloseReason::Panicked => "panicked",
            CloseReason::HandedOver => "handed_over",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Byte counts and last activity of one flow, shared by its copy loops and
/// readers. Activity is kept as nanoseconds since the flow's start.
#[derive(Debug)]
pub struct FlowCounters {
    started: Instant,
    /// Client to backend.
    pub bytes_up: AtomicU64,
    /// Backend to client.
    pub bytes_down: AtomicU64,
    last_activity_ns: AtomicU64,
}

impl FlowCounters {
    pub fn new(now: Instant) -> Self {
        FlowCounters {
            started: now,
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            last_activity_ns: AtomicU64::new(0),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records `bytes` moved at `now` in one direction.
    pub fn record(&self, up: bool, bytes: usize, now: Instant) {
        let counter = if up { &self.bytes_up } else { &self.bytes_down };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
        self.touch(now);
    }

    pub fn touch(&self, now: Instant) {
        let ns = now.saturating_duration_since(self.started).as_nanos() as u64;
        self.last_activity_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn last_activity(&self) -> Instant {
        self.started + Duration::from_nanos(self.last_activity_ns.load(Ordering::Relaxed))
    }
}

/// The idle-timeout rule (B9), as a pure function of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimer {
    pub timeout: Duration,
}

/// What an idle check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleCheck {
    /// Idle for the whole timeout: end the flow.
    Expired,
    /// Activity since: check again at this instant.
    CheckAt(Instant),
}

impl IdleTimer {
    pub fn check(&self, last_activity: Instant, now: Instant) -> IdleCheck {
        let deadline = last_activity + self.timeout;
        if now >= deadline { IdleCheck::Expired } else { IdleCheck::CheckAt(deadline) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timer_expires_only_after_a_silent_timeout() {
        let t0 = Instant::now();
        let timer = IdleTimer { timeout: Duration::from_secs(4) };
        let counters = FlowCounters::new(t0);
        assert_eq!(
            timer.check(counters.last_activity(), t0 + Duration::from_secs(3)),
            IdleCheck::CheckAt(t0 + Duration::from_secs(4))
        );
        counters.record(true, 10, t0 + Duration::from_secs(3));
        assert_eq!(
            timer.check(counters.last_activity(), t0 + Duration::from_secs(4)),
            IdleCheck::CheckAt(t0 + Duration::from_secs(7))
        );
        assert_eq!(timer.check(counters.last_activity(), t0 + Duration::from_secs(7)), IdleCheck::Expired);
        assert_eq!(counters.bytes_up.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn activity_never_moves_backwards() {
        let t0 = Instant::now();
        let counters = FlowCounters::new(t0);
        counters.touch(t0 + Duration::from_secs(5));
        counters.touch(t0 + Duration::from_secs(2));
        assert_eq!(counters.last_activity(), t0 + Duration::from_secs(5));
    }

    #[test]
    fn close_reasons_have_distinct_names() {
        let names: std::collections::HashSet<_> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), CloseReason::ALL.len());
        assert_eq!(CloseReason::IdleTimeout.index(), 3);
    }
}
