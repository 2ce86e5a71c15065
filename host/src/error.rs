//! The crate's errors: who is at fault and what to do about it.
//!
//! - [`Error`]: a configuration could not be started or applied (config,
//!   plugin, probe set-up, listener, resources).
//! - [`ReloadError`]: a reload did not take effect (the running config stays).
//! - [`DrainError`]: an admin drain named no such pool or backend.
//! - [`TlsSetupError`]: an HTTPS probe's TLS could not be set up.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::plugin::PluginError;
use rustls::pki_types::InvalidDnsNameError;

/// Why Fulcrum could not start (or apply) a configuration.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The config is wrong: fix the file.
    Config(ConfigError),
    /// A pool's plugin could not be loaded: fix the plugin or its config.
    /// `key` is `balancer` or `health`.
    Plugin { file: PathBuf, line: usize, pool: String, key: &'static str, error: Box<PluginError> },
    /// A pool's HTTPS probe could not be set up (e.g. an unreadable CA file).
    Probe { file: PathBuf, line: usize, pool: String, error: Box<TlsSetupError> },
    /// A frontend (or the admin API) could not listen: address in use, not
    /// local, no permission.
    Listen { frontend: String, addr: SocketAddr, error: std::io::Error },
    /// `run --takeover` could not take over (no process answers, or it broke off).
    Takeover(String),
    /// `fulcrum plugin new` or `fulcrum plugin check` found a problem.
    Authoring(String),
    /// A pool's `source_addresses` names an address this host cannot send from (B16).
    Source { pool: String, addr: std::net::IpAddr, error: std::io::Error },
    /// The host could not start a thread or runtime (out of resources).
    Resources { what: &'static str, error: std::io::Error },
    /// The Wasm engine could not start.
    Engine(PluginError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => e.fmt(f),
            Error::Plugin { file, line, pool, key, error } => {
                write!(f, "{}:{line}: pool `{pool}` key `{key}`: {error}", file.display())
            }
            Error::Probe { file, line, pool, error } => {
                write!(f, "{}:{line}: pool `{pool}` probe: {error}", file.display())
            }
            Error::Listen { frontend, addr, error } => {
                write!(f, "frontend `{frontend}`: cannot listen on {addr}: {error}")
            }
            Error::Takeover(message) | Error::Authoring(message) => f.write_str(message),
            Error::Source { pool, addr, error } => {
                write!(
                    f,
                    "pool `{pool}`: cannot send from source address {addr} (is it an address of this host?): {error}"
                )
            }
            Error::Resources { what, error } => write!(f, "cannot start {what} (out of resources?): {error}"),
            Error::Engine(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

/// Why a reload did not take effect. The running configuration stays.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReloadError {
    /// The server was started from config text, not a file: there is nothing
    /// to re-read.
    NoConfigFile,
    /// The new config is wrong, or a plugin, probe or listener of it could not
    /// be set up: fix what the error names.
    Rejected(Error),
    /// The server is shutting down.
    ShuttingDown,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::NoConfigFile => f.write_str("this server was not started from a config file"),
            ReloadError::Rejected(e) => e.fmt(f),
            ReloadError::ShuttingDown => f.write_str("the server is shutting down"),
        }
    }
}

impl std::error::Error for ReloadError {}

impl From<Error> for ReloadError {
    fn from(e: Error) -> Self {
        ReloadError::Rejected(e)
    }
}

/// Why an admin drain (or undrain) did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DrainError {
    /// The running config has no such pool.
    NoPool { pool: String },
    /// The pool has no backend with that address.
    NoBackend { pool: String, addr: SocketAddr },
    /// The server is shutting down.
    ShuttingDown,
}

impl fmt::Display for DrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DrainError::NoPool { pool } => write!(f, "no pool named `{pool}`"),
            DrainError::NoBackend { pool, addr } => write!(f, "pool `{pool}` has no backend {addr}"),
            DrainError::ShuttingDown => f.write_str("the server is shutting down"),
        }
    }
}

impl std::error::Error for DrainError {}

/// Why an HTTPS probe could not be set up.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// rustls refused the protocol versions (a build problem, not the config's).
    Provider(rustls::Error),
    /// `tls_ca_file` could not be read as PEM.
    CaFile { path: PathBuf, error: rustls::pki_types::pem::Error },
    /// `tls_ca_file` holds no certificate.
    NoCertificate { path: PathBuf },
    /// A certificate of `tls_ca_file` is not a usable CA.
    BadCertificate { path: PathBuf, error: rustls::Error },
    /// `tls_server_name` is not a DNS name or IP address.
    ServerName { name: String, error: InvalidDnsNameError },
}

impl fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsSetupError::Provider(e) => write!(f, "TLS setup: {e}"),
            TlsSetupError::CaFile { path, error } => write!(f, "tls_ca_file {}: {error}", path.display()),
            TlsSetupError::NoCertificate { path } => {
                write!(f, "tls_ca_file {}: no PEM certificate in it", path.display())
            }
            TlsSetupError::BadCertificate { path, error } => write!(f, "tls_ca_file {}: {error}", path.display()),
            TlsSetupError::ServerName { name, error } => write!(f, "tls_server_name `{name}`: {error}"),
        }
    }
}

impl std::error::Error for TlsSetupError {}
