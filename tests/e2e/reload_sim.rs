//! The reload path (parse -> diff -> prepare -> switch) by simulation: a
//! seeded, deterministic sequence of random configs applied to a running
//! server with traffic. Pools are added, removed and renamed; frontends move
//! between pools and protocols; backends come and go; balancers that fail at
//! load (`init` refuses, a file that is missing), stall in `backends-changed`,
//! answer bogus ids or trap. After every step: no panic, every frontend of the
//! config in effect answers (TCP and UDP, a UDP client keeping its address),
//! every answer comes from a backend of that frontend's pool now, a TCP flow
//! established before the reload still echoes after it, and a reload that
//! failed left nothing of itself visible.
//!
//! `FULCRUM_SIM_SEED=<n>` and `FULCRUM_SIM_STEPS=<n>` run one long sequence
//! by hand: `scripts/test -p fulcrum-tests --test e2e -- reload::sim --nocapture`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fulcrum_tests::*;

/// How a drawn pool's balancer behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Policy {
    Stock(&'static str),
    /// Answers ids that do not exist on every 3rd flow (the host falls back).
    Bogus,
    /// Traps on every 4th flow (the instance is rebuilt, the flow falls back).
    Trap,
    /// Refuses its config: the reload fails at load.
    InitError,
    /// Its file is missing: the reload fails at load.
    Missing,
    /// Spins past the set-up deadline in `backends-changed`: the reload fails
    /// when a frontend needs it primed.
    Stall,
}

#[derive(Clone, Debug)]
struct DrawnPool {
    udp: bool,
    policy: Policy,
    /// Indexes into the TCP or UDP backends.
    backends: Vec<usize>,
}

#[derive(Clone, Debug)]
struct DrawnFrontend {
    udp: bool,
    pool: String,
}

#[derive(Clone, Debug)]
struct Draw {
    pools: BTreeMap<String, DrawnPool>,
    frontends: BTreeMap<String, DrawnFrontend>,
    /// A frontend naming a pool that does not exist: fails at validation.
    dangling: bool,
}

impl Draw {
    fn random(rng: &mut fastrand::Rng, backends: usize) -> Draw {
        let mut pools = BTreeMap::new();
        for _ in 0..rng.usize(1..=4) {
            let policy = match rng.u32(0..100) {
                0..=54 => Policy::Stock(
                    ["round-robin", "five-tuple-hash", "least-connections", "random", "maglev"][rng.usize(0..5)],
                ),
                55..=69 => Policy::Bogus,
                70..=79 => Policy::Trap,
                80..=85 => Policy::InitError,
                86..=90 => Policy::Missing,
                _ => Policy::Stall,
            };
            let mut chosen: Vec<usize> = (0..backends).filter(|_| rng.bool()).collect();
            if chosen.is_empty() {
                chosen.push(rng.usize(0..backends));
            }
            pools.insert(format!("p{}", rng.usize(0..6)), DrawnPool { udp: rng.bool(), policy, backends: chosen });
        }
        let names: Vec<&String> = pools.keys().collect();
        let mut frontends = BTreeMap::new();
        for _ in 0..rng.usize(1..=3) {
            let pool = names[rng.usize(0..names.len())].clone();
            let udp = pools[&pool].udp;
            frontends.insert(format!("f{}", rng.usize(0..4)), DrawnFrontend { udp, pool });
        }
        Draw { pools, frontends, dangling: rng.u32(0..100) < 4 }
    }

    /// A reload to this config must fail (whatever runs).
    fn must_fail(&self) -> bool {
        self.dangling || self.pools.values().any(|p| matches!(p.policy, Policy::InitError | Policy::Missing))
    }

    /// May fail: a stalling balancer (primed for a frontend that uses it).
    fn may_fail(&self) -> bool {
        self.pools.values().any(|p| p.policy == Policy::Stall)
    }

