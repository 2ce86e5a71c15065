//! A backend's probe endpoint whose answers a test switches while it runs:
//! HTTP status, hanging (no answer), resetting, and the CPU load it reports
//! on `/load`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the endpoint does with the next probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answer with the current status.
    Answer = 0,
    /// Accept, read, never answer.
    Hang = 1,
    /// Accept, then reset the connection.
    Reset = 2,
}

/// Switches of one probe endpoint.
#[derive(Debug)]
pub struct Control {
    status: AtomicU16,
    mode: AtomicU8,
    cpu: AtomicU32,
    answered: AtomicUsize,
}

impl Control {
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
        self.mode.store(Mode::Answer as u8, Ordering::SeqCst);
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn set_cpu(&self, cpu: u32) {
        self.cpu.store(cpu, Ordering::SeqCst);
    }

    /// Probes answered (with any status) so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

/// A probe endpoint on `ip:port` (port 0: any).
pub async fn start(ip: IpAddr, port: u16) -> std::io::Result<(SocketAddr, Arc<Control>)> {
    let listener = TcpListener::bind(SocketAddr::new(ip, port)).await?;
    let addr = listener.local_addr()?;
    let control = Arc::new(Control {
        status: AtomicU16::new(200),
        mode: AtomicU8::new(Mode::Answer as u8),
        cpu: AtomicU32::new(0),
        answered: AtomicUsize::new(0),
    });
    let shared = Arc::clone(&control);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(serve(stream, Arc::clone(&shared)));
        }
    });
    Ok((addr, control))
}

/// Probe endpoints on `ips`, all on one port (a pool's probe has one port).
pub async fn start_many(ips: &[IpAddr]) -> (u16, Vec<Arc<Control>>) {
    'retry: for _ in 0..20 {
        let (first, control) = start(ips[0], 0).await.unwrap();
        let mut controls = vec![control];
        for ip in &ips[1..] {
            match start(*ip, first.port()).await {
                Ok((_, c)) => controls.push(c),
                Err(_) => continue 'retry,
            }
        }
        return (first.port(), controls);
    }
    panic!("no port free on all of {ips:?}");
}

async fn serve(mut stream: TcpStream, control: Arc<Control>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    match control.mode.load(Ordering::SeqCst) {
        1 => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        2 => {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
        _ => {
            let status = control.status.load(Ordering::SeqCst);
            let body = format!("cpu={}\n", control.cpu.load(Ordering::SeqCst));
            let response = format!(
                "HTTP/1.1 {status} Test\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            control.answered.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    }
}
