//! The `person` projection's queries, joined with the `identity`
//! processor's links: `ResolveIdentity`, `GetPerson`, and the person's
//! event history, `ListEvents`.

use uuid::Uuid;
use waymark_core::Identity;
use waymark_identity::{IdentityRow, PersonLinks, LINKS, PERSONS};
use waymark_person::history::{self, HistoryEntry, HISTORY};
use waymark_person::PersonState;
use waymark_proto::v1 as pb;
use waymark_runtime::StoreError;

use super::QueryService;
use crate::convert::{identity, timestamp};
use crate::error::{fit_page, page_size, parse_person_id, require_id, ApiError};
use crate::projections::Projections;

fn person(id: Uuid, state: Option<&PersonState>, links: Option<&PersonLinks>) -> pb::Person {
    pb::Person {
        person_id: id.to_string(),
        identities: links
            .map(|l| l.identities().map(identity).collect())
            .unwrap_or_default(),
        first_seen: state.and_then(|s| s.first_seen.as_ref()).map(timestamp),
        last_seen: state.and_then(|s| s.last_seen.as_ref()).map(timestamp),
        event_count: state.map_or(0, |s| s.event_count),
        interaction_count: state.map_or(0, |s| s.interaction_count),
        merged_into: links
            .and_then(PersonLinks::merged_into)
            .map(|m| m.to_string())
            .unwrap_or_default(),
    }
}

/// One event of a person's history.
fn person_event(entry: &HistoryEntry) -> Result<pb::PersonEvent, ApiError> {
    let event = waymark_core::Event::from_json(&entry.event).map_err(|e| {
        ApiError::Store(StoreError::Corrupt {
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

/// The person an identity resolves to.
async fn resolve(p: &Projections, identity: &Identity) -> Result<Option<Uuid>, StoreError> {
    let table = p.table(waymark_identity::NAME, LINKS)?;
    let row: Option<IdentityRow> = table.get(p.store().as_ref(), &identity.key()).await?;
    Ok(row.map(|r| r.person_id))
}

/// The identities of a person and whom it was merged into.
async fn links(p: &Projections, person: Uuid) -> Result<Option<PersonLinks>, StoreError> {
    let table = p.table(waymark_identity::NAME, PERSONS)?;
    table.get(p.store().as_ref(), &person.to_string()).await
}

/// Whether anything is known about a person (its `person` row or its
/// identity links).
pub(super) async fn known(p: &Projections, id: Uuid) -> Result<bool, StoreError> {
    Ok(p.state::<PersonState>(waymark_person::NAME, id)
        .await?
        .is_some()
        || links(p, id).await?.is_some())
}

async fn get(q: &QueryService, id: Uuid) -> Result<pb::Person, ApiError> {
    let state: Option<PersonState> = q.projections.state(waymark_person::NAME, id).await?;
    let links = links(&q.projections, id).await?;
    if state.is_none() && links.is_none() {
        return Err(ApiError::NotFound(format!("person {id} not found")));
    }
    Ok(person(id, state.as_ref(), links.as_ref()))
}

pub(super) async fn resolve_identity(
    q: &QueryService,
    r: pb::ResolveIdentityRequest,
) -> Result<pb::Person, ApiError> {
    require_id("platform", &r.platform)?;
    require_id("platform_id", &r.platform_id)?;
    let identity = Identity::new(r.platform, r.platform_id);
    let id = resolve(&q.projections, &identity)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("identity {identity} not found")))?;
    get(q, id).await
}

pub(super) async fn get_person(
    q: &QueryService,
    r: pb::GetPersonRequest,
) -> Result<pb::Person, ApiError> {
    let id = parse_person_id(&r.person_id)?;
    get(q, id).await
}

pub(super) async fn list_events(
    q: &QueryService,
    r: pb::ListEventsRequest,
) -> Result<pb::ListEventsResponse, ApiError> {
    let id = parse_person_id(&r.person_id)?;
    let limit = page_size(r.page_size)?;
    let from: u64 = if r.page_token.is_empty() {
        0
    } else {
        r.page_token.parse().map_err(|_| {
            ApiError::InvalidArgument(format!(
                "page_token {:?} is not a token this service issued",
                r.page_token
            ))
        })?
    };
    let table = q.projections.table(waymark_person::NAME, HISTORY)?;
    let page = history::read_page(
        q.projections.store().as_ref(),
        &table.name,
        table.encoding,
        &id.to_string(),
        from,
        limit as u64,
    )
    .await?;
    let Some((entries, count)) = page else {
        q.ensure_known(id).await?;
        return Ok(pb::ListEventsResponse::default());
    };
    let mut events = entries
        .iter()
        .map(person_event)
        .collect::<Result<Vec<_>, ApiError>>()?;
    events.truncate(fit_page(&events));
    let next = from + events.len() as u64;
    let next_page_token = if next < count && !events.is_empty() {
        next.to_string()
    } else {
        String::new()
    };
    Ok(pb::ListEventsResponse {
        events,
        next_page_token,
    })
}
