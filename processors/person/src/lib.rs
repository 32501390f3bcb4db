//! The person processor: per-person activity summary folded from
//! `waymark.events` (contract §4, "Person").
//!
//! # Layout
//! - [`PersonFold`]: the [`Fold`] of the `person` projection.
//! - [`PersonState`]: one person's stored projection.
//! - [`history`]: every event applied to a person, kept in a second table.
//! - [`PersonProcessor`]: the processor as a plugin: both tables, the
//!   fold's handler wrapped in [`history::WithHistory`].
//!
//! The person's `identities` and `merged_into` are owned by the identity
//! processor (`waymark-identity`, `PersonLinks`); the query side joins them
//! with this state to answer `GetPerson`.
//!
//! # Guarantees
//! [`PersonFold::apply`] is pure and synchronous: no IO, no clock. Every event
//! it is given counts, whatever its type; the runtime's
//! [`Tracked`](waymark_core::Tracked) record keeps duplicates (contract §4)
//! and redelivered records away from it, so `event_count` excludes them.
//! `first_seen` / `last_seen` are the min / max *event* time, so they do not
//! depend on the order events arrive in; the counts are sums. A replay from
//! offset 0 therefore reproduces exactly the state live processing built.

pub mod history;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use waymark_core::{Event, EventType, Fold};
use waymark_runtime::plugin::{BuildContext, BuildError, ProcessorFactory, TableSpec};
use waymark_runtime::{Handler, ProjectionHandler};

/// The processor's name.
pub const NAME: &str = "person";

/// The state encoding of the person rows and of the history rows
/// ([`waymark_runtime::row`]): raise it whenever [`PersonState`],
/// [`history::HistoryHead`] or [`history::HistoryEntry`] change shape.
///
/// 1: the first; 2: [`waymark_core::Tracked`] records the sources applied;
/// 3: the history stores one row per event instead of chunks of 32.
pub const STATE_ENCODING: u32 = 3;

/// The person processor: [`PersonFold`] over the events, plus each
/// person's event history.
#[derive(Debug, Clone, Copy, Default)]
pub struct PersonProcessor;

impl ProcessorFactory for PersonProcessor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [TableSpec] {
        const TABLES: &[TableSpec] = &[
            TableSpec::tracked("", "person id"),
            TableSpec {
                suffix: history::HISTORY,
                key: "person id (head) or `<person id>/<event index>`",
                position: history::row_position,
                verified: true,
            },
        ];
        TABLES
    }

    fn state_encoding(&self) -> u32 {
        STATE_ENCODING
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Arc<dyn Handler>, BuildError> {
        Ok(Arc::new(history::WithHistory::new(
            ProjectionHandler::new(
                NAME,
                ctx.table(""),
                ctx.encoding(),
                PersonFold,
                ctx.dedupe_window(),
            ),
            ctx.table(history::HISTORY),
            ctx.encoding(),
            ctx.dedupe_window(),
        )))
    }
}

/// Folds every event of a person into a [`PersonState`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PersonFold;

/// One person's activity summary.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PersonState {
    /// The earliest event time applied; `None` before the first event.
    pub first_seen: Option<DateTime<Utc>>,
    /// The latest event time applied; `None` before the first event.
    pub last_seen: Option<DateTime<Utc>>,
    /// Applied events of every type (duplicates and dead letters excluded).
    pub event_count: u64,
    /// Applied `interaction.recorded` events.
    pub interaction_count: u64,
}

impl Fold for PersonFold {
    type State = PersonState;

    fn apply(&self, state: &mut PersonState, event: &Event) {
        let t = event.time;
        state.first_seen = Some(state.first_seen.map_or(t, |f| f.min(t)));
        state.last_seen = Some(state.last_seen.map_or(t, |l| l.max(t)));
        state.event_count += 1;
        if event.event_type() == EventType::InteractionRecorded {
            state.interaction_count += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_core::{ContentType, EventData, Identity, InteractionKind};

    fn event(time: &str, data: EventData) -> Event {
        Event {
            id: "e".into(),
            time: time.parse().unwrap(),
            source: Some(Identity::new("web", "1")),
            person_id: None,
            data,
        }
    }

    fn interaction() -> EventData {
        EventData::InteractionRecorded {
            kind: InteractionKind::Message,
            content_type: ContentType::Text,
            content: Some("hi".into()),
            channel: None,
            direction: None,
        }
    }

    fn completed() -> EventData {
        EventData::JourneyCompleted {
            journey_id: "j".into(),
        }
    }

    #[test]
    fn empty_state_has_no_times() {
        let s = PersonState::default();
        assert_eq!((s.first_seen, s.last_seen), (None, None));
        assert_eq!((s.event_count, s.interaction_count), (0, 0));
    }

    #[test]
    fn first_event_sets_both_times() {
        let mut s = PersonState::default();
        PersonFold.apply(&mut s, &event("2026-01-02T00:00:00Z", completed()));
        let t = Some("2026-01-02T00:00:00Z".parse().unwrap());
        assert_eq!((s.first_seen, s.last_seen), (t, t));
    }

    #[test]
    fn times_are_min_and_max_of_event_time_not_log_order() {
        let mut s = PersonState::default();
        for time in [
            "2026-01-05T00:00:00Z",
            "2026-01-01T00:00:00Z",
            "2026-01-09T00:00:00Z",
            "2026-01-03T00:00:00Z",
        ] {
            PersonFold.apply(&mut s, &event(time, completed()));
        }
        assert_eq!(s.first_seen, Some("2026-01-01T00:00:00Z".parse().unwrap()));
        assert_eq!(s.last_seen, Some("2026-01-09T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn every_type_counts_and_interactions_count_separately() {
        let mut s = PersonState::default();
        let t = "2026-01-01T00:00:00Z";
        PersonFold.apply(&mut s, &event(t, interaction()));
        PersonFold.apply(&mut s, &event(t, completed()));
        PersonFold.apply(
            &mut s,
            &event(t, EventData::IdentityLinked(Identity::new("tg", "2"))),
        );
        PersonFold.apply(&mut s, &event(t, interaction()));
        assert_eq!(s.event_count, 4);
        assert_eq!(s.interaction_count, 2);
    }
}
