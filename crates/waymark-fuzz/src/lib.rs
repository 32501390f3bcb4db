//! What the fuzzers check, shared by the coverage-guided fuzz targets
//! (`fuzz/`, cargo-fuzz and libFuzzer) and the stable test that replays
//! every committed corpus and regression input (`tests/corpus.rs`).
//!
//! Each target takes arbitrary bytes to one decoder of untrusted input and
//! checks that it never panics, plus an oracle where one exists:
//!
//! | target | decoder | oracle |
//! |---|---|---|
//! | `envelope` | `Validator::decode` (Ingest, the Kafka endpoint, identity) | an accepted event re-encoded is accepted again as the same event |
//! | `topology` | `waymark_topology::parse` | — (errors, never a panic) |
//! | `log_codec` | the embedded log's stored records | what decodes encodes back to the same bytes |
//! | `kafka_request` | `waymark_broker::decode_request` | — (a refusal, never a panic) |
//! | `kafka_records` | `waymark_broker::records::decode_batches` | every record decoded stays within the limits |
//!
//! A crash found by a fuzzer is saved under `fuzz/regressions/<target>/`,
//! where `tests/corpus.rs` replays it on every test run.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use waymark_broker::records::{decode_batches, Limits};
use waymark_core::Event;
use waymark_runtime::plugin::Registry;
use waymark_schemas::Validator;

/// A fuzz target: bytes in, a panic when its check fails.
pub type Target = fn(&[u8]);

/// Every target, by name (the file names under `fuzz/fuzz_targets/`).
pub const TARGETS: [(&str, Target); 5] = [
    ("envelope", envelope),
    ("topology", topology),
    ("log_codec", log_codec),
    ("kafka_request", kafka_request),
    ("kafka_records", kafka_records),
];

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| match Validator::new() {
        Ok(v) => v,
        Err(e) => panic!("the built-in schemas do not load: {e}"),
    })
}

/// The envelope decoder: an event it accepts, encoded again, is accepted
/// again as the same event.
pub fn envelope(data: &[u8]) {
    let Ok(event) = validator().decode(data) else {
        return;
    };
    let again = event.to_json();
    match validator().decode(&again) {
        Ok(decoded) => assert_eq!(decoded, event, "re-encoded event decodes differently"),
        Err(e) => panic!(
            "an accepted event, re-encoded as {}, is rejected: {e}",
            String::from_utf8_lossy(&again)
        ),
    }
    // The resolved topic's decoder reads what identity writes.
    if event.person_id.is_some() {
        assert_eq!(Event::from_json(&again).ok().as_ref(), Some(&event));
    }
}

fn declarations() -> &'static [waymark_topology::ProcessorDecl] {
    static DECLS: OnceLock<Vec<waymark_topology::ProcessorDecl>> = OnceLock::new();
    DECLS.get_or_init(|| {
        Registry::new(vec![
            Arc::new(waymark_identity::IdentityProcessor),
            Arc::new(waymark_person::PersonProcessor),
            Arc::new(waymark_interactions::InteractionsProcessor),
            Arc::new(waymark_journey::JourneyProcessor),
            Arc::new(waymark_learning::LearningProcessor),
        ])
        .declarations()
    })
}

/// The topology parser: any text is a topology or a list of errors.
pub fn topology(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = waymark_topology::parse(text, declarations());
    }
}

/// The embedded log's record codec: decoding any bytes never panics, and
/// what decodes encodes back to exactly those bytes.
pub fn log_codec(data: &[u8]) {
    if let Some(record) = waymark_embedded::format::decode(data) {
        let encoded = waymark_embedded::format::encode_stored(record.timestamp_ms, &record);
        assert_eq!(encoded, data, "decode then encode changed the bytes");
    }
    let _ = waymark_embedded::format::decode_v1(data);
}

/// A Kafka request frame: decoded or refused, never a panic.
pub fn kafka_request(data: &[u8]) {
    let _ = waymark_broker::decode_request(Bytes::copy_from_slice(data));
}

/// The limits the fuzzer decodes record batches with (small, so that
/// exceeding them is reachable).
pub const FUZZ_LIMITS: Limits = Limits {
    max_message_bytes: 64 * 1024,
    max_decompressed_bytes: 256 * 1024,
};

/// Kafka record batches: decoded or refused, and what decodes stays
/// within the limits.
pub fn kafka_records(data: &[u8]) {
    if let Ok(batches) = decode_batches(Bytes::copy_from_slice(data), FUZZ_LIMITS) {
        for batch in batches {
            for record in &batch.records {
                assert!(
                    record.payload_len() <= FUZZ_LIMITS.max_message_bytes,
                    "a record of {} bytes passed a limit of {}",
                    record.payload_len(),
                    FUZZ_LIMITS.max_message_bytes
                );
            }
        }
    }
}
