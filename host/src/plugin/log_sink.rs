//! A plugin's stdout and stderr, turned into log lines (rate-limited like
//! its `log` import). Synchronous: writes never block the plugin.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::PluginInfo;

use super::MAX_LOG_LINE;

#[derive(Clone)]
pub(crate) struct LogSink {
    info: Arc<PluginInfo>,
    line: Arc<Mutex<Line>>,
}

/// The line being written: its first [`MAX_LOG_LINE`] bytes, and how many
/// more it had (dropped as they come: memory stays bounded whatever is written).
#[derive(Default)]
struct Line {
    kept: Vec<u8>,
    cut: usize,
}

impl LogSink {
    pub fn new(info: Arc<PluginInfo>) -> Self {
        LogSink { info, line: Arc::default() }
    }

    fn push(&self, mut bytes: &[u8]) {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        while !bytes.is_empty() {
            let (part, rest, ended) = match bytes.iter().position(|&b| b == b'\n') {
                Some(end) => (&bytes[..end], &bytes[end + 1..], true),
                None => (bytes, &[][..], false),
            };
            let room = MAX_LOG_LINE.saturating_sub(line.kept.len()).min(part.len());
            line.kept.extend_from_slice(&part[..room]);
            line.cut += part.len() - room;
            if ended {
                let done = std::mem::take(&mut *line);
                self.emit(&done);
            }
            bytes = rest;
        }
    }

    fn emit(&self, line: &Line) {
        let text = String::from_utf8_lossy(&line.kept);
        self.info.log_line(tracing::Level::INFO, text.trim_end(), line.cut);
    }
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {}
}

impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl AsyncWrite for LogSink {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
