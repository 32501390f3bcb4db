//! Golden fixtures: `tests/fixtures/<case>/events.jsonl` resolved in log
//! order must give the persons and tables of `expected.json`.

mod common;

use serde_json::{json, Value};

#[test]
fn every_fixture_case_matches_its_expected_tables() {
    let cases = common::fixture_cases();
    assert!(cases.len() >= 2, "at least two fixture cases");
    for case in cases {
        let events = common::read_events(&case);
        let (persons, store) = common::live(&events);
        let (identities, links) = store.tables();
        let actual = json!({
            "person_ids": persons,
            "identities": identities,
            "persons": links,
        });
        let expected = std::fs::read_to_string(case.join("expected.json")).expect("expected.json");
        let expected: Value = serde_json::from_str(&expected).expect("expected.json is json");
        assert_eq!(actual, expected, "fixture {}", case.display());

        // The same log resolved one event per batch through the preloaded
        // overlay gives the same result.
        let mut batched = common::Store::default();
        let cuts: Vec<usize> = (0..=events.len()).collect();
        assert_eq!(common::run_batches(&mut batched, &events, &cuts), persons);
        assert_eq!(batched, store, "fixture {} in batches", case.display());
    }
}
