//! Fulcrum as a process (`fulcrum run`, `--takeover`) for the tests that
//! drive the binary: start it and read its listeners, wait for its exit,
//! signal it, and the config of the takeover tests.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::fulcrum_bin;

/// A `fulcrum run` with frontends `web` (TCP) and `dns` (UDP).
pub struct Fulcrum {
    pub child: Child,
    pub web: SocketAddr,
    pub dns: SocketAddr,
}

/// Starts `fulcrum run -c <file> [--takeover]`; returns once it serves (it
/// prints its listeners then).
pub fn fulcrum(file: &std::path::Path, takeover: bool) -> Result<Fulcrum, i32> {
    let (child, addrs) = start(file, takeover, 2, Stdio::null())?;
    match (addrs.get("web"), addrs.get("dns")) {
        (Some(&web), Some(&dns)) => Ok(Fulcrum { child, web, dns }),
        _ => panic!("no web and dns frontends: {addrs:?}"),
    }
}

/// Starts `fulcrum run -c <file> [--takeover]` with its stderr to `stderr`;
/// returns it once it printed its `frontends` listeners (the admin API's
/// counts as one, named `admin`), with their addresses by name, or its exit
/// code when it printed fewer.
pub fn start(
    file: &std::path::Path,
    takeover: bool,
    frontends: usize,
    stderr: Stdio,
) -> Result<(Child, std::collections::HashMap<String, SocketAddr>), i32> {
    let mut command = Command::new(fulcrum_bin());
    command.args(["run", "-c"]).arg(file).stderr(stderr);
    if takeover {
        command.arg("--takeover");
    }
    start_command(command, frontends)
}

/// Runs `command` (a `fulcrum run`) with its stdout piped; as [`start`].
pub fn start_command(
    mut command: Command,
    frontends: usize,
) -> Result<(Child, std::collections::HashMap<String, SocketAddr>), i32> {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addrs = std::collections::HashMap::new();
    for line in lines.by_ref().take(frontends) {
        let line = line.unwrap();
        if let Some(admin) = line.strip_prefix("admin API on http://") {
            addrs.insert("admin".to_owned(), admin.trim_end_matches('/').parse::<SocketAddr>().unwrap());
            continue;
        }
        let mut words = line.split(' ');
        let (Some(name), Some(addr)) = (words.nth(1), words.next_back()) else { continue };
        addrs.insert(name.to_owned(), addr.parse::<SocketAddr>().unwrap());
    }
    std::thread::spawn(move || lines.for_each(drop));
    if addrs.len() == frontends { Ok((child, addrs)) } else { Err(child.wait().unwrap().code().unwrap_or(-1)) }
}

pub fn config_text(tcp: SocketAddr, udp: SocketAddr, control: &std::path::Path, balancer: &str) -> String {
    format!(
        r#"
[runtime]
workers = 2
watch = false
shutdown_grace = "60s"
control_socket = "{}"

[[frontend]]
name = "web"
listen = "127.0.0.1:0"
pool = "web"

[[frontend]]
name = "dns"
listen = "127.0.0.1:0"
protocol = "udp"
pool = "dns"

[[pool]]
name = "web"
balancer = "{balancer}"
backends = [ {{ address = "{tcp}" }} ]

[[pool]]
name = "dns"
backends = [ {{ address = "{udp}" }} ]
"#,
        control.display()
    )
}

/// Connects and reads the backend's greeting; `false` on any failure.
pub async fn one_connection(addr: SocketAddr) -> bool {
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await else {
        return false;
    };
    let mut greeting = [0u8; 3];
    matches!(tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut greeting)).await, Ok(Ok(_)))
        && &greeting == b"b0\n"
}

/// Waits for `child` to exit (at most `limit`); its exit code.
pub async fn exit_of(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn signal(child: &Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let _ = rustix::process::kill_process(pid, signal);
}

/// Runs `command` to its end, at most 20 s (killed past that: a failure).
pub fn finish(command: &mut Command) -> std::process::Output {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after 20 s: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

pub fn kill_all(children: impl IntoIterator<Item = Child>) {
    for mut c in children {
        // Clean-up, not under test.
        let _ = c.kill();
        let _ = c.wait();
    }
}
