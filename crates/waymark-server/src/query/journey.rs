//! The `journey` projection's queries: `GetJourney`, `ListJourneys`.

use uuid::Uuid;
use waymark_journey::{JourneyState, JourneyStatus, JourneysState, NAME};
use waymark_proto::v1 as pb;

use super::QueryService;
use crate::convert::timestamp;
use crate::error::{parse_person_id, require_id, ApiError};

fn journey(person: Uuid, journey_id: &str, j: &JourneyState) -> pb::Journey {
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

pub(super) async fn get_journey(
    q: &QueryService,
    r: pb::GetJourneyRequest,
) -> Result<pb::Journey, ApiError> {
    let id = parse_person_id(&r.person_id)?;
    require_id("journey_id", &r.journey_id)?;
    let state: Option<JourneysState> = q.projections.state(NAME, id).await?;
    let found = state
        .as_ref()
        .and_then(|s| s.journeys.get(&r.journey_id))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "journey {:?} of person {id} not found",
                r.journey_id
            ))
        })?;
    Ok(journey(id, &r.journey_id, found))
}

pub(super) async fn list_journeys(
    q: &QueryService,
    r: pb::ListJourneysRequest,
) -> Result<pb::ListJourneysResponse, ApiError> {
    let id = parse_person_id(&r.person_id)?;
    let Some(state) = q.projections.state::<JourneysState>(NAME, id).await? else {
        q.ensure_known(id).await?;
        return Ok(pb::ListJourneysResponse::default());
    };
    Ok(pb::ListJourneysResponse {
        journeys: state
            .journeys
            .iter()
            .map(|(jid, j)| journey(id, jid, j))
            .collect(),
    })
}
