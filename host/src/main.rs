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
        /// Take over from the Fulcrum running this config (a binary upgrade):
        /// receive its listening sockets over its `control_socket`, serve on
        /// them, then let it drain. Nothing is refused in between.
        #[arg(long)]
        takeover: bool,
        /// Start even though a Fulcrum already serves this config: both then
        /// share every port (SO_REUSEPORT) and split its traffic.
        #[arg(long, conflicts_with = "takeover")]
        reuse_port: bool,
    },
    /// Validate a config file and load every plugin it names; exit non-zero on errors.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Ask the running instance (the config's `[admin]`) for the
    /// troubleshooter's findings; exit 1 when one is an error, 2 when it
    /// cannot be asked.
    Diagnose {
        #[arg(short, long)]
        config: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a plugin, or check one.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
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

#[derive(Subcommand)]
enum PluginCommand {
    /// Write a plugin crate NAME (in --dir): it builds with
    /// `cargo build --release --target wasm32-wasip2`, and has native unit tests
    /// and a config that uses it.
    New {
        name: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        /// The folder to write NAME/ in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Say which world and contract version a `.wasm` component implements
    /// (and time its `select` on a synthetic pool), or exactly what is wrong.
    Check {
        file: PathBuf,
        /// The plugin's config (JSON) for its `init`.
        #[arg(long, default_value = "{}")]
        config: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Balancer,
    Health,
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
    if let Command::Diagnose { config, json } = &cli.command {
        return diagnose(config, *json);
    }
    let result = match cli.command {
        Command::Run { config, takeover, reuse_port } => run(&config, takeover, reuse_port),
        Command::Check { config } => check(&config),
        Command::Demo { listen, admin } => demo(listen, admin),
        Command::Plugin { command } => plugin(command),
        Command::Diagnose { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fulcrum: {e}");
            ExitCode::FAILURE
        }
    }
}

fn diagnose(path: &std::path::Path, json: bool) -> ExitCode {
    let asked = Config::load(path).map_err(|e| e.to_string()).and_then(|config| {
        let admin = config.admin.as_ref().ok_or_else(|| {
            format!("{}: no [admin] section: there is no API to ask the running instance", path.display())
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        let token = admin.token.as_ref().map(|t| t.expose().to_owned());
        runtime.block_on(fulcrum::admin::diagnose::fetch(admin.listen, token.as_deref()))
    });
    match asked {
        Ok(diagnosis) => {
            let text = if json {
                serde_json::to_string_pretty(&diagnosis).unwrap_or_default() + "\n"
            } else {
                diagnosis.text()
            };
            let mut stdout = std::io::stdout();
            let _ = std::io::Write::write_all(&mut stdout, text.as_bytes());
            if diagnosis.has_errors() { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
        Err(e) => {
            eprintln!("fulcrum diagnose: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(path: &std::path::Path, takeover: bool, reuse_port: bool) -> Result<(), fulcrum::Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let config = Config::load(path)?;
    // A second `run` of a config that a Fulcrum serves would share its
    // ports silently (SO_REUSEPORT): traffic, probes and /diagnose split.
    let control = &config.runtime.control_socket;
    if !takeover
        && !reuse_port
        && let Some(running) = fulcrum::server::takeover::running(control)
    {
        let who = match running {
            Ok(pid) => format!("a Fulcrum (pid {pid}) already serves"),
            Err(e) => format!("a process answers on the control socket, and {e}; it serves"),
        };
        return Err(fulcrum::Error::Takeover(format!(
            "{}: {who} this config (control socket {}): `fulcrum run --takeover -c {}` replaces it, \
             `--reuse-port` shares its ports on purpose",
            path.display(),
            control.display(),
            path.display()
        )));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| fulcrum::Error::Resources { what: "the main thread's runtime", error })?;
    // SIGTERM and SIGINT are caught from before the first listener opens: a
    // signal that comes early still drains, it never kills the process.
    let signals = {
        let _context = runtime.enter();
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    };
    let (Ok(mut term), Ok(mut int)) = signals else {
        return Err(fulcrum::Error::Resources {
            what: "the SIGTERM and SIGINT handlers",
            error: std::io::Error::other("cannot install them"),
        });
    };
    // A takeover is a transaction: until this process says "serving", a
    // signal aborts it and the old process (which stopped nothing) serves on.
    let mut aborted = false;
    let server = if takeover {
        let started = std::time::Instant::now();
        let control = config.runtime.control_socket.clone();
        let takeover_error = |e: fulcrum::server::takeover::TakeoverError| fulcrum::Error::Takeover(e.to_string());
        let (inherited, link) = fulcrum::server::takeover::request(&control).map_err(takeover_error)?;
        if signalled(&runtime, &mut term, &mut int) {
            return Err(fulcrum::Error::Takeover(ABORTED.into()));
        }
        // A config or plugin that fails here exits before the old process
        // stopped anything: it goes on serving.
        let server = Server::start_with(&config, Some(inherited))?;
        if signalled(&runtime, &mut term, &mut int) {
            // The old process hears the link close before "serving".
            drop(link);
            tracing::warn!("{ABORTED}; the flows this process took meanwhile drain");
            aborted = true;
        } else {
            let flows = fulcrum::server::takeover::confirm(link, &control);
            server.adopt_udp(flows);
            server.listen_for_takeover();
            tracing::info!(ms = started.elapsed().as_millis() as u64, "took over: serving; the old process drains");
        }
        server
    } else {
        Server::start(&config)?
    };
    let mut taken_over = server.taken_over();
    let mut listening = String::new();
    for frontend in &server.state().frontends {
        listening += &format!("frontend {} listening on {}\n", frontend.name, frontend.addr);
    }
    if let Some(admin) = server.admin_addr() {
        listening += &format!("admin API on http://{admin}/\n");
    }
    // A closed stdout must not stop the server.
    if !aborted {
        let _ = std::io::Write::write_all(&mut std::io::stdout(), listening.as_bytes());
    }
    let mut drained = None;
    runtime.block_on(async {
        // SIGHUP reloads (the control thread listens); SIGINT and SIGTERM
        // drain, and a second one ends at once.
        if !aborted {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = taken_over.wait_for(|t| *t) => {}
            }
        }
        let grace = server.state().config.runtime.shutdown_grace;
        let flows = server.drain(grace);
        tracing::info!(
            flows,
            ?grace,
            "draining: listeners closed, established flows go on; a second signal ends at once"
        );
        let deadline = tokio::time::Instant::now() + grace;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
        while server.active_flows() > 0 {
            tokio::select! {
                _ = tick.tick() => {}
                () = tokio::time::sleep_until(deadline) => break,
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        drained = Some(flows);
    });
    let reset = server.halt();
    let flows = drained.unwrap_or(reset);
    tracing::info!(finished = flows.saturating_sub(reset), reset, "stopped");
    if aborted {
        return Err(fulcrum::Error::Takeover(ABORTED.into()));
    }
    Ok(())
}

const ABORTED: &str = "takeover aborted by a signal before the switch: the old process serves on";

/// Has SIGTERM or SIGINT come? The runtime turns once (up to 10 ms) so that
/// a signal delivered while it was not running is seen.
fn signalled(
    runtime: &tokio::runtime::Runtime,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> bool {
    runtime.block_on(async {
        let either = async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        tokio::time::timeout(std::time::Duration::from_millis(10), either).await.is_ok()
    })
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

fn plugin(command: PluginCommand) -> Result<(), fulcrum::Error> {
    use fulcrum::authoring::{inspect, scaffold};
    let failed = fulcrum::Error::Authoring;
    match command {
        PluginCommand::New { name, kind, dir } => {
            let kind = match kind {
                KindArg::Balancer => scaffold::Kind::Balancer,
                KindArg::Health => scaffold::Kind::Health,
            };
            let root = scaffold::new_plugin(&dir, &name, kind).map_err(|e| failed(e.to_string()))?;
            let out = format!(
                "wrote {root}: a {kind} plugin\n  cd {root}\n  cargo test\n  {build}\n  fulcrum check -c fulcrum.toml\n",
                root = root.display(),
                kind = kind.as_str(),
                build = scaffold::BUILD,
            );
            let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
            Ok(())
        }
        PluginCommand::Check { file, config } => {
            let limits = fulcrum::plugin::PluginLimits {
                deadline: fulcrum::config::DEFAULT_PLUGIN_DEADLINE,
                memory: fulcrum::config::DEFAULT_PLUGIN_MEMORY,
            };
            let runtime = fulcrum::plugin::PluginRuntime::new(limits).map_err(|e| failed(e.to_string()))?;
            let found =
                inspect::inspect(&runtime, &file, &config).map_err(|p| failed(format!("{}: {p}", file.display())))?;
            let contract = found.contract.map_or_else(
                || "fulcrum:plugin@0.1.x (it imports nothing of the contract)".to_owned(),
                |v| format!("fulcrum:plugin@{v}"),
            );
            let mut out = format!("{}: a {} plugin, built against {contract}\n", file.display(), found.world);
            out += &format!(
                "  imports: {}\n",
                if found.imports.is_empty() { "none".into() } else { found.imports.join(", ") }
            );
            if let Some(ns) = found.select_ns {
                out += &format!("  select: {ns:.0} ns a call (10 backends, with the host's checks)\n");
            }
            let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
            Ok(())
        }
    }
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
