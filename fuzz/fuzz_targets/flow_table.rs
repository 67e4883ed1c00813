//! The core's flow table under arbitrary sequences of operations, invariants checked after
//! each (udplb_core::fuzzing::flow_table).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| udplb_core::fuzzing::flow_table(data));
