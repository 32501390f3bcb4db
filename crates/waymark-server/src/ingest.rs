//! The `Ingest` service: validates events and appends them durably to the
//! inputs topic.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;
use waymark_core::Event;
use waymark_proto::v1 as pb;
use waymark_proto::v1::ingest_server::Ingest;
use waymark_proto::v1::publish_result::Outcome;
use waymark_runtime::{Log, OutRecord};
use waymark_schemas::Validator;

use crate::error::ApiError;

/// Most events in one `Publish` call (contract §6).
pub const MAX_EVENTS_PER_PUBLISH: usize = 1000;

/// `waymark.v1.Ingest`.
#[derive(Clone)]
pub struct IngestService {
    log: Arc<dyn Log>,
    validator: Arc<Validator>,
    inputs_topic: String,
}

impl IngestService {
    /// Appends to `inputs_topic` of `log`.
    pub fn new(
        log: Arc<dyn Log>,
        validator: Arc<Validator>,
        inputs_topic: impl Into<String>,
    ) -> Self {
        Self {
            log,
            validator,
            inputs_topic: inputs_topic.into(),
        }
    }
}

/// The record key of a valid event: its person id when the producer set
/// one, else `<platform>:<platform_id>` of its source (contract §1).
pub fn record_key(event: &Event) -> String {
    match (&event.person_id, &event.source) {
        (Some(person), _) => person.to_string(),
        (None, Some(source)) => source.key(),
        (None, None) => event.id.clone(),
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    #[instrument(skip_all, fields(events = request.get_ref().events.len()))]
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let events = request.into_inner().events;
        if events.len() > MAX_EVENTS_PER_PUBLISH {
            return Err(ApiError::InvalidArgument(format!(
                "{} events in one call, more than the maximum of {MAX_EVENTS_PER_PUBLISH}",
                events.len()
            ))
            .into());
        }
        let mut results: Vec<Option<Outcome>> = Vec::with_capacity(events.len());
        let mut records = Vec::new();
        let mut slots = Vec::new();
        for (i, raw) in events.into_iter().enumerate() {
            match self.validator.decode(raw.as_bytes()) {
                Ok(event) => {
                    records.push(OutRecord::keyed(
                        self.inputs_topic.clone(),
                        record_key(&event),
                        raw.into_bytes(),
                    ));
                    slots.push(i);
                    results.push(None);
                }
                Err(rejection) => {
                    results.push(Some(Outcome::Rejected(pb::publish_result::Rejected {
                        error: rejection.kind.as_str().to_owned(),
                        message: rejection.message,
                    })))
                }
            }
        }
        if !records.is_empty() {
            let appended = self.log.produce(records).await.map_err(ApiError::from)?;
            for (slot, a) in slots.into_iter().zip(appended) {
                results[slot] = Some(Outcome::Accepted(pb::publish_result::Accepted {
                    partition: a.partition as i32,
                    offset: a.offset as i64,
                }));
            }
        }
        Ok(Response::new(pb::PublishResponse {
            results: results
                .into_iter()
                .map(|outcome| pb::PublishResult { outcome })
                .collect(),
        }))
    }
}
