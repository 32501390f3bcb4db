//! The fold contract of a projection processor, and the per-person record
//! that makes folding exactly-once.

use std::collections::BTreeMap;
use std::fmt::Debug;

use chrono::{DateTime, Duration, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// A position in a partitioned log: the partition and the offset of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Partition of the topic.
    pub partition: u32,
    /// Offset of the record within the partition.
    pub offset: u64,
}

impl Position {
    /// Builds a position.
    pub fn new(partition: u32, offset: u64) -> Self {
        Self { partition, offset }
    }
}

/// A projection processor: how one event changes one person's state.
///
/// Implementations are pure and synchronous — no IO, no clock, no
/// randomness — so the runtime can batch, retry and replay them freely and
/// a replay from offset 0 gives exactly the state that live processing gave.
/// Every event of `waymark.events` is keyed by its `person_id`; the runtime
/// loads that person's state, calls [`Fold::apply`] for each event in log
/// order and writes the state back with the log position it reflects.
pub trait Fold: Send + Sync + 'static {
    /// One person's projection state.
    type State: Default
        + Clone
        + PartialEq
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static;

    /// Applies one event (of any type; ignore the ones that do not matter).
    fn apply(&self, state: &mut Self::State, event: &Event);
}

/// What [`Tracked::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The event changed (or may have changed) the state.
    Applied,
    /// The event's id was applied before within the dedupe window: no change.
    Duplicate,
    /// The record's log position is already reflected in the state
    /// (redelivery after a crash or rebalance): no change.
    Redelivered,
}

/// One person's stored record around a fold's state.
///
/// It records the log position the state reflects and the event ids applied
/// within the dedupe window, so that
/// - a redelivered record (position at or before [`Tracked::position`] on
///   the same partition) changes nothing, and
/// - an event whose `id` was applied before changes nothing while the earlier
///   copy's event time lies within `window` of the latest event time applied
///   to the person (contract §4, measured in event time so a replay decides
///   exactly as live processing did), and
/// - an event whose *source* (the position of the input record it was
///   resolved from, see [`Tracked::apply_from`]) is at or before one already
///   applied from the same source partition changes nothing, whatever its
///   event time: that is a record appended again by a producer that crashed
///   between appending and recording its progress.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Tracked<S> {
    /// The last log position applied to this record.
    pub position: Option<Position>,
    /// The latest event time applied to this person.
    pub latest_time: Option<DateTime<Utc>>,
    /// Ids of applied events, with their event time in microseconds, kept
    /// while they are within the dedupe window of `latest_time`.
    pub seen: BTreeMap<String, i64>,
    /// Per source partition, the highest source offset applied (one entry
    /// per input partition this person's events came from).
    pub sources: BTreeMap<u32, u64>,
    /// The fold's state.
    pub state: S,
}

impl<S> Tracked<S> {
    /// Applies the record at `position` through `fold`, deduplicating by
    /// position and by event id within `window`.
    pub fn apply<F>(
        &mut self,
        fold: &F,
        event: &Event,
        position: Position,
        window: Duration,
    ) -> ApplyOutcome
    where
        F: Fold<State = S>,
    {
        self.apply_from(fold, event, position, None, window)
    }

    /// [`Tracked::apply`] for a record resolved from the input record at
    /// `source` (its partition and offset in the input topic): also a
    /// duplicate when a record from the same source partition at or after
    /// that offset was applied. A producer appends its records of one
    /// source partition in source order, so only a record appended again
    /// (after a crash) can come back with a smaller source offset.
    pub fn apply_from<F>(
        &mut self,
        fold: &F,
        event: &Event,
        position: Position,
        source: Option<Position>,
        window: Duration,
    ) -> ApplyOutcome
    where
        F: Fold<State = S>,
    {
        if let Some(last) = self.position {
            if last.partition == position.partition && position.offset <= last.offset {
                return ApplyOutcome::Redelivered;
            }
        }
        self.position = Some(position);

        if let Some(source) = source {
            match self.sources.get_mut(&source.partition) {
                Some(applied) if source.offset <= *applied => return ApplyOutcome::Duplicate,
                Some(applied) => *applied = source.offset,
                None => {
                    self.sources.insert(source.partition, source.offset);
                }
            }
        }

        if let (Some(&earlier), Some(latest)) = (self.seen.get(&event.id), self.latest_time) {
            let earlier = micros_to_time(earlier);
            if latest - earlier <= window {
                return ApplyOutcome::Duplicate;
            }
        }

        fold.apply(&mut self.state, event);
        self.seen
            .insert(event.id.clone(), event.time.timestamp_micros());
        let latest = match self.latest_time {
            Some(t) if t >= event.time => t,
            _ => event.time,
        };
        self.latest_time = Some(latest);
        // A window reaching before the first representable time keeps every id.
        let horizon = latest
            .checked_sub_signed(window)
            .map_or(i64::MIN, |h| h.timestamp_micros());
        self.seen.retain(|_, t| *t >= horizon);
        ApplyOutcome::Applied
    }
}

