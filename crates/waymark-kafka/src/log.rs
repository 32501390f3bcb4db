//! The Kafka log: [`KafkaLog`] implements [`waymark_runtime::Log`] on
//! rdkafka (librdkafka).
//!
//! # Producing
//! One shared idempotent `FutureProducer` (`acks=all`,
//! `enable.idempotence=true`, at most 5 requests in flight): librdkafka keeps
//! the records of one partition in order across retries. A keyed record
//! without an explicit partition is placed by [`partition_for`] (Kafka's
//! murmur2) from partition counts cached per topic, so every Waymark and Java
//! producer puts a key in the same partition. A produce enqueues every record
//! of the call, then awaits every delivery report, and answers in input order.
//!
//! # Consuming: one thread per group member, polled on demand
//! A group member is a `BaseConsumer` owned by a dedicated thread, rather than
//! a `StreamConsumer`:
//! - librdkafka runs rebalance callbacks on the thread that polls. Here that is
//!   always the member's thread, and it polls only while [`LogConsumer::next`]
//!   waits (the Java consumer's model). The runner handles a batch before it
//!   asks for the next one, so when a rebalance callback runs, every record
//!   handed out before has been applied: nothing is in flight at a revoke, and
//!   no fetched-ahead buffer has to be drained or discarded.
//! - Closing a member blocks (it serves the final revoke and leaves the
//!   group). The member thread does that, never a tokio worker.
//! - `assign`, `seek`, `commit` and `close` all run on that one thread, which
//!   keeps the librdkafka calls of a member in a simple sequence.
//!
//! # Rebalances: deferred assignment
//! librdkafka's `rd_kafka_seek` fails (`Local: Erroneous state`) until a newly
//! assigned partition has started fetching, and a partition that starts
//! fetching from its committed offset can hand out records the runner will
//! only seek away from. So the member does not assign in the rebalance
//! callback. It queues [`ConsumerEvent::Assigned`] and keeps the partitions
//! pending (the group waits in librdkafka's `wait-assign-call` state;
//! heartbeats go on). The runner's [`LogConsumer::seek`] calls fill in start
//! offsets, and the next [`LogConsumer::next`] applies the assignment with
//! those offsets (`assign`, or `incremental_assign` for cooperative-sticky).
//! Partitions that were not sought start at the committed offset, else at the
//! earliest one. Fetching therefore starts exactly at the sought offset.
//!
//! Revocations are applied in the callback and queued as
//! [`ConsumerEvent::Revoked`]. Records of a revoked partition that were
//! fetched in the same poll but not handed out are dropped: the next owner
//! starts from the position stored with the projection.
//!
//! The default assignment strategy is librdkafka's eager `range,roundrobin`.
//! Every rebalance revokes and reassigns the whole assignment, which the
//! runner handles by reloading its positions. `cooperative-sticky`, set through
//! [`KafkaConfig::properties`], is handled too: then only the partitions that
//! move are revoked and assigned.
//!
//! # Random access
//! [`Log::read`] uses a short-lived `BaseConsumer` without a group, assigned to
//! one partition at the requested offset. It stops at the high watermark, at
//! `max` records or after a bounded wait.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::mpsc::{self as std_mpsc, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};
use waymark_runtime::{
    partition_for, Appended, ConsumerEvent, Log, LogConsumer, LogError, OutRecord, Record,
    TopicConfig,
};

/// How long a metadata or watermark request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ensure_topics` waits for created topics to show in metadata.
const TOPIC_VISIBLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `read` may wait for records it knows exist.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a member polls before it looks at its commands again.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// How long a member waits for more records once it has one.
const LINGER: Duration = Duration::from_millis(10);
/// How long a produce waits for a topic's `max.message.bytes` the first
/// time it writes to it (a cluster that does not answer DescribeConfigs,
/// such as librdkafka's mock cluster, would otherwise hold the produce for
/// the admin client's 60 s request timeout).
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A topic whose limit could not be learned is asked again after this long;
/// meanwhile the brokers' own refusals apply.
const DESCRIBE_RETRY: Duration = Duration::from_secs(60);
/// How long a seek of a fetching partition is retried.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands a member thread can have queued.
const COMMAND_QUEUE: usize = 16;
/// The shared producer is replaced by a new one once its requests have
/// failed for this long without one success in between: after a broker was
/// SIGSTOPped and then SIGKILLed, a librdkafka client can keep answering
/// `BrokerTransportFailure` to every metadata request long after the broker
/// is back, while a fresh client connects at once (found by the fault
/// suite's `real_broker_sigstop_and_sigkill`; consumers get the same
/// treatment from the runner, `RESUBSCRIBE_AFTER`).
const REPLACE_PRODUCER_AFTER: Duration = Duration::from_secs(30);

/// Largest record Waymark topics accept, `max.message.bytes`. Events are at
/// most 1 MiB (contract §2); topics take more so that an oversized event
/// reaches the dead-letter topic as `too_large` (with its headers) instead
/// of being refused at produce time.
pub const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

const MAX_RECORD_BYTES_TEXT: &str = "4194304";

