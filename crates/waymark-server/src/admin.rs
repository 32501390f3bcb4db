//! The `Admin` service: dead letters, status, and projection versions
//! (through an [`Operator`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;
use waymark_proto::v1 as pb;
use waymark_proto::v1::admin_server::Admin;
use waymark_runtime::dead_letter::DeadLetter;
use waymark_runtime::{Log, Record};

use crate::error::{fit_page, page_size, ApiError};

/// The state of the Kafka-protocol endpoint of `waymark dev`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaEndpointStatus {
    /// `host:port` for Kafka clients.
    pub bootstrap: String,
    /// Connections open now.
    pub connections: u64,
    /// Records appended through the endpoint since start.
    pub records_in: u64,
    /// Records sent to consumers since start.
    pub records_out: u64,
    /// Refusals since start.
    pub refusals: u64,
    /// The last refusal, `CODE: reason`.
    pub last_refusal: Option<String>,
}

/// Reports the Kafka endpoint's status on demand.
pub type KafkaEndpointProbe = Arc<dyn Fn() -> KafkaEndpointStatus + Send + Sync>;

/// Operates projection versions: what `ListProjections`, `StartRebuild`,
/// `SwitchVersion`, `DropVersion` and `Verify` do. Implemented where the
/// processors are known (the `waymark` binary).
#[tonic::async_trait]
pub trait Operator: Send + Sync + 'static {
    /// Every processor's versions, in topology order.
    async fn list(&self) -> Result<Vec<pb::Projection>, ApiError>;
    /// Starts building `to` (default: highest + 1) of `processor`.
    async fn start_rebuild(
        &self,
        processor: &str,
        to: Option<u32>,
        switch_when_caught_up: bool,
    ) -> Result<pb::Projection, ApiError>;
    /// Makes building `version` live once it has caught up.
    async fn switch(&self, processor: &str, version: u32) -> Result<pb::Projection, ApiError>;
    /// Drops a building or retired version and its data.
    async fn drop_version(&self, processor: &str, version: u32)
        -> Result<pb::Projection, ApiError>;
    /// Recomputes and compares `processor` (all when `None`).
    async fn verify(&self, processor: Option<&str>) -> Result<Vec<pb::VerifyReport>, ApiError>;
    /// Up to `limit` parked keys of `processor` version `version` (the live
    /// one when `None`) after page token `after`.
    async fn list_parked(
        &self,
        processor: &str,
        version: Option<u32>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<pb::ListParkedResponse, ApiError>;
    /// Asks for parked `key` (as [`waymark_runtime::park::key_text`] shows
    /// it) to be retried, its oldest record first dead-lettered when `skip`.
    async fn retry_parked(
        &self,
        processor: &str,
        version: Option<u32>,
        key: &str,
        skip: bool,
    ) -> Result<pb::ParkedKey, ApiError>;
}

/// `waymark.v1.Admin`.
#[derive(Clone)]
pub struct AdminService {
    log: Arc<dyn Log>,
    dlq_topic: String,
    kafka_endpoint: Option<KafkaEndpointProbe>,
    operator: Option<Arc<dyn Operator>>,
}

impl AdminService {
    /// Reads dead letters from `dlq_topic` of `log`.
    pub fn new(log: Arc<dyn Log>, dlq_topic: impl Into<String>) -> Self {
        Self {
            log,
            dlq_topic: dlq_topic.into(),
            kafka_endpoint: None,
            operator: None,
        }
    }

    /// Serves the projection-version rpcs through `operator`.
    pub fn with_operator(mut self, operator: Arc<dyn Operator>) -> Self {
        self.operator = Some(operator);
        self
    }

    fn operator(&self) -> Result<&Arc<dyn Operator>, ApiError> {
        self.operator.as_ref().ok_or_else(|| {
            ApiError::Unimplemented("projection versions are not operated by this server".into())
        })
    }

    /// Also reports the Kafka endpoint of `waymark dev` in `GetStatus`.
    pub fn with_kafka_endpoint(mut self, probe: KafkaEndpointProbe) -> Self {
        self.kafka_endpoint = Some(probe);
        self
    }
}

/// Page tokens of `ListDeadLetters`: the next offset per partition,
/// `p=o,p=o`.
fn parse_token(token: &str) -> Result<BTreeMap<u32, u64>, ApiError> {
    let bad = || {
        ApiError::InvalidArgument(format!(
            "page_token {token:?} is not a token this service issued"
        ))
    };
    let mut out = BTreeMap::new();
    if token.is_empty() {
        return Ok(out);
    }
    for part in token.split(',') {
        let (p, o) = part.split_once('=').ok_or_else(bad)?;
        out.insert(p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?);
    }
    Ok(out)
}

