//! The configuration parser and validator: any bytes give a config or errors, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = udplb_config::parse(text, "fuzz.toml");
    }
});
