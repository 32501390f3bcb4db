//! Fuzz target `kafka_request`: see `waymark_fuzz::kafka_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_fuzz::kafka_request(data));
