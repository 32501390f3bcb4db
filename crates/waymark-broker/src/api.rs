//! Request handlers: ApiVersions, Metadata, Produce, InitProducerId,
//! ListOffsets, Fetch and FindCoordinator; group requests go to
//! `groups.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, FetchRequest, FetchResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, InitProducerIdRequest, InitProducerIdResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse,
    ProducerId, RequestHeader, RequestKind, ResponseKind, SaslAuthenticateResponse,
    SaslHandshakeResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use waymark_embedded::{
    AppendOutcome, AppendRefusal, EmbeddedLog, PartitionAppend, ProducerBatch, SequenceRefusal,
};

use crate::groups::Coordinator as Groups;
use crate::records::{self, BatchError, Limits};
use crate::sasl::Authenticator;
use crate::server::Pending;
use crate::{BrokerConfig, Counters, BYTES_IN, BYTES_OUT, RECORDS_IN, RECORDS_OUT};

/// The one node of this cluster.
pub(crate) const NODE_ID: i32 = 0;
/// `cluster_id` in metadata.
const CLUSTER_ID: &str = "waymark-dev";

/// The request versions served. Versions that address topics by id
/// (Produce 13, Fetch 13+, OffsetCommit/OffsetFetch 10) are left out:
/// topics are addressed by name.
const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 12),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 10),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::FindCoordinator, 0, 6),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::InitProducerId, 0, 5),
    // Always advertised, as Kafka does; see `sasl.rs` and the crate docs.
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// The name Kafka gives an error code (for metrics and messages).
pub(crate) fn code_name(e: ResponseError) -> String {
    let name = format!("{e:?}");
    // CamelCase → SCREAMING_SNAKE_CASE, as Kafka names them.
    let mut out = String::with_capacity(name.len() + 8);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

pub(crate) fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// Shared state of every connection.
pub(crate) struct Api {
    pub(crate) log: EmbeddedLog,
    pub(crate) config: BrokerConfig,
    pub(crate) counters: Arc<Counters>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) groups: Arc<Groups>,
    /// Bytes of request frames being read or handled, broker-wide.
    pub(crate) memory: Arc<tokio::sync::Semaphore>,
    /// SASL verifiers, when SASL is on (`config.sasl` is then `None`: the
    /// passwords are not kept).
    pub(crate) sasl: Option<Arc<Authenticator>>,
}

