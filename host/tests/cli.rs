//! The `fulcrum` command itself: `check` on good and bad configs, `demo`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn fulcrum() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fulcrum"))
}

const GOOD: &str = r#"[runtime]
workers = 1

[[frontend]]
name = "web"
listen = "127.0.0.1:0"
pool = "web"

[[pool]]
name = "web"
balancer = "stock:round-robin"
backends = [ { address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002" } ]
"#;

/// Writes `text` as a config file in a fresh temporary folder.
fn config_file(test: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fulcrum-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fulcrum.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `fulcrum check` and returns (success, stdout + stderr).
fn check(test: &str, text: &str) -> (bool, String) {
    let path = config_file(test, text);
    let out = fulcrum().arg("check").arg("-c").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_accepts_a_good_config() {
    let (ok, out) = check("good", GOOD);
    assert!(ok, "{out}");
    assert!(out.contains("OK (1 frontends, 1 pools, every plugin loaded)"), "{out}");
}

#[test]
fn check_says_which_wasi_imports_answer_at_once_or_trap() {
    let (ok, out) = check("wasi-notes", GOOD);
    assert!(ok, "{out}");
    // The stock plugins are plain Rust: std's stdio pulls in wasi:io.
    assert!(
        out.contains("pool `web` balancer stock:round-robin: WASI it imports that differs here: wasi:io/poll@")
            && out.contains("(answers at once, traps if it would wait)"),
        "{out}"
    );
}

#[test]
fn check_names_line_and_key_of_each_error() {
    let cases = [
        (
            "unknown-key",
            GOOD.replace("pool = \"web\"\n\n", "pool = \"web\"\ntimeout = \"1s\"\n\n"),
            ":8: key `frontend.timeout`: unknown field",
        ),
        (
            "bad-address",
            GOOD.replace("127.0.0.1:9002", "127.0.0.1"),
            ":12: key `pool.backends.address`: `127.0.0.1` is not an address",
        ),
        (
            "unknown-pool",
            GOOD.replace("pool = \"web\"", "pool = \"api\""),
            ":7: key `frontend.pool`: no pool named `api`",
        ),
        (
            "missing-plugin",
            GOOD.replace("stock:round-robin", "plugins/missing.wasm"),
            ":11: key `pool.balancer`: plugin file",
        ),
        (
            "plugin-refuses-config",
            GOOD.replace(
                "balancer = \"stock:round-robin\"",
                "balancer = \"stock:round-robin\"\nbalancer_config = { bogus = 1 }",
            ),
            ":11: pool `web` key `balancer`: plugin stock:round-robin: refused to start: init: invalid plugin config: unknown field `bogus`",
        ),
        (
            "unknown-stock-plugin",
            GOOD.replace("stock:round-robin", "stock:roulette"),
            ":11: pool `web` key `balancer`: no stock plugin `roulette` here (expected one of: round-robin,",
        ),
    ];
    for (name, text, expected) in cases {
        let (ok, out) = check(name, &text);
        assert!(!ok, "{name}: check passed:\n{out}");
        assert!(out.contains("fulcrum.toml") && out.contains(expected), "{name}: expected {expected:?} in:\n{out}");
    }
}

#[test]
fn check_rejects_a_file_that_is_not_a_plugin() {
    let path = config_file("not-a-plugin", "");
    let bogus = path.with_file_name("bogus.wasm");
    std::fs::write(&bogus, b"not wasm at all").unwrap();
    let (ok, out) = check("not-a-plugin", &GOOD.replace("stock:round-robin", bogus.to_str().unwrap()));
    assert!(!ok, "{out}");
    assert!(
        out.contains(":11: pool `web` key `balancer`: plugin") && out.contains("not a Fulcrum plugin component"),
        "{out}"
    );
}

/// One HTTP/1.0 GET of `url` (`http://host:port/path`); returns the status line and the body.
fn http_get(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    match response.split_once("\r\n\r\n") {
        Some((head, body)) => (head.lines().next().unwrap_or("").to_owned(), body.to_owned()),
        None => panic!("not an HTTP response: {response:?}"),
    }
}

#[test]
fn demo_serves_answers_from_all_three_backends_and_shows_status_and_metrics() {
    let mut child = fulcrum()
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("FULCRUM_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // What it prints: `curl` lines for the balancer, /status, /diagnose and
    // /metrics (in that order), and the dashboard's URL.
    let (mut urls, mut page) = (Vec::new(), None);
    for line in lines.by_ref().map_while(Result::ok) {
        let line = line.trim();
        match line.strip_prefix("curl ") {
            Some(url) => urls.push(url.to_owned()),
            None if line.starts_with("http://") => page = Some(line.to_owned()),
            None => {}
        }
        if urls.len() == 4 {
            break;
        }
    }
    // Keep reading, so that the demo never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let [balancer, status, diagnose, metrics] = urls.as_slice() else { panic!("the demo printed {urls:?}") };
    let page = page.unwrap_or_else(|| panic!("no dashboard URL printed"));
    assert_eq!(format!("{page}status"), *status);
    let (head, body) = http_get(&page);
    assert!(head.contains(" 200 ") && body.contains("<title>"), "{head}");
    let (head, body) = http_get(diagnose);
    assert!(head.contains(" 200 ") && body.contains("\"findings\": []"), "{head}\n{body}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (_, body) = http_get(balancer);
        assert!(body.starts_with("hello from backend-"), "{body:?}");
        seen.insert(body.split_whitespace().nth(2).unwrap().to_owned());
    }
    assert!(status.ends_with("/status") && metrics.ends_with("/metrics"), "{urls:?}");
    let (head, body) = http_get(status);
    assert!(head.contains(" 200 "), "{head}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let backends = json["pools"][0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3, "{body}");
    let flows: u64 = backends.iter().map(|b| b["flows_total"].as_u64().unwrap()).sum();
    assert_eq!(flows, 6, "{body}");
    let (head, body) = http_get(metrics);
    assert!(head.contains(" 200 "), "{head}");
    assert!(body.contains("fulcrum_flows_started_total{frontend=\"demo\"} 6"), "{body}");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// A TCP server that greets every connection with `name\n`.
fn greeter(name: &'static str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.write_all(format!("{name}\n").as_bytes());
        }
    });
    addr
}

fn greeting(addr: &str) -> String {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line.trim().to_owned()
}

#[test]
fn sighup_reloads_the_config() {
    let (one, two) = (greeter("one"), greeter("two"));
    let text = |backend: std::net::SocketAddr, listen: &str| {
        format!(
            "[runtime]\nworkers = 2\nwatch = false\n\n[[frontend]]\nname = \"web\"\nlisten = \"{listen}\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbalancer = \"stock:round-robin\"\nbackends = [ {{ address = \"{backend}\" }} ]\n"
        )
    };
    let path = config_file("sighup", &text(one, "127.0.0.1:0"));
    let mut child =
        fulcrum().arg("run").arg("-c").arg(&path).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("frontend web listening on ").map(str::to_owned))
        .expect("no listening line");
    std::thread::spawn(move || lines.for_each(drop));
    assert_eq!(greeting(&addr), "one");
    std::fs::write(&path, text(two, &addr)).unwrap();
    let sent = std::time::Instant::now();
    let status = Command::new("kill").arg("-HUP").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    while greeting(&addr) != "two" {
        assert!(sent.elapsed() < Duration::from_secs(10), "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("SIGHUP to new policy in effect: {:?}", sent.elapsed());
    let _ = child.kill();
    let _ = child.wait();
}
