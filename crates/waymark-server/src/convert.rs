//! Domain → protobuf conversions. gRPC types stop here.

use chrono::{DateTime, Utc};
use uuid::Uuid;
use waymark_core::{ContentType, Direction, Identity, InteractionKind};
use waymark_identity::PersonLinks;
use waymark_interactions::InteractionItem;
use waymark_journey::{JourneyState, JourneyStatus};
use waymark_learning::CourseState;
use waymark_person::PersonState;
use waymark_proto::v1 as pb;

use crate::error::ApiError;

pub(crate) fn timestamp(time: &DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

pub(crate) fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

pub(crate) fn identity(id: &Identity) -> pb::Identity {
    pb::Identity {
        platform: id.platform.clone(),
        platform_id: id.platform_id.clone(),
    }
}

pub(crate) fn person(
    id: Uuid,
    state: Option<&PersonState>,
    links: Option<&PersonLinks>,
) -> pb::Person {
    pb::Person {
        person_id: id.to_string(),
        identities: links
            .map(|l| l.identities.iter().map(identity).collect())
            .unwrap_or_default(),
        first_seen: state.and_then(|s| s.first_seen.as_ref()).map(timestamp),
        last_seen: state.and_then(|s| s.last_seen.as_ref()).map(timestamp),
        event_count: state.map_or(0, |s| s.event_count),
        interaction_count: state.map_or(0, |s| s.interaction_count),
        merged_into: links
            .and_then(|l| l.merged_into)
            .map(|m| m.to_string())
            .unwrap_or_default(),
    }
}

fn kind(k: InteractionKind) -> &'static str {
    match k {
        InteractionKind::Message => "message",
        InteractionKind::Reaction => "reaction",
        InteractionKind::Call => "call",
        InteractionKind::View => "view",
        InteractionKind::Other => "other",
    }
}

fn content_type(c: ContentType) -> &'static str {
    match c {
        ContentType::Text => "text",
        ContentType::Audio => "audio",
        ContentType::Video => "video",
        ContentType::Image => "image",
        ContentType::None => "none",
    }
}

fn direction(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    }
}

pub(crate) fn interaction(item: &InteractionItem) -> pb::Interaction {
    pb::Interaction {
        id: item.id.clone(),
        time: Some(timestamp(&item.time)),
        channel: item.channel.clone(),
        kind: kind(item.kind).into(),
        content_type: content_type(item.content_type).into(),
        content: item.content.clone().unwrap_or_default(),
        direction: direction(item.direction).into(),
        source: item.source.as_ref().map(identity),
    }
}

pub(crate) fn journey(person: Uuid, journey_id: &str, j: &JourneyState) -> pb::Journey {
    let status = match j.status {
        JourneyStatus::Active => pb::JourneyStatus::Active,
        JourneyStatus::Completed => pb::JourneyStatus::Completed,
    };
    pb::Journey {
        person_id: person.to_string(),
        journey_id: journey_id.to_owned(),
        status: status as i32,
        stage: j.stage.clone(),
        stages: j.stages.clone(),
        started_at: Some(timestamp(&j.started_at)),
        updated_at: Some(timestamp(&j.updated_at)),
        completed_at: j.completed_at.as_ref().map(timestamp),
        runs: j.runs,
    }
}

pub(crate) fn course(person: Uuid, course_id: &str, c: &CourseState) -> pb::LearningProgress {
    pb::LearningProgress {
        person_id: person.to_string(),
        course_id: course_id.to_owned(),
        lessons_completed: c.lessons_completed(),
        average_score: c.average_score(),
        quizzes_answered: c.quizzes_answered,
        quizzes_correct: c.quizzes_correct,
        last_activity: c.last_activity.as_ref().map(timestamp),
    }
}

/// One event of a person's history.
pub(crate) fn person_event(
    entry: &waymark_person::history::HistoryEntry,
) -> Result<pb::PersonEvent, ApiError> {
    let event = waymark_core::Event::from_json(&entry.event).map_err(|e| {
        ApiError::Store(waymark_runtime::StoreError::Corrupt {
            table: "history".into(),
            key: format!("{}/{}", entry.partition, entry.offset),
            reason: e.message,
        })
    })?;
    Ok(pb::PersonEvent {
        id: event.id.clone(),
        r#type: event.event_type().as_str().to_owned(),
        time: Some(timestamp(&event.time)),
        json: String::from_utf8_lossy(&entry.event).into_owned(),
        partition: i32::try_from(entry.partition).unwrap_or(i32::MAX),
        offset: i64::try_from(entry.offset).unwrap_or(i64::MAX),
    })
}
