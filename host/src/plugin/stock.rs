//! The stock plugins, compiled from `plugins/*` by the build script and
//! embedded in the binary. Config names them `stock:<name>`.

#[allow(dead_code)] // the generated file also names each file path
mod generated {
    include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
}

/// Names of the stock balancers (`balancer = "stock:<name>"`).
pub const BALANCERS: [&str; 7] =
    ["round-robin", "five-tuple-hash", "source-ip", "least-connections", "random", "p2c", "maglev"];
/// Names of the stock health plugins (`health = "stock:<name>"`).
pub const HEALTH: [&str; 2] = ["http-200", "http-status"];
/// Every stock plugin's name.
pub const ALL: [&str; 9] = [
    "round-robin",
    "five-tuple-hash",
    "source-ip",
    "least-connections",
    "random",
    "p2c",
    "maglev",
    "http-200",
    "http-status",
];

/// The component bytes of a stock plugin.
pub fn component(name: &str) -> Option<&'static [u8]> {
    generated::ALL.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_stock_balancer_is_embedded_as_a_component() {
        for name in super::BALANCERS.iter().chain(&super::HEALTH) {
            let bytes = super::component(name).unwrap();
            // A component's preamble: magic, then layer 1 (component) version.
            assert_eq!(&bytes[..4], b"\0asm", "{name}");
            assert_eq!(&bytes[6..8], &[1, 0], "{name} is a core module, not a component");
        }
    }
}
