//! Property tests of the fold laws for [`InteractionsFold`], plus the
//! retention and paging invariants checked against a naive model.

use waymark_foldtest as common;

use chrono::Duration;
use proptest::prelude::*;
use waymark_core::{
    ContentType, Direction, Event, EventData, EventType, Fold, InteractionKind, Tracked,
};
use waymark_interactions::{InteractionItem, InteractionsFold, InteractionsState};

const DAY: i64 = 86_400_000;

fn arb_interaction() -> impl Strategy<Value = EventData> + Clone {
    (
        prop_oneof![Just(InteractionKind::Message), Just(InteractionKind::View)],
        prop_oneof![Just(ContentType::Text), Just(ContentType::None)],
        proptest::option::of("[a-z]{0,3}"),
        proptest::option::of(Just("sms".to_string())),
        proptest::option::of(prop_oneof![
            Just(Direction::Inbound),
            Just(Direction::Outbound)
        ]),
    )
        .prop_map(|(kind, content_type, content, channel, direction)| {
            EventData::InteractionRecorded {
                kind,
                content_type,
                content,
                channel,
                direction,
            }
        })
}

/// Mostly interactions, some other events (they move `latest_time` too).
fn arb_data() -> impl Strategy<Value = EventData> + Clone {
    prop_oneof![
        3 => arb_interaction(),
        1 => Just(EventData::JourneyCompleted { journey_id: "j".into() }),
    ]
}

/// A short retention so that the generated 30-day logs prune.
fn fold() -> InteractionsFold {
    InteractionsFold::new(Duration::days(10))
}

proptest! {
    #[test]
    fn redelivery_changes_nothing(
        events in common::arb_events(arb_data(), "e[0-9]", 30 * DAY, 0..40),
        again in proptest::collection::vec(any::<bool>(), 40),
    ) {
        common::check_redelivery(&fold(), &events, &again);
    }

    #[test]
    fn duplicate_within_window_applies_once(
        events in common::arb_unique_events(arb_data(), 6 * DAY, 1..30),
        copies in proptest::collection::vec((0..30usize, 0..30usize), 0..10),
    ) {
        common::check_duplicates(&InteractionsFold::new(Duration::days(3)), &events, &copies);
    }

    #[test]
    fn chunked_replay_equals_live(
        events in common::arb_events(arb_data(), "e[0-9]", 30 * DAY, 0..40),
        cuts in proptest::collection::vec(0..41usize, 0..6),
    ) {
        common::check_chunked_replay(&fold(), &events, &cuts);
    }

    /// With distinct ids, the list is exactly the interactions not older
    /// than the final horizon, sorted newest first then by id.
    #[test]
    fn list_is_the_sorted_interactions_within_the_final_horizon(
        events in common::arb_unique_events(arb_data(), 30 * DAY, 0..40),
    ) {
        let fold = fold();
        let mut state = InteractionsState::default();
        for e in &events {
            fold.apply(&mut state, e);
        }
        let latest = events.iter().map(|e| e.time).max();
        prop_assert_eq!(state.latest_time, latest);
        let mut expected: Vec<&Event> = events
            .iter()
            .filter(|e| e.event_type() == EventType::InteractionRecorded)
            .filter(|e| latest.is_some_and(|l| e.time >= l - fold.retention()))
            .collect();
        expected.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.id.cmp(&b.id)));
        let got: Vec<(&str, _)> = state.items.iter().map(|i| (i.id.as_str(), i.time)).collect();
        let want: Vec<(&str, _)> = expected.iter().map(|e| (e.id.as_str(), e.time)).collect();
        prop_assert_eq!(got, want);
    }

    /// Walking all pages from no cursor returns each item in range exactly
    /// once, in list order, whatever the page size.
    #[test]
    fn paging_walks_the_range_exactly_once(
        events in common::arb_events(arb_interaction(), "e[0-9]{1,2}", 10 * DAY, 0..40),
        since in proptest::option::of(0..10 * DAY),
        until in proptest::option::of(0..10 * DAY),
        limit in 1..7usize,
    ) {
        let mut tracked = Tracked::default();
        let fold = InteractionsFold::default();
        for (i, e) in events.iter().enumerate() {
            tracked.apply(&fold, e, waymark_core::Position::new(0, i as u64), common::WINDOW);
        }
        let state = tracked.state;
        let since = since.map(common::time_at);
        let until = until.map(common::time_at);
        let want: Vec<&InteractionItem> = state
            .items
            .iter()
            .filter(|i| since.is_none_or(|s| i.time >= s) && until.is_none_or(|u| i.time < u))
            .collect();
        let mut got = Vec::new();
        let mut cursor: Option<(chrono::DateTime<chrono::Utc>, String)> = None;
        loop {
            let (page, next) =
                state.page(since, until, cursor.as_ref().map(|(t, id)| (*t, id.as_str())), limit);
            prop_assert!(page.len() <= limit);
            got.extend(page);
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
            prop_assert!(got.len() <= want.len(), "paging does not terminate");
        }
        prop_assert_eq!(got, want);
    }
}