/// Producer settings a deployment may override through properties (public
/// so a benchmark's raw producer can use exactly the same).
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("linger.ms", "5"),
    // Room for a dead letter of an oversized event plus its headers.
    ("message.max.bytes", "4194304"),
    ("batch.num.messages", "10000"),
    ("compression.type", "zstd"),
    // A produce blocks the runner's batch: fail it (the runner retries) after
    // a minute rather than librdkafka's five.
    ("message.timeout.ms", "60000"),
];

/// Producer settings the guarantees depend on.
pub const PRODUCER_FORCED: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("max.in.flight.requests.per.connection", "5"),
    // A metadata lookup must never create a topic with the broker's defaults.
    ("allow.auto.create.topics", "false"),
];

/// Group member settings the guarantees depend on (`group.id` is added).
const MEMBER_FORCED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("allow.auto.create.topics", "false"),
];

/// Settings of the short-lived reader behind [`Log::read`].
const READER_FORCED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("enable.partition.eof", "true"),
    ("auto.offset.reset", "earliest"),
    ("allow.auto.create.topics", "false"),
];

/// Group id of the readers behind [`Log::read`]; they only `assign`.
const READER_GROUP: &str = "waymark.reader";

/// Settings of the admin client.
const ADMIN_FORCED: &[(&str, &str)] = &[("allow.auto.create.topics", "false")];

/// How to reach a Kafka cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub bootstrap: String,
    /// librdkafka properties applied to the producer, every consumer and the
    /// admin client (TLS, SASL, timeouts…). They override Waymark's tuning
    /// defaults but not the settings its guarantees depend on (idempotence,
    /// `acks=all`, manual offset commits).
    pub properties: Vec<(String, String)>,
    /// Replication factor of topics created by [`Log::ensure_topics`].
    pub replication_factor: i32,
}

impl KafkaConfig {
    /// A configuration for `bootstrap` with no extra properties and
    /// replication factor 1.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            properties: Vec::new(),
            replication_factor: 1,
        }
    }

    /// Adds a librdkafka property.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// Sets the replication factor of created topics.
    pub fn replication_factor(mut self, replication_factor: i32) -> Self {
        self.replication_factor = replication_factor;
        self
    }

    /// A librdkafka configuration: `defaults`, then the user's properties,
    /// then `forced`.
    fn client_config(&self, defaults: &[(&str, &str)], forced: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        for (key, value) in forced {
            config.set(*key, *value);
        }
        config
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self::new("127.0.0.1:9092")
    }
}

/// Debug output hides the values of secret-looking properties.
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(key, value)| {
                let secret = ["password", "secret", "key", "token", "jaas", "oauthbearer"]
                    .iter()
                    .any(|s| key.contains(s));
                (key.as_str(), if secret { "<redacted>" } else { value })
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("properties", &properties)
            .field("replication_factor", &self.replication_factor)
            .finish()
    }
}

/// Why a [`KafkaLog`] could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaLogError {
    /// librdkafka rejected the configuration.
    #[error("invalid kafka client configuration: {reason}")]
    InvalidConfig {
        /// librdkafka's reason.
        reason: String,
    },
    /// The cluster answered but refused the credentials (SASL) or the TLS
    /// handshake failed (an untrusted certificate, a plaintext listener):
    /// retrying cannot help.
    #[error("kafka refused the connection: {reason}")]
    Refused {
        /// librdkafka's reason.
        reason: String,
    },
    /// No broker answered within the timeout (it may still be starting).
    #[error("kafka not reachable: {reason}")]
    Unreachable {
        /// librdkafka's reason.
        reason: String,
    },
}

