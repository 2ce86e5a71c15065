//! Parse + validate of any config text must return `Ok` or a `ConfigError`
//! that names a place, and never panic (R8).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match fulcrum::config::Config::parse(Path::new("/nonexistent/fuzz.toml"), text) {
            Ok(config) => assert!(!config.pools.is_empty() || config.frontends.is_empty()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
