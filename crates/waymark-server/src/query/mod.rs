//! The `Query` service: reads projections, one module per processor
//! (`person.rs` with the identity links, `interactions.rs`, `journey.rs`,
//! `learning.rs`), each with its rpcs and its protobuf conversions. The
//! trait impl below only hands each rpc to its module.

mod interactions;
mod journey;
mod learning;
mod person;

use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;
use waymark_proto::v1 as pb;
use waymark_proto::v1::query_server::Query;

use crate::error::ApiError;
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

    /// `NOT_FOUND` unless something is known about the person.
    async fn ensure_known(&self, id: Uuid) -> Result<(), ApiError> {
        if person::known(&self.projections, id).await? {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!("person {id} not found")))
        }
    }
}

/// The answer of an rpc, or its status.
fn answer<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Query for QueryService {
    #[instrument(skip_all, fields(platform = %request.get_ref().platform))]
    async fn resolve_identity(
        &self,
        request: Request<pb::ResolveIdentityRequest>,
    ) -> Result<Response<pb::Person>, Status> {
        answer(person::resolve_identity(self, request.into_inner()).await)
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn get_person(
        &self,
        request: Request<pb::GetPersonRequest>,
    ) -> Result<Response<pb::Person>, Status> {
        answer(person::get_person(self, request.into_inner()).await)
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn list_interactions(
        &self,
        request: Request<pb::ListInteractionsRequest>,
    ) -> Result<Response<pb::ListInteractionsResponse>, Status> {
        answer(interactions::list_interactions(self, request.into_inner()).await)
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn get_journey(
        &self,
        request: Request<pb::GetJourneyRequest>,
    ) -> Result<Response<pb::Journey>, Status> {
        answer(journey::get_journey(self, request.into_inner()).await)
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn list_journeys(
        &self,
        request: Request<pb::ListJourneysRequest>,
    ) -> Result<Response<pb::ListJourneysResponse>, Status> {
        answer(journey::list_journeys(self, request.into_inner()).await)
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn get_learning_progress(
        &self,
        request: Request<pb::GetLearningProgressRequest>,
    ) -> Result<Response<pb::LearningProgress>, Status> {
        answer(learning::get_learning_progress(self, request.into_inner()).await)
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn list_learning_progress(
        &self,
        request: Request<pb::ListLearningProgressRequest>,
    ) -> Result<Response<pb::ListLearningProgressResponse>, Status> {
        answer(learning::list_learning_progress(self, request.into_inner()).await)
    }

    #[instrument(skip_all, fields(person_id = %request.get_ref().person_id))]
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        answer(person::list_events(self, request.into_inner()).await)
    }
}