/// Records the first authentication or TLS error librdkafka reports.
#[derive(Default)]
struct ProbeContext {
    refused: std::sync::Mutex<Option<String>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = match &error {
            KafkaError::Global(code) => Some(*code),
            _ => error.rdkafka_error_code(),
        };
        if matches!(
            code,
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        ) {
            let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
            refused.get_or_insert_with(|| reason.to_owned());
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Connects to the cluster of `config` once and asks for its metadata:
/// `Ok` when it answers, [`KafkaLogError::Refused`] when it refuses the
/// credentials or the TLS handshake fails (a wrong SCRAM password, an
/// untrusted CA), [`KafkaLogError::Unreachable`] when nothing answers in
/// `timeout`. Blocks; call it from a blocking thread.
///
/// # Errors
/// As above, or [`KafkaLogError::InvalidConfig`].
pub fn probe(config: &KafkaConfig, timeout: Duration) -> Result<(), KafkaLogError> {
    let consumer: BaseConsumer<ProbeContext> = config
        .client_config(&[], &[("group.id", "waymark-probe")])
        .create_with_context(ProbeContext::default())
        .map_err(|e| KafkaLogError::InvalidConfig {
            reason: e.to_string(),
        })?;
    let deadline = Instant::now() + timeout;
    loop {
        let step = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        let outcome = consumer.fetch_metadata(None, step);
        // Serves the error callbacks (errors are events of the queue).
        let _ = consumer.poll(Duration::from_millis(50));
        let refused = consumer
            .context()
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(reason) = refused {
            return Err(KafkaLogError::Refused { reason });
        }
        match outcome {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(KafkaLogError::Unreachable {
                    reason: e.to_string(),
                })
            }
            Err(_) => {}
        }
    }
}

fn unavailable(e: impl fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

fn kafka_offset(offset: u64) -> Result<i64, LogError> {
    i64::try_from(offset).map_err(|_| LogError::Unavailable(format!("offset {offset} too large")))
}

/// A [`Log`] on a Kafka cluster. Cheap to clone.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: RwLock<ProducerSlot>,
    admin: AdminClient<DefaultClientContext>,
    /// Partition counts per topic, for key partitioning.
    partitions: RwLock<HashMap<String, u32>>,
    /// Each topic's `max.message.bytes`, as the brokers report it (`None`:
    /// they did not say; the brokers' refusals still apply).
    record_limits: RwLock<HashMap<String, RecordLimit>>,
}

/// The shared producer and how long its requests have been failing.
struct ProducerSlot {
    producer: FutureProducer,
    /// When the first of an unbroken run of failed requests failed.
    failing_since: Option<Instant>,
}

/// What is known of a topic's `max.message.bytes`.
#[derive(Debug, Clone, Copy)]
enum RecordLimit {
    /// The brokers answered (with the limit, or without one).
    Known(Option<usize>),
    /// Asking failed at this instant; asked again after [`DESCRIBE_RETRY`].
    Failed(Instant),
}

impl fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaLog")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl KafkaLog {
    /// Creates the producer and admin clients. Connections are made lazily:
    /// an unreachable cluster shows as [`LogError::Unavailable`] on use.
    pub fn new(config: KafkaConfig) -> Result<Self, KafkaLogError> {
        let invalid = |e: KafkaError| KafkaLogError::InvalidConfig {
            reason: e.to_string(),
        };
        let producer = new_producer(&config).map_err(invalid)?;
        let admin: AdminClient<DefaultClientContext> = config
            .client_config(&[], ADMIN_FORCED)
            .create()
            .map_err(invalid)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer: RwLock::new(ProducerSlot {
                    producer,
                    failing_since: None,
                }),
                admin,
                partitions: RwLock::new(HashMap::new()),
                record_limits: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// The largest record `topic` accepts (`max.message.bytes`, cached);
    /// `None` when the cluster does not say.
    async fn record_limit(&self, topic: &str) -> Option<usize> {
        let cached = self
            .inner
            .record_limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .copied();
        match cached {
            Some(RecordLimit::Known(limit)) => return limit,
            Some(RecordLimit::Failed(at)) if at.elapsed() < DESCRIBE_RETRY => return None,
            _ => {}
        }
        let resource = ResourceSpecifier::Topic(topic);
        let options = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
        let known = match self
            .inner
            .admin
            .describe_configs([&resource], &options)
            .await
        {
            Ok(described) => RecordLimit::Known(described.first().and_then(|d| {
                d.as_ref()
                    .ok()?
                    .get("max.message.bytes")?
                    .value
                    .as_deref()?
                    .parse()
                    .ok()
            })),
            Err(e) => {
                debug!(%topic, error = %e, "max.message.bytes unknown; the brokers' refusals apply");
                RecordLimit::Failed(Instant::now())
            }
        };
        self.inner
            .record_limits
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.to_owned(), known);
        match known {
            RecordLimit::Known(limit) => limit,
            RecordLimit::Failed(_) => None,
        }
    }

    /// The configuration this log was created with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The shared producer (a handle; cheap to clone).
    fn producer(&self) -> FutureProducer {
        self.inner
            .producer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .producer
            .clone()
    }

