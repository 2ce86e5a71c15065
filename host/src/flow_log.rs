//! # Flow log: a JSON line per closed flow
//!
//! `flow_log = "PATH" | "stdout"` on a frontend. The data path hands each
//! closed flow to a bounded queue ([`QUEUE`] lines) and goes on; a thread
//! of the log's own writes the lines. When the writer cannot keep up (a slow
//! disk, a full pipe), lines are dropped and counted, and no flow ever waits.
//!
//! A line: `start` (RFC 3339, ms), `duration_ms`, `frontend`, `protocol`,
//! `client`, `frontend_address`, `backend`, `bytes_up` (client to backend),
//! `bytes_down`, `reason` (the close reason). A TCP flow refused before it
//! had a backend (`no_backend`, `connect_failed`, `local_exhaustion`) has
//! a line too, with `backend: null`; flows refused at the flow cap and
//! refused UDP datagrams are counted, not logged (a flood would be a line
//! each).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::time::{Duration, Instant, SystemTime};

use crate::config::FlowLogTarget;
use crate::flow::{CloseReason, FlowEntry, FlowKey};

/// Lines waiting for the writer at most; past it, lines are dropped.
pub const QUEUE: usize = 8192;

/// Lines written and dropped, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct FlowLogCounters {
    pub written: AtomicU64,
    /// Queue full (the writer is behind), or a write failed.
    pub dropped: AtomicU64,
}

/// One frontend's flow log: the queue's sending end and its counters. The
/// writer thread ends when the last holder drops it.
#[derive(Debug)]
pub struct FlowLog {
    pub target: FlowLogTarget,
    pub counters: Arc<FlowLogCounters>,
    queue: SyncSender<Message>,
    /// The file's identity when opened (device, inode): a reload reopens the
    /// path when it names another file (rotated away).
    identity: Option<(u64, u64)>,
}

/// What the writer is handed.
#[derive(Debug)]
enum Message {
    Line(Line),
    /// Write what came before, then say so.
    Flush(SyncSender<()>),
}

/// A closed flow on its way to the writer (formatted there, off the data path).
#[derive(Debug)]
struct Line {
    frontend: Arc<str>,
    start: SystemTime,
    duration: Duration,
    protocol: &'static str,
    client: SocketAddr,
    local: SocketAddr,
    /// None: refused before it had one.
    backend: Option<SocketAddr>,
    bytes_up: u64,
    bytes_down: u64,
    reason: &'static str,
}

#[derive(serde::Serialize)]
struct Json<'a> {
    start: String,
    duration_ms: f64,
    frontend: &'a str,
    protocol: &'a str,
    client: String,
    frontend_address: String,
    backend: Option<String>,
    bytes_up: u64,
    bytes_down: u64,
    reason: &'a str,
}

impl FlowLog {
    /// Opens the target (a file is created or appended to) and starts its
    /// writer. A FIFO that nobody reads is an error here, not a writer
    /// blocked forever at start.
    pub fn open(target: &FlowLogTarget) -> io::Result<FlowLog> {
        let (out, identity): (Box<dyn Write + Send>, _) = match target {
            FlowLogTarget::Stdout => (Box::new(io::stdout()), None),
            FlowLogTarget::File(path) => {
                let file = open_append(path)?;
                let identity = std::os::unix::fs::MetadataExt::dev(&file.metadata()?);
                let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
                (Box::new(file), Some((identity, inode)))
            }
        };
        let (queue, lines) = sync_channel(QUEUE);
        let counters = Arc::new(FlowLogCounters::default());
        let c = Arc::clone(&counters);
        std::thread::Builder::new().name("flow-log".into()).spawn(move || write_lines(&lines, out, &c))?;
        Ok(FlowLog { target: target.clone(), counters, queue, identity })
    }

    /// Does the target still name the file this log writes (not rotated
    /// away or removed)? Standard output always does.
    pub fn is_current(&self) -> bool {
        match (&self.target, self.identity) {
            (FlowLogTarget::File(path), Some(identity)) => std::fs::metadata(path).is_ok_and(|m| {
                (std::os::unix::fs::MetadataExt::dev(&m), std::os::unix::fs::MetadataExt::ino(&m)) == identity
            }),
            _ => true,
        }
    }

    /// Waits (at most `wait`) until the lines queued so far are written: at
    /// the end of a process, so that the last flows' lines are not lost.
    pub fn flush(&self, wait: std::time::Duration) -> bool {
        let deadline = Instant::now() + wait;
        let (done, flushed) = sync_channel(1);
        let mut message = Message::Flush(done);
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        flushed.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }

    /// Queues the line of a flow that ended; never waits.
    pub fn record(&self, frontend: &Arc<str>, entry: &FlowEntry, reason: CloseReason) {
        let bytes =
            (entry.counters.bytes_up.load(Ordering::Relaxed), entry.counters.bytes_down.load(Ordering::Relaxed));
        self.queue_line(frontend, &entry.key, Some(entry.backend), entry.counters.started(), bytes, reason);
    }

    /// Queues the line of a flow refused before it had a backend (no
    /// backend, every connect failed, local exhaustion).
    pub fn record_refused(&self, frontend: &Arc<str>, key: &FlowKey, since: Instant, reason: CloseReason) {
        self.queue_line(frontend, key, None, since, (0, 0), reason);
    }

