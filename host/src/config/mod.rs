//! # Configuration: TOML -> validated [`Config`]
//!
//! ```text
//!  text ──parse (serde, deny_unknown_fields)──> raw sections (with spans)
//!       ──validate (names, references, ranges)──> Config
//! ```
//!
//! Every error is a [`ConfigError`] naming the file, the line, the key and what
//! was expected. Plugins are not loaded here: `fulcrum check` and the server
//! load them from [`PoolConfig::balancer`] next.

pub mod diff;
mod error;
mod raw;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
use raw::{RawConfig, Source};

/// Default idle timeout of a frontend (B9), as on cloud load balancers.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60);
/// Default idle timeout of a UDP flow (as AWS NLB): no datagram either way
/// for this long and the flow is forgotten.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default time allowed to connect to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on established flows per frontend (R2).
pub const DEFAULT_MAX_FLOWS: usize = 100_000;
/// Default number of other backends tried after a failed connect.
pub const DEFAULT_CONNECT_RETRIES: u32 = 2;
/// Default per-call deadline of a plugin.
pub const DEFAULT_PLUGIN_DEADLINE: Duration = Duration::from_millis(10);
/// Default linear-memory cap of a plugin instance.
pub const DEFAULT_PLUGIN_MEMORY: u64 = 64 << 20;
/// The balancer of a pool that names none.
pub const DEFAULT_BALANCER: &str = "stock:five-tuple-hash";
/// The health plugin of a probe that names none.
pub const DEFAULT_HEALTH: &str = "stock:http-200";
/// Default time established flows may go on after SIGTERM (B17): what a
/// Kubernetes pod gets by default (`terminationGracePeriodSeconds`), and
/// well past a typical request; long-lived flows are reset after it.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default time between two probes of a backend.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Default consecutive results that change a backend's state (B3, B4).
pub const DEFAULT_PROBE_THRESHOLD: u32 = 2;
/// Time a connection has to send its PROXY header (`accept_proxy`).
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bounds of configured values (R8). Past these a value is a slip of
/// the keyboard, not a setting; and host arithmetic on any value within them
/// (`Instant + Duration`, sums of counts) cannot overflow. `check`, the start
/// and every reload refuse a value out of range with its line and key.
pub mod limits {
    use std::time::Duration;

    const HOUR: u64 = 60 * 60;
    const DAY: u64 = 24 * HOUR;

    /// A config file above this size is refused before it is read whole.
    pub const CONFIG_BYTES: u64 = 4 << 20;
    /// `idle_timeout` (TCP): a week.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(7 * DAY);
    /// `udp_idle_timeout`: a day.
    pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(DAY);
    /// `connect_timeout`: ten minutes (the kernel gives up on a SYN well before).
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
    /// `connect_retries`.
    pub const CONNECT_RETRIES: u32 = 16;
    /// `max_flows` per frontend.
    pub const MAX_FLOWS: usize = 10_000_000;
    /// `[runtime] workers`.
    pub const WORKERS: usize = 1024;
    /// `[runtime] plugin_deadline`: a call this long already stalls its worker.
    pub const PLUGIN_DEADLINE: Duration = Duration::from_secs(10);
    /// `[runtime] shutdown_grace`: an hour.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60 * 60);
    /// `[runtime] plugin_memory`: all a 32-bit Wasm memory can address.
    pub const PLUGIN_MEMORY: u64 = 4 << 30;
    /// A probe's or signal's `interval` (and so its `timeout`).
    pub const PROBE_INTERVAL: Duration = Duration::from_secs(HOUR);
    /// A probe's `threshold`.
    pub const PROBE_THRESHOLD: u32 = 100;
    /// Frontends, and pools, in one file.
    pub const FRONTENDS: usize = 1024;
    pub const POOLS: usize = 1024;
    /// Backends of one pool.
    pub const BACKENDS: usize = 10_000;
    /// `source_addresses` of one pool.
    pub const SOURCE_ADDRESSES: usize = 64;
    /// `[[pool.signal]]`s of one pool.
    pub const SIGNALS: usize = 16;
    /// `[pool.passive]` `failures` in a row.
    pub const PASSIVE_FAILURES: u32 = 1000;
    /// `[pool.passive]` `backoff` and `max_backoff`: a day.
    pub const PASSIVE_BACKOFF: Duration = Duration::from_secs(DAY);
    /// A pool's `slow_start`: an hour.
    pub const SLOW_START: Duration = Duration::from_secs(HOUR);
    /// Longest `proxy_header_timeout`.
    pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
    /// A probe's `path` and `host`, in bytes.
    pub const PROBE_PATH: usize = 2048;
    pub const PROBE_HOST: usize = 255;
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it was read from (for messages and relative plugin paths).
    pub file: PathBuf,
    pub runtime: RuntimeConfig,
    /// The admin API (`[admin]`); none without the section.
    pub admin: Option<AdminConfig>,
    pub frontends: Vec<FrontendConfig>,
    pub pools: Vec<PoolConfig>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeConfig {
    /// Data-path threads; default: the number of cores.
    pub workers: usize,
    /// How long one plugin call may run before it is stopped (a fault).
    pub plugin_deadline: Duration,
    /// Linear-memory cap of each plugin instance, in bytes.
    pub plugin_memory: u64,
    /// Reload when the config file or a plugin file changes (default true);
    /// SIGHUP and `POST /reload` work either way.
    pub watch: bool,
    /// After SIGTERM or SIGINT: how long established flows may go on before
    /// what remains is reset (B17).
    pub shutdown_grace: Duration,
    /// Where a `run --takeover` asks this process for its sockets (B17);
    /// default: [`default_control_socket`].
    pub control_socket: PathBuf,
}

/// The admin API: status, flows, drain, reload, metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Loopback by default; anything else should set a token.
    pub listen: SocketAddr,
    /// Bearer token required on every request, from `token` or the
    /// environment variable named by `token_env` (default `FULCRUM_ADMIN_TOKEN`).
    pub token: Option<Secret>,
}

