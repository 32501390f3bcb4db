//! The event model: what processors fold.
//!
//! An [`Event`] is always valid and at the latest version of its type: raw
//! input is validated against `schemas/` and upcast by `waymark-schemas`
//! before it becomes an `Event`. Its canonical JSON form (written by the
//! identity processor to `waymark.events`) is produced by
//! [`Event::to_json`] and read back by [`Event::from_json`].

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::identity::Identity;
use crate::reject::{RejectKind, Rejection};

/// The event types of contract §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    /// `identity.linked`
    #[serde(rename = "identity.linked")]
    IdentityLinked,
    /// `interaction.recorded`
    #[serde(rename = "interaction.recorded")]
    InteractionRecorded,
    /// `journey.started`
    #[serde(rename = "journey.started")]
    JourneyStarted,
    /// `journey.stage_entered`
    #[serde(rename = "journey.stage_entered")]
    JourneyStageEntered,
    /// `journey.completed`
    #[serde(rename = "journey.completed")]
    JourneyCompleted,
    /// `learning.lesson_completed`
    #[serde(rename = "learning.lesson_completed")]
    LessonCompleted,
    /// `learning.quiz_answered`
    #[serde(rename = "learning.quiz_answered")]
    QuizAnswered,
}

impl EventType {
    /// Every type, in contract order.
    pub const ALL: [EventType; 7] = [
        EventType::IdentityLinked,
        EventType::InteractionRecorded,
        EventType::JourneyStarted,
        EventType::JourneyStageEntered,
        EventType::JourneyCompleted,
        EventType::LessonCompleted,
        EventType::QuizAnswered,
    ];

    /// The wire name, e.g. `journey.started`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::IdentityLinked => "identity.linked",
            EventType::InteractionRecorded => "interaction.recorded",
            EventType::JourneyStarted => "journey.started",
            EventType::JourneyStageEntered => "journey.stage_entered",
            EventType::JourneyCompleted => "journey.completed",
            EventType::LessonCompleted => "learning.lesson_completed",
            EventType::QuizAnswered => "learning.quiz_answered",
        }
    }

    /// The latest schema version of this type; events are upcast to it.
    pub fn latest_version(self) -> u32 {
        match self {
            EventType::LessonCompleted => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = Rejection;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Rejection::new(RejectKind::UnknownType, format!("unknown event type {s:?}"))
            })
    }
}

/// `interaction.recorded` `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InteractionKind {
    /// A message.
    Message,
    /// A reaction.
    Reaction,
    /// A call.
    Call,
    /// A view.
    View,
    /// Anything else.
    Other,
}

/// `interaction.recorded` `content_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentType {
    /// Text.
    Text,
    /// Audio.
    Audio,
    /// Video.
    Video,
    /// An image.
    Image,
    /// No content.
    None,
}

/// `interaction.recorded` `direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the person to the product (the default).
    #[default]
    Inbound,
    /// From the product to the person.
    Outbound,
}

/// The result of a lesson (v2 of `learning.lesson_completed`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LessonResult {
    /// Points scored, `0 <= points <= max_points`.
    pub points: f64,
    /// Points possible, `> 0`.
    pub max_points: f64,
}

impl LessonResult {
    /// The score in percent.
    pub fn percent(&self) -> f64 {
        self.points / self.max_points * 100.0
    }
}

/// The typed `data` of an event, at the latest version of its type.
///
/// Serializes as the contract's `data` object; decode it with
/// [`EventData::from_json`], which needs the type.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    /// `identity.linked` v1: that identity now belongs to the source's person.
    IdentityLinked(Identity),
    /// `interaction.recorded` v1.
    InteractionRecorded {
        /// What kind of interaction.
        kind: InteractionKind,
        /// What it carried.
        content_type: ContentType,
        /// The content, at most 64 KiB.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        /// Channel; defaults to the source platform.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        /// Direction; defaults to inbound.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        direction: Option<Direction>,
    },
    /// `journey.started` v1.
    JourneyStarted {
        /// The journey.
        journey_id: String,
        /// The first stage, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage: Option<String>,
    },
    /// `journey.stage_entered` v1.
    JourneyStageEntered {
        /// The journey.
        journey_id: String,
        /// The stage entered.
        stage: String,
    },
    /// `journey.completed` v1.
    JourneyCompleted {
        /// The journey.
        journey_id: String,
    },
    /// `learning.lesson_completed` v2 (v1 is upcast to it).
    LessonCompleted {
        /// The course.
        course_id: String,
        /// The lesson.
        lesson_id: String,
        /// The result, if the lesson was scored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<LessonResult>,
    },
    /// `learning.quiz_answered` v1.
    QuizAnswered {
        /// The course.
        course_id: String,
        /// The quiz.
        quiz_id: String,
        /// Whether the answer was correct.
        correct: bool,
    },
}

