//! Fuzz target `log_codec`: see `waymark_fuzz::log_codec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_fuzz::log_codec(data));