    fn queue_line(
        &self,
        frontend: &Arc<str>,
        key: &FlowKey,
        backend: Option<SocketAddr>,
        since: Instant,
        (bytes_up, bytes_down): (u64, u64),
        reason: CloseReason,
    ) {
        let duration = since.elapsed();
        let line = Line {
            frontend: Arc::clone(frontend),
            start: SystemTime::now().checked_sub(duration).unwrap_or(SystemTime::UNIX_EPOCH),
            duration,
            protocol: key.protocol.as_str(),
            client: key.client,
            local: key.frontend,
            backend,
            bytes_up,
            bytes_down,
            reason: reason.as_str(),
        };
        if self.queue.try_send(Message::Line(line)).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `O_APPEND | O_CREAT`, opened without blocking (a FIFO with no reader
/// fails at once), then switched back to blocking writes for the writer.
fn open_append(path: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::APPEND)?;
    Ok(file)
}

/// Writes `batch` (whole lines) with as many writes as it takes. When one
/// fails after part of it went out, the file holds a line cut short:
/// `unended` is set, and the next batch starts with a newline so its first
/// line is not joined to that half line.
fn write_whole(out: &mut dyn Write, batch: &mut Vec<u8>, unended: &mut bool) -> io::Result<()> {
    if *unended {
        batch.insert(0, b'\n');
    }
    let mut done = 0;
    while done < batch.len() {
        match out.write(&batch[done..]) {
            Ok(0) => {
                *unended = *unended || done > 0 && batch[done - 1] != b'\n';
                return Err(io::ErrorKind::WriteZero.into());
            }
            Ok(n) => {
                done += n;
                *unended = false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                *unended = *unended || done > 0 && batch[done - 1] != b'\n';
                return Err(e);
            }
        }
    }
    out.flush()
}

/// `t` as RFC 3339 with milliseconds, clamped to what the format holds
/// (1970 to 9999): a clock set before 1970 never stops the writer.
fn rfc3339(t: SystemTime) -> String {
    let last = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(253_402_300_799_999);
    humantime::format_rfc3339_millis(t.clamp(SystemTime::UNIX_EPOCH, last)).to_string()
}

/// Lines gathered before a write, at most (bytes).
const BATCH: usize = 64 * 1024;

/// The writer: whole lines gathered into a batch, written with one
/// `write_all` when the queue runs dry or the batch is full. A write always
/// ends on a line boundary, so two writers of one file (two frontends, the
/// old and new process of a takeover) never cut each other's lines.
fn write_lines(queue: &Receiver<Message>, mut out: Box<dyn Write + Send>, counters: &FlowLogCounters) {
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH);
    let mut lines = 0u64;
    // A write that failed midway (disk full) left a line unended in the file.
    let mut unended = false;
    let mut write_batch = |out: &mut Box<dyn Write + Send>, batch: &mut Vec<u8>, lines: &mut u64| {
        if batch.is_empty() {
            return;
        }
        match write_whole(out.as_mut(), batch, &mut unended) {
            Ok(()) => counters.written.fetch_add(*lines, Ordering::Relaxed),
            Err(_) => counters.dropped.fetch_add(*lines, Ordering::Relaxed),
        };
        batch.clear();
        *lines = 0;
    };
    let mut next = queue.recv().ok();
    while let Some(message) = next {
        match message {
            Message::Line(line) => {
                let json = Json {
                    start: rfc3339(line.start),
                    duration_ms: line.duration.as_secs_f64() * 1000.0,
                    frontend: &line.frontend,
                    protocol: line.protocol,
                    client: line.client.to_string(),
                    frontend_address: line.local.to_string(),
                    backend: line.backend.map(|b| b.to_string()),
                    bytes_up: line.bytes_up,
                    bytes_down: line.bytes_down,
                    reason: line.reason,
                };
                if serde_json::to_writer(&mut batch, &json).is_ok() {
                    batch.push(b'\n');
                    lines += 1;
                } else {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                if batch.len() >= BATCH {
                    write_batch(&mut out, &mut batch, &mut lines);
                }
            }
            Message::Flush(done) => {
                write_batch(&mut out, &mut batch, &mut lines);
                let _ = done.try_send(());
            }
        }
        next = match queue.try_recv() {
            Ok(message) => Some(message),
            Err(TryRecvError::Empty) => {
                write_batch(&mut out, &mut batch, &mut lines);
                queue.recv().ok()
            }
            Err(TryRecvError::Disconnected) => None,
        };
    }
    write_batch(&mut out, &mut batch, &mut lines);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A file that takes `room` bytes, then is full until `room` is raised.
    struct Disk {
        written: Vec<u8>,
        room: usize,
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.room.saturating_sub(self.written.len())).min(7);
            if n == 0 {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_cut_by_a_full_disk_never_joins_the_next_line() {
        let mut disk = Disk { written: Vec::new(), room: 10 };
        let mut unended = false;
        let mut first = b"{\"a\":1}\n{\"b\":2}\n".to_vec();
        assert!(write_whole(&mut disk, &mut first, &mut unended).is_err());
        assert!(unended, "a half line is in the file");
        // Still full: nothing more went out, the half line is still unended.
        let mut second = b"{\"c\":3}\n".to_vec();
        assert!(write_whole(&mut disk, &mut second, &mut unended).is_err());
        assert!(unended);
        disk.room = usize::MAX;
        let mut third = b"{\"d\":4}\n".to_vec();
        write_whole(&mut disk, &mut third, &mut unended).unwrap();
        assert!(!unended);
        let text = String::from_utf8(disk.written).unwrap();
        // The whole first line, the cut one alone, then the next batch's whole.
        assert_eq!(text.lines().collect::<Vec<_>>(), ["{\"a\":1}", "{\"", "{\"d\":4}"], "{text:?}");
    }

    #[test]
    fn times_the_format_cannot_hold_are_clamped_not_a_panic() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH - Duration::from_secs(86_400)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(300_000_000_000)), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1_500)), "1970-01-01T00:00:01.500Z");
    }
}