impl EventData {
    /// The type this data belongs to.
    pub fn event_type(&self) -> EventType {
        match self {
            EventData::IdentityLinked(_) => EventType::IdentityLinked,
            EventData::InteractionRecorded { .. } => EventType::InteractionRecorded,
            EventData::JourneyStarted { .. } => EventType::JourneyStarted,
            EventData::JourneyStageEntered { .. } => EventType::JourneyStageEntered,
            EventData::JourneyCompleted { .. } => EventType::JourneyCompleted,
            EventData::LessonCompleted { .. } => EventType::LessonCompleted,
            EventData::QuizAnswered { .. } => EventType::QuizAnswered,
        }
    }

    /// Decodes the `data` of `event_type` at its latest version.
    ///
    /// This is a typed decode, not schema validation: callers that accept
    /// raw input validate against `schemas/` first (`waymark-schemas`).
    pub fn from_json(event_type: EventType, data: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Journey {
            journey_id: String,
        }
        #[derive(Deserialize)]
        struct Stage {
            journey_id: String,
            stage: String,
        }
        #[derive(Deserialize)]
        struct Started {
            journey_id: String,
            #[serde(default)]
            stage: Option<String>,
        }
        #[derive(Deserialize)]
        struct Lesson {
            course_id: String,
            lesson_id: String,
            #[serde(default)]
            result: Option<LessonResult>,
        }
        #[derive(Deserialize)]
        struct Quiz {
            course_id: String,
            quiz_id: String,
            correct: bool,
        }
        #[derive(Deserialize)]
        struct Interaction {
            kind: InteractionKind,
            content_type: ContentType,
            #[serde(default)]
            content: Option<String>,
            #[serde(default)]
            channel: Option<String>,
            #[serde(default)]
            direction: Option<Direction>,
        }
        Ok(match event_type {
            EventType::IdentityLinked => EventData::IdentityLinked(serde_json::from_str(data)?),
            EventType::InteractionRecorded => {
                let i: Interaction = serde_json::from_str(data)?;
                EventData::InteractionRecorded {
                    kind: i.kind,
                    content_type: i.content_type,
                    content: i.content,
                    channel: i.channel,
                    direction: i.direction,
                }
            }
            EventType::JourneyStarted => {
                let s: Started = serde_json::from_str(data)?;
                EventData::JourneyStarted {
                    journey_id: s.journey_id,
                    stage: s.stage,
                }
            }
            EventType::JourneyStageEntered => {
                let s: Stage = serde_json::from_str(data)?;
                EventData::JourneyStageEntered {
                    journey_id: s.journey_id,
                    stage: s.stage,
                }
            }
            EventType::JourneyCompleted => {
                let j: Journey = serde_json::from_str(data)?;
                EventData::JourneyCompleted {
                    journey_id: j.journey_id,
                }
            }
            EventType::LessonCompleted => {
                let l: Lesson = serde_json::from_str(data)?;
                EventData::LessonCompleted {
                    course_id: l.course_id,
                    lesson_id: l.lesson_id,
                    result: l.result,
                }
            }
            EventType::QuizAnswered => {
                let q: Quiz = serde_json::from_str(data)?;
                EventData::QuizAnswered {
                    course_id: q.course_id,
                    quiz_id: q.quiz_id,
                    correct: q.correct,
                }
            }
        })
    }
}

/// A valid event at the latest version of its type.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique per event (1..128 chars).
    pub id: String,
    /// Event time.
    pub time: DateTime<Utc>,
    /// The actor's identity; `None` only when `person_id` was given.
    pub source: Option<Identity>,
    /// The person: given by the producer, or resolved by the identity processor.
    pub person_id: Option<Uuid>,
    /// Typed payload; its variant is the event type.
    pub data: EventData,
}

/// The canonical wire form written to `waymark.events`.
#[derive(Serialize)]
struct WireOut<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: EventType,
    version: u32,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    person_id: Option<&'a Uuid>,
    data: &'a EventData,
}

#[derive(Deserialize)]
struct WireIn<'a> {
    id: String,
    #[serde(rename = "type")]
    event_type: &'a str,
    #[serde(default)]
    version: Option<u32>,
    time: DateTime<Utc>,
    #[serde(default)]
    source: Option<Identity>,
    #[serde(default)]
    person_id: Option<Uuid>,
    #[serde(borrow)]
    data: &'a RawValue,
}

impl Event {
    /// The event's type.
    pub fn event_type(&self) -> EventType {
        self.data.event_type()
    }

