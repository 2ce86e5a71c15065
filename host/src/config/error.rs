//! The one error type of configuration: where (file, line, key) and what.

use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration the user must fix. It names the file, the line (when the
/// file could be read) and the key, and says what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; `None` when the file could not be read at all.
    pub line: Option<usize>,
    /// The key at fault, dotted (`frontend.pool`, `pool.backends.address`).
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn unreadable(file: &Path, err: &std::io::Error) -> Self {
        Self::whole_file(file, format!("cannot read the config file: {err}"))
    }

    /// An error about the file as a whole (no line, no key).
    pub(crate) fn whole_file(file: &Path, message: String) -> Self {
        ConfigError { file: file.to_owned(), line: None, key: String::new(), message }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}
