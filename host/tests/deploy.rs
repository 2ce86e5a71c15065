//! The deployment recipes in `deploy/` are checked: the systemd unit by
//! `systemd-analyze verify` (where systemd is installed) and by what it must
//! say for Fulcrum's signals; the Dockerfile by what it must say to build
//! from source on the pinned toolchain and stop gracefully.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

/// The value of `key=` in a unit file (its last setting).
fn setting<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines().rev().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn the_systemd_unit_verifies_and_fits_fulcrums_signals() {
    let unit = read("deploy/fulcrum.service");
    assert_eq!(setting(&unit, "ExecStart"), Some("/usr/local/bin/fulcrum run -c /etc/fulcrum/fulcrum.toml"));
    assert_eq!(setting(&unit, "ExecReload"), Some("/bin/kill -HUP $MAINPID"), "reload is SIGHUP");
    assert_eq!(setting(&unit, "KillSignal"), Some("SIGTERM"), "stop drains on SIGTERM");
    // The stop timeout leaves room for the default shutdown grace.
    let timeout: u64 = setting(&unit, "TimeoutStopSec").unwrap().trim_end_matches('s').parse().unwrap();
    assert!(timeout > fulcrum::config::DEFAULT_SHUTDOWN_GRACE.as_secs(), "TimeoutStopSec={timeout}");
    // The takeover recipe (README): the new unit, of the same named dynamic
    // user, finds the control socket in the runtime directory, which outlives
    // the old unit's stop.
    assert_eq!(setting(&unit, "DynamicUser"), Some("yes"));
    assert_eq!(setting(&unit, "User"), Some("fulcrum"), "a named dynamic user: the next unit gets the same uid");
    assert_eq!(setting(&unit, "RuntimeDirectory"), Some("fulcrum"));
    assert_eq!(setting(&unit, "RuntimeDirectoryPreserve"), Some("yes"), "the control socket outlives the old unit");
    // Wasmtime writes machine code: W^X denial would break every plugin.
    assert!(setting(&unit, "MemoryDenyWriteExecute").is_none_or(|v| v == "no"));

    let verify = Command::new("systemd-analyze").arg("--version").output();
    if verify.is_err() {
        eprintln!("systemd-analyze is not installed: the unit was checked by its settings only");
        return;
    }
    // Verified as installed, but with the binary this build made.
    let dir = std::env::temp_dir().join(format!("fulcrum-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fulcrum.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/fulcrum", env!("CARGO_BIN_EXE_fulcrum"))).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It warns about what it ignores without failing: any word on the unit is a defect.
    assert!(out.status.success() && !stderr.contains("fulcrum.service"), "systemd-analyze verify: {stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_dockerfile_builds_from_source_on_the_pinned_toolchain_and_stops_gracefully() {
    let dockerfile = read("deploy/Dockerfile");
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain.lines().find_map(|l| l.strip_prefix("channel = ")).unwrap().trim_matches('"');
    let minor = channel.rsplit_once('.').map_or(channel, |(m, _)| m);
    assert!(dockerfile.contains(&format!("FROM rust:{minor}")), "not the pinned toolchain {channel}");
    assert!(dockerfile.contains("cargo build --release --locked -p fulcrum"), "not built from source");
    assert!(dockerfile.contains("STOPSIGNAL SIGTERM"));
    assert!(dockerfile.contains(r#"CMD ["run", "-c", "/etc/fulcrum/fulcrum.toml"]"#));
    assert!(!dockerfile.contains(".wasm"), "stock plugins come from the build, never copied in");
}
