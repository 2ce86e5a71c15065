//! B16: backend connects spread over a pool's `source_addresses`, bound with
//! `IP_BIND_ADDRESS_NO_PORT` (a source port is used up per source and
//! backend, not per source), and local port exhaustion is counted as such,
//! with a reset to the client, never as the backend's failure.
//!
//! The port range is narrowed to ten ports in a network namespace this test
//! creates (it needs root, as CI has); everything runs inside it: a thread
//! moved into the namespace starts the runtime, whose threads (and the
//! server's) inherit it.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fulcrum::flow::CloseReason;
use fulcrum_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// A network namespace of this test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let name = format!("fulcrum-{name}-{}", std::process::id());
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["netns", "add", &name]);
        let ns = Netns(name);
        run(&["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"]);
        run(&["netns", "exec", &ns.0, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40009"]);
        ns
    }

    /// Runs `test` on a thread inside the namespace, with a tokio runtime.
    fn run<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        &self,
        test: impl FnOnce() -> F + Send + 'static,
    ) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(path).unwrap();
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(test())
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

/// Connects from `from` (a port outside the narrowed range) and reads the
/// greeting; `None` when the flow is refused (reset or closed).
async fn try_flow(frontend: SocketAddr, from: SocketAddr) -> Option<(BufReader<TcpStream>, String)> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(from).unwrap();
    let mut reader = BufReader::new(socket.connect(frontend).await.ok()?);
    let mut line = String::new();
    match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await.unwrap() {
        Ok(n) if n > 0 => Some((reader, line.trim().to_owned())),
        _ => None,
    }
}

/// Opens up to `attempts` flows at once through a pool of two backends;
/// returns the flows held and the server.
async fn hold_flows(pool_extra: &str, attempts: u16) -> (Vec<BufReader<TcpStream>>, fulcrum::Server) {
    let b = backends(2, "127.0.0.1").await;
    let server = serve(&config(1, "stock:round-robin", &backend_list(&b, None), "", pool_extra));
    let addr = server.frontend_addr("web").unwrap();
    let mut held = Vec::new();
    for i in 0..attempts {
        if let Some((flow, _)) = try_flow(addr, SocketAddr::from(([127, 0, 0, 2], 50_000 + i))).await {
            held.push(flow);
        }
    }
    (held, server)
}

#[test]
fn source_ports_are_shared_across_backends_and_exhaustion_is_counted() {
    // Each part in a namespace of its own: the first leaves ports in TIME_WAIT.
    let one_source = Netns::new("b16a").run(|| async {
        // One source address, two backends, ten ports: without
        // IP_BIND_ADDRESS_NO_PORT a bound socket would reserve its port for
        // every destination, and at most ten flows could exist at once.
        let (held, server) =
            hold_flows("source_addresses = [\"127.0.0.3\"]\n[admin]\nlisten = \"127.0.0.1:0\"", 40).await;
        let one_source = held.len();
        assert!(one_source > 10, "only {one_source} flows: source ports are not shared across backends");
        let pool = server.pool("web").unwrap();
        let exhausted = pool.source_ports_exhausted.load(Ordering::Relaxed);
        assert!(exhausted > 0, "exhaustion not counted");
        let flows = server.flows("web").unwrap();
        assert_eq!(flows.closed(CloseReason::LocalExhaustion), exhausted);
        for b in pool.load().backends.iter() {
            assert_eq!(b.stats.connect_failures.load(Ordering::Relaxed), 0, "exhaustion blamed on {}", b.addr);
        }
        // The troubleshooter says so, in the API and from the command line
        // (run in this namespace: a child process inherits it).
        let admin_addr = server.admin_addr().unwrap();
        let api = diagnose(admin_addr).await;
        let f = finding(&api, "source_ports_exhausted", None).unwrap_or_else(|| panic!("{api:#}"));
        assert_eq!((f["pool"].as_str(), f["severity"].as_str()), (Some("web"), Some("error")));
        assert!(f["evidence"].to_string().contains(&format!("= {exhausted}")), "{f:#}");
        assert!(f["evidence"].to_string().contains("10 ports"), "{f:#}");
        let (code, cli, _) = diagnose_cli(admin_addr);
        assert!(finding(&cli, "source_ports_exhausted", None).is_some());
        assert_eq!(code, 1);
        drop(held);
        server.shutdown();
        one_source
    });
    // Two source addresses: twice the ports.
    let two_sources = Netns::new("b16b").run(|| async {
        let (held, server) = hold_flows("source_addresses = [\"127.0.0.3\", \"127.0.0.4\"]", 60).await;
        let n = held.len();
        drop(held);
        server.shutdown();
        n
    });
    eprintln!("B16: ten ports, two backends: {one_source} flows from one source address, {two_sources} from two");
    assert!(two_sources > one_source + 5, "{two_sources} flows with two sources, {one_source} with one");
}

#[test]
fn a_source_address_this_host_does_not_have_is_refused_at_start() {
    let text =
        config(1, "stock:round-robin", "[ { address = \"127.0.0.1:9\" } ]", "", "source_addresses = [\"192.0.2.1\"]");
    let config = fulcrum::config::Config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let e = fulcrum::Server::start(&config).unwrap_err().to_string();
    assert!(e.contains("192.0.2.1") && e.contains("source address"), "{e}");
}
