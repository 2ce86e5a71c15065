//! Compiles the stock plugins (`plugins/*`) to Wasm components and generates
//! `$OUT_DIR/plugins.rs`, which `plugin::stock` embeds with `include_bytes!`.

use std::path::Path;

use fulcrum_wasm_build::{Plugin, build};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    build(
        &[
            &[
                Plugin { package: "fulcrum-plugin-round-robin", name: "round-robin" },
                Plugin { package: "fulcrum-plugin-five-tuple-hash", name: "five-tuple-hash" },
                Plugin { package: "fulcrum-plugin-source-ip", name: "source-ip" },
                Plugin { package: "fulcrum-plugin-least-connections", name: "least-connections" },
                Plugin { package: "fulcrum-plugin-random", name: "random" },
                Plugin { package: "fulcrum-plugin-p2c", name: "p2c" },
                Plugin { package: "fulcrum-plugin-maglev", name: "maglev" },
            ],
            &[
                Plugin { package: "fulcrum-plugin-http-200", name: "http-200" },
                Plugin { package: "fulcrum-plugin-http-status", name: "http-status" },
            ],
        ],
        &[&root.join("plugins"), &root.join("sdk"), &root.join("wit")],
    );
}
