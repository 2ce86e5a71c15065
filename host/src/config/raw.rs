//! The TOML shape (serde, `deny_unknown_fields`, spans kept where validation
//! needs a line) and its validation into [`Config`].

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::*;

/// The config text being read, and its parsed document (keys and values
/// with their byte spans), for turning an error's span into a line and the
/// dotted key it is under.
pub(super) struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
    document: Option<Spanned<DeTable<'a>>>,
}

impl<'a> Source<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Source { file, text, document: DeTable::parse(text).ok() }
    }

    fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// The keys leading to the value (or key) at `offset`, outermost first;
    /// array indices are left out (`pool.backends.address`).
    fn path_at(&self, offset: usize) -> Vec<&str> {
        let mut path = Vec::new();
        if let Some(document) = &self.document {
            find_in_table(document.get_ref(), offset, &mut path);
        }
        path
    }

    /// The dotted name of `key`, within the table that holds what is at
    /// `offset` (a span of `key` itself or of another key of its table).
    fn dotted(&self, offset: usize, key: &str) -> String {
        let mut path = self.path_at(offset);
        if path.last() != Some(&key) {
            path.pop();
            path.push(key);
        }
        path.join(".")
    }

    pub fn error(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: Some(self.line_of(span.start)),
            key: self.dotted(span.start, key),
            message: message.into(),
        }
    }

    pub fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let message = err.message().trim().to_owned();
        let start = err.span().map(|s| s.start);
        // serde names the key itself in "unknown field `x`" / "missing field `x`";
        // a missing one is missing from the table at the span.
        let named = |prefix: &str| message.strip_prefix(prefix).and_then(|rest| rest.split('`').next());
        let mut path = start.map(|s| self.path_at(s)).unwrap_or_default();
        if let Some(key) = named("unknown field `") {
            path.pop();
            path.push(key);
        } else if let Some(key) = named("missing field `") {
            path.push(key);
        }
        ConfigError { file: self.file.to_owned(), line: start.map(|s| self.line_of(s)), key: path.join("."), message }
    }
}

/// Pushes onto `path` the keys of `table` that lead to `offset`.
fn find_in_table<'t>(table: &'t DeTable<'_>, offset: usize, path: &mut Vec<&'t str>) -> bool {
    for (key, value) in table {
        let holds = key.span().contains(&offset) || value.span().contains(&offset);
        path.push(key.get_ref().as_ref());
        if find_in_value(value.get_ref(), offset, path) || holds {
            return true;
        }
        path.pop();
    }
    false
}

fn find_in_value<'t>(value: &'t DeValue<'_>, offset: usize, path: &mut Vec<&'t str>) -> bool {
    match value {
        DeValue::Table(table) => find_in_table(table, offset, path),
        DeValue::Array(items) => items.iter().any(|item| find_in_value(item.get_ref(), offset, path)),
        _ => false,
    }
}

/// A duration as humans write it (`"4m"`, `"500ms"`).
#[derive(Clone, Copy, Debug)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d).map(Dur)
    }
}

