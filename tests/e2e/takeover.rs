//! B17, hitless binary upgrade: `fulcrum run --takeover` receives the running
//! process's sockets and serves on them; the old one drains. A client that
//! connects all along sees no failure, long flows held by the old process
//! complete byte for byte, UDP keeps answering; a takeover that cannot start
//! leaves the old process serving and exits non-zero.

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fulcrum_tests::process::*;
use fulcrum_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client connecting to `web` over and over until `stop`.
struct Connector {
    task: tokio::task::JoinHandle<()>,
    attempted: Arc<AtomicU64>,
    /// Connections that did not get the backend's greeting.
    failed: Arc<AtomicU64>,
}

fn connect_all_along(web: SocketAddr, stop: &Arc<AtomicBool>) -> Connector {
    let (attempted, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (stop, counts) = (Arc::clone(stop), (Arc::clone(&attempted), Arc::clone(&failed)));
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            counts.0.fetch_add(1, Ordering::Relaxed);
            if !one_connection(web).await {
                counts.1.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Connector { task, attempted, failed }
}

/// A TCP and a UDP backend, an empty config file for test `name`, and the
/// control socket's path beside it.
async fn setup(name: &str) -> (Backend, UdpBackend, ConfigFile, std::path::PathBuf) {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let udp_backend = UdpBackend::start("u0", "127.0.0.1").await;
    let dir = ConfigFile::new(name, "");
    let control = dir.dir.join("control.sock");
    (backend, udp_backend, dir, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_takeovers_in_a_row_refuse_nothing_and_cut_nothing() {
    let (backend, udp_backend, dir, control) = setup("takeover").await;
    dir.write(&config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin"));
    let first = fulcrum(&dir.path, false).unwrap();
    let (web, dns) = (first.web, first.dns);

    // Long flows, held by the first process through every takeover.
    let mut long = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(web).await.unwrap();
        let mut greeting = [0u8; 3];
        stream.read_exact(&mut greeting).await.unwrap();
        long.push(stream);
    }
    // A client connecting all along, and UDP queries all along.
    let stop = Arc::new(AtomicBool::new(false));
    let Connector { task: connector, attempted, failed } = connect_all_along(web, &stop);
    let (asked, answered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let querier = {
        let (stop, asked, answered) = (Arc::clone(&stop), Arc::clone(&asked), Arc::clone(&answered));
        tokio::spawn(async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                asked.fetch_add(1, Ordering::Relaxed);
                if udp_ask(&socket, dns, b"q", Duration::from_secs(1)).await.is_some() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut processes = vec![first.child];
    let mut took = Vec::new();
    for _ in 0..10 {
        // Some traffic on the current process first.
        let before = attempted.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(10), "connections", || attempted.load(Ordering::Relaxed) >= before + 200).await;
        let started = Instant::now();
        let next = tokio::task::spawn_blocking({
            let path = dir.path.clone();
            move || fulcrum(&path, true)
        })
        .await
        .unwrap()
        .unwrap_or_else(|code| panic!("a takeover failed (exit {code})"));
        took.push(started.elapsed());
        assert_eq!((next.web, next.dns), (web, dns), "the same addresses, the same sockets");
        processes.push(next.child);
    }
    let more = attempted.load(Ordering::Relaxed) + 200;
    wait_until(Duration::from_secs(10), "connections", || attempted.load(Ordering::Relaxed) >= more).await;
    stop.store(true, Ordering::Relaxed);
    connector.await.unwrap();
    querier.await.unwrap();

    // The long flows, on the first process all along, complete byte for byte.
    for (i, stream) in long.iter_mut().enumerate() {
        let data: Vec<u8> = (0..1 << 20).map(|b: u32| (b.wrapping_mul(31).wrapping_add(i as u32) >> 3) as u8).collect();
        let (mut rx, mut tx) = stream.split();
        let (_, echoed) = tokio::join!(async { tx.write_all(&data).await.unwrap() }, async {
            let mut echoed = vec![0u8; data.len()];
            rx.read_exact(&mut echoed).await.unwrap();
            echoed
        });
        assert!(echoed == data, "long flow {i} was not echoed byte for byte");
    }
    let (attempted, failed) = (attempted.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let (asked, answered) = (asked.load(Ordering::Relaxed), answered.load(Ordering::Relaxed));
    eprintln!(
        "10 takeovers: {attempted} connections attempted, {failed} failed; UDP {answered}/{asked} answered; \
         --takeover start to serving: {took:?}"
    );
    assert_eq!(failed, 0, "{failed} of {attempted} connections failed");
    assert!(attempted >= 2000, "only {attempted} connections");
    assert_eq!(answered, asked, "UDP queries went unanswered");

    // The first process still holds the long flows: it has not exited.
    let mut first = processes.remove(0);
    assert!(first.try_wait().unwrap().is_none(), "the first process left its flows");
    drop(long);
    kill_all(std::iter::once(first).chain(processes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_cannot_start_leaves_the_old_process_serving() {
    let (backend, udp_backend, dir, control) = setup("takeover-broken").await;
    dir.write(&config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin"));
    let old = fulcrum(&dir.path, false).unwrap();
    // A plugin that does not exist: the new process cannot start.
    let broken = dir.dir.join("broken.toml");
    std::fs::write(&broken, config_text(backend.addr, udp_backend.addr, &control, "stock:no-such-plugin")).unwrap();
    let code = tokio::task::spawn_blocking(move || fulcrum(&broken, true).err()).await.unwrap();
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    // No process answering: non-zero too.
    let elsewhere = dir.dir.join("elsewhere.toml");
    std::fs::write(
        &elsewhere,
        config_text(backend.addr, udp_backend.addr, &dir.dir.join("none.sock"), "stock:round-robin"),
    )
    .unwrap();
    let code = tokio::task::spawn_blocking(move || fulcrum(&elsewhere, true).err()).await.unwrap();
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    // The old process serves on, and a good takeover still works after.
    for _ in 0..20 {
        assert!(one_connection(old.web).await);
    }
    let path = dir.path.clone();
    let next = tokio::task::spawn_blocking(move || fulcrum(&path, true)).await.unwrap().unwrap();
    assert!(one_connection(next.web).await);
    kill_all([old.child, next.child]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_renames_a_frontend_closes_the_old_port_at_the_switch() {
    let (backend, udp_backend, dir, control) = setup("takeover-rename").await;
    let text = config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin");
    dir.write(&text);
    let mut old = fulcrum(&dir.path, false).unwrap();
    assert!(one_connection(old.web).await);
    // `web` becomes `www` (on a port of its own); `dns` stays.
    dir.write(&text.replace("name = \"web\"\nlisten", "name = \"www\"\nlisten"));
    let path = dir.path.clone();
    let (new, addrs) =
        tokio::task::spawn_blocking(move || start(&path, true, 2, Stdio::null())).await.unwrap().unwrap();
    let switched = Instant::now();
    assert_eq!(addrs["dns"], old.dns, "the kept frontend serves on the same socket");
    assert!(one_connection(addrs["www"]).await);
    // The renamed frontend's old port: refused (not a handshake nobody accepts) within 1 s.
    let web = old.web;
    wait_until(Duration::from_secs(1), "the old port to refuse", || {
        matches!(std::net::TcpStream::connect_timeout(&web, Duration::from_millis(100)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
    eprintln!("renamed frontend: its old port refuses {:?} after the switch", switched.elapsed());
    assert_eq!(exit_of(&mut old.child, Duration::from_secs(10)).await, Some(0), "the old process, with no flows, ends");
    kill_all([new]);
}

/// A config whose start-up takes a while: seven frontends, five on a pool
/// whose balancer computes 150 ms in `backends-changed` for each worker.
fn slow_start_text(tcp: SocketAddr, udp: SocketAddr, control: &std::path::Path) -> String {
    let mut text = config_text(tcp, udp, control, "stock:round-robin")
        .replace("[runtime]\n", "[runtime]\nplugin_deadline = \"50ms\"\n");
    for i in 0..5 {
        text += &format!(
            "\n[[frontend]]\nname = \"slow{i}\"\nlisten = \"127.0.0.1:0\"\npool = \"slow{i}\"\n\n[[pool]]\nname = \"slow{i}\"\n\
             balancer = \"{}\"\nbalancer_config = {{ mode = \"slow\", millis = 150 }}\nbackends = [ {{ address = \"{tcp}\" }} ]\n",
            fulcrum_tests::plugins::MISBEHAVE_PATH
        );
    }
    text
}

/// Lines the slow balancer logs, one as each of its set-up calls begins (a
/// spin of 150 ms follows): points inside a takeover's start-up.
const SLOW_MARK: &str = "misbehave: slow backends-changed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_while_a_takeover_starts_aborts_it_and_the_old_process_serves_on() {
    let (backend, udp_backend, dir, control) = setup("takeover-sigint").await;
    dir.write(&slow_start_text(backend.addr, udp_backend.addr, &control));
    let mut old = fulcrum(&dir.path, false).unwrap();
    let web = old.web;
    let stop = Arc::new(AtomicBool::new(false));
    let Connector { task: connector, attempted, failed } = connect_all_along(web, &stop);
    // Ten points of the start-up, each an event of the new process: at once,
    // and as each of its first nine slow set-up calls begins (five pools, two
    // workers: ten calls, all before the switch, each 150 ms of work).
    let mut aborted = Vec::new();
    for point in 0..10usize {
        let mut command = Command::new(fulcrum_bin());
        command.args(["run", "--takeover", "-c"]).arg(&dir.path).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stderr).lines().map_while(Result::ok);
            let mut marks = 0;
            let mut reached = point == 0;
            if !reached {
                for line in lines.by_ref() {
                    marks += usize::from(line.contains(SLOW_MARK));
                    assert!(!line.contains("took over"), "point {point}: the switch came first");
                    if marks == point {
                        reached = true;
                        break;
                    }
                }
            }
            let _ = tx.send(reached);
            lines.collect::<Vec<_>>()
        });
        let reached = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20))).await.unwrap();
        signal(&child, rustix::process::Signal::INT);
        assert_eq!(reached, Ok(true), "point {point} never came");
        let code = exit_of(&mut child, Duration::from_secs(20)).await;
        let rest = reader.join().unwrap();
        assert!(matches!(code, Some(c) if c != 0), "point {point}: exit {code:?}, not an abort: {rest:?}");
        assert!(old.child.try_wait().unwrap().is_none(), "point {point}: the old process stopped");
        assert!(one_connection(web).await, "point {point}: nothing serves");
        aborted.push(point);
    }
    stop.store(true, Ordering::Relaxed);
    connector.await.unwrap();
    let (attempted, failed) = (attempted.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("SIGINT at points {aborted:?}: {attempted} connections, {failed} failed");
    assert_eq!(failed, 0, "{failed} of {attempted} connections failed");
    // The old process still takes a takeover after ten aborted ones.
    let path = dir.path.clone();
    let next =
        tokio::task::spawn_blocking(move || fulcrum(&path, true)).await.unwrap().unwrap_or_else(|c| panic!("exit {c}"));
    assert_eq!(exit_of(&mut old.child, Duration::from_secs(10)).await, Some(0));
    assert!(one_connection(next.web).await);
    kill_all([next.child]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_the_same_config_is_refused_and_the_first_serves_alone() {
    let (backend, udp_backend, dir, control) = setup("takeover-second").await;
    dir.write(&config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin"));
    let first = fulcrum(&dir.path, false).unwrap();
    let out = finish(Command::new(fulcrum_bin()).args(["run", "-c"]).arg(&dir.path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second run started: {stderr}");
    assert!(stderr.contains(&format!("pid {}", first.child.id())) && stderr.contains("--takeover"), "{stderr}");
    assert!(out.stdout.is_empty(), "it listened: {}", String::from_utf8_lossy(&out.stdout));
    for _ in 0..20 {
        assert!(one_connection(first.web).await);
    }
    kill_all([first.child]);
}

/// A listener on `path` run by uid 65534 (nobody), as a stranger's fake
/// control socket would be; `python3` binds it.
fn stranger_listener(path: &std::path::Path, answer: &str) -> Child {
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_UNIX)\ns.bind({path:?})\ns.listen(4)\nprint('ready',flush=True)\n\
         while True:\n  c,_=s.accept()\n  try:\n    c.sendall({answer:?}.encode())\n    time.sleep(0.2)\n  except OSError:\n    pass\n  c.close()\n",
        path = path.to_str().unwrap()
    );
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is missing: scripts/test installs it");
    let mut ready = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_socket_of_another_uid_is_refused_by_both_sides() {
    use std::os::unix::fs::PermissionsExt;
    let backend = Backend::start("b0", "127.0.0.1").await;
    let udp_backend = UdpBackend::start("u0", "127.0.0.1").await;
    let dir = ConfigFile::new("takeover-stranger", "");
    // A directory the stranger may write to (the config points there).
    let shared = dir.dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let control = shared.join("control.sock");
    dir.write(&config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin"));

    // The new side: a fake listener that answers like a Fulcrum would.
    let mut fake = stranger_listener(&control, "{\"frontends\":[],\"admin\":false}\n");
    let out = finish(Command::new(fulcrum_bin()).args(["run", "--takeover", "-c"]).arg(&dir.path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "took over from a stranger: {stderr}");
    assert!(stderr.contains("refused to take over") && stderr.contains("uid 65534"), "{stderr}");
    // A plain run refuses to start beside it too, naming it.
    let out = finish(Command::new(fulcrum_bin()).args(["run", "-c"]).arg(&dir.path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("uid 65534"), "{stderr}");
    let _ = fake.kill();
    let _ = fake.wait();
    let _ = std::fs::remove_file(&control);

    // The old side: a control socket in a directory every user may write to
    // is never made; in a private one, a stranger who reaches it is refused.
    let (mut old, _) = start(&dir.path, false, 2, Stdio::piped()).unwrap();
    let mut stderr_lines = std::io::BufReader::new(old.stderr.take().unwrap()).lines();
    let warned = stderr_lines.by_ref().map_while(Result::ok).find(|l| l.contains("no takeover into this process"));
    assert!(warned.is_some_and(|l| l.contains("writable by every user")), "no warning");
    assert!(!control.exists(), "a control socket in a world-writable directory");
    kill_all([old]);

    let private = dir.dir.join("private");
    std::fs::create_dir(&private).unwrap();
    let control = private.join("control.sock");
    dir.write(&config_text(backend.addr, udp_backend.addr, &control, "stock:round-robin"));
    let (mut old, addrs) = start(&dir.path, false, 2, Stdio::piped()).unwrap();
    let stderr_lines = std::io::BufReader::new(old.stderr.take().unwrap()).lines();
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is owner-only: {mode:o}");
    // Let the stranger reach it (as a careless chmod would), then ask as the stranger.
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ntry:\n  s.sendall(b'takeover\\n')\n  got=s.recv(4096)\nexcept OSError:\n  got=b''\nprint(repr(got))\n",
        control.to_str().unwrap()
    );
    use std::os::unix::process::CommandExt;
    let asked = Command::new("python3").args(["-c", &script]).uid(65534).gid(65534).output().unwrap();
    let said = String::from_utf8_lossy(&asked.stderr);
    assert_eq!(String::from_utf8_lossy(&asked.stdout).trim(), "b''", "the stranger got an answer: {said}");
    let refused = stderr_lines.map_while(Result::ok).find(|l| l.contains("takeover refused"));
    assert!(refused.is_some_and(|l| l.contains("uid 65534")), "no refusal logged");
    assert!(one_connection(addrs["web"]).await, "the old process serves on");
    assert!(old.try_wait().unwrap().is_none());
    kill_all([old]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_control_socket_is_in_a_private_directory() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let backend = Backend::start("b0", "127.0.0.1").await;
    let udp_backend = UdpBackend::start("u0", "127.0.0.1").await;
    let dir = ConfigFile::new("takeover-default", "");
    let text = config_text(backend.addr, udp_backend.addr, std::path::Path::new("x"), "stock:round-robin");
    dir.write(&text.replace("control_socket = \"x\"\n", ""));
    // No runtime directory: the temporary directory (here the test's own,
    // world-writable like /tmp) gets a private directory of Fulcrum's.
    let tmp = dir.dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (path, tmp_dir) = (dir.path.clone(), tmp.clone());
    let run = move |takeover: bool| {
        let mut command = Command::new(fulcrum_bin());
        command
            .args(["run", "-c"])
            .arg(&path)
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("XDG_RUNTIME_DIR")
            .env("TMPDIR", &tmp_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if takeover {
            command.arg("--takeover");
        }
        let mut child = command.spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        std::thread::spawn(move || lines.for_each(drop));
        (child, first)
    };
    let again = run.clone();
    let (old, first) = tokio::task::spawn_blocking(move || run(false)).await.unwrap();
    assert!(first.starts_with("frontend "), "{first}");
    let private = tmp.join(format!("fulcrum-{}", rustix::process::geteuid().as_raw()));
    let meta = std::fs::metadata(&private).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700, "{}", private.display());
    let sockets: Vec<_> = std::fs::read_dir(&private).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    let name = sockets[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with("fulcrum-") && name.ends_with(".sock") && name.len() == "fulcrum-.sock".len() + 16,
        "{name}"
    );
    assert_eq!(std::fs::metadata(&sockets[0]).unwrap().mode() & 0o777, 0o600);
    // The same default path is found again by a takeover.
    let mut old = old;
    let (new, first) = tokio::task::spawn_blocking(move || again(true)).await.unwrap();
    assert!(first.starts_with("frontend "), "{first}");
    assert_eq!(exit_of(&mut old, Duration::from_secs(10)).await, Some(0));
    kill_all([new]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_and_an_ejected_backend_stay_so_across_a_takeover() {
    let (b0, b2) = (Backend::start("b0", "127.0.0.1").await, Backend::start("b2", "127.0.0.1").await);
    // Nothing listens there: its connects fail, passive health ejects it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let udp_backend = UdpBackend::start("u0", "127.0.0.1").await;
    let dir = ConfigFile::new("takeover-health", "");
    let control = dir.dir.join("control.sock");
    let text = config_text(b0.addr, udp_backend.addr, &control, "stock:round-robin")
        .replace(
            &format!("backends = [ {{ address = \"{}\" }} ]\n", b0.addr),
            &format!(
                "backends = [ {{ address = \"{}\" }}, {{ address = \"{dead}\" }}, {{ address = \"{}\" }} ]\n\
                 passive = {{ failures = 3, backoff = \"120s\" }}\n",
                b0.addr, b2.addr
            ),
        )
        .replace("[runtime]\n", "[admin]\nlisten = \"127.0.0.1:0\"\n\n[runtime]\n");
    dir.write(&text);
    let path = dir.path.clone();
    let (old, addrs) =
        tokio::task::spawn_blocking(move || start(&path, false, 3, Stdio::null())).await.unwrap().unwrap();
    let (web, api) = (addrs["web"], addrs["admin"]);
    let (code, body) = admin(api, "POST", &format!("/backends/web/{}/drain", b0.addr), None).await;
    assert_eq!(code, 200, "{body}");
    // Round robin over b2 and the dead one: every client lands on b2, and the dead one is out.
    for _ in 0..12 {
        assert_eq!(greeting(web, None).await, "b2");
    }
    let backend_of = |status: &serde_json::Value, addr: SocketAddr| {
        let backends =
            status["pools"].as_array().unwrap().iter().find(|p| p["name"] == "web").unwrap()["backends"].clone();
        backends.as_array().unwrap().iter().find(|b| b["address"] == addr.to_string()).unwrap().clone()
    };
    let status = |api| async move {
        let (code, body) = admin(api, "GET", "/status", None).await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let before = status(api).await;
    assert_eq!(backend_of(&before, b0.addr)["state"], "draining", "{before}");
    let ejected = backend_of(&before, dead);
    assert_eq!(ejected["state"], "down", "{ejected}");
    assert!(ejected["reason"].as_str().unwrap().starts_with("passive"), "{ejected}");

    let path = dir.path.clone();
    let (new, addrs) =
        tokio::task::spawn_blocking(move || start(&path, true, 3, Stdio::null())).await.unwrap().unwrap();
    assert_eq!(addrs["web"], web, "the same socket");
    let api = addrs["admin"];
    let after = status(api).await;
    assert_eq!(backend_of(&after, b0.addr)["state"], "draining", "the drain was lost: {after}");
    assert_eq!(backend_of(&after, b0.addr)["reason"], "drained by the admin API", "{after}");
    let still = backend_of(&after, dead);
    assert_eq!(still["state"], "down", "the ejection was lost: {still}");
    assert_eq!(still["reason"], ejected["reason"], "{still}");
    // New flows of the new process: none to the drained backend, none tried on the ejected one.
    for _ in 0..12 {
        assert_eq!(greeting(web, None).await, "b2");
    }
    assert_eq!(
        backend_of(&status(api).await, dead)["connect_failures"],
        0,
        "the new process tried the ejected backend"
    );
    assert_eq!(b0.accepted(), 0, "the drained backend got a flow");
    kill_all([old, new]);
}

/// A UDP backend answering each datagram with `<name>|<source it saw>|` and the datagram.
async fn udp_peer_backend(name: &'static str) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
            let answer = format!("{name}|{peer}|{}", String::from_utf8_lossy(&buf[..n]));
            let _ = socket.send_to(answer.as_bytes(), peer).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_keep_their_backend_and_source_port_across_ten_takeovers() {
    let backend = Backend::start("b0", "127.0.0.1").await;
    let (u0, u1) = (udp_peer_backend("u0").await, udp_peer_backend("u1").await);
    let dir = ConfigFile::new("takeover-udp-flows", "");
    let control = dir.dir.join("control.sock");
    let text = config_text(backend.addr, u0, &control, "stock:round-robin").replace(
        &format!("backends = [ {{ address = \"{u0}\" }} ]\n"),
        &format!(
            "balancer = \"stock:round-robin\"\nbackends = [ {{ address = \"{u0}\" }}, {{ address = \"{u1}\" }} ]\n"
        ),
    );
    dir.write(&text);
    let first = fulcrum(&dir.path, false).unwrap();
    let dns = first.dns;
    // Clients sending every 50 ms; each reply names the backend and the source it saw.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
        clients.push(tokio::spawn(async move {
            let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
            socket.connect(dns).await.unwrap();
            let receiver = {
                let socket = Arc::clone(&socket);
                tokio::spawn(async move {
                    let (mut seen, mut seqs) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
                    let mut buf = [0u8; 2048];
                    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await {
                        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let mut parts = answer.splitn(3, '|');
                        let (name, peer, seq) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
                        seen.insert(format!("{name} from {peer}"));
                        seqs.insert(seq.parse::<u64>().unwrap());
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    (seen, seqs)
                })
            };
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = socket.send(sent.to_string().as_bytes()).await;
                sent += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (seen, seqs) = receiver.await.unwrap();
            (sent, seen, seqs)
        }));
    }
    let mut processes = vec![first.child];
    for _ in 0..10 {
        let before = answered.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(10), "answers", || answered.load(Ordering::Relaxed) >= before + 40).await;
        let path = dir.path.clone();
        let next = tokio::task::spawn_blocking(move || fulcrum(&path, true)).await.unwrap().unwrap();
        assert_eq!(next.dns, dns);
        // The old process handed its UDP flows over: nothing keeps it.
        let mut old = processes.pop().unwrap();
        assert_eq!(exit_of(&mut old, Duration::from_secs(10)).await, Some(0), "the old process kept flows");
        processes.push(next.child);
    }
    let before = answered.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "answers", || answered.load(Ordering::Relaxed) >= before + 40).await;
    stop.store(true, Ordering::Relaxed);
    let mut lost_total = 0;
    for client in clients {
        let (sent, seen, seqs) = client.await.unwrap();
        let lost = sent - seqs.len() as u64;
        lost_total += lost;
        assert_eq!(seen.len(), 1, "a flow changed backend or source port: {seen:?}");
        assert!(lost <= 10, "{lost} of {sent} datagrams lost over 10 takeovers");
    }
    eprintln!("10 takeovers, 8 UDP clients every 50 ms: {lost_total} datagrams lost in all");
    kill_all(processes);
}

/// The README's systemd upgrade command: its `--property=` settings and the
/// command it runs.
fn upgrade_recipe() -> (std::collections::HashMap<String, String>, Vec<String>) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("systemd-run --unit fulcrum-next").expect("the README has no systemd upgrade recipe");
    let end = start + readme[start..].find("\n```").unwrap();
    let line = readme[start..end].replace("\\\n", " ");
    let mut properties = std::collections::HashMap::new();
    let mut command = Vec::new();
    for word in line.split_whitespace().skip(3) {
        match word.strip_prefix("--property=").and_then(|p| p.split_once('=')) {
            Some((key, value)) if command.is_empty() => {
                properties.insert(key.to_owned(), value.to_owned());
            }
            _ => command.push(word.to_owned()),
        }
    }
    (properties, command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_upgrade_recipe_takes_over_and_can_be_run_again() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fulcrum.service")).unwrap();
    let setting =
        |key: &str| unit.lines().rev().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(str::to_owned);
    let (properties, recipe) = upgrade_recipe();
    // The new unit runs as the old one's user, with its runtime directory.
    for key in ["DynamicUser", "User", "RuntimeDirectory", "AmbientCapabilities"] {
        assert_eq!(properties.get(key), setting(key).as_ref(), "the recipe's {key} is not the unit's");
    }
    let exec_start: Vec<String> = setting("ExecStart").unwrap().split_whitespace().map(str::to_owned).collect();

    // What systemd gives both units: one uid (the same User= of a dynamic
    // user), the runtime directory made for it (0755, its own) in
    // $RUNTIME_DIRECTORY; when a unit stops, the directory goes unless
    // RuntimeDirectoryPreserve=yes.
    let backend = Backend::start("b0", "127.0.0.1").await;
    let udp_backend = UdpBackend::start("u0", "127.0.0.1").await;
    let dir = ConfigFile::new("takeover-systemd", "");
    let text = config_text(backend.addr, udp_backend.addr, std::path::Path::new("unused"), "stock:round-robin");
    let text: String = text.lines().filter(|l| !l.starts_with("control_socket")).map(|l| format!("{l}\n")).collect();
    dir.write(&text);
    let runtime_dir = dir.dir.join("run").join(setting("RuntimeDirectory").unwrap());
    let uid = 65534;
    let make_runtime_dir = || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&runtime_dir).unwrap();
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&runtime_dir, Some(uid), Some(uid)).unwrap();
    };
    let unit_stopped = |runtime_dir: &std::path::Path| {
        if setting("RuntimeDirectoryPreserve").as_deref() != Some("yes") {
            let _ = std::fs::remove_dir_all(runtime_dir);
        }
    };
    let run = |words: &[String]| {
        use std::os::unix::process::CommandExt;
        let words: Vec<String> = words
            .iter()
            .map(|w| match w.as_str() {
                "/usr/local/bin/fulcrum" => fulcrum_bin().display().to_string(),
                "/etc/fulcrum/fulcrum.toml" => dir.path.display().to_string(),
                _ => w.clone(),
            })
            .collect();
        let mut command = Command::new(&words[0]);
        command.args(&words[1..]).uid(uid).gid(uid).env("RUNTIME_DIRECTORY", &runtime_dir).stderr(Stdio::null());
        start_command(command, 2)
    };

    make_runtime_dir();
    let (mut old, addrs) = run(&exec_start).unwrap_or_else(|c| panic!("the unit's ExecStart exited {c}"));
    let web = addrs["web"];
    assert!(one_connection(web).await);
    for round in 0..2 {
        // The recipe (a second time: from the unit the first one started).
        make_runtime_dir();
        let (new, addrs) = run(&recipe).unwrap_or_else(|c| panic!("round {round}: the recipe's takeover exited {c}"));
        assert_eq!(addrs["web"], web, "round {round}: not the same socket");
        assert_eq!(exit_of(&mut old, Duration::from_secs(10)).await, Some(0), "round {round}: the old unit went on");
        unit_stopped(&runtime_dir);
        assert!(one_connection(web).await, "round {round}: nothing serves");
        old = new;
    }
    kill_all([old]);
}
