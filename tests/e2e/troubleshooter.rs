//! The troubleshooter: each trap built on loopback, seen in `GET /diagnose`
//! (with the right backend or frontend) and in `fulcrum diagnose`'s output
//! and exit code; a healthy setup has no findings.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fulcrum_sdk::BackendState::{Down, Up};
use fulcrum_tests::probe_target::{self, Mode};
use fulcrum_tests::*;
use rcgen::{CertificateParams, KeyPair};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);
const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

/// Asserts the finding is in the API's answer and the CLI's, with the same
/// severity; returns the API's.
fn seen(api: &Value, cli: &Value, kind: &str, backend: Option<SocketAddr>) -> Value {
    let found = finding(api, kind, backend).unwrap_or_else(|| panic!("no {kind} for {backend:?} in {api:#}")).clone();
    let by_cli =
        finding(cli, kind, backend).unwrap_or_else(|| panic!("no {kind} for {backend:?} from the CLI: {cli:#}"));
    assert_eq!(found["severity"], by_cli["severity"]);
    for key in ["summary", "fix"] {
        assert!(!found[key].as_str().unwrap().is_empty(), "{key} empty: {found:#}");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_setup_has_no_findings() {
    let b = backends(3, "127.0.0.1").await;
    let server = serve(&(config(2, "stock:round-robin", &backend_list(&b, None), "", "") + ADMIN));
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..30 {
        greeting(addr, None).await;
    }
    let admin_addr = server.admin_addr().unwrap();
    let api = diagnose(admin_addr).await;
    assert_eq!(api["findings"], serde_json::json!([]), "{api:#}");
    let (code, cli, text) = diagnose_cli(admin_addr);
    assert_eq!((code, &cli["findings"]), (0, &serde_json::json!([])));
    assert!(text.starts_with("No findings."), "{text}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_passes_but_the_data_port_refuses() {
    // B14: probes on their own port pass; backend 0's data port refuses.
    let ips: Vec<IpAddr> = vec!["127.0.0.141".parse().unwrap(), "127.0.0.142".parse().unwrap()];
    let (port, _controls) = probe_target::start_many(&ips).await;
    let dead = std::net::TcpListener::bind("127.0.0.141:0").unwrap().local_addr().unwrap();
    let live = Backend::start("b1", "127.0.0.142").await;
    let list = format!("[ {{ address = \"{dead}\" }}, {{ address = \"{}\" }} ]", live.addr);
    let probe = format!(
        "[pool.probe]\nprotocol = \"http\"\nport = {port}\npath = \"/health\"\ninterval = \"100ms\"\nthreshold = 1\n[pool.passive]\nfailures = 3\n"
    );
    let server = serve(&(config(1, "stock:round-robin", &list, "", &probe) + ADMIN));
    wait_state(&server, 0, Up, WAIT).await;
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..10 {
        assert_eq!(greeting(addr, None).await, "b1");
    }
    let admin_addr = server.admin_addr().unwrap();
    let api = diagnose(admin_addr).await;
    let (code, cli, text) = diagnose_cli(admin_addr);
    let f = seen(&api, &cli, "probe_passes_data_fails", Some(dead));
    assert_eq!(f["severity"], "error");
    assert_eq!(f["pool"], "web");
    let evidence = f["evidence"].to_string();
    assert!(evidence.contains("last probe: ok") && evidence.contains("failed connects"), "{evidence}");
    assert!(finding(&api, "probe_passes_data_fails", Some(live.addr)).is_none(), "the serving backend is fine");
    assert_eq!(code, 1, "an error finding: exit 1\n{text}");
    assert!(text.contains(&format!("ERROR probe_passes_data_fails [pool web, backend {dead}]")), "{text}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_are_backends_of_the_pool_are_hairpins() {
    // B15: the frontend on 127.0.0.1, backends on .151 and .152; a client on .151.
    let b0 = Backend::start("b0", "127.0.0.151").await;
    let b1 = Backend::start("b1", "127.0.0.152").await;
    let list = backend_list(&[b0, b1], None);
    let server = serve(&(config(1, "stock:round-robin", &list, "", "") + ADMIN));
    let addr = server.frontend_addr("web").unwrap();
    for _ in 0..4 {
        let name = greeting(addr, Some("127.0.0.151:0".parse().unwrap())).await;
        assert_eq!(name, "b1", "never balanced back to itself");
    }
    greeting(addr, None).await; // the balancer's own host is no hairpin
    let admin_addr = server.admin_addr().unwrap();
    let b0_addr: SocketAddr = list.split('"').nth(1).unwrap().parse().unwrap();
    let api = diagnose(admin_addr).await;
    let (code, cli, _) = diagnose_cli(admin_addr);
    let f = seen(&api, &cli, "hairpin_clients", Some(b0_addr));
    assert_eq!(f["severity"], "warning");
    assert!(f["summary"].as_str().unwrap().starts_with("4 flows"), "{f:#}");
    assert_eq!(api["findings"].as_array().unwrap().len(), 1, "{api:#}");
    assert_eq!(code, 0, "warnings only: exit 0");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_down_with_a_silent_probe_and_a_refused_one() {
    // Backend 0 accepts the probe and never answers (a silent drop); nothing
    // listens on backend 1's port (refused). Every backend is down.
    let (silent, control) = probe_target::start("127.0.0.1".parse().unwrap(), 0).await.unwrap();
    control.set_mode(Mode::Hang);
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let list = format!("[ {{ address = \"{silent}\" }}, {{ address = \"{refused}\" }} ]");
    let probe =
        "[pool.probe]\nprotocol = \"http\"\npath = \"/\"\ninterval = \"150ms\"\ntimeout = \"100ms\"\nthreshold = 1\n";
    let server = serve(&(config(1, "stock:round-robin", &list, "", probe) + ADMIN));
    wait_state(&server, 0, Down, WAIT).await;
    wait_state(&server, 1, Down, WAIT).await;
    let admin_addr = server.admin_addr().unwrap();
    let api = diagnose(admin_addr).await;
    let (code, cli, text) = diagnose_cli(admin_addr);
    let all = seen(&api, &cli, "all_backends_down", None);
    assert_eq!((all["severity"].as_str(), all["pool"].as_str()), (Some("error"), Some("web")));
    assert_eq!(all["evidence"].as_array().unwrap().len(), 2);
    let timeout = seen(&api, &cli, "probe_timeout", Some(silent));
    assert!(timeout["summary"].as_str().unwrap().contains("no answer"), "{timeout:#}");
    seen(&api, &cli, "probe_refused", Some(refused));
    assert!(
        finding(&api, "probe_timeout", Some(refused)).is_none()
            && finding(&api, "probe_refused", Some(silent)).is_none()
    );
    assert_eq!(api["findings"][0]["severity"], "error", "errors first");
    assert_eq!(code, 1, "{text}");
    server.shutdown();
}

/// An HTTPS server on 127.0.0.1 with a self-signed certificate valid for
/// `days` more days.
async fn https_backend(days: i64) -> SocketAddr {
    let mut params = CertificateParams::new(vec!["backend.test".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    let expires = std::time::SystemTime::now() + Duration::from_secs((days * 86_400) as u64);
    params.not_after = expires.into();
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    https_server(cert.der().clone(), key.serialize_der()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_certificates_that_expire_soon_or_fail_verification() {
    let soon = https_backend(5).await;
    let later = https_backend(90).await;
    let probe = |verify: bool| {
        format!(
            "[pool.probe]\nprotocol = \"https\"\npath = \"/\"\ninterval = \"150ms\"\nthreshold = 1\ntls_verify = {verify}\n"
        )
    };
    let text = format!(
        "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\npool = \"web\"\n\
         [[frontend]]\nname = \"strict\"\nlisten = \"127.0.0.1:0\"\npool = \"strict\"\n\
         [[pool]]\nname = \"web\"\nbackends = [ {{ address = \"{soon}\" }}, {{ address = \"{later}\" }} ]\n{}\
         [[pool]]\nname = \"strict\"\nbackends = [ {{ address = \"{later}\" }} ]\n{}{ADMIN}",
        probe(false),
        probe(true)
    );
    let server = serve(&text);
    wait_state(&server, 0, Up, WAIT).await;
    wait_state(&server, 1, Up, WAIT).await;
    let strict = server.pool("strict").unwrap();
    wait_until(WAIT, "the strict pool's backend down", || strict.load().backends[0].state == Down).await;
    let admin_addr = server.admin_addr().unwrap();
    let api = diagnose(admin_addr).await;
    let (code, cli, _) = diagnose_cli(admin_addr);
    let expiring = seen(&api, &cli, "certificate_expiring", Some(soon));
    assert_eq!(expiring["severity"], "warning");
    let summary = expiring["summary"].as_str().unwrap();
    assert!(summary.contains("expires in 4 days") || summary.contains("expires in 5 days"), "{summary}");
    assert!(
        api["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["kind"] != "certificate_expiring" || f["backend"] != later.to_string()),
        "a certificate good for 90 days is no finding: {api:#}"
    );
    // Verified against the system roots, the self-signed one fails.
    let invalid = api["findings"].as_array().unwrap().iter().find(|f| f["kind"] == "certificate_invalid").unwrap();
    assert_eq!(
        (invalid["pool"].as_str(), invalid["backend"].as_str()),
        (Some("strict"), Some(later.to_string().as_str()))
    );
    assert_eq!(code, 1);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_ended_by_idle_timeout_at_a_high_rate() {
    let b = backends(1, "127.0.0.1").await;
    let server =
        serve(&(config(1, "stock:round-robin", &backend_list(&b, None), "idle_timeout = \"100ms\"", "") + ADMIN));
    let addr = server.frontend_addr("web").unwrap();
    // Clients that keep their connections open and quiet, like a keep-alive
    // longer than the idle timeout.
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(connect(addr, None).await);
    }
    let flows = server.flows("web").unwrap();
    wait_until(WAIT, "12 idle timeouts", || flows.closed(fulcrum::flow::CloseReason::IdleTimeout) == 12).await;
    let admin_addr = server.admin_addr().unwrap();
    let api = diagnose(admin_addr).await;
    let (code, cli, _) = diagnose_cli(admin_addr);
    let f = seen(&api, &cli, "idle_timeouts_high", None);
    assert_eq!((f["frontend"].as_str(), f["severity"].as_str()), (Some("web"), Some("warning")));
    assert!(f["summary"].as_str().unwrap().starts_with("12 of 12 flows"), "{f:#}");
    assert!(f["fix"].as_str().unwrap().contains("100ms"), "{f:#}");
    assert_eq!(code, 0);
    server.shutdown();
}

/// An HTTP endpoint that answers like a proxy in front of other hosts: 200
/// with a `Via` header (an appliance's).
async fn appliance() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nvia: 1.1 appliance-7\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_answered_by_a_proxy_is_seen() {
    let b = Backend::start("b0", "127.0.0.1").await;
    let via = appliance().await;
    let probe = format!(
        "[pool.probe]\nprotocol = \"http\"\nport = {}\npath = \"/\"\ninterval = \"150ms\"\nthreshold = 1\n",
        via.port()
    );
    let server =
        serve(&(config(1, "stock:round-robin", &backend_list(std::slice::from_ref(&b), None), "", &probe) + ADMIN));
    wait_state(&server, 0, Up, WAIT).await;
    let admin_addr = server.admin_addr().unwrap();
    let api = diagnose(admin_addr).await;
    let (code, cli, _) = diagnose_cli(admin_addr);
    let f = seen(&api, &cli, "probe_through_proxy", Some(b.addr));
    assert!(f["summary"].as_str().unwrap().contains("appliance-7"), "{f:#}");
    assert_eq!(code, 0);
    // What cannot be seen is listed as a check to make.
    assert!(api["checks"][0].as_str().unwrap().contains("appliance"));
    server.shutdown();
}

/// Every string in `value` is free of control characters and of the
/// Unicode controls that reorder text.
fn assert_inert(value: &Value, what: &str) {
    match value {
        Value::String(s) => assert!(
            !s.chars().any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
            "{what}: a raw control character in {s:?}"
        ),
        Value::Array(items) => items.iter().for_each(|v| assert_inert(v, what)),
        Value::Object(map) => map.values().for_each(|v| assert_inert(v, what)),
        _ => {}
    }
}

/// Issue 20: a health plugin's verdict reason with terminal escapes,
/// newlines and a forged log line is shown inert by `/status`, `/diagnose`,
/// `fulcrum diagnose` and the process log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_verdict_reason_is_shown_inert_everywhere() {
    let b = Backend::start("b0", "127.0.0.1").await;
    let probe = format!(
        "[pool.probe]\nprotocol = \"tcp\"\ninterval = \"100ms\"\nthreshold = 1\nhealth = \"{}\"\nhealth_config = {{ mode = \"hostile-reason\" }}\n",
        plugins::HEALTH_TRAP_PATH
    );
    let file = ConfigFile::new(
        "hostile-reason",
        &(config(1, "stock:round-robin", &backend_list(std::slice::from_ref(&b), None), "", &probe) + ADMIN),
    );
    let log = file.dir.join("stderr.log");
    let mut child = std::process::Command::new(fulcrum_bin())
        .args(["run", "-c"])
        .arg(&file.path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let admin_addr: SocketAddr = std::io::BufRead::lines(stdout)
        .map(Result::unwrap)
        .find_map(|l| l.strip_prefix("admin API on http://").map(|a| a.trim_end_matches('/').parse().unwrap()))
        .unwrap();
    let mut status = Value::Null;
    for _ in 0..200 {
        let (_, body) = admin(admin_addr, "GET", "/status", None).await;
        status = serde_json::from_str(&body).unwrap();
        if status.to_string().contains("forged line") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(status.to_string().contains("forged line"), "the verdict never showed: {status:#}");
    assert_inert(&status, "/status");
    let api = diagnose(admin_addr).await;
    assert!(api.to_string().contains("forged line"), "{api:#}");
    assert_inert(&api, "/diagnose");
    let (code, cli, text) = diagnose_cli(admin_addr);
    assert_eq!(code, 1, "every backend is down: an error\n{text}");
    assert_inert(&cli, "fulcrum diagnose --json");
    assert!(text.contains("forged line"), "{text}");
    assert!(!text.chars().any(|c| c.is_control() && c != '\n' || c == '\u{202e}'), "fulcrum diagnose: {text:?}");
    assert!(!text.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")), "a forged line in the output: {text}");
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("forged line"), "the reason was not logged: {logged}");
    for raw in ["\u{1b}[2J", "\u{1b}[31mred", "\r\n", "\u{7}", "\u{202e}"] {
        assert!(!logged.contains(raw), "the log holds {raw:?} raw: {logged}");
    }
    assert!(!logged.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")), "a forged log line: {logged}");
    drop(b);
}