/// A socket address with a message that says what is expected.
#[derive(Clone, Copy, Debug)]
struct Addr(SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Addr).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{text}` is not an address: expected ip:port, like \"127.0.0.1:8080\" or \"[::1]:8080\""
            ))
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    runtime: RawRuntime,
    admin: Option<RawAdmin>,
    #[serde(default)]
    frontend: Vec<RawFrontend>,
    #[serde(default)]
    pool: Vec<RawPool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    workers: Option<Spanned<usize>>,
    plugin_deadline: Option<Spanned<Dur>>,
    plugin_memory: Option<Spanned<bytesize::ByteSize>>,
    watch: Option<bool>,
    shutdown_grace: Option<Spanned<Dur>>,
    control_socket: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<Addr>>,
    token: Option<Spanned<String>>,
    token_env: Option<String>,
}

impl RawAdmin {
    fn validate(self, src: &Source<'_>) -> Result<AdminConfig, ConfigError> {
        let listen_span = self.listen.as_ref().map(Spanned::span);
        let listen = match self.listen {
            Some(a) => a.get_ref().0,
            None => DEFAULT_ADMIN_LISTEN,
        };
        let token = match self.token {
            Some(t) if t.get_ref().trim().is_empty() => return Err(src.error(t.span(), "token", "must not be empty")),
            Some(t) if t.get_ref().len() > 4096 || t.get_ref().chars().any(|c| c.is_control()) => {
                return Err(src.error(t.span(), "token", "must be at most 4096 bytes, without control characters"));
            }
            Some(t) => Some(Secret::new(t.into_inner())),
            None => std::env::var(self.token_env.as_deref().unwrap_or(ADMIN_TOKEN_ENV))
                .ok()
                .filter(|t| !t.trim().is_empty())
                .map(Secret::new),
        };
        // R7: an API reachable from other hosts must not be open to them.
        if !listen.ip().is_loopback() && token.is_none() {
            return Err(src.error(
                listen_span.unwrap_or(0..0),
                "listen",
                format!(
                    "{listen} is reachable from other hosts: set `token` (or {}) or listen on a loopback address",
                    self.token_env.as_deref().unwrap_or(ADMIN_TOKEN_ENV)
                ),
            ));
        }
        Ok(AdminConfig { listen, token })
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawProtocol {
    Tcp,
    Udp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrontend {
    name: Spanned<String>,
    listen: Spanned<Addr>,
    protocol: Option<Spanned<RawProtocol>>,
    pool: Spanned<String>,
    idle_timeout: Option<Spanned<Dur>>,
    udp_idle_timeout: Option<Spanned<Dur>>,
    tcp_reset: Option<Spanned<bool>>,
    connect_timeout: Option<Spanned<Dur>>,
    connect_retries: Option<Spanned<u32>>,
    max_flows: Option<Spanned<usize>>,
    flow_log: Option<Spanned<String>>,
    accept_proxy: Option<Spanned<bool>>,
    proxy_header_timeout: Option<Spanned<Dur>>,
    accept_proxy_from: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProxyProtocol {
    V1,
    V2,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawOnAllDown {
    KeepFlows,
    ResetFlows,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    balancer: Option<Spanned<String>>,
    #[serde(default)]
    balancer_config: toml::Table,
    on_all_down: Option<RawOnAllDown>,
    allow_hairpin: Option<bool>,
    source_addresses: Option<Spanned<Vec<Spanned<String>>>>,
    backends: Spanned<Vec<RawBackend>>,
    probe: Option<RawProbe>,
    #[serde(default)]
    signal: Vec<RawProbe>,
    passive: Option<RawPassive>,
    slow_start: Option<Spanned<Dur>>,
    proxy_protocol: Option<Spanned<RawProxyProtocol>>,
}

/// `[pool.passive]`: health learned from the data path.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPassive {
    enabled: Option<bool>,
    failures: Option<Spanned<u32>>,
    backoff: Option<Spanned<Dur>>,
    max_backoff: Option<Spanned<Dur>>,
    max_ejected_percent: Option<Spanned<u32>>,
}

impl RawPassive {
    fn validate(self, src: &Source<'_>) -> Result<PassiveConfig, ConfigError> {
        let d = PassiveConfig::default();
        let backoff = duration(src, self.backoff, d.backoff, "backoff", limits::PASSIVE_BACKOFF)?;
        let max_span = self.max_backoff.as_ref().map(Spanned::span).unwrap_or_default();
        let max_backoff =
            duration(src, self.max_backoff, d.max_backoff.max(backoff), "max_backoff", limits::PASSIVE_BACKOFF)?;
        if max_backoff < backoff {
            return Err(src.error(max_span, "max_backoff", "must be at least `backoff`"));
        }
        Ok(PassiveConfig {
            enabled: self.enabled.unwrap_or(d.enabled),
            failures: count(src, self.failures, d.failures, "failures", 1..=limits::PASSIVE_FAILURES)?,
            backoff,
            max_backoff,
            max_ejected_percent: count(
                src,
                self.max_ejected_percent,
                d.max_ejected_percent,
                "max_ejected_percent",
                0..=100,
            )?,
        })
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawProbeProtocol {
    Tcp,
    Http,
    Https,
}

/// `[pool.probe]` and `[[pool.signal]]` share their keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    protocol: Spanned<RawProbeProtocol>,
    port: Option<u16>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    interval: Option<Spanned<Dur>>,
    timeout: Option<Spanned<Dur>>,
    threshold: Option<Spanned<u32>>,
    health: Option<Spanned<String>>,
    #[serde(default)]
    health_config: toml::Table,
    tls_ca_file: Option<Spanned<String>>,
    tls_verify: Option<bool>,
    tls_server_name: Option<String>,
}

impl RawProbe {
    /// `signal`: a `[[pool.signal]]` (HTTP only, `path` and `health` required).
    fn validate(self, src: &Source<'_>, signal: bool) -> Result<ProbeConfig, ConfigError> {
        let table_span = self.protocol.span();
        let protocol = match *self.protocol.get_ref() {
            RawProbeProtocol::Tcp if signal => {
                return Err(src.error(
                    table_span,
                    "protocol",
                    "a signal reads an HTTP answer: expected \"http\" or \"https\"",
                ));
            }
            RawProbeProtocol::Tcp => ProbeProtocol::Tcp,
            RawProbeProtocol::Http => ProbeProtocol::Http,
            RawProbeProtocol::Https => ProbeProtocol::Https,
        };
        let path = match self.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(src.error(p.span(), "path", format!("`{}` must start with /", p.get_ref())));
            }
            Some(p) if p.get_ref().len() > limits::PROBE_PATH || p.get_ref().chars().any(char::is_control) => {
                return Err(src.error(
                    p.span(),
                    "path",
                    format!("must be at most {} bytes, without control characters", limits::PROBE_PATH),
                ));
            }
            Some(p) => p.into_inner(),
            None if signal => {
                return Err(src.error(table_span, "path", "a signal needs the path it reads, like \"/load\""));
            }
            None => "/".to_owned(),
        };
        let interval = duration(src, self.interval, DEFAULT_PROBE_INTERVAL, "interval", limits::PROBE_INTERVAL)?;
        let timeout_span = self.timeout.as_ref().map(Spanned::span);
        let timeout = duration(src, self.timeout, interval, "timeout", limits::PROBE_INTERVAL)?;
        if let Some(span) = timeout_span
            && timeout > interval
        {
            return Err(src.error(span, "timeout", format!("{timeout:?} is longer than the interval ({interval:?})")));
        }
        let threshold = count(src, self.threshold, DEFAULT_PROBE_THRESHOLD, "threshold", 1..=limits::PROBE_THRESHOLD)?;
        let (health, health_span) = match self.health {
            Some(h) => (h.get_ref().clone(), h.span()),
            None if signal => {
                return Err(src.error(table_span, "health", "a signal needs the health plugin that reads it"));
            }
            None => (DEFAULT_HEALTH.to_owned(), table_span.clone()),
        };
        let health = plugin_ref(src, &health, health_span.clone(), "health")?;
        let ca_file = match self.tls_ca_file {
            Some(f) => {
                let path = relative_to(src.file, f.get_ref());
                if !path.is_file() {
                    return Err(src.error(f.span(), "tls_ca_file", format!("{} does not exist", path.display())));
                }
                Some(path)
            }
            None => None,
        };
        let host = match self.host {
            Some(h)
                if h.get_ref().is_empty()
                    || h.get_ref().len() > limits::PROBE_HOST
                    || h.get_ref().chars().any(|c| c.is_control() || c.is_whitespace()) =>
            {
                return Err(src.error(
                    h.span(),
                    "host",
                    format!("must be 1..={} bytes, without spaces or control characters", limits::PROBE_HOST),
                ));
            }
            Some(h) => Some(h.into_inner()),
            None => None,
        };
        let health_config = serde_json::to_string(&self.health_config).map_err(|e| {
            src.error(health_span.clone(), "health_config", format!("cannot be passed to the plugin: {e}"))
        })?;
        Ok(ProbeConfig {
            protocol,
            port: self.port,
            path,
            host,
            interval,
            timeout,
            threshold,
            health,
            health_config,
            tls: TlsConfig { ca_file, verify: self.tls_verify.unwrap_or(true), server_name: self.tls_server_name },
            line: src.line_of(health_span.start),
        })
    }
}

/// A plugin named in config: `stock:<name>`, or an existing file. Which
/// stock plugins exist is the plugin loader's to say (`fulcrum check` loads
/// every plugin, and names this line when the name is unknown).
fn plugin_ref(src: &Source<'_>, text: &str, span: Range<usize>, key: &str) -> Result<PluginRef, ConfigError> {
    const EXPECTED: &str = "expected `stock:<name>` or the path of a .wasm component";
    if text.trim().is_empty() {
        return Err(src.error(span, key, EXPECTED));
    }
    let plugin = PluginRef::parse(text, src.file);
    match &plugin {
        PluginRef::Stock(name) if name.trim().is_empty() => Err(src.error(span, key, EXPECTED)),
        PluginRef::File(path) if !path.is_file() => {
            Err(src.error(span, key, format!("plugin file {} does not exist", path.display())))
        }
        _ => Ok(plugin),
    }
}

pub(super) fn relative_to(config: &Path, path: &str) -> std::path::PathBuf {
    let path = Path::new(path);
    if path.is_absolute() { path.to_owned() } else { config.parent().unwrap_or(Path::new(".")).join(path) }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<Addr>,
    weight: Option<Spanned<u32>>,
}

/// A duration longer than 0 and at most `max` (R8): as written, or
/// `default` when unset.
fn duration(
    src: &Source<'_>,
    value: Option<Spanned<Dur>>,
    default: Duration,
    key: &str,
    max: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        Some(v) if v.get_ref().0.is_zero() => Err(src.error(v.span(), key, "must be longer than 0")),
        Some(v) if v.get_ref().0 > max => Err(src.error(
            v.span(),
            key,
            format!(
                "{} is out of range: at most {}",
                humantime::format_duration(v.get_ref().0),
                humantime::format_duration(max)
            ),
        )),
        Some(v) => Ok(v.get_ref().0),
        None => Ok(default),
    }
}

/// A count in `range` (R8): as written, or `default` when unset.
fn count<T>(
    src: &Source<'_>,
    value: Option<Spanned<T>>,
    default: T,
    key: &str,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: PartialOrd + Copy + std::fmt::Display,
{
    match value {
        Some(v) if !range.contains(v.get_ref()) => Err(src.error(
            v.span(),
            key,
            format!("{} is out of range: expected {}..={}", v.get_ref(), range.start(), range.end()),
        )),
        Some(v) => Ok(*v.get_ref()),
        None => Ok(default),
    }
}

/// Refuses more than `max` items of a list (R8), naming the first one past it.
fn at_most<T>(
    src: &Source<'_>,
    items: &[T],
    span_of: impl Fn(&T) -> Range<usize>,
    key: &str,
    what: &str,
    max: usize,
) -> Result<(), ConfigError> {
    match items.get(max) {
        Some(extra) => Err(src.error(span_of(extra), key, format!("more than {max} {what}"))),
        None => Ok(()),
    }
}

impl RawConfig {
    pub(super) fn validate(self, src: &Source<'_>) -> Result<Config, ConfigError> {
        let runtime = RuntimeConfig {
            workers: count(
                src,
                self.runtime.workers,
                std::thread::available_parallelism().map_or(1, |n| n.get()).min(limits::WORKERS),
                "workers",
                1..=limits::WORKERS,
            )?,
            plugin_deadline: duration(
                src,
                self.runtime.plugin_deadline,
                DEFAULT_PLUGIN_DEADLINE,
                "plugin_deadline",
                limits::PLUGIN_DEADLINE,
            )?,
            plugin_memory: match self.runtime.plugin_memory {
                Some(m) if m.get_ref().as_u64() < (1 << 20) || m.get_ref().as_u64() > limits::PLUGIN_MEMORY => {
                    return Err(src.error(
                        m.span(),
                        "plugin_memory",
                        format!("{} is out of range: expected 1 MiB..=4 GiB", m.get_ref().display().iec()),
                    ));
                }
                Some(m) => m.get_ref().as_u64(),
                None => DEFAULT_PLUGIN_MEMORY,
            },
            watch: self.runtime.watch.unwrap_or(true),
            shutdown_grace: match self.runtime.shutdown_grace {
                // Zero is allowed: reset every flow at once.
                Some(g) if g.get_ref().0.is_zero() => Duration::ZERO,
                g => duration(src, g, DEFAULT_SHUTDOWN_GRACE, "shutdown_grace", limits::SHUTDOWN_GRACE)?,
            },
            control_socket: match &self.runtime.control_socket {
                Some(path) => relative_to(src.file, path),
                None => default_control_socket(src.file),
            },
        };

        at_most(src, &self.frontend, |f| f.name.span(), "name", "frontends", limits::FRONTENDS)?;
        at_most(src, &self.pool, |p| p.name.span(), "name", "pools", limits::POOLS)?;
        let pool_names: Vec<_> = self.pool.iter().map(|p| (p.name.get_ref().clone(), p.name.span())).collect();
        let backend_spans: Vec<(String, SocketAddr, Range<usize>)> = self
            .pool
            .iter()
            .flat_map(|p| {
                p.backends.get_ref().iter().map(|b| (p.name.get_ref().clone(), b.address.get_ref().0, b.address.span()))
            })
            .collect();
        let pools = self.pool.into_iter().map(|p| p.validate(src)).collect::<Result<Vec<_>, _>>()?;
        let mut frontends = Vec::with_capacity(self.frontend.len());
        let mut frontend_names = Vec::with_capacity(self.frontend.len());
        let mut listens = Vec::with_capacity(self.frontend.len());
        for f in self.frontend {
            let pool_span = f.pool.span();
            let pool = f.pool.into_inner();
            if !pools.iter().any(|p| p.name == pool) {
                let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                return Err(src.error(
                    pool_span,
                    "pool",
                    format!("no pool named `{pool}` (pools: {})", list_or_none(&known)),
                ));
            }
            let protocol = match f.protocol {
                None => Protocol::Tcp,
                Some(p) => match *p.get_ref() {
                    RawProtocol::Tcp => Protocol::Tcp,
                    RawProtocol::Udp => Protocol::Udp,
                },
            };
            // A key that means nothing for the frontend's protocol is an error, not ignored.
            let other_protocol: [(Option<Range<usize>>, &str, Protocol, &str); 6] = [
                (f.tcp_reset.as_ref().map(Spanned::span), "tcp_reset", Protocol::Tcp, "UDP has no reset to send"),
                (
                    f.connect_timeout.as_ref().map(Spanned::span),
                    "connect_timeout",
                    Protocol::Tcp,
                    "UDP connects nothing",
                ),
                (
                    f.connect_retries.as_ref().map(Spanned::span),
                    "connect_retries",
                    Protocol::Tcp,
                    "UDP connects nothing",
                ),
                (
                    f.proxy_header_timeout.as_ref().map(Spanned::span),
                    "proxy_header_timeout",
                    Protocol::Tcp,
                    "PROXY headers are accepted on TCP frontends only",
                ),
                (
                    f.idle_timeout.as_ref().map(Spanned::span),
                    "idle_timeout",
                    Protocol::Tcp,
                    "UDP flows idle out after udp_idle_timeout",
                ),
                (
                    f.udp_idle_timeout.as_ref().map(Spanned::span),
                    "udp_idle_timeout",
                    Protocol::Udp,
                    "TCP flows idle out after idle_timeout",
                ),
            ];
            for (span, key, only, why) in other_protocol {
                if let Some(span) = span.filter(|_| protocol != only) {
                    return Err(src.error(
                        span,
                        key,
                        format!("is for {} frontends only: {why}", only.as_str().to_uppercase()),
                    ));
                }
            }
            let max_flows = count(src, f.max_flows, DEFAULT_MAX_FLOWS, "max_flows", 1..=limits::MAX_FLOWS)?;
            frontend_names.push((f.name.get_ref().clone(), f.name.span()));
            let listen = f.listen.get_ref().0;
            let flow_log = match f.flow_log {
                None => None,
                Some(target) if target.get_ref() == "stdout" => Some(FlowLogTarget::Stdout),
                Some(target) if target.get_ref().trim().is_empty() || target.get_ref().contains('\0') => {
                    return Err(src.error(target.span(), "flow_log", "must be a file path or \"stdout\""));
                }
                Some(target) => Some(FlowLogTarget::File(relative_to(src.file, target.get_ref()))),
            };
            let accept_proxy = f.accept_proxy.as_ref().is_some_and(|a| *a.get_ref());
            if let Some(a) = f.accept_proxy.as_ref().filter(|_| accept_proxy && protocol == Protocol::Udp) {
                return Err(src.error(a.span(), "accept_proxy", "PROXY headers are accepted on TCP frontends only"));
            }
            if let Some(pp) = pools.iter().find(|p| p.name == pool && p.proxy_protocol.is_some())
                && protocol == Protocol::Udp
            {
                return Err(src.error(
                    pool_span,
                    "pool",
                    format!(
                        "pool `{}` sends PROXY headers (proxy_protocol), which are for TCP frontends only",
                        pp.name
                    ),
                ));
            }
            let accept_proxy_from = match f.accept_proxy_from {
                None => Vec::new(),
                Some(list) if !accept_proxy => {
                    return Err(src.error(list.span(), "accept_proxy_from", "needs accept_proxy = true"));
                }
                Some(list) => {
                    let list = list.into_inner();
                    at_most(src, &list, Spanned::span, "accept_proxy_from", "sources", limits::SOURCE_ADDRESSES)?;
                    let mut nets = Vec::with_capacity(list.len());
                    for item in list {
                        let text = item.get_ref().trim();
                        let net = text
                            .parse::<ipnet::IpNet>()
                            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                            .map_err(|_| {
                                src.error(
                                    item.span(),
                                    "accept_proxy_from",
                                    format!(
                                        "`{text}` is not an IP address or a CIDR block (10.0.0.0/8, 2001:db8::/32)"
                                    ),
                                )
                            })?;
                        nets.push(net.trunc());
                    }
                    nets
                }
            };
            let proxy_header_timeout = duration(
                src,
                f.proxy_header_timeout,
                DEFAULT_PROXY_HEADER_TIMEOUT,
                "proxy_header_timeout",
                limits::PROXY_HEADER_TIMEOUT,
            )?;
            if listen.port() != 0 {
                listens.push(((protocol, listen), f.listen.span()));
            }
            frontends.push(FrontendConfig {
                name: f.name.into_inner(),
                listen,
                protocol,
                pool,
                idle_timeout: duration(
                    src,
                    f.idle_timeout,
                    DEFAULT_IDLE_TIMEOUT,
                    "idle_timeout",
                    limits::IDLE_TIMEOUT,
                )?,
                udp_idle_timeout: duration(
                    src,
                    f.udp_idle_timeout,
                    DEFAULT_UDP_IDLE_TIMEOUT,
                    "udp_idle_timeout",
                    limits::UDP_IDLE_TIMEOUT,
                )?,
                tcp_reset: f.tcp_reset.is_some_and(Spanned::into_inner),
                connect_timeout: duration(
                    src,
                    f.connect_timeout,
                    DEFAULT_CONNECT_TIMEOUT,
                    "connect_timeout",
                    limits::CONNECT_TIMEOUT,
                )?,
                connect_retries: count(
                    src,
                    f.connect_retries,
                    DEFAULT_CONNECT_RETRIES,
                    "connect_retries",
                    0..=limits::CONNECT_RETRIES,
                )?,
                max_flows,
                flow_log,
                accept_proxy,
                proxy_header_timeout,
                accept_proxy_from,
            });
        }
        if let Some((dup, span)) = second_of_two(&frontend_names) {
            return Err(src.error(span.clone(), "name", format!("two frontends are named `{dup}`")));
        }
        if let Some((dup, span)) = second_of_two(&pool_names) {
            return Err(src.error(span.clone(), "name", format!("two pools are named `{dup}`")));
        }
        if let Some(((protocol, addr), span)) = second_of_two(&listens) {
            let protocol = protocol.as_str();
            return Err(src.error(span.clone(), "listen", format!("two frontends listen on {protocol} {addr}")));
        }
        if let Some((pool, addr, span, frontend)) = backend_spans
            .iter()
            .find_map(|(pool, addr, span)| own_listener(&frontends, pool, *addr).map(|f| (pool, addr, span, f)))
        {
            return Err(src.error(
                span.clone(),
                "address",
                format!(
                    "pool `{pool}`: backend {addr} is where frontend `{frontend}` listens: its flows would loop \
                     back into this Fulcrum"
                ),
            ));
        }
        let admin = self.admin.map(|a| a.validate(src)).transpose()?;
        Ok(Config { file: src.file.to_owned(), runtime, admin, frontends, pools })
    }
}

/// The frontend that listens on `addr` for the protocol of a frontend that
/// balances to `pool` (a backend there would send flows back into Fulcrum).
/// A wildcard listener counts for the loopback and wildcard addresses of its port.
fn own_listener<'a>(frontends: &'a [FrontendConfig], pool: &str, addr: SocketAddr) -> Option<&'a str> {
    let uses = |protocol| frontends.iter().any(|f| f.pool == pool && f.protocol == protocol);
    frontends
        .iter()
        .filter(|f| f.listen.port() != 0 && uses(f.protocol))
        .find(|f| {
            f.listen == addr
                || f.listen.port() == addr.port()
                    && f.listen.is_ipv4() == addr.is_ipv4()
                    && (f.listen.ip().is_unspecified() && (addr.ip().is_loopback() || addr.ip().is_unspecified())
                        || addr.ip().is_unspecified())
        })
        .map(|f| f.name.as_str())
}

impl RawPool {
    fn validate(self, src: &Source<'_>) -> Result<PoolConfig, ConfigError> {
        let name_span = self.name.span();
        let (balancer_text, balancer_span) = match &self.balancer {
            Some(b) => (b.get_ref().clone(), b.span()),
            None => (DEFAULT_BALANCER.to_owned(), name_span.clone()),
        };
        let balancer = plugin_ref(src, &balancer_text, balancer_span.clone(), "balancer")?;
        let backends_span = self.backends.span();
        let raw_backends = self.backends.into_inner();
        if raw_backends.is_empty() {
            return Err(src.error(backends_span, "backends", "a pool needs at least one backend"));
        }
        at_most(src, &raw_backends, |b| b.address.span(), "address", "backends in one pool", limits::BACKENDS)?;
        at_most(src, &self.signal, |s| s.protocol.span(), "protocol", "signals in one pool", limits::SIGNALS)?;
        let mut backends = Vec::with_capacity(raw_backends.len());
        for b in raw_backends {
            let weight = count(src, b.weight, 100, "weight", 0..=100)?;
            let address = b.address.get_ref().0;
            if backends.iter().any(|x: &BackendConfig| x.address == address) {
                return Err(src.error(
                    b.address.span(),
                    "address",
                    format!("backend {address} is listed twice in this pool"),
                ));
            }
            backends.push(BackendConfig { address, weight });
        }
        let source_addresses = match self.source_addresses {
            None => Vec::new(),
            Some(list) => {
                let list_span = list.span();
                let list = list.into_inner();
                at_most(src, &list, Spanned::span, "source_addresses", "source addresses", limits::SOURCE_ADDRESSES)?;
                let mut ips: Vec<std::net::IpAddr> = Vec::with_capacity(list.len());
                for item in list {
                    let Ok(ip) = item.get_ref().parse::<std::net::IpAddr>() else {
                        return Err(src.error(
                            item.span(),
                            "source_addresses",
                            format!("`{}` is not an IP address (no port: the kernel picks it)", item.get_ref()),
                        ));
                    };
                    if ip.is_unspecified() || ip.is_multicast() || ips.contains(&ip) {
                        return Err(src.error(
                            item.span(),
                            "source_addresses",
                            format!("{ip} cannot be a source address here (unspecified, multicast or listed twice)"),
                        ));
                    }
                    ips.push(ip);
                }
                // Every backend needs a source of its own family.
                if let Some(b) = backends.iter().find(|b| !ips.iter().any(|ip| ip.is_ipv4() == b.address.is_ipv4())) {
                    return Err(src.error(
                        list_span,
                        "source_addresses",
                        format!("no source address of the family of backend {}", b.address),
                    ));
                }
                ips
            }
        };
        // B15: the pool's `allow_hairpin` is the one switch. The host's checks
        // and fallback read it; a stock balancer is handed it in its config.
        let mut balancer_config = self.balancer_config;
        if let PluginRef::Stock(_) = &balancer {
            if balancer_config.contains_key("allow_hairpin") {
                return Err(src.error(
                    balancer_span.clone(),
                    "balancer_config.allow_hairpin",
                    "hairpin is the pool's switch (allow_hairpin = true on the pool): host, stock balancer and \
                     fallback all follow it",
                ));
            }
            if self.allow_hairpin == Some(true) {
                balancer_config.insert("allow_hairpin".into(), toml::Value::Boolean(true));
            }
        }
        let balancer_config = serde_json::to_string(&balancer_config).map_err(|e| {
            src.error(name_span.clone(), "balancer_config", format!("cannot be passed to the plugin: {e}"))
        })?;
        Ok(PoolConfig {
            name: self.name.into_inner(),
            balancer,
            balancer_config,
            on_all_down: match self.on_all_down {
                None | Some(RawOnAllDown::KeepFlows) => OnAllDown::KeepFlows,
                Some(RawOnAllDown::ResetFlows) => OnAllDown::ResetFlows,
            },
            allow_hairpin: self.allow_hairpin.unwrap_or(false),
            source_addresses,
            backends,
            balancer_line: src.line_of(balancer_span.start),
            probe: self.probe.map(|p| p.validate(src, false)).transpose()?,
            signals: self.signal.into_iter().map(|p| p.validate(src, true)).collect::<Result<_, _>>()?,
            passive: self.passive.map(|p| p.validate(src)).transpose()?.unwrap_or_default(),
            slow_start: match self.slow_start {
                // "0s" switches it off, like leaving it out.
                Some(s) if s.get_ref().0.is_zero() => None,
                s => s.map(|s| duration(src, Some(s), Duration::ZERO, "slow_start", limits::SLOW_START)).transpose()?,
            },
            proxy_protocol: self.proxy_protocol.map(|p| match p.into_inner() {
                RawProxyProtocol::V1 => ProxyProtocol::V1,
                RawProxyProtocol::V2 => ProxyProtocol::V2,
            }),
        })
    }
}

/// The second of two equal items (names, addresses), with its span.
fn second_of_two<T: Eq + std::hash::Hash>(items: &[(T, Range<usize>)]) -> Option<&(T, Range<usize>)> {
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    items.iter().find(|(item, _)| !seen.insert(item))
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() { "none".to_owned() } else { names.join(", ") }
}
