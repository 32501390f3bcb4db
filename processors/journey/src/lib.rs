//! The journey processor: per person and `journey_id`, where the person is
//! in a journey and how many times they went through it (contract §4,
//! "Journey").
//!
//! # Layout
//! - [`JourneyFold`]: the [`Fold`] the runtime registers as `journey`.
//! - [`JourneysState`]: one person's journeys by `journey_id`.
//! - [`JourneyState`], [`JourneyStatus`]: one journey.
//!
//! # Rules
//! - `journey.started` on an unknown journey starts run 1 (`ACTIVE`, `stage`
//!   and `stages` from its `stage`, if any); on a `COMPLETED` journey it
//!   starts a new run (`runs` + 1, `stages` reset to its stage or empty,
//!   `stage` = its stage or empty, `ACTIVE`, `completed_at` cleared,
//!   `started_at` = its time); on an `ACTIVE` journey it is applied as a
//!   `journey.stage_entered` of its stage, or changes only `updated_at`
//!   when it has none.
//! - `journey.stage_entered` records the stage (`stage`, appended to
//!   `stages`); on an unknown journey it starts run 1 implicitly; on a
//!   `COMPLETED` journey the journey stays `COMPLETED`.
//! - `journey.completed` sets `COMPLETED` and `completed_at` = its time
//!   (a repeated one moves `completed_at`); on an unknown journey it starts
//!   run 1 implicitly, already completed.
//! - Every one of them sets `updated_at` to its event time: the time of the
//!   last applied event in log order, which may go back when event times
//!   arrive out of order.
//!
//! # Guarantees
//! [`JourneyFold::apply`] is pure and synchronous: no IO, no clock; other
//! event types leave the state unchanged. Events are applied in log order
//! (contract §4), never reordered by event time, so a replay from offset 0
//! gives exactly the live state. Duplicates within the dedupe window and
//! redelivered records never reach the fold (the runtime's
//! [`Tracked`](waymark_core::Tracked) filters them).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use waymark_core::{Event, EventData, Fold};
use waymark_runtime::plugin::{BuildContext, BuildError, ProcessorFactory, TableSpec};

/// The processor's name.
pub const NAME: &str = "journey";

/// The state encoding of its rows ([`waymark_runtime::row`]): raise it
/// whenever [`JourneysState`] (or a type in it) changes shape.
///
/// 1: the first; 2: [`waymark_core::Tracked`] records the sources applied.
pub const STATE_ENCODING: u32 = 2;

/// The journey processor as a plugin: [`JourneyFold`] over the events, one
/// row per person.
#[derive(Debug, Clone, Copy, Default)]
pub struct JourneyProcessor;

impl ProcessorFactory for JourneyProcessor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [TableSpec] {
        const TABLES: &[TableSpec] = &[TableSpec::tracked("", "person id")];
        TABLES
    }

    fn state_encoding(&self) -> u32 {
        STATE_ENCODING
    }

    fn build(
        &self,
        ctx: &BuildContext<'_>,
    ) -> Result<std::sync::Arc<dyn waymark_runtime::Handler>, BuildError> {
        Ok(ctx.fold(JourneyFold))
    }
}

/// Folds `journey.*` events into a [`JourneysState`].
#[derive(Debug, Clone, Copy, Default)]
pub struct JourneyFold;

/// One person's journeys.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JourneysState {
    /// Journeys by `journey_id`.
    pub journeys: BTreeMap<String, JourneyState>,
}

/// Where a journey is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JourneyStatus {
    /// Started and not completed (the default).
    #[default]
    Active,
    /// Completed; a `journey.started` starts a new run.
    Completed,
}

/// One journey of a person.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JourneyState {
    /// `ACTIVE` or `COMPLETED`.
    pub status: JourneyStatus,
    /// The last stage entered, or the stage of `journey.started`; empty if
    /// none.
    pub stage: String,
    /// Every stage entered in this run, in log order, starting with the
    /// started stage if given.
    pub stages: Vec<String>,
    /// Event time of the event that started this run (explicitly or
    /// implicitly).
    pub started_at: DateTime<Utc>,
    /// Event time of the last applied event of this journey.
    pub updated_at: DateTime<Utc>,
    /// Event time of the last `journey.completed` of this run, if any.
    pub completed_at: Option<DateTime<Utc>>,
    /// How many runs were started (1 for the first).
    pub runs: u32,
}