impl Api {
    pub(crate) fn new(
        log: EmbeddedLog,
        config: BrokerConfig,
        sasl: Option<Arc<Authenticator>>,
        counters: Arc<Counters>,
        shutdown: CancellationToken,
    ) -> Self {
        let groups = Arc::new(Groups::new(log.clone(), config.session_timeout_bounds));
        // At least one largest request always fits.
        let memory = config
            .max_queued_request_bytes
            .max(config.max_request_bytes)
            .min(tokio::sync::Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        let memory = Arc::new(tokio::sync::Semaphore::new(memory));
        Self {
            memory,
            log,
            config,
            counters,
            shutdown,
            groups,
            sasl,
        }
    }

    /// Starts the group coordinator's timer (sessions, rebalance deadlines).
    pub(crate) fn start_sweeper(&self, tasks: &mut JoinSet<()>) {
        let (groups, token) = (self.groups.clone(), self.shutdown.clone());
        tasks.spawn(async move { groups.sweep_until(token).await });
    }

    fn api_keys() -> Vec<ApiVersion> {
        SUPPORTED
            .iter()
            .map(|(k, min, max)| {
                ApiVersion::default()
                    .with_api_key(*k as i16)
                    .with_min_version(*min)
                    .with_max_version(*max)
            })
            .collect()
    }

    /// The KIP-511 answer to an ApiVersions version this broker does not
    /// know (encoded as v0).
    pub(crate) fn api_versions_unsupported(&self) -> ResponseKind {
        self.counters.refused(
            "UNSUPPORTED_VERSION",
            "ApiVersions version not supported; answered with the supported ones",
        );
        ResponseKind::ApiVersions(
            ApiVersionsResponse::default()
                .with_error_code(ResponseError::UnsupportedVersion.code())
                .with_api_keys(Self::api_keys()),
        )
    }

    pub(crate) fn refuse(&self, e: ResponseError, why: &str) -> i16 {
        self.counters.refused(&code_name(e), why);
        e.code()
    }

    /// Starts a request: everything that must happen in arrival order
    /// (queueing a produce to the log) happens before this returns.
    pub(crate) async fn start(
        self: &Arc<Self>,
        request: RequestKind,
        header: &RequestHeader,
        version: i16,
        local: SocketAddr,
    ) -> Pending {
        let client_id = header
            .client_id
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default();
        match request {
            RequestKind::ApiVersions(_) => {
                let r = ApiVersionsResponse::default().with_api_keys(Self::api_keys());
                ready(ResponseKind::ApiVersions(r))
            }
            RequestKind::Metadata(r) => {
                ready(ResponseKind::Metadata(self.metadata(&r, version, local)))
            }
            RequestKind::Produce(r) => self.produce(r, version).await,
            RequestKind::InitProducerId(r) => {
                let api = self.clone();
                Box::pin(async move {
                    Some(ResponseKind::InitProducerId(api.init_producer_id(r).await))
                })
            }
            RequestKind::ListOffsets(r) => {
                let api = self.clone();
                Box::pin(async move {
                    Some(ResponseKind::ListOffsets(
                        api.list_offsets(r, version).await,
                    ))
                })
            }
            RequestKind::Fetch(r) => {
                let api = self.clone();
                Box::pin(async move { Some(ResponseKind::Fetch(api.fetch(r, version).await)) })
            }
            RequestKind::FindCoordinator(r) => ready(ResponseKind::FindCoordinator(
                self.find_coordinator(&r, version, local),
            )),
            RequestKind::JoinGroup(r) => {
                let groups = self.groups.clone();
                let host = local.ip().to_string();
                Box::pin(async move {
                    Some(ResponseKind::JoinGroup(
                        groups.join(r, version, client_id, host).await,
                    ))
                })
            }
            RequestKind::SyncGroup(r) => {
                let groups = self.groups.clone();
                Box::pin(
                    async move { Some(ResponseKind::SyncGroup(groups.sync(r, version).await)) },
                )
            }
            RequestKind::Heartbeat(r) => ready(ResponseKind::Heartbeat(self.groups.heartbeat(&r))),
            RequestKind::LeaveGroup(r) => {
                ready(ResponseKind::LeaveGroup(self.groups.leave(&r, version)))
            }
            RequestKind::OffsetCommit(r) => {
                let groups = self.groups.clone();
                Box::pin(async move { Some(ResponseKind::OffsetCommit(groups.commit(r).await)) })
            }
            RequestKind::OffsetFetch(r) => ready(ResponseKind::OffsetFetch(
                self.groups.fetch_offsets(&r, version),
            )),
            RequestKind::DescribeGroups(r) => {
                ready(ResponseKind::DescribeGroups(self.groups.describe(&r)))
            }
            RequestKind::ListGroups(r) => {
                ready(ResponseKind::ListGroups(self.groups.list(&r, version)))
            }
            // Reached without SASL, or once authenticated (the
            // connection's SASL session answers them before): Kafka's
            // answers on a listener without SASL, or after authentication.
            RequestKind::SaslHandshake(_) => {
                let code = self.refuse(
                    ResponseError::IllegalSaslState,
                    "SaslHandshake without SASL or after authentication",
                );
                let mechanisms = self
                    .sasl
                    .as_ref()
                    .map(|s| s.mechanism_names())
                    .unwrap_or_default();
                ready(ResponseKind::SaslHandshake(
                    SaslHandshakeResponse::default()
                        .with_error_code(code)
                        .with_mechanisms(mechanisms),
                ))
            }
            RequestKind::SaslAuthenticate(_) => {
                let code = self.refuse(
                    ResponseError::IllegalSaslState,
                    "SaslAuthenticate without SASL or after authentication",
                );
                let message = if self.sasl.is_some() {
                    "SaslAuthenticate request received after successful authentication"
                } else {
                    "SASL is not enabled on this endpoint"
                };
                ready(ResponseKind::SaslAuthenticate(
                    SaslAuthenticateResponse::default()
                        .with_error_code(code)
                        .with_error_message(Some(str_bytes(message))),
                ))
            }
            other => {
                // Not advertised, so a well-behaved client never sends it;
                // `supports` has already closed the connection for it.
                warn!(request = ?std::mem::discriminant(&other), "kafka endpoint: unexpected request");
                Box::pin(async { None })
            }
        }
    }

    /// The host and port clients are sent to: the configured advertised
    /// address, else the one the connection arrived on.
    fn advertised(&self, local: SocketAddr) -> (String, i32) {
        match &self.config.advertised {
            Some((host, port)) => (host.clone(), i32::from(*port)),
            None => (local.ip().to_string(), i32::from(local.port())),
        }
    }

    fn broker(&self, local: SocketAddr) -> MetadataResponseBroker {
        let (host, port) = self.advertised(local);
        MetadataResponseBroker::default()
            .with_node_id(BrokerId(NODE_ID))
            .with_host(str_bytes(host))
            .with_port(port)
    }

    fn metadata(&self, r: &MetadataRequest, version: i16, local: SocketAddr) -> MetadataResponse {
        let topics = self.log.topics().unwrap_or_default();
        let known: HashMap<&str, u32> = topics.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        // v0: an empty list means every topic; v1+: null does.
        let wanted: Vec<String> = match &r.topics {
            None => topics.iter().map(|(n, _)| n.clone()).collect(),
            Some(list) if list.is_empty() && version == 0 => {
                topics.iter().map(|(n, _)| n.clone()).collect()
            }
            Some(list) => list
                .iter()
                .filter_map(|t| t.name.as_ref().map(|n| n.to_string()))
                .collect(),
        };
        let topics = wanted
            .into_iter()
            .map(|name| {
                let topic = MetadataResponseTopic::default()
                    .with_name(Some(TopicName(str_bytes(name.clone()))));
                match known.get(name.as_str()) {
                    Some(&partitions) => topic.with_partitions(
                        (0..partitions)
                            .map(|p| {
                                MetadataResponsePartition::default()
                                    .with_partition_index(p as i32)
                                    .with_leader_id(BrokerId(NODE_ID))
                                    .with_leader_epoch(0)
                                    .with_replica_nodes(vec![BrokerId(NODE_ID)])
                                    .with_isr_nodes(vec![BrokerId(NODE_ID)])
                            })
                            .collect(),
                    ),
                    None => topic.with_error_code(self.refuse(
                        ResponseError::UnknownTopicOrPartition,
                        &format!("metadata for unknown topic {name}"),
                    )),
                }
            })
            .collect();
        MetadataResponse::default()
            .with_brokers(vec![self.broker(local)])
            .with_cluster_id(Some(str_bytes(CLUSTER_ID)))
            .with_controller_id(BrokerId(NODE_ID))
            .with_topics(topics)
    }

    fn find_coordinator(
        &self,
        r: &FindCoordinatorRequest,
        version: i16,
        local: SocketAddr,
    ) -> FindCoordinatorResponse {
        let (host, port) = self.advertised(local);
        let host = str_bytes(host);
        let (error, message) = if r.key_type == 0 {
            (0, None)
        } else {
            // The one answer both librdkafka and the Java client treat as
            // final (anything else they retry until their timeout).
            let code = self.refuse(
                ResponseError::TransactionalIdAuthorizationFailed,
                "transaction coordinator asked for; transactions are not supported",
            );
            (
                code,
                Some(str_bytes("transactions are not supported by waymark dev")),
            )
        };
        if version >= 4 {
            let coordinators = r
                .coordinator_keys
                .iter()
                .map(|key| {
                    Coordinator::default()
                        .with_key(key.clone())
                        .with_node_id(BrokerId(if error == 0 { NODE_ID } else { -1 }))
                        .with_host(if error == 0 {
                            host.clone()
                        } else {
                            StrBytes::default()
                        })
                        .with_port(if error == 0 { port } else { -1 })
                        .with_error_code(error)
                        .with_error_message(message.clone())
                })
                .collect();
            return FindCoordinatorResponse::default().with_coordinators(coordinators);
        }
        let response = FindCoordinatorResponse::default().with_error_code(error);
        let response = if version >= 1 {
            response.with_error_message(message)
        } else {
            response
        };
        if error == 0 {
            response
                .with_node_id(BrokerId(NODE_ID))
                .with_host(host)
                .with_port(port)
        } else {
            response.with_node_id(BrokerId(-1)).with_port(-1)
        }
    }

    async fn init_producer_id(&self, r: InitProducerIdRequest) -> InitProducerIdResponse {
        if r.transactional_id.is_some() {
            let code = self.refuse(
                ResponseError::TransactionalIdAuthorizationFailed,
                "InitProducerId with a transactional id; transactions are not supported",
            );
            return InitProducerIdResponse::default()
                .with_error_code(code)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1);
        }
        // As Kafka does for producers without a transactional id: always a
        // new producer id, epoch 0.
        match self.log.allocate_producer_id().await {
            Ok(id) => InitProducerIdResponse::default()
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(0),
            Err(e) => {
                warn!(error = %e, "kafka endpoint: cannot allocate a producer id");
                InitProducerIdResponse::default()
                    .with_error_code(ResponseError::CoordinatorNotAvailable.code())
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1)
            }
        }
    }

    /// Validates and queues a produce request; the returned future answers
    /// once the log has made it durable.
    async fn produce(self: &Arc<Self>, r: ProduceRequest, version: i16) -> Pending {
        let acks = r.acks;
        let partition_error = |index: i32, code: i16, message: String| {
            partition_failure(index, code, message, version)
        };
        // Per topic, per partition: either an immediate error or a slot in
        // the append.
        enum Slot {
            Error(PartitionProduceResponse),
            Appends(Vec<usize>),
        }
        let mut parts: Vec<PartitionAppend> = Vec::new();
        let mut plan: Vec<(TopicName, Vec<(i32, Slot)>)> = Vec::new();
        let mut records_in: Vec<(String, u64, u64)> = Vec::new();
        let transactional = r.transactional_id.is_some();
        let bad_acks = !matches!(acks, -1..=1);
        for topic in r.topic_data {
            let name = topic.name.to_string();
            let policy = self.config.policy(&name);
            let partitions = self.log.partition_count(&name);
            let mut slots = Vec::new();
            for data in topic.partition_data {
                let index = data.index;
                let refusal = if bad_acks {
                    Some((
                        ResponseError::InvalidRequiredAcks,
                        format!("acks={acks} is not -1, 0 or 1"),
                    ))
                } else if transactional {
                    Some((
                        ResponseError::InvalidRequest,
                        "transactions are not supported by waymark dev".to_owned(),
                    ))
                } else if partitions.is_none() {
                    Some((
                        ResponseError::UnknownTopicOrPartition,
                        format!("unknown topic {name}; topics come from topology.yaml"),
                    ))
                } else if !policy.writable {
                    Some((
                        ResponseError::TopicAuthorizationFailed,
                        format!("{name} is written by Waymark's processors only"),
                    ))
                } else if index < 0 || partitions.is_some_and(|n| index as u32 >= n) {
                    Some((
                        ResponseError::UnknownTopicOrPartition,
                        format!("{name} has no partition {index}"),
                    ))
                } else {
                    None
                };
                if let Some((e, why)) = refusal {
                    let code = self.refuse(e, &format!("produce to {name}/{index}: {why}"));
                    slots.push((index, Slot::Error(partition_error(index, code, why))));
                    continue;
                }
                let limits = Limits {
                    max_message_bytes: policy.max_message_bytes,
                    max_decompressed_bytes: self.config.max_decompressed_bytes,
                };
                let Some(bytes) = data.records else {
                    let code =
                        self.refuse(ResponseError::CorruptMessage, "produce without records");
                    slots.push((
                        index,
                        Slot::Error(partition_error(index, code, "no records".into())),
                    ));
                    continue;
                };
                match records::decode_batches(bytes, limits) {
                    Ok(batches) => {
                        let mut at = Vec::new();
                        for batch in batches {
                            let count = batch.records.len() as u64;
                            let size: usize = batch.records.iter().map(|r| r.payload_len()).sum();
                            records_in.push((name.clone(), count, size as u64));
                            let producer = (batch.producer_id >= 0).then_some(ProducerBatch {
                                producer_id: batch.producer_id,
                                epoch: batch.producer_epoch,
                                first_sequence: batch.base_sequence,
                                count: batch.records.len() as i32,
                            });
                            at.push(parts.len());
                            parts.push(PartitionAppend {
                                topic: name.clone(),
                                partition: index as u32,
                                records: batch.records,
                                producer,
                            });
                        }
                        slots.push((index, Slot::Appends(at)));
                    }
                    Err(e) => {
                        let kind = match &e {
                            BatchError::Corrupt(_) => ResponseError::CorruptMessage,
                            BatchError::Magic(_) => ResponseError::UnsupportedForMessageFormat,
                            BatchError::TooLarge(_) => ResponseError::MessageTooLarge,
                            BatchError::Unsupported(_) => ResponseError::InvalidRecord,
                        };
                        let why = e.to_string();
                        let code = self.refuse(kind, &format!("produce to {name}/{index}: {why}"));
                        slots.push((index, Slot::Error(partition_error(index, code, why))));
                    }
                }
            }
            plan.push((topic.name, slots));
        }
        let queued = if parts.is_empty() {
            None
        } else {
            Some(self.log.queue_append(parts).await)
        };
        let api = self.clone();
        Box::pin(async move {
            let results = match queued {
                None => Ok(Vec::new()),
                Some(Ok(rx)) => rx.await.unwrap_or(Err(waymark_runtime::LogError::Closed)),
                Some(Err(e)) => Err(e),
            };
            if let Ok(outcomes) = &results {
                // records_in[i] describes parts[i].
                for ((topic, count, bytes), outcome) in records_in.iter().zip(outcomes) {
                    if matches!(outcome, Ok(AppendOutcome::Appended { .. })) {
                        api.counters.records_in.fetch_add(*count, Ordering::Relaxed);
                        metrics::counter!(RECORDS_IN, "topic" => topic.clone()).increment(*count);
                        metrics::counter!(BYTES_IN, "topic" => topic.clone()).increment(*bytes);
                    }
                }
            }
            let responses = plan
                .into_iter()
                .map(|(name, slots)| {
                    let partitions = slots
                        .into_iter()
                        .map(|(index, slot)| match slot {
                            Slot::Error(p) => p,
                            Slot::Appends(at) => {
                                api.produce_answer(index, &at, &results, version, &name)
                            }
                        })
                        .collect();
                    TopicProduceResponse::default()
                        .with_name(name)
                        .with_partition_responses(partitions)
                })
                .collect();
            if acks == 0 {
                return None;
            }
            Some(ResponseKind::Produce(
                ProduceResponse::default().with_responses(responses),
            ))
        })
    }

    fn produce_answer(
        &self,
        index: i32,
        at: &[usize],
        results: &Result<Vec<waymark_embedded::AppendResult>, waymark_runtime::LogError>,
        version: i16,
        topic: &TopicName,
    ) -> PartitionProduceResponse {
        let fail = |code: i16, message: String| partition_failure(index, code, message, version);
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                let code = self.refuse(
                    ResponseError::KafkaStorageError,
                    &format!("produce to {}/{index}: {e}", topic.as_str()),
                );
                return fail(code, e.to_string());
            }
        };
        let mut first: Option<(i64, i64, i64)> = None;
        for i in at {
            let Some(result) = results.get(*i) else {
                return fail(
                    ResponseError::UnknownServerError.code(),
                    "missing append result".into(),
                );
            };
            let (offset, time, start) = match result {
                Ok(AppendOutcome::Appended {
                    base_offset,
                    log_append_time_ms,
                    log_start_offset,
                }) => (
                    *base_offset as i64,
                    *log_append_time_ms,
                    *log_start_offset as i64,
                ),
                Ok(AppendOutcome::Duplicate { base_offset }) => (*base_offset as i64, -1, 0),
                Err(refusal) => {
                    let (e, why) = match refusal {
                        AppendRefusal::Sequence(SequenceRefusal::OutOfOrder { expected }) => (
                            ResponseError::OutOfOrderSequenceNumber,
                            format!("out of order sequence number; expected {expected}"),
                        ),
                        AppendRefusal::Sequence(SequenceRefusal::StaleEpoch { current }) => (
                            ResponseError::InvalidProducerEpoch,
                            format!("producer epoch is older than the current {current}"),
                        ),
                        AppendRefusal::UnknownTopic(t) => (
                            ResponseError::UnknownTopicOrPartition,
                            format!("unknown topic {t}"),
                        ),
                        AppendRefusal::UnknownPartition(p) => (
                            ResponseError::UnknownTopicOrPartition,
                            format!("unknown partition {p}"),
                        ),
                    };
                    let code =
                        self.refuse(e, &format!("produce to {}/{index}: {why}", topic.as_str()));
                    return fail(code, why);
                }
            };
            first.get_or_insert((offset, time, start));
        }
        let (offset, time, start) = first.unwrap_or((-1, -1, 0));
        PartitionProduceResponse::default()
            .with_index(index)
            .with_base_offset(offset)
            .with_log_append_time_ms(time)
            .with_log_start_offset(start)
    }

    async fn list_offsets(&self, r: ListOffsetsRequest, version: i16) -> ListOffsetsResponse {
        let mut topics = Vec::with_capacity(r.topics.len());
        for topic in r.topics {
            let name = topic.name.to_string();
            let mut partitions = Vec::with_capacity(topic.partitions.len());
            for p in topic.partitions {
                let base =
                    ListOffsetsPartitionResponse::default().with_partition_index(p.partition_index);
                let Ok(index) = u32::try_from(p.partition_index) else {
                    partitions
                        .push(base.with_error_code(ResponseError::UnknownTopicOrPartition.code()));
                    continue;
                };
                let (low, high) = match self.log.offsets(&name, index) {
                    Ok(w) => w,
                    Err(_) => {
                        let code = self.refuse(
                            ResponseError::UnknownTopicOrPartition,
                            &format!("list offsets of unknown {name}/{index}"),
                        );
                        partitions.push(
                            base.with_error_code(code)
                                .with_offset(-1)
                                .with_timestamp(-1),
                        );
                        continue;
                    }
                };
                let found: Option<(i64, i64)> = match p.timestamp {
                    -1 => Some((high as i64, -1)),
                    -2 | -4 | -5 => Some((low as i64, -1)),
                    -3 => {
                        // The newest record and its time (max timestamp).
                        if high > low {
                            match self.log.read_stored(&name, index, high - 1, 1).await {
                                Ok(r) => r.first().map(|(o, rec)| (*o as i64, rec.timestamp_ms)),
                                Err(_) => None,
                            }
                        } else {
                            Some((-1, -1))
                        }
                    }
                    ts => match self.log.offset_for_time(&name, index, ts).await {
                        Ok(Some((o, t))) => Some((o as i64, t)),
                        Ok(None) => Some((-1, -1)),
                        Err(_) => None,
                    },
                };
                partitions.push(match found {
                    Some((offset, ts)) => {
                        let answer = base.with_offset(offset).with_timestamp(ts);
                        if version >= 4 {
                            answer.with_leader_epoch(0)
                        } else {
                            answer
                        }
                    }
                    None => base
                        .with_error_code(ResponseError::KafkaStorageError.code())
                        .with_offset(-1)
                        .with_timestamp(-1),
                });
            }
            topics.push(
                ListOffsetsTopicResponse::default()
                    .with_name(topic.name)
                    .with_partitions(partitions),
            );
        }
        ListOffsetsResponse::default().with_topics(topics)
    }

    async fn fetch(&self, r: FetchRequest, version: i16) -> FetchResponse {
        if version >= 7 && r.session_id != 0 {
            // No fetch sessions are kept: a client that thinks it has one
            // is told so and starts over with full fetches.
            return FetchResponse::default()
                .with_error_code(ResponseError::FetchSessionIdNotFound.code())
                .with_session_id(0);
        }
        let deadline = Instant::now() + Duration::from_millis(r.max_wait_ms.max(0) as u64);
        let min_bytes = r.min_bytes.max(0) as usize;
        let max_bytes = if r.max_bytes > 0 {
            r.max_bytes as usize
        } else {
            usize::MAX
        };
        loop {
            // Registered before reading, so an append in between wakes us.
            let appended = self.log.appended();
            let (response, bytes) = self.fetch_once(&r, version, max_bytes).await;
            if bytes >= min_bytes.max(1)
                || Instant::now() >= deadline
                || self.shutdown.is_cancelled()
            {
                return response;
            }
            tokio::select! {
                _ = appended => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
    }

    async fn fetch_once(
        &self,
        r: &FetchRequest,
        version: i16,
        max_bytes: usize,
    ) -> (FetchResponse, usize) {
        let mut total = 0usize;
        let mut responses = Vec::with_capacity(r.topics.len());
        for topic in &r.topics {
            let name = topic.topic.to_string();
            let mut partitions = Vec::with_capacity(topic.partitions.len());
            for p in &topic.partitions {
                let base = PartitionData::default().with_partition_index(p.partition);
                let offsets = u32::try_from(p.partition)
                    .ok()
                    .and_then(|i| self.log.offsets(&name, i).ok().map(|o| (i, o)));
                let Some((index, (low, high))) = offsets else {
                    let code = self.refuse(
                        ResponseError::UnknownTopicOrPartition,
                        &format!("fetch from unknown {name}/{}", p.partition),
                    );
                    partitions.push(base.with_error_code(code).with_high_watermark(-1));
                    continue;
                };
                let base = base
                    .with_high_watermark(high as i64)
                    .with_last_stable_offset(high as i64);
                let base = if version >= 5 {
                    base.with_log_start_offset(low as i64)
                } else {
                    base
                };
                let from = p.fetch_offset;
                if from < low as i64 || from > high as i64 {
                    let code = self.refuse(
                        ResponseError::OffsetOutOfRange,
                        &format!("fetch {name}/{index} at {from}, outside {low}..={high}"),
                    );
                    partitions.push(base.with_error_code(code));
                    continue;
                }
                let from = from as u64;
                if from == high || (total >= max_bytes && total > 0) {
                    partitions.push(base);
                    continue;
                }
                let room = (max_bytes - total).min(p.partition_max_bytes.max(1) as usize);
                match self.log.read_stored(&name, index, from, room).await {
                    Ok(records) if records.is_empty() => partitions.push(base),
                    Ok(records) => {
                        let bytes = records::encode_fetched(&records);
                        total += bytes.len();
                        self.counters
                            .records_out
                            .fetch_add(records.len() as u64, Ordering::Relaxed);
                        metrics::counter!(RECORDS_OUT, "topic" => name.clone())
                            .increment(records.len() as u64);
                        metrics::counter!(BYTES_OUT, "topic" => name.clone())
                            .increment(bytes.len() as u64);
                        partitions.push(base.with_records(Some(bytes)));
                    }
                    Err(e) => {
                        warn!(topic = %name, partition = index, error = %e, "kafka endpoint: fetch failed");
                        partitions
                            .push(base.with_error_code(ResponseError::KafkaStorageError.code()));
                    }
                }
            }
            responses.push(
                FetchableTopicResponse::default()
                    .with_topic(topic.topic.clone())
                    .with_partitions(partitions),
            );
        }
        (FetchResponse::default().with_responses(responses), total)
    }
}

/// A produce partition's answer for a refusal (`error_message` from v8).
fn partition_failure(
    index: i32,
    code: i16,
    message: String,
    version: i16,
) -> PartitionProduceResponse {
    let p = PartitionProduceResponse::default()
        .with_index(index)
        .with_error_code(code)
        .with_base_offset(-1);
    if version >= 8 {
        p.with_error_message(Some(str_bytes(message)))
    } else {
        p
    }
}

fn ready(response: ResponseKind) -> Pending {
    Box::pin(async move { Some(response) })
}
/// Whether this endpoint serves version `version` of `key`.
pub(crate) fn supported(key: ApiKey, version: i16) -> bool {
    SUPPORTED
        .iter()
        .any(|(k, min, max)| *k == key && (*min..=*max).contains(&version))
}
