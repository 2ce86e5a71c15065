//! The `fulcrum` command: run, check, demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fulcrum::Server;
use fulcrum::config::Config;

/// A programmable layer-4 load balancer with sandboxed Wasm policy plugins.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the frontends of a config file.
    Run {
        /// The config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file and load every plugin it names; exit non-zero on errors.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start three demo HTTP backends on loopback and a balancer in front of them.
    Demo {
        /// Where the demo balancer listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the demo's admin API (status, metrics) listens.
        #[arg(long, default_value = "127.0.0.1:9900")]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FULCRUM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Every panic (a bug) is counted (`fulcrum_panics_total`) and logged
    // with where it happened; the task it hit ends, the process goes on.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        fulcrum::telemetry::PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        tracing::error!(thread, "panic: {info}");
        default_hook(info);
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Demo { listen, admin } => demo(listen, admin),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fulcrum: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> Result<(), fulcrum::Error> {
    let config = Config::load(path)?;
    let server = Server::start(&config)?;
    let mut listening = String::new();
    for frontend in &server.state().frontends {
        listening += &format!("frontend {} listening on {}\n", frontend.name, frontend.addr);
    }
    if let Some(admin) = server.admin_addr() {
        listening += &format!("admin API on http://{admin}/\n");
    }
    // A closed stdout must not stop the server.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), listening.as_bytes());
    block_on(async {
        // SIGHUP reloads (the control thread listens); SIGINT and SIGTERM stop.
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
    })?;
    tracing::info!("shutting down");
    server.shutdown();
    Ok(())
}

fn check(path: &std::path::Path) -> Result<(), fulcrum::Error> {
    let config = Config::load(path)?;
    let pools = fulcrum::check(&config)?;
    let mut out = format!(
        "{}: OK ({} frontends, {} pools, every plugin loaded)\n",
        path.display(),
        config.frontends.len(),
        config.pools.len()
    );
    for pool in &pools {
        let health = pool.probe.iter().chain(&pool.signals).map(|h| ("health", &h.info));
        for (key, info) in std::iter::once(("balancer", &pool.balancer.info)).chain(health) {
            if info.wasi_notes.is_empty() {
                continue;
            }
            let notes: Vec<String> =
                info.wasi_notes.iter().map(|(import, note)| format!("{import} ({note})")).collect();
            out += &format!(
                "  pool `{}` {key} {}: WASI it imports that differs here: {}\n",
                pool.config.name,
                info.name,
                notes.join("; ")
            );
        }
    }
    // A closed stdout must not turn a good check into a failure.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    Ok(())
}

fn demo(listen: SocketAddr, admin: SocketAddr) -> Result<(), fulcrum::Error> {
    block_on(fulcrum::demo::run(listen, admin))?
}

fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, fulcrum::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| fulcrum::Error::Resources { what: "the main thread's runtime", error })?;
    Ok(runtime.block_on(future))
}
