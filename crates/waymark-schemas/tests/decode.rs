//! `Validator::decode`: classification, upcasting and the typed event.

// Test helpers outside #[test] functions unwrap too; a panic is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;
use waymark_core::{
    ContentType, Direction, Event, EventData, EventType, Identity, InteractionKind, LessonResult,
    RejectKind, Rejection,
};
use waymark_schemas::{upcast, Validator, MAX_EVENT_BYTES, MAX_REPORTED_ERRORS};

fn validator() -> Validator {
    Validator::new().unwrap()
}

/// A valid envelope of `type` with `data`, from `telegram:42`.
fn envelope(event_type: &str, data: Value) -> Value {
    json!({
        "id": "evt-1",
        "type": event_type,
        "time": "2026-03-01T10:00:00Z",
        "source": {"platform": "telegram", "platform_id": "42"},
        "data": data,
    })
}

fn decode(value: &Value) -> Result<Event, Rejection> {
    validator().decode(&serde_json::to_vec(value).unwrap())
}

fn reject(value: &Value) -> Rejection {
    decode(value).expect_err("should be rejected")
}

fn utc(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

#[test]
fn decodes_a_valid_event_into_the_typed_event() {
    let event = decode(&envelope(
        "interaction.recorded",
        json!({"kind": "message", "content_type": "text", "content": "hi", "direction": "outbound"}),
    ))
    .unwrap();
    assert_eq!(
        event,
        Event {
            id: "evt-1".into(),
            time: utc("2026-03-01T10:00:00Z"),
            source: Some(Identity::new("telegram", "42")),
            person_id: None,
            data: EventData::InteractionRecorded {
                kind: InteractionKind::Message,
                content_type: ContentType::Text,
                content: Some("hi".into()),
                channel: None,
                direction: Some(Direction::Outbound),
            },
        }
    );
}

#[test]
fn every_reject_kind_is_produced() {
    let v = validator();
    let mut seen = Vec::new();
    let mut too_large =
        serde_json::to_vec(&envelope("journey.completed", json!({"journey_id": "j"}))).unwrap();
    too_large.resize(MAX_EVENT_BYTES + 1, b' ');
    let mut bad_version = envelope("journey.completed", json!({"journey_id": "j"}));
    bad_version["version"] = json!(2);
    let cases: Vec<(Vec<u8>, RejectKind)> = vec![
        (too_large, RejectKind::TooLarge),
        (b"{\"id\": ".to_vec(), RejectKind::MalformedJson),
        (b"\xff\xfe{}".to_vec(), RejectKind::MalformedJson),
        (b"\"just a string\"".to_vec(), RejectKind::InvalidEnvelope),
        (
            serde_json::to_vec(&json!({"id": "x"})).unwrap(),
            RejectKind::InvalidEnvelope,
        ),
        (
            serde_json::to_vec(&envelope("journey.paused", json!({}))).unwrap(),
            RejectKind::UnknownType,
        ),
        (
            serde_json::to_vec(&bad_version).unwrap(),
            RejectKind::UnsupportedVersion,
        ),
        (
            serde_json::to_vec(&envelope("journey.completed", json!({}))).unwrap(),
            RejectKind::InvalidData,
        ),
    ];
    for (bytes, kind) in cases {
        let rejection = v.decode(&bytes).expect_err("should be rejected");
        assert_eq!(rejection.kind, kind, "{rejection}");
        seen.push(rejection.kind);
    }
    for kind in RejectKind::ALL {
        assert!(seen.contains(&kind), "{kind} never produced");
    }
}

#[test]
fn classification_follows_the_contract_order() {
    // Unknown type wins over bad data; bad envelope wins over unknown type.
    let rejection = reject(&envelope("nope", json!({"journey_id": ""})));
    assert_eq!(rejection.kind, RejectKind::UnknownType);
    let mut e = envelope("nope", json!({}));
    e["id"] = json!("");
    assert_eq!(reject(&e).kind, RejectKind::InvalidEnvelope);
    // Unsupported version wins over bad data.
    let mut e = envelope("learning.lesson_completed", json!({}));
    e["version"] = json!(3);
    let rejection = reject(&e);
    assert_eq!(rejection.kind, RejectKind::UnsupportedVersion);
    assert_eq!(
        rejection.message,
        "/version: learning.lesson_completed has no version 3; supported versions are 1, 2"
    );
    // Size is checked before anything else, even for garbage.
    let garbage = vec![0xff; MAX_EVENT_BYTES + 1];
    assert_eq!(
        validator().decode(&garbage).unwrap_err().kind,
        RejectKind::TooLarge
    );
}

#[test]
fn messages_name_the_json_path() {
    let rejection = reject(&envelope(
        "journey.stage_entered",
        json!({"journey_id": "j", "stage": ""}),
    ));
    assert_eq!(rejection.kind, RejectKind::InvalidData);
    assert_eq!(
        rejection.message,
        r#"/data/stage: "" is shorter than 1 character"#
    );

    let mut e = envelope("journey.completed", json!({"journey_id": "j"}));
    e.as_object_mut().unwrap().remove("source");
    let rejection = reject(&e);
    assert_eq!(rejection.kind, RejectKind::InvalidEnvelope);
    assert_eq!(
        rejection.message,
        "/source: is required unless person_id is set"
    );

    let rejection = reject(&envelope("x.y", json!({})));
    assert!(
        rejection
            .message
            .starts_with(r#"/type: unknown event type "x.y""#),
        "{rejection}"
    );
}

#[test]
fn messages_report_the_first_few_errors_and_stay_short() {
    let rejection = reject(&json!({
        "id": "", "type": 1, "version": 0, "time": "noon",
        "source": {"platform": "A B", "platform_id": ""}, "data": []
    }));
    assert_eq!(rejection.kind, RejectKind::InvalidEnvelope);
    let listed = rejection.message.split("; /").count();
    assert_eq!(listed, MAX_REPORTED_ERRORS, "{rejection}");
    assert!(rejection.message.contains("; and "), "{rejection}");

    // A huge value is quoted shortened.
    let content = "x".repeat(65_537);
    let rejection = reject(&envelope(
        "interaction.recorded",
        json!({"kind": "message", "content_type": "text", "content": content}),
    ));
    assert_eq!(rejection.kind, RejectKind::InvalidData);
    assert!(rejection.message.len() < 200, "{}", rejection.message);
    assert!(
        rejection
            .message
            .ends_with("(65537 characters) is longer than 65536 characters"),
        "{}",
        rejection.message
    );
}

#[test]
fn messages_are_lowercase_without_trailing_period() {
    let samples = [
        b"{".to_vec(),
        b"[]".to_vec(),
        serde_json::to_vec(&envelope("x", json!({}))).unwrap(),
        serde_json::to_vec(&envelope("journey.started", json!({"journey_id": 1}))).unwrap(),
    ];
    for bytes in samples {
        let rejection = validator().decode(&bytes).unwrap_err();
        let first = rejection.message.chars().next().unwrap();
        assert!(!first.is_uppercase(), "{rejection}");
        assert!(!rejection.message.ends_with('.'), "{rejection}");
    }
}

#[test]
fn content_of_exactly_65536_characters_is_accepted() {
    let content = "é".repeat(65_536);
    let event = decode(&envelope(
        "interaction.recorded",
        json!({"kind": "message", "content_type": "text", "content": content}),
    ))
    .unwrap();
    let EventData::InteractionRecorded {
        content: Some(c), ..
    } = event.data
    else {
        panic!("wrong data {:?}", event.data);
    };
    assert_eq!(c.chars().count(), 65_536);
}

#[test]
fn lesson_v1_with_score_upcasts_to_v2_result() {
    let mut e = envelope(
        "learning.lesson_completed",
        json!({"course_id": "c", "lesson_id": "l", "score": 87.5}),
    );
    e["version"] = json!(1);
    let event = decode(&e).unwrap();
    assert_eq!(
        event.data,
        EventData::LessonCompleted {
            course_id: "c".into(),
            lesson_id: "l".into(),
            result: Some(LessonResult {
                points: 87.5,
                max_points: 100.0,
            }),
        }
    );
    // The canonical form is v2.
    let canonical: Value = serde_json::from_slice(&event.to_json()).unwrap();
    assert_eq!(canonical["version"], 2);
    assert_eq!(
        canonical["data"]["result"],
        json!({"points": 87.5, "max_points": 100.0})
    );
}

#[test]
fn lesson_v1_without_score_upcasts_to_no_result() {
    // Absent version means 1; a `result` is not a v1 field and is dropped.
    let event = decode(&envelope(
        "learning.lesson_completed",
        json!({"course_id": "c", "lesson_id": "l", "result": "ignored in v1"}),
    ))
    .unwrap();
    assert_eq!(
        event.data,
        EventData::LessonCompleted {
            course_id: "c".into(),
            lesson_id: "l".into(),
            result: None,
        }
    );
}

#[test]
fn upcast_function() {
    let t = EventType::LessonCompleted;
    assert_eq!(
        upcast(
            t,
            1,
            json!({"course_id": "c", "lesson_id": "l", "score": 40, "x": 1})
        ),
        json!({"course_id": "c", "lesson_id": "l", "result": {"points": 40, "max_points": 100}, "x": 1})
    );
    assert_eq!(
        upcast(t, 1, json!({"course_id": "c", "lesson_id": "l"})),
        json!({"course_id": "c", "lesson_id": "l"})
    );
    // Latest-version data and other types are unchanged.
    let v2 = json!({"course_id": "c", "lesson_id": "l", "result": {"points": 1, "max_points": 2}});
    assert_eq!(upcast(t, 2, v2.clone()), v2);
    let j = json!({"journey_id": "j", "score": 5});
    assert_eq!(upcast(EventType::JourneyStarted, 1, j.clone()), j);
}

#[test]
fn v1_score_is_validated_before_upcasting() {
    let mut e = envelope(
        "learning.lesson_completed",
        json!({"course_id": "c", "lesson_id": "l", "score": 150}),
    );
    e["version"] = json!(1);
    let rejection = reject(&e);
    assert_eq!(rejection.kind, RejectKind::InvalidData);
    assert_eq!(
        rejection.message,
        "/data/score: 150 is greater than the maximum of 100"
    );
}

#[test]
fn points_above_max_points_are_rejected() {
    let mut e = envelope(
        "learning.lesson_completed",
        json!({"course_id": "c", "lesson_id": "l", "result": {"points": 12, "max_points": 10}}),
    );
    e["version"] = json!(2);
    let rejection = reject(&e);
    assert_eq!(rejection.kind, RejectKind::InvalidData);
    assert_eq!(
        rejection.message,
        "/data/result/points: 12 is greater than max_points (10)"
    );
    // Equal is fine.
    e["data"]["result"]["points"] = json!(10);
    assert!(decode(&e).is_ok());
}

#[test]
fn person_id_only_events_are_accepted_without_source() {
    let person = "3095ab98-1137-5b2a-bb38-d695297f3289";
    let mut e = envelope("journey.started", json!({"journey_id": "j", "stage": "s"}));
    e.as_object_mut().unwrap().remove("source");
    e["person_id"] = json!(person);
    let event = decode(&e).unwrap();
    assert_eq!(event.source, None);
    assert_eq!(event.person_id, Some(Uuid::parse_str(person).unwrap()));

    // Both may be given.
    e["source"] = json!({"platform": "web", "platform_id": "c1"});
    let event = decode(&e).unwrap();
    assert_eq!(event.source, Some(Identity::new("web", "c1")));
    assert!(event.person_id.is_some());
}

#[test]
fn unknown_fields_are_ignored() {
    let mut e = envelope(
        "learning.quiz_answered",
        json!({"course_id": "c", "quiz_id": "q", "correct": true, "attempt": 3}),
    );
    e["trace_id"] = json!("abc");
    e["meta"] = json!({"nested": [1, 2, 3]});
    e["source"]["display_name"] = json!("Ann");
    let event = decode(&e).unwrap();
    assert_eq!(
        event.data,
        EventData::QuizAnswered {
            course_id: "c".into(),
            quiz_id: "q".into(),
            correct: true,
        }
    );
    assert_eq!(event.source, Some(Identity::new("telegram", "42")));
}

#[test]
fn events_over_one_mib_are_too_large() {
    let event = envelope("journey.completed", json!({"journey_id": "j"}));
    let base = serde_json::to_vec(&event).unwrap().len();
    // An unknown field pads the event to exactly the limit: accepted.
    let padded = |pad: usize| {
        let mut e = event.clone();
        e["padding"] = json!("p".repeat(pad));
        serde_json::to_vec(&e).unwrap()
    };
    let overhead = padded(0).len() - base;
    let at_limit = padded(MAX_EVENT_BYTES - base - overhead);
    assert_eq!(at_limit.len(), MAX_EVENT_BYTES);
    assert!(validator().decode(&at_limit).is_ok());

    let over = padded(MAX_EVENT_BYTES - base - overhead + 1);
    assert_eq!(over.len(), MAX_EVENT_BYTES + 1);
    let rejection = validator().decode(&over).unwrap_err();
    assert_eq!(rejection.kind, RejectKind::TooLarge);
    assert_eq!(rejection.kind.as_str(), "too_large");
    assert_eq!(
        rejection.message,
        "event is 1048577 bytes, more than the limit of 1048576 bytes"
    );
}

#[test]
fn times_with_offsets_are_normalized_to_utc() {
    let cases = [
        ("2026-03-01T12:30:00.250+02:30", "2026-03-01T10:00:00.250Z"),
        ("2026-02-28T19:00:00-05:00", "2026-03-01T00:00:00Z"),
        ("2026-03-01T10:00:00z", "2026-03-01T10:00:00Z"),
        (
            "2026-03-01t10:00:00.123456789+00:00",
            "2026-03-01T10:00:00.123456789Z",
        ),
    ];
    for (given, expected) in cases {
        let mut e = envelope("journey.completed", json!({"journey_id": "j"}));
        e["time"] = json!(given);
        let event = decode(&e).unwrap_or_else(|r| panic!("{given}: {r}"));
        assert_eq!(event.time, utc(expected), "{given}");
        let canonical: Value = serde_json::from_slice(&event.to_json()).unwrap();
        assert_eq!(canonical["time"], expected, "{given}");
    }
}

#[test]
fn version_may_be_written_as_a_whole_float() {
    let mut e = envelope(
        "learning.lesson_completed",
        json!({"course_id": "c", "lesson_id": "l", "result": {"points": 1, "max_points": 4}}),
    );
    e["version"] = json!(2.0);
    assert!(decode(&e).is_ok());
    e["version"] = json!(1e30);
    assert_eq!(reject(&e).kind, RejectKind::UnsupportedVersion);
}

#[test]
fn decoded_events_round_trip_through_the_canonical_form() {
    let v = validator();
    let mut lesson = envelope(
        "learning.lesson_completed",
        json!({"course_id": "c", "lesson_id": "l", "score": 50}),
    );
    lesson["version"] = json!(1);
    let raws = [
        envelope(
            "identity.linked",
            json!({"platform": "web", "platform_id": "x"}),
        ),
        envelope("journey.started", json!({"journey_id": "j"})),
        lesson,
    ];
    for raw in raws {
        let event = v.decode(&serde_json::to_vec(&raw).unwrap()).unwrap();
        let canonical = event.to_json();
        assert_eq!(Event::from_json(&canonical).unwrap(), event);
        // The canonical form is itself a valid raw event, decoding to the same.
        assert_eq!(v.decode(&canonical).unwrap(), event);
    }
}

#[test]
fn a_validator_is_shared_across_threads() {
    let v = Arc::new(validator());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let v = Arc::clone(&v);
            std::thread::spawn(move || {
                let e = envelope("journey.completed", json!({"journey_id": format!("j{i}")}));
                v.decode(&serde_json::to_vec(&e).unwrap()).is_ok()
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap());
    }
}

#[test]
fn versions_lists_every_known_version() {
    let v = validator();
    assert_eq!(v.versions(EventType::LessonCompleted), vec![1, 2]);
    for t in EventType::ALL {
        let versions = v.versions(t);
        assert_eq!(versions.last().copied(), Some(t.latest_version()), "{t}");
    }
}
