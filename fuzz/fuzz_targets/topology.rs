//! Fuzz target `topology`: see `waymark_fuzz::topology`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_fuzz::topology(data));