    /// Records how a request of the shared producer went: a success ends a
    /// run of failures; an [`LogError::Unavailable`] failure that keeps a
    /// run going for [`REPLACE_PRODUCER_AFTER`] replaces the producer with
    /// a new one. Other errors (unknown topics, refused records) say
    /// nothing about the client.
    fn producer_outcome<T>(&self, result: &Result<T, LogError>) {
        let failed = matches!(result, Err(LogError::Unavailable(_)));
        let mut slot = self
            .inner
            .producer
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !failed {
            if result.is_ok() {
                slot.failing_since = None;
            }
            return;
        }
        let since = *slot.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() < REPLACE_PRODUCER_AFTER {
            return;
        }
        match new_producer(&self.inner.config) {
            Ok(fresh) => {
                warn!(
                    seconds = since.elapsed().as_secs(),
                    "the Kafka producer's requests kept failing; replaced it with a new one"
                );
                let old = std::mem::replace(&mut slot.producer, fresh);
                slot.failing_since = None;
                drop(slot);
                // Destroying a client waits for its threads: not on an
                // async worker. Records still queued in it fail, so their
                // produce calls fail and are retried.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    drop(runtime.spawn_blocking(move || drop(old)));
                }
            }
            Err(e) => warn!(error = %e, "creating a new Kafka producer failed"),
        }
    }

    /// The partition count of `topic`, from the cache or else from metadata.
    async fn cached_partitions(&self, topic: &str) -> Result<u32, LogError> {
        if let Some(n) = self
            .inner
            .partitions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
        {
            return Ok(*n);
        }
        self.refresh_partitions(topic).await
    }

    /// The partition count of `topic` from metadata; updates the cache.
    async fn refresh_partitions(&self, topic: &str) -> Result<u32, LogError> {
        let producer = self.producer();
        let name = topic.to_owned();
        let fetched = tokio::task::spawn_blocking(move || fetch_partition_count(&producer, &name))
            .await
            .map_err(unavailable)
            .and_then(|r| r);
        self.producer_outcome(&fetched);
        let n = fetched?;
        self.inner
            .partitions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.to_owned(), n);
        Ok(n)
    }

    fn forget_partitions(&self, topic: &str) {
        self.inner
            .partitions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(topic);
        self.inner
            .record_limits
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(topic);
    }

    /// The partition of every record: explicit, by key, or `None` (left to
    /// librdkafka's partitioner, random for records without a key).
    async fn place(&self, records: &[OutRecord]) -> Result<Vec<Option<u32>>, LogError> {
        let mut placed = Vec::with_capacity(records.len());
        for record in records {
            let n = self.cached_partitions(&record.topic).await?;
            placed.push(match (record.partition, &record.key) {
                (Some(p), _) if p < n => Some(p),
                (Some(p), _) => {
                    // The topic may have grown since it was cached.
                    if p < self.refresh_partitions(&record.topic).await? {
                        Some(p)
                    } else {
                        return Err(LogError::UnknownPartition {
                            topic: record.topic.clone(),
                            partition: p,
                        });
                    }
                }
                (None, Some(key)) => Some(partition_for(key, n)),
                (None, None) => None,
            });
        }
        Ok(placed)
    }

    /// Produces `records` (not empty) with the shared producer: see
    /// [`Log::produce`].
    async fn produce_all(&self, records: Vec<OutRecord>) -> Result<Vec<Appended>, LogError> {
        let placed = self.place(&records).await?;
        // Enqueue everything first: librdkafka batches the records and keeps
        // the order of each partition.
        let mut refused = Vec::new();
        let mut reason = String::new();
        let mut deliveries = Vec::with_capacity(records.len());
        for (i, (record, partition)) in records.iter().zip(placed).enumerate() {
            // A record over its topic's limit is refused here, before it is
            // sent: sent, it would make the broker refuse the whole batch it
            // travels in, records that fit included.
            if let Some(limit) = self.record_limit(&record.topic).await {
                let size = record_size(record);
                if size > limit {
                    refused.push(i);
                    reason = format!(
                        "{size} bytes, more than max.message.bytes {limit} of {}",
                        record.topic
                    );
                    continue;
                }
            }
            match self.enqueue(record, partition).await? {
                Enqueued::Sent(delivery) => deliveries.push((i, delivery)),
                Enqueued::TooLarge(why) => {
                    refused.push(i);
                    reason = why;
                }
            }
        }
        let mut appended = Vec::with_capacity(deliveries.len());
        let mut failure = None;
        for (i, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(d)) => appended.push(Appended {
                    partition: d.partition as u32,
                    offset: d.offset as u64,
                }),
                Ok(Err((KafkaError::MessageProduction(code), _))) if too_large(code) => {
                    refused.push(i);
                    reason = code.to_string();
                }
                Ok(Err((e, _))) => {
                    // The topic may have been recreated: look it up again.
                    self.forget_partitions(&records[i].topic);
                    failure.get_or_insert_with(|| unavailable(e));
                }
                Err(_) => {
                    failure.get_or_insert(LogError::Closed);
                }
            }
        }
        // A transient failure means a retry of the whole call; the records
        // too large come back then.
        if let Some(e) = failure {
            return Err(e);
        }
        if !refused.is_empty() {
            refused.sort_unstable();
            return Err(LogError::TooLarge {
                refused,
                appended,
                reason,
            });
        }
        Ok(appended)
    }

    /// Enqueues one record, waiting while librdkafka's queue is full.
    async fn enqueue(
        &self,
        record: &OutRecord,
        partition: Option<u32>,
    ) -> Result<Enqueued, LogError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_slice()),
            });
        }
        let mut future_record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic)
            .payload(record.value.as_slice())
            .headers(headers);
        if let Some(key) = &record.key {
            future_record = future_record.key(key.as_slice());
        }
        if let Some(p) = partition {
            future_record = future_record.partition(p as i32);
        }
        let producer = self.producer();
        loop {
            match producer.send_result(future_record) {
                Ok(delivery) => return Ok(Enqueued::Sent(delivery)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    future_record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((KafkaError::MessageProduction(code), _)) if too_large(code) => {
                    return Ok(Enqueued::TooLarge(code.to_string()))
                }
                Err((e, _)) => return Err(unavailable(e)),
            }
        }
    }
}

/// A record handed to the producer, or refused by it at once.
enum Enqueued {
    /// On its way; the future says whether it was appended.
    Sent(DeliveryFuture),
    /// Larger than the producer or the topic accepts (the reason).
    TooLarge(String),
}

/// A record's size as Kafka counts it against `max.message.bytes`, at most:
/// key, value and headers uncompressed, plus the record batch overhead.
fn record_size(record: &OutRecord) -> usize {
    const BATCH_OVERHEAD: usize = 61 + 21;
    record.key.as_ref().map_or(0, Vec::len)
        + record.value.len()
        + record
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 10)
            .sum::<usize>()
        + BATCH_OVERHEAD
}

/// Whether `code` refuses a record for being too large: permanent.
fn too_large(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
    )
}

/// A producer with Waymark's settings over `config`'s.
fn new_producer(config: &KafkaConfig) -> KafkaResult<FutureProducer> {
    config
        .client_config(PRODUCER_DEFAULTS, PRODUCER_FORCED)
        .create()
}

