//! The learning processor: per person and `course_id`, lessons completed,
//! scores and quiz answers (contract §4, "Learning progress").
//!
//! # Layout
//! - [`LearningFold`]: the [`Fold`] the runtime registers as `learning`.
//! - [`LearningState`]: one person's courses by `course_id`.
//! - [`CourseState`]: one course, with the derived
//!   [`CourseState::lessons_completed`] and [`CourseState::average_score`].
//!
//! # Rules
//! - `learning.lesson_completed` (v2; v1 is upcast before it gets here)
//!   records the lesson. When it carries a `result`, the lesson's score
//!   becomes `points / max_points * 100`; a later completion without a
//!   result keeps the earlier score. A lesson completed again with a result
//!   takes the new score (the latest, in log order).
//! - `learning.quiz_answered` counts an answer, and a correct one.
//! - Both set `last_activity` to the max event time of the course's events.
//!
//! # Guarantees
//! [`LearningFold::apply`] is pure and synchronous: no IO, no clock; other
//! event types leave the state unchanged. Events are applied in log order
//! (contract §4), so "latest score" means latest in the log, and a replay
//! from offset 0 gives exactly the live state. Duplicates within the dedupe
//! window and redelivered records never reach the fold (the runtime's
//! [`Tracked`](waymark_core::Tracked) filters them); a resend applied again
//! after the window counts its quiz answer again (contract §4).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use waymark_core::{Event, EventData, Fold};
use waymark_runtime::plugin::{BuildContext, BuildError, ProcessorFactory, TableSpec};

/// The processor's name.
pub const NAME: &str = "learning";

/// The state encoding of its rows ([`waymark_runtime::row`]): raise it
/// whenever [`LearningState`] (or a type in it) changes shape.
///
/// 1: the first; 2: [`waymark_core::Tracked`] records the sources applied.
pub const STATE_ENCODING: u32 = 2;

/// The learning processor as a plugin: [`LearningFold`] over the events,
/// one row per person.
#[derive(Debug, Clone, Copy, Default)]
pub struct LearningProcessor;

impl ProcessorFactory for LearningProcessor {
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
        Ok(ctx.fold(LearningFold))
    }
}

/// Folds `learning.*` events into a [`LearningState`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LearningFold;

/// One person's learning progress.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LearningState {
    /// Courses by `course_id`.
    pub courses: BTreeMap<String, CourseState>,
}

/// Progress in one course.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CourseState {
    /// Completed lessons by `lesson_id`, with the latest score in percent,
    /// or `None` when no completion of that lesson carried a result.
    pub lessons: BTreeMap<String, Option<f64>>,
    /// Quiz answers.
    pub quizzes_answered: u64,
    /// Correct quiz answers.
    pub quizzes_correct: u64,
    /// The max event time of the course's events.
    pub last_activity: Option<DateTime<Utc>>,
}

impl CourseState {
    /// Distinct lessons completed.
    pub fn lessons_completed(&self) -> u64 {
        self.lessons.len() as u64
    }

    /// The mean of the lessons' latest scores, over the lessons that carried
    /// a score; `None` when none did.
    pub fn average_score(&self) -> Option<f64> {
        let (sum, n) = self
            .lessons
            .values()
            .flatten()
            .fold((0.0, 0u64), |(sum, n), score| (sum + score, n + 1));
        (n > 0).then(|| sum / n as f64)
    }

    fn touch(&mut self, time: DateTime<Utc>) {
        self.last_activity = Some(self.last_activity.map_or(time, |t| t.max(time)));
    }
}

impl Fold for LearningFold {
    type State = LearningState;

