//! IPv6: frontends, backends and probes on `[::1]`, TCP and UDP; a PROXY
//! header names an IPv6 client; the flow log and `/diagnose` see them.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_sdk::BackendState::{Down, Up};
use fulcrum_tests::probe_target;
use fulcrum_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

fn v6_config(protocol: &str, backends: &str, pool_extra: &str) -> String {
    format!(
        "[runtime]\nworkers = 2\n\n[admin]\nlisten = \"[::1]:0\"\n\n[[frontend]]\nname = \"web\"\nlisten = \"[::1]:0\"\nprotocol = \"{protocol}\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbalancer = \"stock:round-robin\"\nbackends = {backends}\n{pool_extra}\n"
    )
}

/// Connects over IPv6 and reads the greeting.
async fn greet6(frontend: SocketAddr) -> (TcpStream, String) {
    let stream = TcpStream::connect(frontend).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    tokio::time::timeout(WAIT, reader.read_line(&mut name)).await.unwrap().unwrap();
    (reader.into_inner(), name.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_over_ipv6_balances_and_probes_follow_the_backends() {
    let b = backends(3, "::1").await;
    let ips = ["::1".parse().unwrap()];
    let (probe_port, controls) = probe_target::start_many(&ips).await;
    let probe = format!(
        "[pool.probe]\nprotocol = \"http\"\nport = {probe_port}\npath = \"/\"\ninterval = \"100ms\"\nthreshold = 1\n"
    );
    let server = serve(&v6_config("tcp", &backend_list(&b, None), &probe));
    for i in 0..3 {
        wait_state(&server, i, Up, WAIT).await;
    }
    let frontend = server.frontend_addr("web").unwrap();
    assert!(frontend.is_ipv6());
    let mut names = Vec::new();
    for _ in 0..6 {
        let (mut stream, name) = greet6(frontend).await;
        stream.write_all(b"over v6\n").await.unwrap();
        let mut echo = [0u8; 8];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"over v6\n");
        names.push(name);
    }
    assert_strict_turns(&names, 3);
    // The probe over IPv6 takes every backend down when it fails.
    controls[0].set_status(503);
    for i in 0..3 {
        wait_state(&server, i, Down, WAIT).await;
    }
    let last = server.pool("web").unwrap().load().backends[0].stats.last_probe().unwrap();
    assert_eq!((last.outcome, last.status), (fulcrum_sdk::Outcome::HttpStatus, Some(503)));
    // The admin API on [::1] answers, and the troubleshooter names the pool.
    let api = server.admin_addr().unwrap();
    let d = diagnose(api).await;
    assert!(finding(&d, "all_backends_down", None).is_some(), "{d:#}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_over_ipv6_keeps_a_client_on_its_backend() {
    let mut list = Vec::new();
    let mut udp = Vec::new();
    for i in 0..2 {
        let backend = UdpBackend::start(&format!("u{i}"), "::1").await;
        list.push(format!("{{ address = \"{}\" }}", backend.addr));
        udp.push(backend);
    }
    let server = serve(&v6_config("udp", &format!("[ {} ]", list.join(", ")), ""));
    let frontend = server.frontend_addr("web").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for c in 0..4 {
        let client = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
        let (first, _) = udp_ask(&client, frontend, b"q0", WAIT).await.unwrap();
        for q in 1..5 {
            let payload = format!("c{c}q{q}");
            let (name, echoed) = udp_ask(&client, frontend, payload.as_bytes(), WAIT).await.unwrap();
            assert_eq!(
                (name.as_str(), echoed.as_slice()),
                (first.as_str(), payload.as_bytes()),
                "one flow, one backend"
            );
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "new flows rotate over both backends: {seen:?}");
    let flows = server.flows("web").unwrap();
    assert!(flows.sample(10).iter().all(|f| f.key.client.is_ipv6() && f.backend.is_ipv6()));
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_is_named_in_proxy_headers_and_the_flow_log() {
    // A backend that reads the PROXY v1 line Fulcrum sends, then echoes it.
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let backend: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                let _ = reader.read_line(&mut line).await;
                let _ = reader.get_mut().write_all(line.as_bytes()).await;
                let _ = reader.get_mut().shutdown().await;
            });
        }
    });
    let dir = std::env::temp_dir().join(format!("fulcrum-v6-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("flows.jsonl");
    let _ = std::fs::remove_file(&log);
    let text = v6_config("tcp", &format!("[ {{ address = \"{backend}\" }} ]"), "proxy_protocol = \"v1\"").replace(
        "pool = \"web\"\n\n[[pool]]",
        &format!("pool = \"web\"\nflow_log = {:?}\n\n[[pool]]", log.display().to_string()),
    );
    let server = serve(&text);
    let frontend = server.frontend_addr("web").unwrap();
    let mut stream = TcpStream::connect(frontend).await.unwrap();
    let me = stream.local_addr().unwrap();
    let mut line = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut line)).await.unwrap().unwrap();
    assert_eq!(line, format!("PROXY TCP6 ::1 ::1 {} {}\r\n", me.port(), frontend.port()));
    drop(stream);
    wait_until(WAIT, "the flow's log line", || std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() == 1))
        .await;
    let entry: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&log).unwrap().trim()).unwrap();
    assert_eq!(entry["client"], me.to_string());
    assert_eq!(entry["backend"], backend.to_string());
    server.shutdown();
}
