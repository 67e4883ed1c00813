//! The PROXY protocol v2 parser: any bytes parse or fail with a reason, never a panic, and a
//! parsed header's length never runs past the input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| udplb_core::fuzzing::proxy(data));
