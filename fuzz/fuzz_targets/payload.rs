//! The payload-key readers (RADIUS, SIP, bytes at an offset, a delimited token): any bytes
//! give a key or none, never a panic; parsed RADIUS attributes stay within their packet.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| udplb_core::fuzzing::payload(data));