fn format_token(next: &BTreeMap<u32, u64>) -> String {
    next.iter()
        .map(|(p, o)| format!("{p}={o}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[tonic::async_trait]
impl Admin for AdminService {
    #[instrument(skip_all)]
    async fn list_projections(
        &self,
        _: Request<pb::ListProjectionsRequest>,
    ) -> Result<Response<pb::ListProjectionsResponse>, Status> {
        let projections = self.operator()?.list().await?;
        Ok(Response::new(pb::ListProjectionsResponse { projections }))
    }

    #[instrument(skip_all, fields(processor = %request.get_ref().processor))]
    async fn start_rebuild(
        &self,
        request: Request<pb::StartRebuildRequest>,
    ) -> Result<Response<pb::Projection>, Status> {
        let r = request.into_inner();
        let to = (r.to_version != 0).then_some(r.to_version);
        let p = self
            .operator()?
            .start_rebuild(&r.processor, to, r.switch_when_caught_up)
            .await?;
        Ok(Response::new(p))
    }

    #[instrument(skip_all, fields(processor = %request.get_ref().processor))]
    async fn switch_version(
        &self,
        request: Request<pb::SwitchVersionRequest>,
    ) -> Result<Response<pb::Projection>, Status> {
        let r = request.into_inner();
        let p = self.operator()?.switch(&r.processor, r.version).await?;
        Ok(Response::new(p))
    }

    #[instrument(skip_all, fields(processor = %request.get_ref().processor))]
    async fn drop_version(
        &self,
        request: Request<pb::DropVersionRequest>,
    ) -> Result<Response<pb::Projection>, Status> {
        let r = request.into_inner();
        let p = self
            .operator()?
            .drop_version(&r.processor, r.version)
            .await?;
        Ok(Response::new(p))
    }

    #[instrument(skip_all, fields(processor = %request.get_ref().processor))]
    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let r = request.into_inner();
        let processor = (!r.processor.is_empty()).then_some(r.processor.as_str());
        let reports = self.operator()?.verify(processor).await?;
        Ok(Response::new(pb::VerifyResponse { reports }))
    }

    #[instrument(skip_all)]
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let kafka_endpoint = self.kafka_endpoint.as_ref().map(|probe| {
            let s = probe();
            pb::KafkaEndpointStatus {
                bootstrap: s.bootstrap,
                connections: s.connections,
                records_in: s.records_in,
                records_out: s.records_out,
                refusals: s.refusals,
                last_refusal: s.last_refusal.unwrap_or_default(),
            }
        });
        let failing = waymark_runtime::status::failing()
            .into_iter()
            .map(|f| pb::FailingPartition {
                processor: f.processor,
                version: f.version,
                topic: f.topic,
                partition: f.partition as i32,
                offset: f.offset as i64,
                retries: f.retries,
                error: f.error,
                since: Some(prost_types::Timestamp {
                    seconds: f.since_ms.div_euclid(1000),
                    nanos: (f.since_ms.rem_euclid(1000) * 1_000_000) as i32,
                }),
            })
            .collect();
        Ok(Response::new(pb::GetStatusResponse {
            kafka_endpoint,
            failing,
        }))
    }

    #[instrument(skip_all, fields(processor = %request.get_ref().processor))]
    async fn list_parked(
        &self,
        request: Request<pb::ListParkedRequest>,
    ) -> Result<Response<pb::ListParkedResponse>, Status> {
        let r = request.into_inner();
        crate::error::require_id("processor", &r.processor)?;
        let limit = page_size(r.page_size)?;
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        if let Some(token) = after {
            let valid = token.len() <= 2048
                && token.split_once('/').is_some_and(|(kind, rest)| {
                    matches!(kind, "h" | "e" | "r")
                        && rest.bytes().all(|b| b.is_ascii_hexdigit() || b == b'/')
                });
            if !valid {
                return Err(ApiError::InvalidArgument(format!(
                    "page_token {token:?} is not a token this service issued"
                ))
                .into());
            }
        }
        let version = (r.version != 0).then_some(r.version);
        let page = self
            .operator()?
            .list_parked(&r.processor, version, limit, after)
            .await?;
        Ok(Response::new(page))
    }

    #[instrument(skip_all, fields(processor = %request.get_ref().processor))]
    async fn retry_parked(
        &self,
        request: Request<pb::RetryParkedRequest>,
    ) -> Result<Response<pb::ParkedKey>, Status> {
        let r = request.into_inner();
        crate::error::require_id("processor", &r.processor)?;
        if r.key.is_empty() {
            return Err(ApiError::InvalidArgument("key is required".into()).into());
        }
        let version = (r.version != 0).then_some(r.version);
        let parked = self
            .operator()?
            .retry_parked(&r.processor, version, &r.key, r.skip_failing)
            .await?;
        Ok(Response::new(parked))
    }

    #[instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let r = request.into_inner();
        let limit = page_size(r.page_size)?;
        let page = if r.newest_first {
            self.dead_letters_newest_first(limit, &r.page_token).await?
        } else {
            self.dead_letters_oldest_first(limit, &r.page_token).await?
        };
        Ok(Response::new(page))
    }
}

