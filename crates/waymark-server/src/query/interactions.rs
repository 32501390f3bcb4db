//! The `interactions` projection's query: `ListInteractions`.

use chrono::{DateTime, Utc};
use waymark_core::{ContentType, Direction, InteractionKind};
use waymark_interactions::{timeline, InteractionItem, NAME};
use waymark_proto::v1 as pb;

use super::QueryService;
use crate::convert::{from_timestamp, identity, timestamp};
use crate::error::{fit_page, page_size, parse_person_id, ApiError};

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

fn interaction(item: &InteractionItem) -> pb::Interaction {
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

/// Page tokens of `ListInteractions`: `<unix micros>:<event id>` of the
/// last item returned.
fn parse_cursor(token: &str) -> Result<Option<(DateTime<Utc>, String)>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        ApiError::InvalidArgument(format!(
            "page_token {token:?} is not a token this service issued"
        ))
    };
    let (micros, id) = token.split_once(':').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let time = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok(Some((time, id.to_owned())))
}

fn format_cursor(time: &DateTime<Utc>, id: &str) -> String {
    format!("{}:{id}", time.timestamp_micros())
}

fn bound(
    field: &str,
    ts: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    match ts {
        Some(ts) => Ok(Some(from_timestamp(ts).ok_or_else(|| {
            ApiError::InvalidArgument(format!("{field} is not a valid timestamp"))
        })?)),
        None => Ok(None),
    }
}

pub(super) async fn list_interactions(
    q: &QueryService,
    r: pb::ListInteractionsRequest,
) -> Result<pb::ListInteractionsResponse, ApiError> {
    let id = parse_person_id(&r.person_id)?;
    let limit = page_size(r.page_size)?;
    let cursor = parse_cursor(&r.page_token)?;
    let since = bound("since", r.since.as_ref())?;
    let until = bound("until", r.until.as_ref())?;
    let table = q.projections.table(NAME, "")?;
    let after = cursor.as_ref().map(|(t, i)| (*t, i.as_str()));
    let page = timeline::read_page(
        q.projections.store().as_ref(),
        &table.name,
        table.encoding,
        &id.to_string(),
        timeline::PageRequest {
            since,
            until,
            after,
            limit,
        },
    )
    .await?;
    let Some((items, mut next)) = page else {
        q.ensure_known(id).await?;
        return Ok(pb::ListInteractionsResponse::default());
    };
    let mut interactions: Vec<pb::Interaction> = items.iter().map(interaction).collect();
    let fit = fit_page(&interactions);
    if fit < interactions.len() {
        // The rest of the page is the start of the next one.
        interactions.truncate(fit);
        next = items.get(fit - 1).map(|last| (last.time, last.id.clone()));
    }
    Ok(pb::ListInteractionsResponse {
        interactions,
        next_page_token: next.map(|(t, i)| format_cursor(&t, &i)).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let t: DateTime<Utc> = "2026-01-01T00:00:00.123456Z".parse().unwrap();
        let token = format_cursor(&t, "a:b");
        assert_eq!(parse_cursor(&token).unwrap(), Some((t, "a:b".to_string())));
        assert!(parse_cursor("nope").is_err());
        assert_eq!(parse_cursor("").unwrap(), None);
    }
}
