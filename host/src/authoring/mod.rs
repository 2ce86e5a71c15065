//! # Writing plugins
//!
//! - [`scaffold`]: `fulcrum plugin new`: a plugin crate to start from.
//! - [`inspect`]: `fulcrum plugin check`: what a `.wasm` file is, as a
//!   plugin, or exactly what is wrong with it.

pub mod inspect;
pub mod scaffold;
