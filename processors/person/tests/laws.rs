//! Property tests of the fold laws for [`PersonFold`].

use waymark_foldtest as common;

use proptest::prelude::*;
use waymark_core::{ContentType, EventData, Identity, InteractionKind, LessonResult};
use waymark_person::PersonFold;

/// Any event type: the person fold counts them all.
fn arb_data() -> impl Strategy<Value = EventData> + Clone {
    prop_oneof![
        Just(EventData::IdentityLinked(Identity::new("tg", "2"))),
        Just(EventData::InteractionRecorded {
            kind: InteractionKind::Message,
            content_type: ContentType::Text,
            content: Some("hi".into()),
            channel: None,
            direction: None,
        }),
        Just(EventData::JourneyStarted {
            journey_id: "j".into(),
            stage: None,
        }),
        Just(EventData::JourneyCompleted {
            journey_id: "j".into(),
        }),
        Just(EventData::LessonCompleted {
            course_id: "c".into(),
            lesson_id: "l".into(),
            result: Some(LessonResult {
                points: 1.0,
                max_points: 2.0,
            }),
        }),
    ]
}

const DAY: i64 = 86_400_000;

proptest! {
    #[test]
    fn redelivery_changes_nothing(
        events in common::arb_events(arb_data(), "e[0-9]", 30 * DAY, 0..40),
        again in proptest::collection::vec(any::<bool>(), 40),
    ) {
        common::check_redelivery(&PersonFold, &events, &again);
    }

    #[test]
    fn duplicate_within_window_applies_once(
        events in common::arb_unique_events(arb_data(), 6 * DAY, 1..30),
        copies in proptest::collection::vec((0..30usize, 0..30usize), 0..10),
    ) {
        common::check_duplicates(&PersonFold, &events, &copies);
    }

    #[test]
    fn chunked_replay_equals_live(
        events in common::arb_events(arb_data(), "e[0-9]", 30 * DAY, 0..40),
        cuts in proptest::collection::vec(0..41usize, 0..6),
    ) {
        common::check_chunked_replay(&PersonFold, &events, &cuts);
    }
}
