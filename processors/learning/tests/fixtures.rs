//! Golden fixtures: `tests/fixtures/<case>/events.jsonl` folded per person
//! must give `expected.json`.

use waymark_foldtest as common;

use waymark_learning::LearningFold;

#[test]
fn every_fixture_case_matches_its_expected_state() {
    let cases = common::fixture_cases(env!("CARGO_MANIFEST_DIR"));
    assert!(cases.len() >= 2, "at least two fixture cases");
    for case in cases {
        let (actual, expected) = common::run_fixture(&LearningFold, &case);
        assert_eq!(actual, expected, "fixture {}", case.display());
    }
}

/// The stored bytes of every fixture case are the golden ones: a change to
/// the state's stored shape needs a new `STATE_ENCODING` and a
/// `projection_version` bump.
#[test]
fn stored_encoding_is_unchanged() {
    for case in common::fixture_cases(env!("CARGO_MANIFEST_DIR")) {
        common::assert_stored_encoding(&LearningFold, waymark_learning::STATE_ENCODING, &case);
    }
}
