//! # Admin API (hyper, on the control thread)
//!
//! | request | what |
//! |---|---|
//! | `GET /` | the dashboard: one self-contained page that polls `/status` and `/diagnose` |
//! | `GET /diagnose` | JSON: the troubleshooter's findings ([`diagnose`]) |
//! | `GET /status` | JSON: frontends, pools, backends (health, weight, drain, flows, last probe, connect failures), plugins (digest, faults), reloads |
//! | `GET /flows?limit=N` | JSON: a sample of live flows (default 100) |
//! | `POST /backends/{pool}/{address}/drain`, `/undrain` | no new flows to the backend / again |
//! | `POST /reload` | re-read the config file and apply it |
//! | `GET /metrics` | Prometheus text |
//!
//! Safe by default (R7):
//! - With a token (`[admin] token`, or `FULCRUM_ADMIN_TOKEN`), every request
//!   needs `Authorization: Bearer <token>`: a read without it is answered
//!   401, a mutation (drain, undrain, reload) 403. The dashboard page itself
//!   (`GET /`, no data in it) is served without: it asks for the token.
//! - Without a token the API listens only on loopback (config error
//!   otherwise), and serves only requests addressed to itself: `Host` must be
//!   its own address (`127.0.0.1:PORT`, `localhost:PORT`, `[::1]:PORT`), which
//!   defeats DNS rebinding.
//! - Any request from a browser page of another origin (`Origin` not this
//!   API's own, or `Sec-Fetch-Site: cross-site`) is refused with 403, so a web
//!   page an operator opens cannot drain or reload.
//! - A client has [`HEADER_READ_TIMEOUT`] to send each request's headers
//!   (also the idle time allowed between requests), a connection lives at
//!   most [`CONNECTION_LIFETIME`], and at most [`MAX_CONNECTIONS`] are served
//!   at once (more wait in the kernel's backlog).
//! - Out of descriptors, the accept loop pauses like the data path's (R1,
//!   [`crate::net::AcceptBackoff`]), counted as `fulcrum_admin_accept_pauses_total`.
//!
//! The API sees the server only through [`Handle`]: what runs now, the
//! metrics text, and the reload and drain requests. `server` implements it;
//! this room never imports `server`.

pub mod diagnose;
pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use percent_encoding::percent_decode_str;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

use crate::error::{DrainError, ReloadError};
use crate::live::{ReloadLog, ReloadResult, State};

type Reply = Response<Full<Bytes>>;

/// Time a client has to send a request's headers, from its connection or
/// the previous answer on: a slow or silent client is dropped after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one admin connection (a client that never reads its
/// answer holds it no longer).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// What the admin API may see and ask of a running server.
pub trait Handle: Send + Sync + 'static {
    /// What runs now.
    fn state(&self) -> Arc<State>;
    /// Reload outcomes so far.
    fn reloads(&self) -> &ReloadLog;
    /// The Prometheus text of every metric, as of now.
    fn metrics(&self) -> String;
    /// Asks for a reload of the config file; answers when it is in effect or failed.
    fn reload(&self) -> oneshot::Receiver<Result<ReloadResult, ReloadError>>;
    /// Asks to drain (or undrain) a backend; answers when it is in effect.
    fn drain(&self, pool: &str, addr: SocketAddr, drained: bool) -> oneshot::Receiver<Result<(), DrainError>>;
    /// Counts a pause of the admin accept loop, out of descriptors (R1).
    fn count_accept_pause(&self);
    /// The graceful shutdown in progress, if one is.
    fn draining(&self) -> Option<crate::live::Draining>;
}

/// Serves the admin API on `listener` until the runtime that runs it stops,
/// or `handed_over` turns true (a new process took the socket over).
pub async fn serve(
    listener: TcpListener,
    handle: Arc<dyn Handle>,
    mut handed_over: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(own) = listener.local_addr() else { return };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        // A slot first: past the cap, clients wait in the backlog, not in memory.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = handed_over.wait_for(|h| *h) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(e) => {
                if backoff.pause("admin", &e).await {
                    handle.count_accept_pause();
                }
                continue;
            }
        };
        let handle = Arc::clone(&handle);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let handle = Arc::clone(&handle);
                async move { Ok::<_, Infallible>(route(req, own, &*handle).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(status, "application/json", body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("cannot encode: {e}\n")),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// The dashboard page (`GET /`).
const DASHBOARD: &str = include_str!("dashboard.html");

/// Who may ask: `None`, or the answer that refuses (R7, see the module docs).
/// `public`: the request needs no token (the dashboard page, which holds no data).
fn refusal(req: &Request<Incoming>, own: SocketAddr, state: &State, public: bool) -> Option<Reply> {
    let headers = req.headers();
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let token = state.config.admin.as_ref().and_then(|a| a.token.as_ref());
    let host = text(header::HOST);
    // Without a token, only requests addressed to this API itself.
    if token.is_none() && host.is_some_and(|h| !is_own_host(h, own)) {
        return Some(error(StatusCode::FORBIDDEN, "the Host header is not this API's address"));
    }
    let cross_site = text(header::HeaderName::from_static("sec-fetch-site")).is_some_and(|s| s == "cross-site");
    let same_origin = |origin: &str| {
        origin
            .strip_prefix("http://")
            .is_some_and(|o| host.is_some_and(|h| o.eq_ignore_ascii_case(h)) || is_own_host(o, own))
    };
    if cross_site || text(header::ORIGIN).is_some_and(|o| !same_origin(o)) {
        return Some(error(StatusCode::FORBIDDEN, "cross-origin requests are refused"));
    }
    // Without a token, or for the page that asks for it, nothing more to check.
    let token = token.filter(|_| !public)?;
    let given = text(header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.expose().as_bytes()))) {
        return None;
    }
    // A mutation without the token is refused outright; a read is asked for it.
    let (status, message) = match *req.method() {
        Method::GET | Method::HEAD => (StatusCode::UNAUTHORIZED, "a bearer token is required"),
        _ => (StatusCode::FORBIDDEN, "drain, undrain and reload need the admin token"),
    };
    let mut r = error(status, message);
    r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    Some(r)
}

