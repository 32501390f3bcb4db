//! The `Query` service: reads projections.

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;
use waymark_core::Identity;
use waymark_proto::v1 as pb;
use waymark_proto::v1::query_server::Query;

use crate::convert;
use crate::error::{fit_page, page_size, parse_person_id, require_id, ApiError};
use crate::projections::Projections;

/// `waymark.v1.Query`.
#[derive(Clone)]
pub struct QueryService {
    projections: Projections,
}

impl QueryService {
    /// Serves `projections`.
    pub fn new(projections: Projections) -> Self {
        Self { projections }
    }

    async fn person(&self, id: Uuid) -> Result<pb::Person, ApiError> {
        let state = self.projections.person(id).await?;
        let links = self.projections.links(id).await?;
        if state.is_none() && links.is_none() {
            return Err(ApiError::NotFound(format!("person {id} not found")));
        }
        Ok(convert::person(id, state.as_ref(), links.as_ref()))
    }

    async fn ensure_known(&self, id: Uuid) -> Result<(), ApiError> {
        if self.projections.person_known(id).await? {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!("person {id} not found")))
        }
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

#[tonic::async_trait]
impl Query for QueryService {
    #[instrument(skip_all, fields(platform = %request.get_ref().platform))]
    async fn resolve_identity(
        &self,
        request: Request<pb::ResolveIdentityRequest>,
    ) -> Result<Response<pb::Person>, Status> {
        let r = request.into_inner();
        require_id("platform", &r.platform)?;
        require_id("platform_id", &r.platform_id)?;
        let identity = Identity::new(r.platform, r.platform_id);
        let person = self
            .projections
            .resolve(&identity)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("identity {identity} not found")))?;
        Ok(Response::new(self.person(person).await?))
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn get_person(
        &self,
        request: Request<pb::GetPersonRequest>,
    ) -> Result<Response<pb::Person>, Status> {
        let id = parse_person_id(&request.get_ref().person_id)?;
        Ok(Response::new(self.person(id).await?))
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn list_interactions(
        &self,
        request: Request<pb::ListInteractionsRequest>,
    ) -> Result<Response<pb::ListInteractionsResponse>, Status> {
        let r = request.into_inner();
        let id = parse_person_id(&r.person_id)?;
        let limit = page_size(r.page_size)?;
        let cursor = parse_cursor(&r.page_token)?;
        let since = match &r.since {
            Some(ts) => Some(convert::from_timestamp(ts).ok_or_else(|| {
                ApiError::InvalidArgument("since is not a valid timestamp".into())
            })?),
            None => None,
        };
        let until = match &r.until {
            Some(ts) => Some(convert::from_timestamp(ts).ok_or_else(|| {
                ApiError::InvalidArgument("until is not a valid timestamp".into())
            })?),
            None => None,
        };
        let Some(state) = self
            .projections
            .interactions(id)
            .await
            .map_err(ApiError::from)?
        else {
            self.ensure_known(id).await?;
            return Ok(Response::new(pb::ListInteractionsResponse::default()));
        };
        let after = cursor.as_ref().map(|(t, i)| (*t, i.as_str()));
        let (items, mut next) = state.page(since, until, after, limit);
        let mut interactions: Vec<pb::Interaction> =
            items.iter().copied().map(convert::interaction).collect();
        let fit = fit_page(&interactions);
        if fit < interactions.len() {
            // The rest of the page is the start of the next one.
            interactions.truncate(fit);
            next = items.get(fit - 1).map(|last| (last.time, last.id.clone()));
        }
        Ok(Response::new(pb::ListInteractionsResponse {
            interactions,
            next_page_token: next.map(|(t, i)| format_cursor(&t, &i)).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn get_journey(
        &self,
        request: Request<pb::GetJourneyRequest>,
    ) -> Result<Response<pb::Journey>, Status> {
        let r = request.into_inner();
        let id = parse_person_id(&r.person_id)?;
        require_id("journey_id", &r.journey_id)?;
        let state = self
            .projections
            .journeys(id)
            .await
            .map_err(ApiError::from)?;
        let journey = state
            .as_ref()
            .and_then(|s| s.journeys.get(&r.journey_id))
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "journey {:?} of person {id} not found",
                    r.journey_id
                ))
            })?;
        Ok(Response::new(convert::journey(id, &r.journey_id, journey)))
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn list_journeys(
        &self,
        request: Request<pb::ListJourneysRequest>,
    ) -> Result<Response<pb::ListJourneysResponse>, Status> {
        let id = parse_person_id(&request.get_ref().person_id)?;
        let Some(state) = self
            .projections
            .journeys(id)
            .await
            .map_err(ApiError::from)?
        else {
            self.ensure_known(id).await?;
            return Ok(Response::new(pb::ListJourneysResponse::default()));
        };
        Ok(Response::new(pb::ListJourneysResponse {
            journeys: state
                .journeys
                .iter()
                .map(|(jid, j)| convert::journey(id, jid, j))
                .collect(),
        }))
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn get_learning_progress(
        &self,
        request: Request<pb::GetLearningProgressRequest>,
    ) -> Result<Response<pb::LearningProgress>, Status> {
        let r = request.into_inner();
        let id = parse_person_id(&r.person_id)?;
        require_id("course_id", &r.course_id)?;
        let state = self
            .projections
            .learning(id)
            .await
            .map_err(ApiError::from)?;
        let course = state
            .as_ref()
            .and_then(|s| s.courses.get(&r.course_id))
            .ok_or_else(|| {
                ApiError::NotFound(format!("course {:?} of person {id} not found", r.course_id))
            })?;
        Ok(Response::new(convert::course(id, &r.course_id, course)))
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn list_learning_progress(
        &self,
        request: Request<pb::ListLearningProgressRequest>,
    ) -> Result<Response<pb::ListLearningProgressResponse>, Status> {
        let id = parse_person_id(&request.get_ref().person_id)?;
        let Some(state) = self
            .projections
            .learning(id)
            .await
            .map_err(ApiError::from)?
        else {
            self.ensure_known(id).await?;
            return Ok(Response::new(pb::ListLearningProgressResponse::default()));
        };
        Ok(Response::new(pb::ListLearningProgressResponse {
            courses: state
                .courses
                .iter()
                .map(|(cid, c)| convert::course(id, cid, c))
                .collect(),
        }))
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let r = request.into_inner();
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
        let Some((entries, count)) = self
            .projections
            .history(id, from, limit as u64)
            .await
            .map_err(ApiError::from)?
        else {
            self.ensure_known(id).await?;
            return Ok(Response::new(pb::ListEventsResponse::default()));
        };
        let mut events = entries
            .iter()
            .map(convert::person_event)
            .collect::<Result<Vec<_>, ApiError>>()?;
        events.truncate(fit_page(&events));
        let next = from + events.len() as u64;
        let next_page_token = if next < count && !events.is_empty() {
            next.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEventsResponse {
            events,
            next_page_token,
        }))
    }
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
