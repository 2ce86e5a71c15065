//! The one `bindgen!` site: host bindings of the plugin contract (`wit/`),
//! one module per world. The health world reuses the balancer world's shared
//! interfaces so that both speak the same Rust types.

pub mod balancer {
    wasmtime::component::bindgen!({
        world: "balancer",
        path: "../wit",
    });
}

pub mod health {
    wasmtime::component::bindgen!({
        world: "health",
        path: "../wit",
        with: {
            "fulcrum:plugin/types": super::balancer::fulcrum::plugin::types,
            "fulcrum:plugin/host": super::balancer::fulcrum::plugin::host,
        },
    });
}

pub use balancer::fulcrum::plugin::types;
