//! Property tests of the fold laws for [`JourneyFold`].

use waymark_foldtest as common;

use proptest::prelude::*;
use waymark_core::{EventData, Identity};
use waymark_journey::JourneyFold;

const DAY: i64 = 86_400_000;

/// Journey events over two journeys and three stages, plus an unrelated
/// event (it moves the dedupe window but not the journeys).
fn arb_data() -> impl Strategy<Value = EventData> + Clone {
    let journey = prop_oneof![Just("j1".to_string()), Just("j2".to_string())];
    let stage = prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("c".to_string())
    ];
    prop_oneof![
        (journey.clone(), proptest::option::of(stage.clone()))
            .prop_map(|(journey_id, stage)| { EventData::JourneyStarted { journey_id, stage } }),
        (journey.clone(), stage)
            .prop_map(|(journey_id, stage)| EventData::JourneyStageEntered { journey_id, stage }),
        journey.prop_map(|journey_id| EventData::JourneyCompleted { journey_id }),
        Just(EventData::IdentityLinked(Identity::new("tg", "2"))),
    ]
}

proptest! {
    #[test]
    fn redelivery_changes_nothing(
        events in common::arb_events(arb_data(), "e[0-9]", 30 * DAY, 0..40),
        again in proptest::collection::vec(any::<bool>(), 40),
    ) {
        common::check_redelivery(&JourneyFold, &events, &again);
    }

    #[test]
    fn duplicate_within_window_applies_once(
        events in common::arb_unique_events(arb_data(), 6 * DAY, 1..30),
        copies in proptest::collection::vec((0..30usize, 0..30usize), 0..10),
    ) {
        common::check_duplicates(&JourneyFold, &events, &copies);
    }

    #[test]
    fn chunked_replay_equals_live(
        events in common::arb_events(arb_data(), "e[0-9]", 30 * DAY, 0..40),
        cuts in proptest::collection::vec(0..41usize, 0..6),
    ) {
        common::check_chunked_replay(&JourneyFold, &events, &cuts);
    }
}
