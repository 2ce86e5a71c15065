//! Compiles the test-only plugins (`tests/plugins/*`) and the example health
//! plugin (`examples/cpu-backpressure`) to Wasm components;
//! `fulcrum_tests::plugins` writes them to files for configs to point at.

use std::path::Path;

use fulcrum_wasm_build::{Plugin, build};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    build(
        &[
            &[
                Plugin { package: "fulcrum-test-plugin-misbehave", name: "misbehave" },
                Plugin { package: "fulcrum-test-plugin-legacy-balancer", name: "legacy-balancer" },
            ],
            &[
                Plugin { package: "cpu-backpressure", name: "cpu-backpressure" },
                Plugin { package: "fulcrum-test-plugin-health-trap", name: "health-trap" },
            ],
        ],
        &[&root.join("tests/plugins"), &root.join("examples"), &root.join("sdk"), &root.join("wit")],
    );
}
