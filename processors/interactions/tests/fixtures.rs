//! Golden fixtures: `tests/fixtures/<case>/events.jsonl` folded per person
//! must give `expected.json`, through the fold and through the stored
//! timeline alike, and the timeline's stored rows are the golden ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use serde_json::Value;
use waymark_foldtest as common;
use waymark_interactions::{InteractionsFold, STATE_ENCODING};
use waymark_runtime::memory::MemoryStore;

/// Small chunks, so the fixtures' rows include splits.
const CHUNK_BYTES: u64 = 200;

#[test]
fn every_fixture_case_matches_its_expected_state() {
    let cases = common::fixture_cases(env!("CARGO_MANIFEST_DIR"));
    assert!(cases.len() >= 2, "at least two fixture cases");
    for case in cases {
        let (actual, expected) = common::run_fixture(&InteractionsFold::default(), &case);
        assert_eq!(actual, expected, "fixture {}", case.display());
    }
}

/// The timeline's rows for a case (one record per batch, as a live
/// pipeline that keeps up does).
async fn timeline(case: &std::path::Path) -> (MemoryStore, Vec<String>) {
    let events = common::read_events(case);
    let store = MemoryStore::new();
    let handler = support::handler(&InteractionsFold::default(), CHUNK_BYTES);
    for record in support::records(&events) {
        support::handle(&handler, &store, &[record]).await;
    }
    let mut persons: Vec<String> = events
        .iter()
        .filter_map(|e| e.person_id.map(|p| p.to_string()))
        .collect();
    persons.sort();
    persons.dedup();
    (store, persons)
}

#[tokio::test]
async fn the_stored_timeline_holds_the_expected_state() {
    for case in common::fixture_cases(env!("CARGO_MANIFEST_DIR")) {
        let (store, persons) = timeline(&case).await;
        let mut actual = serde_json::Map::new();
        for person in persons {
            let state = support::stored_state(&store, &person).await.unwrap();
            actual.insert(person, serde_json::to_value(&state).unwrap());
        }
        let (_, expected) = common::run_fixture(&InteractionsFold::default(), &case);
        assert_eq!(
            Value::Object(actual),
            expected,
            "fixture {}",
            case.display()
        );
    }
}

/// The stored rows of every fixture case are the golden ones: a change to
/// their stored shape needs a new `STATE_ENCODING` and a
/// `projection_version` bump.
#[tokio::test]
async fn stored_encoding_is_unchanged() {
    for case in common::fixture_cases(env!("CARGO_MANIFEST_DIR")) {
        let (store, _) = timeline(&case).await;
        let rows: BTreeMap<String, Vec<u8>> = support::rows(&store);
        assert!(
            rows.keys().any(|k| k.contains("/c/")),
            "fixture {} stores chunks",
            case.display()
        );
        common::assert_golden_rows(STATE_ENCODING, &case, &rows);
    }
}
