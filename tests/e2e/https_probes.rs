//! HTTPS probes (B1): the backend's certificate, issued by a CA made here
//! (rcgen), is trusted when the CA is configured, refused (tls-error) when it
//! is not, and accepted with the explicit opt-out.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_sdk::BackendState::{Down, Up};
use fulcrum_tests::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

/// A CA (PEM) and an HTTPS server on 127.0.0.1 with a certificate it issued.
async fn https_backend() -> (String, SocketAddr) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Fulcrum test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["backend.test".to_owned()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();

    let addr = https_server(cert.der().clone(), key.serialize_der()).await;
    (ca.pem(), addr)
}

/// A pool with one data backend and an HTTPS probe on `probe_port`.
async fn serve_with_probe(probe_port: u16, tls: &str) -> (fulcrum::Server, Backend) {
    let data = Backend::start("b0", "127.0.0.1").await;
    let probe = format!(
        "[pool.probe]\nprotocol = \"https\"\nport = {probe_port}\npath = \"/health\"\ninterval = \"150ms\"\nthreshold = 1\n{tls}\n"
    );
    let server = serve(&config(1, "stock:round-robin", &backend_list(std::slice::from_ref(&data), None), "", &probe));
    (server, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_probe_trusts_the_configured_ca_only() {
    let (ca_pem, addr) = https_backend().await;
    let ca_file = std::env::temp_dir().join(format!("fulcrum-test-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca_pem).unwrap();
    let wait = Duration::from_secs(10);

    let (server, _b) =
        serve_with_probe(addr.port(), &format!("tls_ca_file = {:?}", ca_file.display().to_string())).await;
    wait_state(&server, 0, Up, wait).await;
    server.shutdown();

    let (server, _b) = serve_with_probe(addr.port(), "").await;
    wait_state(&server, 0, Down, wait).await;
    let reason = server.pool("web").unwrap().load().backends[0].reason.clone().unwrap();
    assert!(reason.contains("TLS"), "{reason}");
    server.shutdown();

    let (server, _b) = serve_with_probe(addr.port(), "tls_verify = false").await;
    wait_state(&server, 0, Up, wait).await;
    server.shutdown();

    // The name checked is the configured one: the certificate is not for it.
    let (server, _b) = serve_with_probe(
        addr.port(),
        &format!("tls_ca_file = {:?}\ntls_server_name = \"other.test\"", ca_file.display().to_string()),
    )
    .await;
    wait_state(&server, 0, Down, wait).await;
    server.shutdown();
}