/// A secret (the admin token): compared and sent, never shown in `Debug`
/// output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    /// The secret itself, for comparing or sending it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Environment variable read for the admin token when the config sets none.
pub const ADMIN_TOKEN_ENV: &str = "FULCRUM_ADMIN_TOKEN";
/// Where the admin API listens by default.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9900));

/// A frontend's transport: the same type plugins see in a flow.
pub use fulcrum_sdk::Protocol;

#[derive(Clone, Debug, PartialEq)]
pub struct FrontendConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub pool: String,
    /// No bytes either way for this long ends a TCP flow (B9).
    pub idle_timeout: Duration,
    /// No datagram either way for this long ends a UDP flow.
    pub udp_idle_timeout: Duration,
    /// On idle timeout, reset both sides (B10) instead of closing with FIN.
    pub tcp_reset: bool,
    pub connect_timeout: Duration,
    /// Other backends tried after a failed connect.
    pub connect_retries: u32,
    /// Established flows at which new ones are refused (R2).
    pub max_flows: usize,
    /// Where a JSON line per closed flow goes (`flow_log`); none: nowhere.
    pub flow_log: Option<FlowLogTarget>,
    /// TCP: every connection starts with a PROXY protocol header (v1 or v2)
    /// from an upstream load balancer, whose client is the flow's client.
    pub accept_proxy: bool,
    /// Time a connection has to send its whole PROXY header.
    pub proxy_header_timeout: Duration,
    /// `accept_proxy_from`: the only peers whose PROXY headers are believed
    /// (the upstream balancers); empty: any peer. Others are reset at once.
    pub accept_proxy_from: Vec<ipnet::IpNet>,
}

/// Where a frontend's flow log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowLogTarget {
    Stdout,
    /// Appended to (created if missing).
    File(PathBuf),
}

impl std::fmt::Display for FlowLogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlowLogTarget::Stdout => f.write_str("stdout"),
            FlowLogTarget::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The PROXY protocol version sent to a pool's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// Text: `PROXY TCP4 client-ip server-ip client-port server-port\r\n`.
    V1,
    /// Binary.
    V2,
}

/// What to do with established flows when every backend of a pool is down (B7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnAllDown {
    KeepFlows,
    ResetFlows,
}

/// Where a plugin comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PluginRef {
    /// Built into the binary: `stock:<name>`.
    Stock(String),
    /// A `.wasm` component on disk (relative paths are relative to the config file).
    File(PathBuf),
}

impl std::fmt::Display for PluginRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginRef::Stock(name) => write!(f, "stock:{name}"),
            PluginRef::File(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub balancer: PluginRef,
    /// The plugin's `balancer_config` table, as JSON.
    pub balancer_config: String,
    pub on_all_down: OnAllDown,
    /// Let a flow go to a backend that is its own client (B15); default
    /// false: the host refuses such an answer from any balancer.
    pub allow_hairpin: bool,
    /// Local addresses backend connections come from, in turn (B16); empty:
    /// the kernel's choice. Each gives its own range of source ports.
    pub source_addresses: Vec<std::net::IpAddr>,
    pub backends: Vec<BackendConfig>,
    /// The line of the pool's `balancer` key (or its table), for plugin errors.
    pub balancer_line: usize,
    /// Health probe (`[pool.probe]`); without one every backend counts as up.
    pub probe: Option<ProbeConfig>,
    /// Custom signals (`[[pool.signal]]`): weight and drain, never down (B12).
    pub signals: Vec<ProbeConfig>,
    /// Passive health (`[pool.passive]`): data-path failures take a backend out.
    pub passive: PassiveConfig,
    /// A backend that comes up (recovered or added) gets a share of new flows
    /// that grows from almost nothing to its full weight over this window.
    pub slow_start: Option<Duration>,
    /// TCP: each backend connection starts with a PROXY header naming the
    /// client (`proxy_protocol = "v1" | "v2"`).
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// Passive health (`[pool.passive]`), on by default: `failures` consecutive
/// failures of the data path toward a backend (TCP connect refused or timed
/// out, UDP port unreachable) take it out for `backoff`, doubling with each
/// ejection in a row up to `max_backoff`; a passing probe or the back-off's
/// end brings it back. At most `max_ejected_percent` of a pool's backends
/// are out at once, so that a fault of this host's own cannot empty a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassiveConfig {
    pub enabled: bool,
    pub failures: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub max_ejected_percent: u32,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            enabled: true,
            failures: 5,
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeProtocol {
    /// Connect succeeds = success.
    Tcp,
    /// GET `path`; 200 = success (unless the health plugin says otherwise).
    Http,
    /// GET `path` over TLS, the certificate verified unless `tls_verify = false`.
    Https,
}

/// A probe (`[pool.probe]`) or a signal (`[[pool.signal]]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    pub protocol: ProbeProtocol,
    /// Port to probe; default: the backend's own port (B14).
    pub port: Option<u16>,
    pub path: String,
    /// `Host` header; default: the backend's address.
    pub host: Option<String>,
    /// Time between two probes of a backend (each backend's start is spread
    /// over one interval).
    pub interval: Duration,
    /// Time allowed for one probe; at most `interval` (default: the interval).
    /// A probe that times out counts at the end of its interval, so a backend
    /// that stops answering is down after more than threshold x interval and
    /// less than (threshold + 1) x interval (B6).
    pub timeout: Duration,
    /// Consecutive results that change the state (not used by signals).
    pub threshold: u32,
    pub health: PluginRef,
    /// The health plugin's `health_config`, as JSON.
    pub health_config: String,
    pub tls: TlsConfig,
    /// The line of the `health` key (or the table), for plugin errors.
    pub line: usize,
}

