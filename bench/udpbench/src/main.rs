//! `udpbench echo --listen ADDR`: answers every datagram with itself.
//! `udpbench load --target ADDR --flows N --seconds S --size B`: N flows
//! (sockets), each sending a datagram and waiting for its answer in a loop
//! (ping-pong), for S seconds; prints answers per second and losses.
//!
//! Used by `bench/udp.sh` to compare Fulcrum with nginx `stream` on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::net::UdpSocket;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo every datagram back to its sender.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Ping-pong load; prints `answers/s` and losses.
    Load {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 64)]
        flows: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Echo { listen } => echo(listen).await,
            Command::Load { target, flows, seconds, size } => load(target, flows, seconds, size).await,
        }
    })
}

async fn echo(listen: SocketAddr) -> std::io::Result<()> {
    let socket = UdpSocket::bind(listen).await?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

async fn load(target: SocketAddr, flows: usize, seconds: u64, size: usize) -> std::io::Result<()> {
    let answers = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..flows {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(target).await?;
        let (answers, lost) = (Arc::clone(&answers), Arc::clone(&lost));
        tasks.push(tokio::spawn(async move {
            let payload = vec![7u8; size];
            let mut buf = vec![0u8; 65_536];
            while Instant::now() < end {
                if socket.send(&payload).await.is_err() {
                    lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await {
                    Ok(Ok(_)) => answers.fetch_add(1, Ordering::Relaxed),
                    _ => lost.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = answers.load(Ordering::Relaxed);
    println!(
        "{:.0} answers/s ({} answers, {} lost, {:.1} s)",
        n as f64 / elapsed,
        n,
        lost.load(Ordering::Relaxed),
        elapsed
    );
    Ok(())
}