    fn text(&self, tcp: &[Backend], udp: &[UdpBackend], missing: &std::path::Path) -> String {
        let mut text = String::from(
            "[runtime]\nworkers = 2\nwatch = false\nplugin_deadline = \"10ms\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        );
        for (name, f) in &self.frontends {
            let protocol = if f.udp { "udp" } else { "tcp" };
            text += &format!(
                "\n[[frontend]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\npool = \"{}\"\n",
                f.pool
            );
        }
        if self.dangling {
            text += "\n[[frontend]]\nname = \"dangling\"\nlisten = \"127.0.0.1:0\"\npool = \"nowhere\"\n";
        }
        for (name, p) in &self.pools {
            let misbehave = plugins::MISBEHAVE_PATH;
            let balancer = match p.policy {
                Policy::Stock(stock) => format!("balancer = \"stock:{stock}\""),
                Policy::Bogus => {
                    format!("balancer = \"{misbehave}\"\nbalancer_config = {{ mode = \"bogus\", every = 3 }}")
                }
                Policy::Trap => {
                    format!("balancer = \"{misbehave}\"\nbalancer_config = {{ mode = \"trap\", every = 4 }}")
                }
                Policy::InitError => {
                    format!("balancer = \"{misbehave}\"\nbalancer_config = {{ mode = \"init-error\", bytes = 20 }}")
                }
                Policy::Missing => format!("balancer = \"{}\"", missing.display()),
                Policy::Stall => {
                    format!("balancer = \"{misbehave}\"\nbalancer_config = {{ mode = \"slow\", millis = 400 }}")
                }
            };
            let addrs: Vec<String> = p
                .backends
                .iter()
                .map(|&i| format!("{{ address = \"{}\" }}", if p.udp { udp[i].addr } else { tcp[i].addr }))
                .collect();
            text += &format!("\n[[pool]]\nname = \"{name}\"\n{balancer}\nbackends = [ {} ]\n", addrs.join(", "));
        }
        text
    }

    /// The backend names each frontend may answer from.
    fn allowed(&self, frontend: &DrawnFrontend) -> Vec<String> {
        let pool = &self.pools[&frontend.pool];
        pool.backends.iter().map(|i| format!("{}{i}", if pool.udp { "u" } else { "b" })).collect()
    }
}

/// Panics on Fulcrum's own threads (workers, control, plugin preparer).
static HOST_PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts [`HOST_PANICS`] from now on (the usual report still prints).
fn count_host_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().is_some_and(|n| n.starts_with("fulcrum-")) {
                HOST_PANICS.fetch_add(1, Ordering::Relaxed);
            }
            previous(info);
        }));
    });
}