/// How HTTPS probes check a backend's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TlsConfig {
    /// Extra trusted CA certificates (PEM), besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// `false` accepts any certificate (self-signed backends). Default: true.
    pub verify: bool,
    /// Name to verify (and send as SNI); default: the backend's IP address.
    pub server_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    /// 0..=100; 0 takes no new flows.
    pub weight: u32,
}

impl Config {
    /// Reads and validates a config file; one above [`limits::CONFIG_BYTES`]
    /// is refused without reading it whole (nor reading on forever from a
    /// device or a pipe).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let too_big = || {
            ConfigError::whole_file(
                path,
                format!("the file is larger than {} MiB: refused", limits::CONFIG_BYTES >> 20),
            )
        };
        let file = std::fs::File::open(path).map_err(|e| ConfigError::unreadable(path, &e))?;
        // A regular file is measured first; a device or a pipe is read up to the cap.
        if file.metadata().is_ok_and(|m| m.is_file() && m.len() > limits::CONFIG_BYTES) {
            return Err(too_big());
        }
        let mut text = String::new();
        file.take(limits::CONFIG_BYTES + 1).read_to_string(&mut text).map_err(|e| ConfigError::unreadable(path, &e))?;
        if text.len() as u64 > limits::CONFIG_BYTES {
            return Err(too_big());
        }
        Config::parse(path, &text)
    }

    /// Parses and validates config text; `path` names it in errors and anchors
    /// relative plugin paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let src = Source::new(path, text);
        let raw: RawConfig = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
        raw.validate(&src)
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Every plugin file the config names (watched for hot reload).
    pub fn plugin_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for p in &self.pools {
            let health = p.probe.iter().chain(&p.signals).map(|c| &c.health);
            for plugin in std::iter::once(&p.balancer).chain(health) {
                if let PluginRef::File(path) = plugin {
                    files.push(path.clone());
                }
            }
        }
        files
    }
}

/// The default `control_socket` of a config file: in the runtime directory
/// (`$RUNTIME_DIRECTORY`, as systemd's `RuntimeDirectory=` sets it, else
/// `$XDG_RUNTIME_DIR`, else a private directory of Fulcrum's own,
/// `<temp>/fulcrum-<uid>`, made 0700 when it is first listened on), named
/// after a SHA-256 of the config file's full path (stable across builds and
/// toolchains), so that two Fulcrums with different configs never meet and
/// the old and new process of one always do.
pub fn default_control_socket(config: &Path) -> PathBuf {
    use sha2::Digest;
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR"))
        .map_or_else(private_default_dir, PathBuf::from);
    let full = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_owned());
    let digest = sha2::Sha256::digest(full.as_os_str().as_encoded_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("fulcrum-{name}.sock"))
}

/// `<temp>/fulcrum-<uid>`: where control sockets go when there is no runtime directory.
fn private_default_dir() -> PathBuf {
    std::env::temp_dir().join(format!("fulcrum-{}", rustix::process::geteuid().as_raw()))
}

/// Is `dir` the private directory [`default_control_socket`] falls back to?
pub fn is_private_default_dir(dir: &Path) -> bool {
    dir == private_default_dir()
}

impl PluginRef {
    pub(crate) fn parse(text: &str, config_file: &Path) -> PluginRef {
        match text.strip_prefix("stock:") {
            Some(name) => PluginRef::Stock(name.to_owned()),
            None => PluginRef::File(raw::relative_to(config_file, text)),
        }
    }
}

#[cfg(test)]
mod tests;