/// Partition count of `topic` from a metadata request (blocking).
fn fetch_partition_count(producer: &FutureProducer, topic: &str) -> Result<u32, LogError> {
    let unknown = || LogError::UnknownTopic(topic.to_owned());
    let metadata = match producer
        .client()
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
    {
        Ok(m) => m,
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
            return Err(unknown())
        }
        Err(e) => return Err(unavailable(e)),
    };
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(unknown)?;
    match t.error() {
        None => {}
        Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => return Err(unknown()),
        Some(e) => {
            return Err(LogError::Unavailable(format!(
                "metadata of topic {topic}: {}",
                RDKafkaErrorCode::from(e)
            )))
        }
    }
    match t.partitions().len() {
        0 => Err(unknown()),
        n => Ok(n as u32),
    }
}

#[async_trait]
impl Log for KafkaLog {
    async fn ensure_topics(&self, topics: &[TopicConfig]) -> Result<(), LogError> {
        let mut missing = Vec::new();
        for t in topics {
            match self.refresh_partitions(&t.name).await {
                Ok(n) if n != t.partitions => {
                    warn!(topic = %t.name, partitions = n, wanted = t.partitions, "topic exists with another partition count; left alone");
                }
                Ok(_) => {}
                Err(LogError::UnknownTopic(_)) => missing.push(t),
                Err(e) => return Err(e),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let settings: Vec<(String, &str)> = missing
            .iter()
            .map(|t| {
                let retention = t
                    .retention
                    .map_or_else(|| "-1".to_owned(), |r| r.as_millis().to_string());
                let policy = if t.compaction { "compact" } else { "delete" };
                (retention, policy)
            })
            .collect();
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .zip(&settings)
            .map(|(t, (retention, policy))| {
                NewTopic::new(
                    &t.name,
                    t.partitions.max(1) as i32,
                    TopicReplication::Fixed(self.inner.config.replication_factor),
                )
                .set("retention.ms", retention)
                .set("cleanup.policy", policy)
                .set("max.message.bytes", MAX_RECORD_BYTES_TEXT)
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(TOPIC_VISIBLE_TIMEOUT));
        let results = self
            .inner
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(unavailable)?;
        for result in results {
            match result {
                Ok(name) => info!(topic = %name, "topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(LogError::Unavailable(format!(
                        "creating topic {name}: {code}"
                    )))
                }
            }
        }
        // Creation is acknowledged before every broker knows the topic.
        let deadline = Instant::now() + TOPIC_VISIBLE_TIMEOUT;
        for t in missing {
            loop {
                match self.refresh_partitions(&t.name).await {
                    Ok(n) if n >= t.partitions.max(1) => break,
                    Ok(_) | Err(LogError::UnknownTopic(_)) | Err(LogError::Unavailable(_))
                        if Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(n) => {
                        return Err(LogError::Unavailable(format!(
                            "topic {} shows {n} partitions, not {}",
                            t.name, t.partitions
                        )))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.refresh_partitions(topic).await
    }

    async fn produce(&self, records: Vec<OutRecord>) -> Result<Vec<Appended>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let produced = self.produce_all(records).await;
        self.producer_outcome(&produced);
        produced
    }

    async fn subscribe(&self, group: &str, topic: &str) -> Result<Box<dyn LogConsumer>, LogError> {
        // Fail fast on a topic that does not exist.
        self.cached_partitions(topic).await?;
        let mut config = self.inner.config.client_config(&[], MEMBER_FORCED);
        config.set("group.id", group);
        let context = MemberContext {
            topic: topic.to_owned(),
            state: Mutex::new(MemberState::default()),
        };
        let (commands, command_rx) = std_mpsc::sync_channel(COMMAND_QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_topic = topic.to_owned();
        std::thread::Builder::new()
            .name(format!("waymark-kafka-{group}"))
            .spawn(move || {
                let consumer: BaseConsumer<MemberContext> =
                    match config.create_with_context(context) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(unavailable(e)));
                            return;
                        }
                    };
                if let Err(e) = consumer.subscribe(&[&thread_topic]) {
                    let _ = ready_tx.send(Err(unavailable(e)));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                Member {
                    consumer,
                    topic: thread_topic,
                }
                .run(&command_rx);
            })
            .map_err(unavailable)?;
        ready_rx.await.map_err(|_| LogError::Closed)??;
        info!(group, topic, "joined consumer group");
        Ok(Box::new(KafkaConsumer {
            commands,
            pending: None,
        }))
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64), LogError> {
        if partition >= self.cached_partitions(topic).await? {
            return Err(LogError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
            });
        }
        let producer = self.producer();
        let topic = topic.to_owned();
        let fetched = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_watermarks(&topic, partition as i32, METADATA_TIMEOUT)
        })
        .await
        .map_err(unavailable)
        .and_then(|r| r.map_err(unavailable));
        self.producer_outcome(&fetched);
        let (low, high) = fetched?;
        Ok((low.max(0) as u64, high.max(0) as u64))
    }

    async fn group_members(&self, group: &str) -> Result<usize, LogError> {
        let producer = self.producer();
        let group = group.to_owned();
        tokio::task::spawn_blocking(move || {
            let list = producer
                .client()
                .fetch_group_list(Some(&group), METADATA_TIMEOUT)
                .map_err(unavailable)?;
            Ok(list
                .groups()
                .iter()
                .find(|g| g.name() == group)
                .map_or(0, |g| g.members().len()))
        })
        .await
        .map_err(unavailable)?
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        let (low, high) = self.watermarks(topic, partition).await?;
        let from = from.max(low);
        if from >= high || max == 0 {
            return Ok(Vec::new());
        }
        let mut config = self.inner.config.client_config(&[], READER_FORCED);
        // librdkafka's `assign` needs a group id; the reader never joins the
        // group nor commits to it.
        config.set("group.id", READER_GROUP);
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            read_blocking(&config, &topic, partition, from, high, max)
        })
        .await
        .map_err(unavailable)?
    }
}