    /// Canonical JSON: the contract envelope at the latest version, with
    /// `time` in UTC (RFC 3339) and `person_id` when known.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = WireOut {
            id: &self.id,
            event_type: self.event_type(),
            version: self.event_type().latest_version(),
            time: format_time(&self.time),
            source: self.source.as_ref(),
            person_id: self.person_id.as_ref(),
            data: &self.data,
        };
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Decodes a canonical event (as written by [`Event::to_json`]).
    ///
    /// Only the latest version of each type is accepted here; raw producer
    /// input goes through `waymark-schemas`, which validates and upcasts.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Rejection> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Rejection::new(RejectKind::MalformedJson, format!("not utf-8: {e}")))?;
        let wire: WireIn<'_> = serde_json::from_str(text).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                Rejection::new(RejectKind::MalformedJson, e.to_string())
            } else {
                Rejection::new(RejectKind::InvalidEnvelope, e.to_string())
            }
        })?;
        let event_type: EventType = wire.event_type.parse()?;
        let version = wire.version.unwrap_or(1);
        if version != event_type.latest_version() {
            return Err(Rejection::new(
                RejectKind::UnsupportedVersion,
                format!(
                    "{event_type} version {version} is not the canonical version {}",
                    event_type.latest_version()
                ),
            ));
        }
        let data = EventData::from_json(event_type, wire.data.get())
            .map_err(|e| Rejection::new(RejectKind::InvalidData, format!("data: {e}")))?;
        if wire.source.is_none() && wire.person_id.is_none() {
            return Err(Rejection::new(
                RejectKind::InvalidEnvelope,
                "source is required unless person_id is set",
            ));
        }
        Ok(Event {
            id: wire.id,
            time: wire.time,
            source: wire.source,
            person_id: wire.person_id,
            data,
        })
    }
}

/// RFC 3339 in UTC with as many fractional digits as needed.
pub fn format_time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event {
            id: "e1".into(),
            time: "2026-01-02T03:04:05.5+01:00".parse().unwrap(),
            source: Some(Identity::new("telegram", "42")),
            person_id: Some(Uuid::nil()),
            data: EventData::LessonCompleted {
                course_id: "c".into(),
                lesson_id: "l".into(),
                result: Some(LessonResult {
                    points: 7.0,
                    max_points: 10.0,
                }),
            },
        }
    }

    #[test]
    fn canonical_json_round_trips() {
        let e = sample();
        let json = e.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains(r#""type":"learning.lesson_completed""#),
            "{text}"
        );
        assert!(text.contains(r#""version":2"#), "{text}");
        assert!(
            text.contains(r#""time":"2026-01-02T02:04:05.500Z""#),
            "{text}"
        );
        assert_eq!(Event::from_json(&json).unwrap(), e);
    }

    #[test]
    fn every_type_round_trips() {
        let datas = vec![
            EventData::IdentityLinked(Identity::new("web", "x")),
            EventData::InteractionRecorded {
                kind: InteractionKind::Message,
                content_type: ContentType::Text,
                content: Some("hi".into()),
                channel: None,
                direction: Some(Direction::Outbound),
            },
            EventData::JourneyStarted {
                journey_id: "j".into(),
                stage: None,
            },
            EventData::JourneyStageEntered {
                journey_id: "j".into(),
                stage: "s".into(),
            },
            EventData::JourneyCompleted {
                journey_id: "j".into(),
            },
            EventData::QuizAnswered {
                course_id: "c".into(),
                quiz_id: "q".into(),
                correct: true,
            },
        ];
        for data in datas {
            let mut e = sample();
            e.data = data;
            assert_eq!(Event::from_json(&e.to_json()).unwrap(), e);
        }
    }

    #[test]
    fn rejects_old_versions_and_garbage() {
        let v1 = br#"{"id":"a","type":"learning.lesson_completed","version":1,"time":"2026-01-01T00:00:00Z","person_id":"00000000-0000-0000-0000-000000000000","data":{"course_id":"c","lesson_id":"l"}}"#;
        assert_eq!(
            Event::from_json(v1).unwrap_err().kind,
            RejectKind::UnsupportedVersion
        );
        assert_eq!(
            Event::from_json(b"{nope").unwrap_err().kind,
            RejectKind::MalformedJson
        );
        let unknown = br#"{"id":"a","type":"x.y","time":"2026-01-01T00:00:00Z","person_id":"00000000-0000-0000-0000-000000000000","data":{}}"#;
        assert_eq!(
            Event::from_json(unknown).unwrap_err().kind,
            RejectKind::UnknownType
        );
    }
}
