//! Edge hardening (R7, R8): the admin API refuses cross-site and token-less
//! mutations, drops slow clients, caps its connections and never opens on a
//! reload; `fulcrum check` refuses out-of-range values and oversized files.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fulcrum_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn with_admin(text: &str, admin: &str) -> String {
    text.replace("[runtime]\n", &format!("[admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n\n[runtime]\n"))
}

fn drain_path(b: &Backend) -> String {
    format!("/backends/web/{}/drain", b.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_and_foreign_host_requests_are_refused_without_a_token() {
    let b = backends(1, "127.0.0.1").await;
    let server = serve(&with_admin(&config(1, "stock:round-robin", &backend_list(&b, None), "", ""), ""));
    let api = server.admin_addr().unwrap();
    let path = drain_path(&b[0]);
    // A web page of another origin (a form POST, or fetch) cannot drain.
    let evil = format!("host: {api}\r\norigin: http://evil.example\r\n");
    assert_eq!(admin_with(api, "POST", &path, &evil).await.0, 403);
    assert_eq!(admin_with(api, "POST", "/reload", &evil).await.0, 403);
    let cross = format!("host: {api}\r\nsec-fetch-site: cross-site\r\n");
    assert_eq!(admin_with(api, "POST", &path, &cross).await.0, 403);
    assert_eq!(admin_with(api, "POST", &path, &format!("host: {api}\r\norigin: null\r\n")).await.0, 403);
    // DNS rebinding: a foreign name resolving to 127.0.0.1 is not this API.
    assert_eq!(admin_with(api, "GET", "/status", "host: evil.example\r\n").await.0, 403);
    assert_eq!(admin_with(api, "POST", &path, &format!("host: evil.example:{}\r\n", api.port())).await.0, 403);
    assert_eq!(server.pool("web").unwrap().load().backends[0].state, fulcrum_sdk::BackendState::Up);
    // Same origin, or a non-browser client on loopback: served.
    let same = format!("host: localhost:{}\r\norigin: http://localhost:{}\r\n", api.port(), api.port());
    assert_eq!(admin_with(api, "POST", &path, &same).await.0, 200);
    assert_eq!(admin(api, "POST", &path.replace("drain", "undrain"), None).await.0, 200);
    assert_eq!(admin_with(api, "GET", "/status", &format!("host: {api}\r\n")).await.0, 200);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_a_mutation_without_it_is_forbidden() {
    let b = backends(1, "127.0.0.1").await;
    let server =
        serve(&with_admin(&config(1, "stock:round-robin", &backend_list(&b, None), "", ""), "token = \"t0ken\""));
    let api = server.admin_addr().unwrap();
    let path = drain_path(&b[0]);
    assert_eq!(admin(api, "POST", &path, None).await.0, 403);
    assert_eq!(admin(api, "POST", "/reload", Some("wrong")).await.0, 403);
    assert_eq!(admin(api, "GET", "/status", None).await.0, 401);
    // Even with the token, a cross-site request is refused.
    let evil = format!("host: {api}\r\norigin: http://evil.example\r\nauthorization: Bearer t0ken\r\n");
    assert_eq!(admin_with(api, "POST", &path, &evil).await.0, 403);
    assert_eq!(admin(api, "POST", &path, Some("t0ken")).await.0, 200);
    // The token is never shown.
    assert!(!format!("{:?}", server.state().config).contains("t0ken"));
    server.shutdown();
}

/// Reads until the server closes the connection; how long that took.
async fn closed_after(mut stream: TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the admin API kept a slow client for {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_admin_clients_are_dropped_and_connections_capped() {
    let b = backends(1, "127.0.0.1").await;
    let server = serve(&with_admin(&config(1, "stock:round-robin", &backend_list(&b, None), "", ""), ""));
    let api = server.admin_addr().unwrap();
    // A client that never finishes its headers (slowloris), and one that sends nothing.
    let mut slow = TcpStream::connect(api).await.unwrap();
    slow.write_all(b"GET /status HTTP/1.1\r\nhost: 127").await.unwrap();
    let silent = TcpStream::connect(api).await.unwrap();
    let (a, b2) =
        tokio::join!(closed_after(slow, Duration::from_secs(15)), closed_after(silent, Duration::from_secs(15)));
    assert!(a >= Duration::from_secs(4) && b2 >= Duration::from_secs(4), "dropped too early: {a:?} {b2:?}");

    // The cap: 64 silent connections hold every slot; the next request waits
    // for them to time out instead of costing more memory, then is served.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(TcpStream::connect(api).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let (code, _) = admin(api, "GET", "/status", None).await;
    assert_eq!(code, 200);
    assert!(start.elapsed() >= Duration::from_secs(3), "served past the connection cap: {:?}", start.elapsed());
    drop(held);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_opens_the_api_and_says_what_needs_a_restart() {
    let b = backends(1, "127.0.0.1").await;
    let base = config(1, "stock:round-robin", &backend_list(&b, None), "", "");
    let file = ConfigFile::new("admin-reload", &with_admin(&base, "token = \"first\""));
    let server = serve_file(&file);
    let api = server.admin_addr().unwrap();
    // The token removed, the address moved: the API stays where it is, closed.
    file.write(&base.replace("[runtime]\n", "[admin]\nlisten = \"127.0.0.1:1\"\n\n[runtime]\n"));
    let result = server.reload().unwrap();
    let notes = result.notes.join("\n");
    assert!(notes.contains("token removed") && notes.contains("listen changed"), "{notes}");
    assert_eq!(admin(api, "GET", "/status", None).await.0, 401);
    assert_eq!(admin(api, "GET", "/status", Some("first")).await.0, 200);
    // A new token applies at once.
    file.write(&with_admin(&base, "token = \"s3cond-token\""));
    server.reload().unwrap();
    assert_eq!(admin(api, "GET", "/status", Some("first")).await.0, 401);
    let (code, status) = admin(api, "GET", "/status", Some("s3cond-token")).await;
    assert_eq!(code, 200);
    assert!(!status.contains("s3cond"), "the token is never shown: {status}");
    server.shutdown();
}

fn check(file: &ConfigFile) -> (bool, String) {
    let out = std::process::Command::new(fulcrum_bin()).args(["check", "-c"]).arg(&file.path).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_refuses_out_of_range_values_with_line_and_key() {
    let base = config(1, "stock:round-robin", "[ { address = \"127.0.0.1:9\" } ]", "", "");
    let file = ConfigFile::new("check-ranges", &base);
    assert!(check(&file).0, "{}", check(&file).1);
    let line_of = |text: &str, key: &str| text.lines().position(|l| l.starts_with(key)).unwrap() + 1;
    for (extra, key) in [
        ("idle_timeout = \"300000000000y\"", "frontend.idle_timeout"),
        ("connect_timeout = \"1y\"", "frontend.connect_timeout"),
        ("max_flows = 99999999999", "frontend.max_flows"),
        ("connect_retries = 4000000000", "frontend.connect_retries"),
    ] {
        let text = base.replace("pool = \"web\"\n", &format!("pool = \"web\"\n{extra}\n"));
        file.write(&text);
        let (ok, stderr) = check(&file);
        let want = format!("fulcrum.toml:{}: key `{key}`", line_of(&text, extra));
        assert!(!ok && stderr.contains(&want) && stderr.contains("out of range"), "{extra}: {stderr}");
    }
    // A huge probe interval, a non-loopback admin without a token.
    for (text, key) in [
        (format!("{base}\n[pool.probe]\nprotocol = \"tcp\"\ninterval = \"9999h\"\n"), "pool.probe.interval"),
        (with_admin(&base, "").replace("127.0.0.1:0", "0.0.0.0:0"), "admin.listen"),
    ] {
        file.write(&text);
        let (ok, stderr) = check(&file);
        assert!(!ok && stderr.contains(&format!("key `{key}`")), "{key}: {stderr}");
    }
}

#[test]
fn check_refuses_an_oversized_file_quickly() {
    let mut text = config(1, "stock:round-robin", "[ { address = \"127.0.0.1:9\" } ]", "", "");
    text.push('#');
    text.push_str(&"x".repeat(64 << 20));
    let file = ConfigFile::new("check-size", &text);
    let (ok, stderr) = check(&file);
    assert!(!ok && stderr.contains("larger than 4 MiB"), "{stderr}");
}