/// Reads records `from..high` (at most `max`) of one partition (blocking).
fn read_blocking(
    config: &ClientConfig,
    topic: &str,
    partition: u32,
    from: u64,
    high: u64,
    max: usize,
) -> Result<Vec<Record>, LogError> {
    let consumer: BaseConsumer = config.create().map_err(unavailable)?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition as i32, Offset::Offset(kafka_offset(from)?))
        .map_err(unavailable)?;
    consumer.assign(&assignment).map_err(unavailable)?;
    drop(assignment);
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut out = Vec::new();
    let mut end = false;
    while out.len() < max {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match consumer.poll(left) {
            Some(Ok(message)) => {
                let record = to_record(&message);
                let last = record.offset + 1 >= high;
                out.push(record);
                if last {
                    break;
                }
            }
            // The end of the partition (records below `high` were compacted away).
            Some(Err(KafkaError::PartitionEOF(_))) => {
                end = true;
                break;
            }
            Some(Err(e)) => return Err(unavailable(e)),
            None => {}
        }
    }
    if out.is_empty() && !end {
        return Err(LogError::Unavailable(format!(
            "no record of {topic}/{partition} from offset {from} within {READ_TIMEOUT:?}"
        )));
    }
    Ok(out)
}

fn to_record(message: &BorrowedMessage<'_>) -> Record {
    Record {
        partition: message.partition() as u32,
        offset: message.offset() as u64,
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
    }
}

/// A request to a member thread.
enum Command {
    Next {
        max: usize,
        reply: oneshot::Sender<Result<ConsumerEvent, LogError>>,
    },
    Seek {
        partition: u32,
        offset: u64,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    Commit {
        offsets: Vec<(u32, u64)>,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

/// The async handle of a group member; its thread does the work.
struct KafkaConsumer {
    commands: std_mpsc::SyncSender<Command>,
    /// The answer to a `next` whose caller was cancelled: the next call
    /// takes it, so no event or record is lost.
    pending: Option<oneshot::Receiver<Result<ConsumerEvent, LogError>>>,
}

impl KafkaConsumer {
    fn send(&self, command: Command) -> Result<(), LogError> {
        self.commands.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => LogError::Unavailable("consumer command queue full".into()),
            TrySendError::Disconnected(_) => LogError::Closed,
        })
    }
}

#[async_trait]
impl LogConsumer for KafkaConsumer {
    async fn next(&mut self, max: usize) -> Result<ConsumerEvent, LogError> {
        let answer = match &mut self.pending {
            Some(answer) => answer,
            None => {
                let (reply, answer) = oneshot::channel();
                self.send(Command::Next { max, reply })?;
                self.pending.insert(answer)
            }
        };
        let result = answer.await;
        self.pending = None;
        result.map_err(|_| LogError::Closed)?
    }

    async fn seek(&mut self, partition: u32, offset: u64) -> Result<(), LogError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Seek {
            partition,
            offset,
            reply,
        })?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Commit {
            offsets: offsets.to_vec(),
            reply,
        })?;
        answer.await.map_err(|_| LogError::Closed)?
    }
}

/// Partitions handed to the group member but not yet assigned in librdkafka.
struct PendingAssignment {
    /// Start offset per partition, once sought (`None`: the committed offset,
    /// else the earliest).
    offsets: BTreeMap<u32, Option<i64>>,
    /// [`ConsumerEvent::Assigned`] was handed out; the next `next` applies
    /// the assignment.
    announced: bool,
    cooperative: bool,
}

#[derive(Default)]
struct MemberState {
    /// Assignment changes not yet handed out, in order.
    events: VecDeque<ConsumerEvent>,
    pending: Option<PendingAssignment>,
    /// Partitions assigned in librdkafka.
    assigned: BTreeSet<u32>,
}

/// Turns rebalance callbacks (run inside the member thread's `poll`) into
/// queued [`ConsumerEvent`]s.
struct MemberContext {
    topic: String,
    state: Mutex<MemberState>,
}

