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
//!
//! The API sees the server only through [`Handle`]: what runs now, the
//! metrics text, and the reload and drain requests. `server` implements it;
//! this room never imports `server`.

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
use percent_encoding::percent_decode_str;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::error::{DrainError, ReloadError};
use crate::live::{ReloadLog, ReloadResult, State};

type Reply = Response<Full<Bytes>>;

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
}

/// Serves the admin API on `listener` until the runtime that runs it stops.
pub async fn serve(listener: TcpListener, handle: Arc<dyn Handle>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let handle = Arc::clone(&handle);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handle = Arc::clone(&handle);
                async move { Ok::<_, Infallible>(route(req, &*handle).await) }
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

fn authorized(req: &Request<Incoming>, state: &State) -> bool {
    let Some(token) = state.config.admin.as_ref().and_then(|a| a.token.as_deref()) else { return true };
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())))
}

/// `?limit=N` of `/flows`, the last one given (default 100, at most 10,000).
fn flow_limit(query: Option<&str>) -> usize {
    let limit = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(key, _)| key == "limit")
        .filter_map(|(_, value)| value.parse().ok())
        .last();
    limit.unwrap_or(100usize).min(10_000)
}

async fn route(req: Request<Incoming>, handle: &dyn Handle) -> Reply {
    let state = handle.state();
    if !authorized(&req, &state) {
        let mut r = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["status"]) => json(StatusCode::OK, &status::status(&state, handle.reloads())),
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
        (_, ["status" | "flows" | "metrics" | "reload"]) | (_, ["backends", _, _, "drain" | "undrain"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {path}", req.method()))
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}
