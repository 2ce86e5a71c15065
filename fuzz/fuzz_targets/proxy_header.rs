//! The PROXY header parser (`accept_proxy`) on any bytes: it never panics,
//! a header it accepts is a prefix of the input that parses alone to the
//! same, it never waits for more than its bound, and the addresses it
//! reads come back the same through the writer (v1 and v2). The properties
//! live next to the parser (`assert_properties`), which also replays this
//! target's corpus in the ordinary tests.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fulcrum::proxy::proxy_header::assert_properties(data));