impl MemberContext {
    fn state(&self) -> MutexGuard<'_, MemberState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn revoke(
        &self,
        consumer: &BaseConsumer<Self>,
        cooperative: bool,
        tpl: &TopicPartitionList,
        partitions: Vec<u32>,
    ) {
        let lost = consumer.assignment_lost();
        let result = if cooperative {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        if let Err(e) = result {
            error!(topic = %self.topic, error = %e, "unassigning revoked partitions failed");
        }
        let mut state = self.state();
        let mut revoked: BTreeSet<u32> = if cooperative {
            partitions
                .into_iter()
                .filter(|p| state.assigned.remove(p))
                .collect()
        } else {
            std::mem::take(&mut state.assigned)
        };
        if let Some(pending) = state.pending.take() {
            if pending.announced {
                revoked.extend(pending.offsets.keys());
            } else {
                state
                    .events
                    .retain(|e| !matches!(e, ConsumerEvent::Assigned(_)));
            }
        }
        if !revoked.is_empty() {
            let revoked: Vec<u32> = revoked.into_iter().collect();
            info!(topic = %self.topic, partitions = ?revoked, lost, "partitions revoked");
            state.events.push_back(ConsumerEvent::Revoked(revoked));
        }
    }

    fn pop_event(&self) -> Option<ConsumerEvent> {
        let mut state = self.state();
        let event = state.events.pop_front()?;
        if matches!(event, ConsumerEvent::Assigned(_)) {
            if let Some(pending) = state.pending.as_mut() {
                pending.announced = true;
            }
        }
        Some(event)
    }
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<u32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition() as u32)
            .collect();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS if partitions.is_empty() => {
                // Nothing to seek: complete the rebalance at once.
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    error!(topic = %self.topic, error = %e, "empty assignment failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Deferred: applied with the runner's offsets by the next `next`.
                info!(topic = %self.topic, ?partitions, cooperative, "partitions assigned");
                let mut state = self.state();
                state.pending = Some(PendingAssignment {
                    offsets: partitions.iter().map(|p| (*p, None)).collect(),
                    announced: false,
                    cooperative,
                });
                state.events.push_back(ConsumerEvent::Assigned(partitions));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, cooperative, tpl, partitions);
            }
            other => {
                warn!(topic = %self.topic, error = ?other, "rebalance failed; dropping the assignment");
                self.revoke(consumer, cooperative, tpl, partitions);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            debug!(topic = %self.topic, error = %e, "offset commit failed (lag tooling only)");
        }
    }
}

/// A group member on its own thread.
struct Member {
    consumer: BaseConsumer<MemberContext>,
    topic: String,
}

impl Member {
    fn context(&self) -> &MemberContext {
        self.consumer.context()
    }

    /// Serves commands until the handle is dropped, then leaves the group.
    fn run(self, commands: &std_mpsc::Receiver<Command>) {
        let mut waiting: Option<(usize, oneshot::Sender<Result<ConsumerEvent, LogError>>)> = None;
        loop {
            let command = if waiting.is_some() {
                match commands.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            };
            match command {
                Some(Command::Next { max, reply }) => waiting = Some((max, reply)),
                Some(Command::Seek {
                    partition,
                    offset,
                    reply,
                }) => {
                    let _ = reply.send(self.seek(partition, offset));
                }
                Some(Command::Commit { offsets, reply }) => {
                    let _ = reply.send(self.commit(&offsets));
                }
                None => {
                    if let Some((max, reply)) = waiting.take() {
                        match self.poll_once(max) {
                            Some(answer) => {
                                let _ = reply.send(answer);
                            }
                            None => waiting = Some((max, reply)),
                        }
                    }
                }
            }
        }
        self.close();
    }

