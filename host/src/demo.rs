//! `fulcrum demo`: three HTTP backends on loopback that answer with their own
//! name, a round-robin balancer in front of them, and the line to curl.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::{Error, Server};

/// Starts a demo HTTP backend answering `hello from <name>` on `addr`;
/// returns the address it listens on.
pub async fn http_backend(name: &str, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let body = Bytes::from(format!("hello from {name} ({local})\n"));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(local)
}

/// The demo's config: one frontend on `listen`, round robin over `backends`,
/// the admin API on `admin`.
pub fn config(listen: SocketAddr, admin: SocketAddr, backends: &[SocketAddr]) -> Result<Config, Error> {
    let list: Vec<String> = backends.iter().map(|b| format!("{{ address = \"{b}\" }}")).collect();
    let text = format!(
        r#"[runtime]
workers = 2

[admin]
listen = "{admin}"

[[frontend]]
name = "demo"
listen = "{listen}"
pool = "demo"
idle_timeout = "60s"

[[pool]]
name = "demo"
balancer = "stock:round-robin"
backends = [ {} ]
"#,
        list.join(", ")
    );
    Ok(Config::parse(Path::new("(demo)"), &text)?)
}

/// Runs the demo until Ctrl-C.
pub async fn run(listen: SocketAddr, admin: SocketAddr) -> Result<(), Error> {
    let mut backends = Vec::new();
    for i in 1..=3 {
        let name = format!("backend-{i}");
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let addr =
            http_backend(&name, any).await.map_err(|error| Error::Listen { frontend: name, addr: any, error })?;
        backends.push(addr);
    }
    let config = config(listen, admin, &backends)?;
    let server = Server::start(&config)?;
    let addr = server.frontend_addr("demo").unwrap_or(listen);
    let mut text = String::from("Fulcrum demo: 3 HTTP backends on loopback, round robin in front of them.\n");
    for (i, b) in backends.iter().enumerate() {
        text += &format!("  backend-{} at {b}\n", i + 1);
    }
    text += &format!("Try it (each curl is a new flow, so the answers rotate):\n  curl http://{addr}/\n");
    if let Some(admin) = server.admin_addr() {
        text += &format!(
            "See inside: the live dashboard (drain a backend there and watch the answers skip it)\n  http://{admin}/\n\
             or the API (backends, flows, plugin calls, the troubleshooter):\n  curl http://{admin}/status\n  curl http://{admin}/diagnose\n  curl http://{admin}/metrics\n"
        );
    }
    text += "Ctrl-C stops the demo.\n";
    // A closed stdout must not stop the demo (println! would panic).
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
    let _ = tokio::signal::ctrl_c().await;
    server.shutdown();
    Ok(())
}
