//! Fuzz target `envelope`: see `waymark_fuzz::envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_fuzz::envelope(data));