    /// One step of `next`: an assignment change, records, an error, or
    /// `None` when nothing arrived within a poll slice.
    fn poll_once(&self, max: usize) -> Option<Result<ConsumerEvent, LogError>> {
        self.apply_pending();
        if let Some(event) = self.context().pop_event() {
            return Some(Ok(event));
        }
        let max = max.max(1);
        let mut deadline = Instant::now() + POLL_SLICE;
        let mut records = Vec::new();
        let mut failure = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.consumer.poll(left) {
                Some(Ok(message)) => {
                    if records.is_empty() {
                        deadline = Instant::now() + LINGER;
                    }
                    records.push(to_record(&message));
                    if records.len() >= max {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                None => {}
            }
            // A rebalance ran inside that poll: hand out what came before it.
            if !self.context().state().events.is_empty() {
                break;
            }
        }
        {
            // Records of partitions revoked during this poll are not ours.
            let state = self.context().state();
            records.retain(|r| state.assigned.contains(&r.partition));
        }
        if !records.is_empty() {
            if let Some(e) = failure {
                warn!(topic = %self.topic, error = %e, "consumer error");
            }
            return Some(Ok(ConsumerEvent::Records(records)));
        }
        if let Some(event) = self.context().pop_event() {
            return Some(Ok(event));
        }
        failure.map(|e| {
            warn!(topic = %self.topic, error = %e, "consumer error");
            Err(unavailable(e))
        })
    }

    /// Applies an announced pending assignment with the sought offsets.
    fn apply_pending(&self) {
        let pending = {
            let mut state = self.context().state();
            match &state.pending {
                Some(p) if p.announced => state.pending.take(),
                _ => None,
            }
        };
        let Some(pending) = pending else {
            return;
        };
        let mut tpl = TopicPartitionList::with_capacity(pending.offsets.len());
        for (partition, offset) in &pending.offsets {
            let offset = offset.map_or(Offset::Invalid, Offset::Offset);
            if let Err(e) = tpl.add_partition_offset(&self.topic, *partition as i32, offset) {
                error!(topic = %self.topic, partition, error = %e, "bad start offset");
            }
        }
        let result = if pending.cooperative {
            self.consumer.incremental_assign(&tpl)
        } else {
            self.consumer.assign(&tpl)
        };
        let partitions: Vec<u32> = pending.offsets.keys().copied().collect();
        let mut state = self.context().state();
        match result {
            Ok(()) => {
                debug!(topic = %self.topic, offsets = ?pending.offsets, "assignment applied");
                state.assigned.extend(partitions);
            }
            Err(e) => {
                // The runner must not wait for partitions it will never get.
                error!(topic = %self.topic, error = %e, "applying the assignment failed");
                state.events.push_back(ConsumerEvent::Revoked(partitions));
            }
        }
    }

    fn seek(&self, partition: u32, offset: u64) -> Result<(), LogError> {
        let offset = kafka_offset(offset)?;
        {
            let mut state = self.context().state();
            if let Some(start) = state
                .pending
                .as_mut()
                .and_then(|p| p.offsets.get_mut(&partition))
            {
                *start = Some(offset);
                return Ok(());
            }
            if !state.assigned.contains(&partition) {
                return Err(LogError::Unavailable(format!(
                    "partition {partition} of {} is not assigned to this member",
                    self.topic
                )));
            }
        }
        // A fetching partition: librdkafka discards what it fetched before.
        let deadline = Instant::now() + SEEK_TIMEOUT;
        loop {
            match self.consumer.seek(
                &self.topic,
                partition as i32,
                Offset::Offset(offset),
                SEEK_TIMEOUT,
            ) {
                Ok(()) => return Ok(()),
                // Not fetching yet (`Local: Erroneous state`): retry shortly.
                Err(e) if Instant::now() < deadline => {
                    debug!(topic = %self.topic, partition, error = %e, "seek retried");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
    }

    fn commit(&self, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (partition, offset) in offsets {
            tpl.add_partition_offset(
                &self.topic,
                *partition as i32,
                Offset::Offset(kafka_offset(*offset)?),
            )
            .map_err(unavailable)?;
        }
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(unavailable)
    }

    /// Leaves the group. librdkafka cannot leave while it waits for the
    /// assign call of a pending assignment, so that is applied first.
    fn close(self) {
        if let Some(pending) = self.context().state().pending.as_mut() {
            pending.announced = true;
        }
        self.apply_pending();
        let topic = self.topic.clone();
        drop(self.consumer);
        debug!(%topic, "left consumer group");
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn record_size_limits_agree() {
        assert_eq!(MAX_RECORD_BYTES_TEXT, MAX_RECORD_BYTES.to_string());
        assert!(PRODUCER_DEFAULTS.contains(&("message.max.bytes", MAX_RECORD_BYTES_TEXT)));
    }

    use super::*;

    /// The raw librdkafka handle of the log's current producer.
    fn producer_handle(log: &KafkaLog) -> usize {
        log.producer().client().native_ptr() as usize
    }

    #[tokio::test]
    async fn a_producer_failing_for_long_is_replaced_and_one_success_resets() {
        // Clients connect lazily: nothing listens on this port.
        let log = KafkaLog::new(KafkaConfig::new("127.0.0.1:1")).unwrap();
        let first = producer_handle(&log);
        let unavailable: Result<(), LogError> = Err(LogError::Unavailable("down".into()));
        log.producer_outcome(&unavailable);
        assert_eq!(
            producer_handle(&log),
            first,
            "a first failure replaces nothing"
        );
        // A success ends the run: an old start of failures no longer counts.
        log.producer_outcome(&Ok(()));
        assert!(log.inner.producer.read().unwrap().failing_since.is_none());
        // Errors that say nothing about the client do not start a run.
        log.producer_outcome::<()>(&Err(LogError::UnknownTopic("t".into())));
        assert!(log.inner.producer.read().unwrap().failing_since.is_none());
        // Failing for longer than the bound: the next failure replaces it.
        log.inner.producer.write().unwrap().failing_since =
            Some(Instant::now() - REPLACE_PRODUCER_AFTER);
        log.producer_outcome(&unavailable);
        assert_ne!(producer_handle(&log), first, "replaced");
        assert!(log.inner.producer.read().unwrap().failing_since.is_none());
    }

    #[test]
    fn properties_override_defaults_but_not_guarantees() {
        let config = KafkaConfig::new("broker:9092")
            .property("linger.ms", "50")
            .property("acks", "1")
            .property("security.protocol", "SASL_SSL");
        let client = config.client_config(PRODUCER_DEFAULTS, PRODUCER_FORCED);
        assert_eq!(client.get("bootstrap.servers"), Some("broker:9092"));
        assert_eq!(client.get("linger.ms"), Some("50"));
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
    }

    #[test]
    fn debug_hides_secrets() {
        let config = KafkaConfig::default()
            .property("sasl.username", "waymark")
            .property("sasl.password", "hunter2")
            .property("ssl.key.pem", "-----BEGIN");
        let shown = format!("{config:?}");
        assert!(shown.contains("waymark"));
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("BEGIN"));
    }

    #[test]
    fn offsets_beyond_i64_are_rejected() {
        assert_eq!(kafka_offset(42).ok(), Some(42));
        assert!(kafka_offset(u64::MAX).is_err());
    }
}
