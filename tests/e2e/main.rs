//! The end-to-end tests: real sockets on loopback, real probes, real plugins,
//! and the real binary where a test says so. One test binary of modules, one
//! per feature (`cargo test -p fulcrum-tests --test e2e -- takeover::`).
//!
//! Tests that change what the whole process shares stay binaries of their
//! own: `descriptors` and `udp_flood` lower the descriptor limit,
//! `reload_storm` sends SIGHUP to its own process, `takeover_soak` is the
//! long one.
//!
//! Third-party programs, and the tests that drive them: nginx and HAProxy
//! (`proxy_protocol`), headless Chromium (`operators`, the dashboard),
//! `ip netns` and `sysctl` (`source_ports`), python3 as another uid
//! (`takeover`), Node and componentize-js (`second_language`),
//! `systemd-analyze` (`host/tests/deploy.rs`). `scripts/test` installs them.

#![allow(clippy::unwrap_used)]

mod admin;
mod authoring;
mod balancers;
mod edge;
mod flows;
mod health;
mod https_probes;
mod ipv6;
mod isolation;
mod operators;
mod platform;
mod plugin_faults;
mod proxy_protocol;
mod reload;
mod second_language;
mod shutdown;
mod source_ports;
mod takeover;
mod troubleshooter;
mod udp;