impl JourneyState {
    /// Run 1, started at `time` (explicitly or implicitly).
    fn first_run(time: DateTime<Utc>) -> Self {
        Self {
            status: JourneyStatus::Active,
            stage: String::new(),
            stages: Vec::new(),
            started_at: time,
            updated_at: time,
            completed_at: None,
            runs: 1,
        }
    }

    fn enter(&mut self, stage: &str) {
        self.stage = stage.to_owned();
        self.stages.push(stage.to_owned());
    }
}

impl Fold for JourneyFold {
    type State = JourneysState;

    fn apply(&self, state: &mut JourneysState, event: &Event) {
        let time = event.time;
        match &event.data {
            EventData::JourneyStarted { journey_id, stage } => {
                match state.journeys.get_mut(journey_id) {
                    Some(j) if j.status == JourneyStatus::Active => {
                        if let Some(stage) = stage {
                            j.enter(stage);
                        }
                        j.updated_at = time;
                    }
                    Some(j) => {
                        let runs = j.runs.saturating_add(1);
                        *j = JourneyState::first_run(time);
                        j.runs = runs;
                        if let Some(stage) = stage {
                            j.enter(stage);
                        }
                    }
                    None => {
                        let mut j = JourneyState::first_run(time);
                        if let Some(stage) = stage {
                            j.enter(stage);
                        }
                        state.journeys.insert(journey_id.clone(), j);
                    }
                }
            }
            EventData::JourneyStageEntered { journey_id, stage } => {
                let j = state
                    .journeys
                    .entry(journey_id.clone())
                    .or_insert_with(|| JourneyState::first_run(time));
                j.enter(stage);
                j.updated_at = time;
            }
            EventData::JourneyCompleted { journey_id } => {
                let j = state
                    .journeys
                    .entry(journey_id.clone())
                    .or_insert_with(|| JourneyState::first_run(time));
                j.status = JourneyStatus::Completed;
                j.completed_at = Some(time);
                j.updated_at = time;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_core::Identity;

    fn day(d: u32) -> DateTime<Utc> {
        format!("2026-01-{d:02}T00:00:00Z").parse().unwrap()
    }

    fn ev(d: u32, data: EventData) -> Event {
        Event {
            id: format!("e{d}"),
            time: day(d),
            source: Some(Identity::new("web", "1")),
            person_id: None,
            data,
        }
    }

    fn started(d: u32, stage: Option<&str>) -> Event {
        ev(
            d,
            EventData::JourneyStarted {
                journey_id: "j".into(),
                stage: stage.map(Into::into),
            },
        )
    }

    fn entered(d: u32, stage: &str) -> Event {
        ev(
            d,
            EventData::JourneyStageEntered {
                journey_id: "j".into(),
                stage: stage.into(),
            },
        )
    }

    fn completed(d: u32) -> Event {
        ev(
            d,
            EventData::JourneyCompleted {
                journey_id: "j".into(),
            },
        )
    }

    fn run(events: &[Event]) -> JourneyState {
        let mut s = JourneysState::default();
        for e in events {
            JourneyFold.apply(&mut s, e);
        }
        s.journeys["j"].clone()
    }

    fn journey(
        status: JourneyStatus,
        stage: &str,
        stages: &[&str],
        (started, updated, completed): (u32, u32, Option<u32>),
        runs: u32,
    ) -> JourneyState {
        JourneyState {
            status,
            stage: stage.into(),
            stages: stages.iter().map(|s| s.to_string()).collect(),
            started_at: day(started),
            updated_at: day(updated),
            completed_at: completed.map(day),
            runs,
        }
    }

    use JourneyStatus::{Active, Completed};

    #[test]
    fn started_with_a_stage() {
        assert_eq!(
            run(&[started(1, Some("a"))]),
            journey(Active, "a", &["a"], (1, 1, None), 1)
        );
    }

    #[test]
    fn started_without_a_stage() {
        assert_eq!(
            run(&[started(1, None)]),
            journey(Active, "", &[], (1, 1, None), 1)
        );
    }

    #[test]
    fn stage_entered_records_every_stage_in_log_order() {
        assert_eq!(
            run(&[started(1, Some("a")), entered(2, "b"), entered(3, "a")]),
            journey(Active, "a", &["a", "b", "a"], (1, 3, None), 1)
        );
    }

    #[test]
    fn stage_entered_on_unknown_journey_starts_it_implicitly() {
        assert_eq!(
            run(&[entered(4, "b")]),
            journey(Active, "b", &["b"], (4, 4, None), 1)
        );
    }

    #[test]
    fn completed_on_unknown_journey_starts_it_completed() {
        assert_eq!(
            run(&[completed(4)]),
            journey(Completed, "", &[], (4, 4, Some(4)), 1)
        );
    }

    #[test]
    fn completed_keeps_the_stage() {
        assert_eq!(
            run(&[started(1, Some("a")), entered(2, "b"), completed(3)]),
            journey(Completed, "b", &["a", "b"], (1, 3, Some(3)), 1)
        );
    }

    #[test]
    fn started_on_completed_starts_a_new_run() {
        let events = [
            started(1, Some("a")),
            entered(2, "b"),
            completed(3),
            started(5, Some("x")),
        ];
        assert_eq!(run(&events), journey(Active, "x", &["x"], (5, 5, None), 2));
    }

    #[test]
    fn started_without_stage_on_completed_resets_the_stage() {
        let events = [started(1, Some("a")), completed(3), started(5, None)];
        assert_eq!(run(&events), journey(Active, "", &[], (5, 5, None), 2));
    }

    #[test]
    fn started_on_active_is_a_stage_entered_of_its_stage() {
        let events = [started(1, Some("a")), started(2, Some("b"))];
        assert_eq!(
            run(&events),
            journey(Active, "b", &["a", "b"], (1, 2, None), 1)
        );
    }

    #[test]
    fn started_on_active_without_stage_only_moves_updated_at() {
        let events = [started(1, Some("a")), started(2, None)];
        assert_eq!(run(&events), journey(Active, "a", &["a"], (1, 2, None), 1));
    }

    #[test]
    fn stage_entered_on_completed_records_it_and_stays_completed() {
        let events = [started(1, Some("a")), completed(2), entered(3, "z")];
        assert_eq!(
            run(&events),
            journey(Completed, "z", &["a", "z"], (1, 3, Some(2)), 1)
        );
    }

    #[test]
    fn repeated_completed_moves_completed_at() {
        let events = [started(1, None), completed(2), completed(4)];
        assert_eq!(
            run(&events),
            journey(Completed, "", &[], (1, 4, Some(4)), 1)
        );
        // even backwards in event time: the last one in log order wins
        let events = [started(1, None), completed(4), completed(2)];
        assert_eq!(
            run(&events),
            journey(Completed, "", &[], (1, 2, Some(2)), 1)
        );
    }

    #[test]
    fn updated_at_follows_log_order_not_event_time() {
        let events = [started(5, Some("a")), entered(3, "b")];
        assert_eq!(
            run(&events),
            journey(Active, "b", &["a", "b"], (5, 3, None), 1)
        );
    }

    #[test]
    fn third_run_counts() {
        let events = [
            completed(1),
            started(2, None),
            completed(3),
            started(4, Some("s")),
        ];
        assert_eq!(run(&events), journey(Active, "s", &["s"], (4, 4, None), 3));
    }

    #[test]
    fn journeys_are_independent_and_other_events_ignored() {
        let mut s = JourneysState::default();
        JourneyFold.apply(&mut s, &started(1, Some("a")));
        JourneyFold.apply(
            &mut s,
            &ev(
                2,
                EventData::JourneyCompleted {
                    journey_id: "k".into(),
                },
            ),
        );
        JourneyFold.apply(
            &mut s,
            &ev(3, EventData::IdentityLinked(Identity::new("tg", "1"))),
        );
        assert_eq!(s.journeys.len(), 2);
        assert_eq!(
            s.journeys["j"],
            journey(Active, "a", &["a"], (1, 1, None), 1)
        );
        assert_eq!(
            s.journeys["k"],
            journey(Completed, "", &[], (2, 2, Some(2)), 1)
        );
    }
}
