//! The crate's error: who is at fault and what to do about it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::plugin::PluginError;

/// Why Fulcrum could not start (or apply) a configuration.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The config is wrong: fix the file.
    Config(ConfigError),
    /// A pool's plugin could not be loaded: fix the plugin or its config.
    /// `key` is `balancer` or `health`.
    Plugin { file: PathBuf, line: usize, pool: String, key: &'static str, error: Box<PluginError> },
    /// A pool's probe could not be set up (e.g. an unreadable CA file).
    Probe { file: PathBuf, line: usize, pool: String, message: String },
    /// A frontend could not listen (address in use, not local, no permission).
    Listen { frontend: String, addr: SocketAddr, error: std::io::Error },
    /// The host could not start a thread or runtime (out of resources).
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => e.fmt(f),
            Error::Plugin { file, line, pool, key, error } => {
                write!(f, "{}:{line}: pool `{pool}` key `{key}`: {error}", file.display())
            }
            Error::Probe { file, line, pool, message } => {
                write!(f, "{}:{line}: pool `{pool}` probe: {message}", file.display())
            }
            Error::Listen { frontend, addr, error } => {
                write!(f, "frontend `{frontend}`: cannot listen on {addr}: {error}")
            }
            Error::Internal(what) => write!(f, "internal error: {what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}