impl AdminService {
    /// A page of dead letters oldest first; the token holds the next offset
    /// to read per partition.
    async fn dead_letters_oldest_first(
        &self,
        limit: usize,
        token: &str,
    ) -> Result<pb::ListDeadLettersResponse, ApiError> {
        if token.starts_with(NEWEST_FIRST) {
            return Err(ApiError::InvalidArgument(
                "page_token was issued for newest_first".into(),
            ));
        }
        let mut next = parse_token(token)?;
        let partitions = self.log.partitions(&self.dlq_topic).await?;
        // Read up to a page from every partition, merge oldest first.
        let mut candidates: Vec<Record> = Vec::new();
        for p in 0..partitions {
            let from = next.get(&p).copied().unwrap_or(0);
            candidates.extend(self.log.read(&self.dlq_topic, p, from, limit).await?);
        }
        candidates.sort_by_key(|r| (r.timestamp_ms, r.partition, r.offset));
        candidates.truncate(limit);
        let mut dead_letters: Vec<pb::DeadLetter> = candidates.iter().map(dead_letter).collect();
        dead_letters.truncate(fit_page(&dead_letters));
        for r in &candidates[..dead_letters.len()] {
            next.insert(r.partition, r.offset + 1);
        }
        let mut more = false;
        for p in 0..partitions {
            let (_, high) = self.log.watermarks(&self.dlq_topic, p).await?;
            if next.get(&p).copied().unwrap_or(0) < high {
                more = true;
            }
        }
        Ok(pb::ListDeadLettersResponse {
            dead_letters,
            next_page_token: if more {
                format_token(&next)
            } else {
                String::new()
            },
        })
    }

    /// A page of dead letters newest first; the token holds, per partition,
    /// the offset below which the next page reads.
    async fn dead_letters_newest_first(
        &self,
        limit: usize,
        token: &str,
    ) -> Result<pb::ListDeadLettersResponse, ApiError> {
        let mut end = match token.strip_prefix(NEWEST_FIRST) {
            Some(rest) => parse_token(rest)?,
            None if token.is_empty() => BTreeMap::new(),
            None => {
                return Err(ApiError::InvalidArgument(
                    "page_token was issued for oldest first".into(),
                ))
            }
        };
        let partitions = self.log.partitions(&self.dlq_topic).await?;
        let mut low = BTreeMap::new();
        let mut candidates: Vec<Record> = Vec::new();
        for p in 0..partitions {
            let (first, high) = self.log.watermarks(&self.dlq_topic, p).await?;
            low.insert(p, first);
            let until = end.get(&p).copied().unwrap_or(high).min(high);
            let from = until.saturating_sub(limit as u64).max(first);
            if from < until {
                let records = self.log.read(&self.dlq_topic, p, from, limit).await?;
                candidates.extend(records.into_iter().filter(|r| r.offset < until));
            }
            end.insert(p, until);
        }
        candidates.sort_by_key(|r| std::cmp::Reverse((r.timestamp_ms, r.partition, r.offset)));
        candidates.truncate(limit);
        let mut dead_letters: Vec<pb::DeadLetter> = candidates.iter().map(dead_letter).collect();
        dead_letters.truncate(fit_page(&dead_letters));
        for r in &candidates[..dead_letters.len()] {
            let e = end.entry(r.partition).or_insert(r.offset);
            *e = (*e).min(r.offset);
        }
        let more = end
            .iter()
            .any(|(p, e)| *e > low.get(p).copied().unwrap_or(0));
        Ok(pb::ListDeadLettersResponse {
            dead_letters,
            next_page_token: if more {
                format!("{NEWEST_FIRST}{}", format_token(&end))
            } else {
                String::new()
            },
        })
    }
}

/// The prefix of newest-first page tokens.
const NEWEST_FIRST: &str = "n:";

fn dead_letter(record: &Record) -> pb::DeadLetter {
    let d = DeadLetter::from_record(record);
    pb::DeadLetter {
        topic: d.topic,
        partition: d.partition,
        offset: d.offset,
        key: d.key,
        value: d.value,
        error: d.error,
        message: d.message,
        processor: d.processor,
        truncated_from: d.truncated_from,
        time: Some(prost_types::Timestamp {
            seconds: d.timestamp_ms.div_euclid(1000),
            nanos: (d.timestamp_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let mut m = BTreeMap::new();
        m.insert(0, 5);
        m.insert(2, 9);
        assert_eq!(parse_token(&format_token(&m)).unwrap(), m);
        assert!(parse_token("x").is_err());
    }
}
