//! One probe: TCP connect, HTTP GET, or HTTPS GET, bounded by its timeout,
//! reported as an [`Observation`] (outcome, latency, status, headers, the
//! first bytes of the body).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fulcrum_sdk::{Observation, Outcome, ProbeKind};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{ProbeConfig, ProbeProtocol, ProxyProtocol};

/// Bytes of the body handed to the health plugin.
pub const BODY_PREFIX: usize = 1024;
/// Response headers handed to the health plugin (the first ones).
pub const MAX_HEADERS: usize = 16;
const MAX_HEADER_VALUE: usize = 256;

/// Where and how to probe one backend.
#[derive(Clone)]
pub struct ProbeTarget {
    pub addr: SocketAddr,
    pub config: Arc<ProbeConfig>,
    /// `signal` for `[[pool.signal]]`, else the probe's protocol.
    pub kind: ProbeKind,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Sent first on each probe connection: the pool sends its backends a
    /// PROXY header and the probe is of the data port.
    pub proxy_header: Option<Vec<u8>>,
}

/// The PROXY header of a health check (as HAProxy's `check-send-proxy`): v1
/// `UNKNOWN`, v2 `LOCAL`, the forms the spec gives a balancer's own
/// connections, so the backend uses the connection's addresses.
pub fn health_check_header(version: ProxyProtocol) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        ProxyProtocol::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Stream,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap_or_default(),
    }
}

impl std::fmt::Debug for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeTarget").field("addr", &self.addr).field("kind", &self.kind).finish_non_exhaustive()
    }
}

fn observation(kind: ProbeKind, outcome: Outcome) -> Observation {
    Observation { kind, outcome, latency_us: 0, status: None, headers: Vec::new(), body: Vec::new() }
}

/// An I/O error as a probe outcome.
fn outcome_of(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Refused,
        io::ErrorKind::TimedOut => Outcome::Timeout,
        _ => Outcome::Reset,
    }
}

/// What one probe saw: the observation for the health plugin, and for the
/// troubleshooter what the plugin is not shown.
#[derive(Clone, Debug)]
pub struct Probed {
    pub observation: Observation,
    /// HTTPS: when the backend's certificate expires (Unix seconds).
    pub certificate_expires_at: Option<i64>,
}

/// Runs one probe; never longer than its timeout.
pub async fn probe(target: &ProbeTarget) -> Probed {
    let start = Instant::now();
    let mut seen = match tokio::time::timeout(target.config.timeout, run(target)).await {
        Ok(seen) => seen,
        Err(_) => Probed { observation: observation(target.kind, Outcome::Timeout), certificate_expires_at: None },
    };
    seen.observation.latency_us = start.elapsed().as_micros() as u64;
    seen
}

async fn run(target: &ProbeTarget) -> Probed {
    let only = |observation| Probed { observation, certificate_expires_at: None };
    let mut stream = match TcpStream::connect(target.addr).await {
        Ok(stream) => stream,
        Err(e) => return only(observation(target.kind, outcome_of(&e))),
    };
    let _ = stream.set_nodelay(true);
    if let Some(header) = &target.proxy_header
        && let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut stream, header).await
    {
        return only(observation(target.kind, outcome_of(&e)));
    }
    match (&target.config.protocol, &target.tls) {
        (ProbeProtocol::Tcp, _) => only(observation(target.kind, Outcome::Ok)),
        (ProbeProtocol::Https, Some((connector, name))) => match connector.connect(name.clone(), stream).await {
            Ok(tls) => {
                let expires = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|der| {
                    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                    Some(cert.validity().not_after.timestamp())
                });
                Probed { observation: http_get(tls, target).await, certificate_expires_at: expires }
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => only(observation(target.kind, Outcome::TlsError)),
            Err(e) => only(observation(target.kind, outcome_of(&e))),
        },
        _ => only(http_get(stream, target).await),
    }
}

/// GET the probe's path over an established connection.
async fn http_get<S>(io: S, target: &ProbeTarget) -> Observation
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e: hyper::Error| {
        let io_error = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<io::Error>());
        observation(target.kind, io_error.map_or(Outcome::Reset, outcome_of))
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(pair) => pair,
        Err(e) => return failed(e),
    };
    let host = target.config.host.clone().unwrap_or_else(|| target.addr.to_string());
    let request = Request::get(target.config.path.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "fulcrum-probe")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new());
    let Ok(request) = request else {
        return observation(target.kind, Outcome::Reset);
    };
    let exchange = async {
        let response = sender.send_request(request).await.map_err(failed)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .take(MAX_HEADERS)
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes());
                (name.as_str().to_owned(), value.chars().take(MAX_HEADER_VALUE).collect())
            })
            .collect();
        let mut body = Vec::new();
        let mut incoming = response.into_body();
        while body.len() < BODY_PREFIX {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        body.extend_from_slice(&data[..data.len().min(BODY_PREFIX - body.len())]);
                    }
                }
                // A body cut short still had its status: judge that.
                Some(Err(_)) | None => break,
            }
        }
        let outcome = if status == 200 { Outcome::Ok } else { Outcome::HttpStatus };
        Ok::<_, Observation>(Observation {
            kind: target.kind,
            outcome,
            latency_us: 0,
            status: Some(status),
            headers,
            body,
        })
    };
    // The connection is driven by its own task, ended with the probe (also
    // when the probe's timeout drops this future).
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    exchange.await.unwrap_or_else(|failed| failed)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
