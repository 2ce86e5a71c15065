//! # Admin API (hyper, on the control thread)
//!
//! | request | what |
//! |---|---|
//! | `GET /status` | JSON: frontends, pools, backends (health, weight, drain, flows, last probe, connect failures), plugins (digest, faults), reloads |
//! | `GET /flows?limit=N` | JSON: a sample of live flows (default 100) |
//! | `POST /backends/{pool}/{address}/drain`, `/undrain` | no new flows to the backend / again |
//! | `POST /reload` | re-read the config file and apply it |
//! | `GET /metrics` | Prometheus text |
//!
//! With a token (`[admin] token`, or `FULCRUM_ADMIN_TOKEN`), every request
//! needs `Authorization: Bearer <token>`; without, 401.

pub mod metrics;
pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::server::Shared;
use crate::server::control::ControlMsg;

type Reply = Response<Full<Bytes>>;

/// Serves the admin API on `listener` until the control runtime stops.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(req, &shared).await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
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

fn authorized(req: &Request<Incoming>, shared: &Shared) -> bool {
    let state = shared.state.load();
    let Some(token) = state.config.admin.as_ref().and_then(|a| a.token.as_deref()) else { return true };
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `%5B`, `%5D`, `%3A` and friends in a path segment (IPv6 addresses).
fn percent_decode(segment: &str) -> String {
    let mut out = Vec::with_capacity(segment.len());
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Reply {
    if !authorized(&req, shared) {
        let mut r = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["status"]) => json(StatusCode::OK, &status::status(shared)),
        (&Method::GET, ["flows"]) => {
            let limit = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("limit=")))
                .and_then(|n| n.parse().ok())
                .unwrap_or(100usize);
            json(StatusCode::OK, &status::flows(shared, limit.min(10_000)))
        }
        (&Method::GET, ["metrics"]) => {
            reply(StatusCode::OK, "text/plain; version=0.0.4", shared.metrics.render(shared))
        }
        (&Method::POST, ["reload"]) => match crate::server::reload::run(Arc::clone(shared), "api").await {
            Ok(result) => json(StatusCode::OK, &result),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
        },
        (&Method::POST, ["backends", pool, address, action @ ("drain" | "undrain")]) => {
            let Ok(addr) = percent_decode(address).parse::<SocketAddr>() else {
                return error(StatusCode::BAD_REQUEST, format!("`{address}` is not ip:port"));
            };
            let (tx, rx) = oneshot::channel();
            let msg = ControlMsg::Drain { pool: (*pool).to_owned(), addr, drained: *action == "drain", reply: tx };
            if shared.control.send(msg).is_err() {
                return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            }
            match rx.await {
                Ok(Ok(())) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "pool": pool, "backend": addr.to_string(), "drained": *action == "drain" }),
                ),
                Ok(Err(e)) => error(StatusCode::NOT_FOUND, e),
                Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
            }
        }
        (_, ["status" | "flows" | "metrics" | "reload"]) | (_, ["backends", _, _, "drain" | "undrain"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {path}", req.method()))
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}