/// Is `host` (a `Host` header, or an origin's `host:port`) this API's own
/// address: its IP or a loopback name, with its port?
fn is_own_host(host: &str, own: SocketAddr) -> bool {
    // `name:port`, or a bare name (the default port, 80).
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !host.ends_with(']') => (name, port.parse().ok()),
        _ => (host, Some(80)),
    };
    if port != Some(own.port()) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == own.ip() || (own.ip().is_loopback() && ip.is_loopback()),
        Err(_) => own.ip().is_loopback() && name.eq_ignore_ascii_case("localhost"),
    }
}

/// `?limit=N` of `/flows`, the last one given (default 100, at most 10,000).
fn flow_limit(query: Option<&str>) -> usize {
    let limit = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(key, _)| key == "limit")
        .filter_map(|(_, value)| value.parse().ok())
        .last();
    limit.unwrap_or(100usize).min(10_000)
}

async fn route(req: Request<Incoming>, own: SocketAddr, handle: &dyn Handle) -> Reply {
    let state = handle.state();
    let path = req.uri().path().to_owned();
    let page = req.method() == Method::GET && path == "/";
    if let Some(refused) = refusal(&req, own, &state, page) {
        return refused;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, [""]) => {
            let mut page = reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD);
            let headers = page.headers_mut();
            headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
            // No other site may frame it (a click on drain through a frame).
            headers.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static("frame-ancestors 'none'"));
            headers.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
            page
        }
        (&Method::GET, ["diagnose"]) => {
            // It may read the host's socket table: off the control thread's runtime.
            let state = Arc::clone(&state);
            match tokio::task::spawn_blocking(move || diagnose::diagnose(&state)).await {
                Ok(diagnosis) => json(StatusCode::OK, &diagnosis),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("diagnose failed: {e}")),
            }
        }
        (&Method::GET, ["status"]) => {
            json(StatusCode::OK, &status::status(&state, handle.reloads(), handle.draining()))
        }
        (&Method::GET, ["flows"]) => json(StatusCode::OK, &status::flows(&state, flow_limit(req.uri().query()))),
        (&Method::GET, ["metrics"]) => reply(StatusCode::OK, "text/plain; version=0.0.4", handle.metrics()),
        (&Method::POST, ["reload"]) => match handle.reload().await.unwrap_or(Err(ReloadError::ShuttingDown)) {
            Ok(result) => json(StatusCode::OK, &result),
            Err(e @ ReloadError::ShuttingDown) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        },
        (&Method::POST, ["backends", pool, address, action @ ("drain" | "undrain")]) => {
            let pool = percent_decode_str(pool).decode_utf8_lossy();
            let address = percent_decode_str(address).decode_utf8_lossy();
            let Ok(addr) = address.parse::<SocketAddr>() else {
                return error(StatusCode::BAD_REQUEST, format!("`{address}` is not ip:port"));
            };
            let drained = *action == "drain";
            match handle.drain(&pool, addr, drained).await.unwrap_or(Err(DrainError::ShuttingDown)) {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "pool": pool, "backend": addr.to_string(), "drained": drained }),
                ),
                Err(e @ DrainError::ShuttingDown) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
            }
        }
        (_, [""]) if path == "/" => {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {path}", req.method()))
        }
        (_, ["status" | "flows" | "metrics" | "reload" | "diagnose"])
        | (_, ["backends", _, _, "drain" | "undrain"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {path}", req.method()))
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_host_names_are_the_address_and_loopback_names_with_the_port() {
        let v4: SocketAddr = "127.0.0.1:9900".parse().unwrap_or_else(|_| unreachable!());
        for host in ["127.0.0.1:9900", "localhost:9900", "LOCALHOST:9900", "[::1]:9900", "127.0.0.2:9900"] {
            assert!(is_own_host(host, v4), "{host}");
        }
        for host in ["evil.example:9900", "127.0.0.1:9901", "127.0.0.1", "localhost", "10.0.0.1:9900", "", ":9900"] {
            assert!(!is_own_host(host, v4), "{host}");
        }
        let on_80: SocketAddr = "[::1]:80".parse().unwrap_or_else(|_| unreachable!());
        for host in ["[::1]", "localhost", "[::1]:80", "127.0.0.1:80"] {
            assert!(is_own_host(host, on_80), "{host}");
        }
    }
}
