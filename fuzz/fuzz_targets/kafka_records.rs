//! Fuzz target `kafka_records`: see `waymark_fuzz::kafka_records`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_fuzz::kafka_records(data));