/// Connects and reads the backend's greeting line.
async fn tcp_greeting(addr: SocketAddr) -> Result<String, String> {
    use tokio::io::AsyncBufReadExt;
    let read = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        tokio::io::BufReader::new(stream).read_line(&mut line).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(line.trim_end().to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.map_err(|_| "no greeting in 5 s".to_owned())?
}

/// Runs `steps` random reloads from `seed`; returns (applied, failed).
async fn simulate(seed: u64, steps: usize) -> (usize, usize) {
    count_host_panics();
    const BACKENDS: usize = 5;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for i in 0..BACKENDS {
        tcp.push(Backend::start(&format!("b{i}"), "127.0.0.1").await);
        udp.push(UdpBackend::start(&format!("u{i}"), "127.0.0.1").await);
    }
    let file = ConfigFile::new(&format!("reload-sim-{seed}"), "");
    let missing = file.dir.join("no-such-plugin.wasm");
    let mut rng = fastrand::Rng::with_seed(seed);
    // The first config: one that must start.
    let mut current = loop {
        let draw = Draw::random(&mut rng, BACKENDS);
        if !draw.must_fail() && !draw.may_fail() {
            break draw;
        }
    };
    file.write(&current.text(&tcp, &udp, &missing));
    let server = std::sync::Arc::new(serve_file(&file));
    // One UDP client per frontend name, kept across steps (its flow moves with its pool).
    let mut clients: BTreeMap<String, tokio::net::UdpSocket> = BTreeMap::new();
    let (mut applied, mut failed) = (0, 0);
    for step in 0..=steps {
        let at = format!("seed {seed} step {step}");
        if step > 0 {
            let draw = Draw::random(&mut rng, BACKENDS);
            file.write(&draw.text(&tcp, &udp, &missing));
            let before = server.state();
            // An established flow on every TCP frontend, across the reload.
            let mut flows = Vec::new();
            for (name, f) in current.frontends.iter().filter(|(_, f)| !f.udp) {
                let stream = tokio::net::TcpStream::connect(server.frontend_addr(name).unwrap()).await.unwrap();
                let mut stream = tokio::io::BufReader::new(stream);
                let mut greeting = String::new();
                tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut greeting).await.unwrap();
                flows.push((name.clone(), f.clone(), stream));
            }
            let reloading = std::sync::Arc::clone(&server);
            let outcome = tokio::task::spawn_blocking(move || reloading.reload()).await.unwrap();
            for (name, f, mut stream) in flows {
                let echoed = async {
                    tokio::io::AsyncWriteExt::write_all(stream.get_mut(), b"still\n").await?;
                    let mut line = String::new();
                    tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut line).await?;
                    Ok::<_, std::io::Error>(line)
                };
                let line = tokio::time::timeout(Duration::from_secs(5), echoed).await;
                assert!(
                    matches!(&line, Ok(Ok(l)) if l == "still\n"),
                    "{at}: a flow on {name} ({f:?}) did not survive the reload: {line:?}"
                );
            }
            match outcome {
                Ok(result) => {
                    assert!(!draw.must_fail(), "{at}: a config that cannot work was applied: {draw:?}");
                    // The outcome says what changed: every frontend that moved pools, typed.
                    for (name, f) in &draw.frontends {
                        let Some(was) = current.frontends.get(name).filter(|w| w.udp == f.udp) else { continue };
                        if was.pool != f.pool {
                            let moved = result.changes.iter().any(|c| {
                                matches!(c, fulcrum::config::diff::Change::FrontendMoved { frontend, to, .. }
                                    if frontend == name && *to == f.pool)
                            });
                            assert!(
                                moved,
                                "{at}: {name} moved from {} to {}, not in {:?}",
                                was.pool, f.pool, result.changes
                            );
                        }
                    }
                    current = draw;
                    applied += 1;
                }
                Err(e) => {
                    assert!(draw.must_fail() || draw.may_fail(), "{at}: a good config failed: {e}\n{draw:?}");
                    // Nothing of it is visible: the very same frontends and pools.
                    let after = server.state();
                    assert!(std::sync::Arc::ptr_eq(&before, &after), "{at}: a failed reload changed the state ({e})");
                    failed += 1;
                }
            }
        }
        // What runs is what the config in effect says.
        let state = server.state();
        let running: Vec<&str> = state.frontends.iter().map(|f| f.name.as_str()).collect();
        let drawn: Vec<&str> = current.frontends.keys().map(String::as_str).collect();
        assert_eq!(running, drawn, "{at}: frontends");
        for (name, f) in &current.frontends {
            let addr = server.frontend_addr(name).unwrap();
            let allowed = current.allowed(f);
            for _ in 0..2 {
                let answer = if f.udp {
                    if !clients.contains_key(name) {
                        clients.insert(name.clone(), tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    }
                    let client = &clients[name];
                    match udp_ask(client, addr, b"sim", Duration::from_secs(2)).await {
                        Some((answer, _)) => answer,
                        None => {
                            let (_, status) = admin(server.admin_addr().unwrap(), "GET", "/status", None).await;
                            panic!("{at}: UDP frontend {name} did not answer ({f:?}): {current:?}\n{status}")
                        }
                    }
                } else {
                    tcp_greeting(addr)
                        .await
                        .unwrap_or_else(|e| panic!("{at}: TCP frontend {name} did not answer: {e} ({f:?})"))
                };
                assert!(
                    allowed.contains(&answer),
                    "{at}: {name} answered from {answer}, not of pool {} {allowed:?}",
                    f.pool
                );
            }
        }
    }
    let panics = HOST_PANICS.load(Ordering::Relaxed);
    assert_eq!(panics, 0, "seed {seed}: {panics} panics in Fulcrum's threads");
    match std::sync::Arc::try_unwrap(server) {
        Ok(server) => server.shutdown(),
        Err(_) => unreachable!("the reload tasks are done"),
    }
    (applied, failed)
}

/// The seeds CI runs, each a few dozen steps (their sum: a few hundred).
const SEEDS: [u64; 4] = [1, 2, 3, 4];
const STEPS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_random_reload_sequences_keep_every_frontend_answering_from_its_pool() {
    let by_hand = std::env::var("FULCRUM_SIM_SEED").ok().and_then(|s| s.parse().ok());
    let steps = std::env::var("FULCRUM_SIM_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(STEPS);
    let seeds: Vec<u64> = by_hand.map_or_else(|| SEEDS.to_vec(), |seed| vec![seed]);
    for seed in seeds {
        let (applied, failed) = simulate(seed, steps).await;
        eprintln!("reload simulation, seed {seed}: {steps} steps, {applied} applied, {failed} failed whole");
    }
}
