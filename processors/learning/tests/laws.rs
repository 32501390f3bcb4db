//! Property tests of the fold laws for [`LearningFold`], and of the derived
//! values against a naive model.

use waymark_foldtest as common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use waymark_core::{EventData, Fold, Identity, LessonResult};
use waymark_learning::{LearningFold, LearningState};

const DAY: i64 = 86_400_000;

fn arb_result() -> impl Strategy<Value = LessonResult> + Clone {
    (1u32..=20)
        .prop_flat_map(|max| (0..=max, Just(max)))
        .prop_map(|(points, max)| LessonResult {
            points: f64::from(points),
            max_points: f64::from(max),
        })
}

/// Learning events over two courses, three lessons and two quizzes, plus an
/// unrelated event.
fn arb_data() -> impl Strategy<Value = EventData> + Clone {
    let course = prop_oneof![Just("c1".to_string()), Just("c2".to_string())];
    prop_oneof![
        (
            course.clone(),
            prop_oneof![Just("l1"), Just("l2"), Just("l3")],
            proptest::option::of(arb_result()),
        )
            .prop_map(|(course_id, lesson, result)| EventData::LessonCompleted {
                course_id,
                lesson_id: lesson.to_string(),
                result,
            }),
        (course, prop_oneof![Just("q1"), Just("q2")], any::<bool>()).prop_map(
            |(course_id, quiz, correct)| EventData::QuizAnswered {
                course_id,
                quiz_id: quiz.to_string(),
                correct,
            }
        ),
        Just(EventData::IdentityLinked(Identity::new("tg", "2"))),
    ]
}

proptest! {
    #[test]
    fn redelivery_changes_nothing(
        events in common::arb_events(arb_data(), "e[0-9]", 30 * DAY, 0..40),
        again in proptest::collection::vec(any::<bool>(), 40),
    ) {
        common::check_redelivery(&LearningFold, &events, &again);
    }

    #[test]
    fn duplicate_within_window_applies_once(
        events in common::arb_unique_events(arb_data(), 6 * DAY, 1..30),
        copies in proptest::collection::vec((0..30usize, 0..30usize), 0..10),
    ) {
        common::check_duplicates(&LearningFold, &events, &copies);
    }

    #[test]
    fn chunked_replay_equals_live(
        events in common::arb_events(arb_data(), "e[0-9]", 30 * DAY, 0..40),
        cuts in proptest::collection::vec(0..41usize, 0..6),
    ) {
        common::check_chunked_replay(&LearningFold, &events, &cuts);
    }

    /// `lessons_completed` and `average_score` agree with a direct reading
    /// of contract §4 over the raw log.
    #[test]
    fn derived_values_match_a_naive_model(
        events in common::arb_unique_events(arb_data(), 30 * DAY, 0..40),
    ) {
        let mut state = LearningState::default();
        for e in &events {
            LearningFold.apply(&mut state, e);
        }
        // course -> lesson -> latest score in log order
        let mut model: BTreeMap<&str, BTreeMap<&str, Option<f64>>> = BTreeMap::new();
        for e in &events {
            if let EventData::LessonCompleted { course_id, lesson_id, result } = &e.data {
                let lesson = model.entry(course_id).or_default().entry(lesson_id).or_default();
                if let Some(r) = result {
                    *lesson = Some(r.points / r.max_points * 100.0);
                }
            }
        }
        for (course, lessons) in &model {
            let c = &state.courses[*course];
            prop_assert_eq!(c.lessons_completed(), lessons.len() as u64);
            let scores: Vec<f64> = lessons.values().flatten().copied().collect();
            let mean = (!scores.is_empty())
                .then(|| scores.iter().sum::<f64>() / scores.len() as f64);
            prop_assert_eq!(c.average_score(), mean);
            prop_assert!(c.average_score().is_none_or(|s| (0.0..=100.0).contains(&s)));
        }
    }
}