    fn apply(&self, state: &mut LearningState, event: &Event) {
        match &event.data {
            EventData::LessonCompleted {
                course_id,
                lesson_id,
                result,
            } => {
                let course = state.courses.entry(course_id.clone()).or_default();
                let score = course.lessons.entry(lesson_id.clone()).or_default();
                if let Some(result) = result {
                    *score = Some(result.percent());
                }
                course.touch(event.time);
            }
            EventData::QuizAnswered {
                course_id, correct, ..
            } => {
                let course = state.courses.entry(course_id.clone()).or_default();
                course.quizzes_answered += 1;
                if *correct {
                    course.quizzes_correct += 1;
                }
                course.touch(event.time);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_core::{Identity, LessonResult};

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

    fn lesson(d: u32, course: &str, lesson: &str, result: Option<(f64, f64)>) -> Event {
        ev(
            d,
            EventData::LessonCompleted {
                course_id: course.into(),
                lesson_id: lesson.into(),
                result: result.map(|(points, max_points)| LessonResult { points, max_points }),
            },
        )
    }

    fn quiz(d: u32, course: &str, correct: bool) -> Event {
        ev(
            d,
            EventData::QuizAnswered {
                course_id: course.into(),
                quiz_id: "q".into(),
                correct,
            },
        )
    }

    fn run(events: &[Event]) -> LearningState {
        let mut s = LearningState::default();
        for e in events {
            LearningFold.apply(&mut s, e);
        }
        s
    }

    #[test]
    fn score_is_points_over_max_points_in_percent() {
        let s = run(&[lesson(1, "c", "l1", Some((3.0, 4.0)))]);
        let c = &s.courses["c"];
        assert_eq!(c.lessons["l1"], Some(75.0));
        assert_eq!(c.lessons_completed(), 1);
        assert_eq!(c.average_score(), Some(75.0));
    }

    #[test]
    fn later_completion_without_score_keeps_the_earlier_score() {
        let s = run(&[
            lesson(1, "c", "l1", Some((8.0, 10.0))),
            lesson(2, "c", "l1", None),
        ]);
        assert_eq!(s.courses["c"].lessons["l1"], Some(80.0));
    }

    #[test]
    fn later_completion_with_score_replaces_it_even_if_lower() {
        let s = run(&[
            lesson(1, "c", "l1", Some((8.0, 10.0))),
            lesson(2, "c", "l1", Some((1.0, 10.0))),
        ]);
        assert_eq!(s.courses["c"].lessons["l1"], Some(10.0));
        assert_eq!(s.courses["c"].lessons_completed(), 1);
    }

    #[test]
    fn unscored_then_scored_takes_the_score() {
        let s = run(&[
            lesson(1, "c", "l1", None),
            lesson(2, "c", "l1", Some((1.0, 2.0))),
        ]);
        assert_eq!(s.courses["c"].lessons["l1"], Some(50.0));
    }

    #[test]
    fn average_is_over_scored_lessons_only() {
        let s = run(&[
            lesson(1, "c", "l1", Some((1.0, 1.0))),
            lesson(2, "c", "l2", None),
            lesson(3, "c", "l3", Some((0.0, 5.0))),
        ]);
        let c = &s.courses["c"];
        assert_eq!(c.lessons_completed(), 3);
        assert_eq!(c.average_score(), Some(50.0));
    }

    #[test]
    fn average_is_none_without_scores() {
        let s = run(&[lesson(1, "c", "l1", None), quiz(2, "c", true)]);
        assert_eq!(s.courses["c"].average_score(), None);
        assert_eq!(CourseState::default().average_score(), None);
        assert_eq!(CourseState::default().lessons_completed(), 0);
    }

    #[test]
    fn quizzes_count_answers_and_correct_ones() {
        let s = run(&[quiz(1, "c", true), quiz(2, "c", false), quiz(3, "c", true)]);
        let c = &s.courses["c"];
        assert_eq!((c.quizzes_answered, c.quizzes_correct), (3, 2));
        assert_eq!(c.lessons_completed(), 0);
    }

    #[test]
    fn last_activity_is_the_max_event_time_per_course() {
        let s = run(&[
            quiz(5, "c", true),
            lesson(2, "c", "l1", None),
            lesson(7, "d", "l1", None),
        ]);
        assert_eq!(s.courses["c"].last_activity, Some(day(5)));
        assert_eq!(s.courses["d"].last_activity, Some(day(7)));
    }

    #[test]
    fn other_events_are_ignored() {
        let s = run(&[ev(
            1,
            EventData::JourneyCompleted {
                journey_id: "j".into(),
            },
        )]);
        assert_eq!(s, LearningState::default());
    }
}