fn micros_to_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventData;
    use crate::identity::Identity;

    struct Count;
    impl Fold for Count {
        type State = u32;
        fn apply(&self, state: &mut u32, _: &Event) {
            *state += 1;
        }
    }

    fn event(id: &str, time: &str) -> Event {
        Event {
            id: id.into(),
            time: time.parse().unwrap(),
            source: Some(Identity::new("web", "1")),
            person_id: None,
            data: EventData::JourneyCompleted {
                journey_id: "j".into(),
            },
        }
    }

    const WEEK: Duration = Duration::days(7);

    #[test]
    fn redelivered_positions_are_ignored() {
        let mut t = Tracked::<u32>::default();
        let e = event("a", "2026-01-01T00:00:00Z");
        assert_eq!(
            t.apply(&Count, &e, Position::new(0, 5), WEEK),
            ApplyOutcome::Applied
        );
        let e2 = event("b", "2026-01-01T00:00:00Z");
        assert_eq!(
            t.apply(&Count, &e2, Position::new(0, 5), WEEK),
            ApplyOutcome::Redelivered
        );
        assert_eq!(
            t.apply(&Count, &e2, Position::new(0, 4), WEEK),
            ApplyOutcome::Redelivered
        );
        assert_eq!(
            t.apply(&Count, &e2, Position::new(0, 6), WEEK),
            ApplyOutcome::Applied
        );
        assert_eq!(t.state, 2);
    }

    #[test]
    fn a_record_appended_again_is_a_duplicate_whatever_its_event_time() {
        let mut t = Tracked::<u32>::default();
        let far_apart = [
            "2026-01-01T00:00:00Z",
            "2026-03-01T00:00:00Z",
            "2026-06-01T00:00:00Z",
        ];
        // Sources 0/10, 0/11, 1/3 appended, then 0/10 and 0/11 again (a
        // producer's crash), then 0/12: ids alone are out of the window.
        let log = [
            ("a", far_apart[0], (0, 10)),
            ("b", far_apart[1], (0, 11)),
            ("c", far_apart[2], (1, 3)),
            ("a", far_apart[0], (0, 10)),
            ("b", far_apart[1], (0, 11)),
            ("d", far_apart[2], (0, 12)),
        ];
        let outcomes: Vec<ApplyOutcome> = log
            .iter()
            .enumerate()
            .map(|(i, (id, time, (p, o)))| {
                t.apply_from(
                    &Count,
                    &event(id, time),
                    Position::new(0, i as u64),
                    Some(Position::new(*p, *o)),
                    WEEK,
                )
            })
            .collect();
        use ApplyOutcome::{Applied, Duplicate};
        assert_eq!(
            outcomes,
            [Applied, Applied, Applied, Duplicate, Duplicate, Applied]
        );
        assert_eq!(t.state, 4);
        assert_eq!(t.sources, [(0, 12), (1, 3)].into());
    }

    #[test]
    fn a_window_longer_than_time_itself_keeps_every_id_without_overflowing() {
        let mut t = Tracked::<u32>::default();
        for (i, id) in ["a", "b", "a"].into_iter().enumerate() {
            t.apply(
                &Count,
                &event(id, "2026-01-01T00:00:00Z"),
                Position::new(0, i as u64),
                Duration::MAX,
            );
        }
        assert_eq!(t.state, 2);
        assert_eq!(t.seen.len(), 2);
    }

    #[test]
    fn duplicate_ids_within_the_window_are_ignored() {
        let mut t = Tracked::<u32>::default();
        t.apply(
            &Count,
            &event("a", "2026-01-01T00:00:00Z"),
            Position::new(0, 0),
            WEEK,
        );
        t.apply(
            &Count,
            &event("b", "2026-01-08T00:00:00Z"),
            Position::new(0, 1),
            WEEK,
        );
        // exactly 7 days between the earlier copy and the latest: still a duplicate
        assert_eq!(
            t.apply(
                &Count,
                &event("a", "2026-01-01T00:00:00Z"),
                Position::new(0, 2),
                WEEK
            ),
            ApplyOutcome::Duplicate
        );
        t.apply(
            &Count,
            &event("c", "2026-01-08T00:00:01Z"),
            Position::new(0, 3),
            WEEK,
        );
        // now the earlier copy is outside the window: applied again
        assert_eq!(
            t.apply(
                &Count,
                &event("a", "2026-01-01T00:00:00Z"),
                Position::new(0, 4),
                WEEK
            ),
            ApplyOutcome::Applied
        );
        assert_eq!(t.state, 4);
        assert!(t.seen.contains_key("b") && t.seen.contains_key("c"));
    }
}
