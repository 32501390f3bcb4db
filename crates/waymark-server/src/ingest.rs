//! The `Ingest` service: validates events and appends them durably to the
//! inputs topic.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;
use waymark_core::{Event, RejectKind};
use waymark_proto::v1 as pb;
use waymark_proto::v1::ingest_server::Ingest;
use waymark_proto::v1::publish_result::Outcome;
use waymark_runtime::{Appended, Log, LogError, OutRecord};
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

/// What validating a publish call gives: a result per event (`None` for
/// the valid ones, filled in once appended), their records, and the
/// result slot of each record.
type Validated = (Vec<Option<Outcome>>, Vec<OutRecord>, Vec<usize>);

/// Validates `events` for `topic` (blocking: run off the async workers).
fn validate(validator: &Validator, topic: &str, events: Vec<String>) -> Validated {
    let mut results: Vec<Option<Outcome>> = Vec::with_capacity(events.len());
    let mut records = Vec::new();
    let mut slots = Vec::new();
    for (i, raw) in events.into_iter().enumerate() {
        match validator.decode(raw.as_bytes()) {
            Ok(event) => {
                records.push(OutRecord::keyed(
                    topic.to_owned(),
                    record_key(&event),
                    raw.into_bytes(),
                ));
                slots.push(i);
                results.push(None);
            }
            Err(rejection) => results.push(Some(Outcome::Rejected(pb::publish_result::Rejected {
                error: rejection.kind.as_str().to_owned(),
                message: rejection.message,
            }))),
        }
    }
    (results, records, slots)
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
        // Schema validation is CPU work (up to 1000 events of up to 1 MiB):
        // off the async workers, so it never stalls other requests.
        let validator = self.validator.clone();
        let topic = self.inputs_topic.clone();
        let (mut results, records, slots) =
            tokio::task::spawn_blocking(move || validate(&validator, &topic, events))
                .await
                .map_err(|e| Status::unavailable(format!("validation was interrupted: {e}")))?;
        if !records.is_empty() {
            let appended: Vec<Option<Appended>> = match self.log.produce(records).await {
                Ok(appended) => appended.into_iter().map(Some).collect(),
                // Larger than the inputs topic accepts (a topic configured
                // below the contract's 1 MiB): those events are rejected,
                // the others were appended.
                Err(LogError::TooLarge {
                    refused, appended, ..
                }) => {
                    let mut appended = appended.into_iter();
                    (0..slots.len())
                        .map(|i| {
                            if refused.contains(&i) {
                                None
                            } else {
                                appended.next()
                            }
                        })
                        .collect()
                }
                Err(e) => return Err(ApiError::from(e).into()),
            };
            for (slot, a) in slots.into_iter().zip(appended) {
                results[slot] = Some(match a {
                    Some(a) => Outcome::Accepted(pb::publish_result::Accepted {
                        partition: a.partition as i32,
                        offset: a.offset as i64,
                    }),
                    None => Outcome::Rejected(pb::publish_result::Rejected {
                        error: RejectKind::TooLarge.as_str().to_owned(),
                        message: "the event is larger than the inputs topic accepts".to_owned(),
                    }),
                });
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
