//! The durable embedded log: topics of partitions of records on redb.
//!
//! Each partition is a redb table `offset → record` (layout in `codec.rs`).
//! Appends go through one writer thread that group-commits every pending
//! request — runtime produces, Kafka-protocol appends with their
//! idempotent-producer state, consumer-group offsets, producer ids — into a
//! single fsynced transaction, then wakes the topic's readers. Nothing is
//! answered before that transaction is durable.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{error, info, warn};
use waymark_runtime::log::ConsumerEvent;
use waymark_runtime::{
    partition_for, Appended, Log, LogConsumer, LogError, OutRecord, Record, TopicConfig,
};

use crate::codec::{self, StoredRecord};
use crate::producers::{self, Check, ProducerBatch, Producers, SequenceRefusal};

const TOPICS: TableDefinition<'static, &str, u32> = TableDefinition::new("_topics");
const GROUPS: TableDefinition<'static, &str, u64> = TableDefinition::new("_group_offsets");
/// Log-wide settings: the record format, the next producer id.
const META: TableDefinition<'static, &str, u64> = TableDefinition::new("_meta");
/// Idempotent-producer state per producer id and partition.
const PRODUCERS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("_producers");
const META_FORMAT: &str = "record_format";
const META_NEXT_PRODUCER_ID: &str = "next_producer_id";
/// Page cache of the log file (redb's default is 1 GiB; appends and tail
/// reads need little).
const LOG_CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Group-committed requests per transaction, at most.
const MAX_REQUESTS_PER_COMMIT: usize = 256;

fn partition_table(topic: &str, partition: u32) -> String {
    format!("{topic}#{partition}")
}

fn group_key(group: &str, topic: &str, partition: u32) -> String {
    format!("{group}\u{0}{topic}\u{0}{partition}")
}

fn parse_group_key(key: &str) -> Option<(&str, &str, u32)> {
    let mut parts = key.split('\u{0}');
    let group = parts.next()?;
    let topic = parts.next()?;
    let partition = parts.next()?.parse().ok()?;
    Some((group, topic, partition))
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

struct Topic {
    name: String,
    /// Next offset per partition.
    high: Vec<AtomicU64>,
    /// First stored offset per partition (moves with retention).
    low: Vec<AtomicU64>,
    /// Woken after every commit that appended to this topic.
    appended: Notify,
    /// Round-robin counter for records without key or partition.
    round_robin: AtomicU64,
}

impl Topic {
    fn partitions(&self) -> u32 {
        self.high.len() as u32
    }
}

/// The database, as the log holds it.
enum Db {
    Open(Database),
    /// Closed for good: dropping the database released its file lock.
    Closed,
    /// A commit failed (e.g. the disk is full); redb then refuses every
    /// transaction until the file is opened again, which is tried at most
    /// once per [`REOPEN_EVERY`].
    Failed {
        reason: String,
        since: std::time::Instant,
    },
}

/// How often a failed database is opened again.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn open_database(path: &Path) -> Result<Database, LogError> {
    Database::builder()
        .set_cache_size(LOG_CACHE_BYTES)
        .create(path)
        .map_err(unavailable)
}

struct Inner {
    db: RwLock<Db>,
    /// The file, to open it again after a failure.
    path: std::path::PathBuf,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Woken after every commit that appended anything (fetch long polls).
    any_appended: Notify,
    /// Live consumers by group ([`Log::group_members`]).
    members: Mutex<HashMap<String, usize>>,
}

impl Inner {
    /// Runs `f` on the open database, opening it again first if a commit
    /// failed before.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, LogError>) -> Result<T, LogError> {
        {
            let guard = self.db.read().map_err(|_| LogError::Closed)?;
            match &*guard {
                Db::Open(db) => return f(db),
                Db::Closed => return Err(LogError::Closed),
                Db::Failed { .. } => {}
            }
        }
        self.reopen(None);
        let guard = self.db.read().map_err(|_| LogError::Closed)?;
        match &*guard {
            Db::Open(db) => f(db),
            Db::Closed => Err(LogError::Closed),
            Db::Failed { reason, .. } => Err(LogError::Unavailable(format!(
                "the embedded log failed and cannot be opened again yet: {reason}"
            ))),
        }
    }

    /// After `failure` (a failed commit), or for a database that failed
    /// before: drops the database and opens its file again, which redb
    /// repairs if it has to. Nothing of a failed transaction was published
    /// (offsets and producer state change only after a commit), so the
    /// in-memory state stays as it is.
    fn reopen(&self, failure: Option<&LogError>) {
        let Ok(mut guard) = self.db.write() else {
            return;
        };
        match &*guard {
            Db::Closed => return,
            Db::Open(_) if failure.is_none() => return,
            Db::Failed { since, .. } if since.elapsed() < REOPEN_EVERY => return,
            _ => {}
        }
        let reason = match (&*guard, failure) {
            (_, Some(e)) => e.to_string(),
            (Db::Failed { reason, .. }, None) => reason.clone(),
            _ => String::new(),
        };
        // Release the file before opening it again.
        *guard = Db::Failed {
            reason: reason.clone(),
            since: std::time::Instant::now(),
        };
        match open_database(&self.path) {
            Ok(db) => {
                info!(path = %self.path.display(), after = %reason, "embedded log opened again");
                *guard = Db::Open(db);
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "opening the embedded log again failed; retrying");
                *guard = Db::Failed {
                    reason: format!("{reason}; opening it again: {e}"),
                    since: std::time::Instant::now(),
                };
            }
        }
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        self.topics
            .read()
            .map_err(|_| LogError::Closed)?
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownTopic(name.to_owned()))
    }
}

enum Request {
    Produce {
        records: Vec<OutRecord>,
        reply: oneshot::Sender<Result<Vec<Appended>, LogError>>,
    },
    /// Kafka-protocol appends, one entry per partition.
    Append {
        parts: Vec<PartitionAppend>,
        reply: oneshot::Sender<Result<Vec<AppendResult>, LogError>>,
    },
    Commit {
        group: String,
        topic: String,
        offsets: Vec<(u32, u64)>,
        /// Answered once the offsets are durable (Kafka `OffsetCommit`).
        reply: Option<oneshot::Sender<Result<(), LogError>>>,
    },
    ProducerId {
        reply: oneshot::Sender<Result<i64, LogError>>,
    },
}

/// One partition's records of a Kafka produce request.
#[derive(Debug, Clone)]
pub struct PartitionAppend {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Records, in order; appended all or none.
    pub records: Vec<StoredRecord>,
    /// The idempotent producer that sent them, if any.
    pub producer: Option<ProducerBatch>,
}

/// What happened to a [`PartitionAppend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Appended (durably) from `base_offset`.
    Appended {
        /// Offset of the first record.
        base_offset: u64,
        /// The log append time given to every record.
        log_append_time_ms: i64,
        /// First offset still stored in the partition.
        log_start_offset: u64,
    },
    /// A retry of a batch appended before, at `base_offset`; nothing was
    /// appended again.
    Duplicate {
        /// Offset of the first record of the original append.
        base_offset: u64,
    },
}

/// Why a [`PartitionAppend`] was refused (nothing of it was appended).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendRefusal {
    /// No such topic.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// No such partition.
    #[error("unknown partition {0}")]
    UnknownPartition(u32),
    /// The idempotent producer's sequence or epoch does not follow on.
    #[error("sequence refused: {0:?}")]
    Sequence(SequenceRefusal),
}

/// Result of one [`PartitionAppend`].
pub type AppendResult = Result<AppendOutcome, AppendRefusal>;

/// The durable embedded log of `waymark dev`. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
    writer: mpsc::Sender<Request>,
}

impl EmbeddedLog {
    /// Opens (or creates) the log in file `path`.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let db = open_database(path)?;
        let mut topics = HashMap::new();
        {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(TOPICS).map_err(unavailable)?;
            txn.open_table(GROUPS).map_err(unavailable)?;
            txn.open_table(PRODUCERS).map_err(unavailable)?;
            migrate_records(&txn)?;
            txn.commit().map_err(unavailable)?;
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(TOPICS).map_err(unavailable)?;
            for entry in table.iter().map_err(unavailable)? {
                let (name, partitions) = entry.map_err(unavailable)?;
                let name = name.value().to_owned();
                let mut high = Vec::new();
                let mut low = Vec::new();
                for p in 0..partitions.value() {
                    let table_name = partition_table(&name, p);
                    let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&table_name);
                    let (first, next) = match txn.open_table(def) {
                        Ok(t) => {
                            let next = t
                                .last()
                                .map_err(unavailable)?
                                .map_or(0, |(k, _)| k.value() + 1);
                            let first = t
                                .first()
                                .map_err(unavailable)?
                                .map_or(next, |(k, _)| k.value());
                            (first, next)
                        }
                        Err(redb::TableError::TableDoesNotExist(_)) => (0, 0),
                        Err(e) => return Err(unavailable(e)),
                    };
                    high.push(AtomicU64::new(next));
                    low.push(AtomicU64::new(first));
                }
                topics.insert(name.clone(), Arc::new(Topic::new(name, high, low)));
            }
        }
        let writer = Writer::load(&db)?;
        let inner = Arc::new(Inner {
            db: RwLock::new(Db::Open(db)),
            path: path.to_owned(),
            topics: RwLock::new(topics),
            any_appended: Notify::new(),
            members: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel(1024);
        let writer_inner = inner.clone();
        std::thread::Builder::new()
            .name("waymark-log-writer".into())
            .spawn(move || writer.run(&writer_inner, rx))
            .map_err(unavailable)?;
        info!(path = %path.display(), "embedded log open");
        Ok(Self { inner, writer: tx })
    }

    /// Reads the committed offsets of `group` on `topic` (lag tooling).
    pub fn committed(&self, group: &str, topic: &str) -> Result<HashMap<u32, u64>, LogError> {
        let topic = self.inner.topic(topic)?;
        self.inner.with_db(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(GROUPS).map_err(unavailable)?;
            let mut out = HashMap::new();
            for p in 0..topic.partitions() {
                if let Some(v) = table
                    .get(group_key(group, &topic.name, p).as_str())
                    .map_err(unavailable)?
                {
                    out.insert(p, v.value());
                }
            }
            Ok(out)
        })
    }

    /// Deletes the records of `topic` appended more than `max_age` ago, like
    /// Kafka's time-based retention, and returns how many were deleted. The
    /// newest record of each partition is always kept, so offsets keep
    /// growing across restarts and are never reused, and so is every record
    /// at or after `keep_from`'s offset for its partition (what a reader
    /// has not applied yet; a partition not in it has no such floor).
    pub fn apply_retention(
        &self,
        topic: &str,
        max_age: std::time::Duration,
        keep_from: &std::collections::BTreeMap<u32, u64>,
    ) -> Result<u64, LogError> {
        let topic = self.inner.topic(topic)?;
        let cutoff =
            now_ms().saturating_sub(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX));
        let mut deleted = 0;
        self.inner.with_db(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let mut new_low = Vec::new();
            for p in 0..topic.partitions() {
                let high = topic.high[p as usize].load(Ordering::Acquire);
                let end = keep_from.get(&p).map_or(high.saturating_sub(1), |floor| {
                    (*floor).min(high.saturating_sub(1))
                });
                let name = partition_table(&topic.name, p);
                let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
                let mut table = txn.open_table(def).map_err(unavailable)?;
                let mut expired = Vec::new();
                for entry in table.range(..end).map_err(unavailable)? {
                    let (offset, bytes) = entry.map_err(unavailable)?;
                    match codec::timestamp(bytes.value()) {
                        Some(ts) if ts < cutoff => expired.push(offset.value()),
                        _ => break,
                    }
                }
                for offset in &expired {
                    table.remove(*offset).map_err(unavailable)?;
                }
                deleted += expired.len() as u64;
                if let Some(last) = expired.last() {
                    new_low.push((p, last + 1));
                }
            }
            txn.commit().map_err(unavailable)?;
            for (p, low) in new_low {
                topic.low[p as usize].fetch_max(low, Ordering::AcqRel);
            }
            Ok(())
        })?;
        if deleted > 0 {
            info!(topic = %topic.name, deleted, "retention applied");
        }
        Ok(deleted)
    }

    /// Closes the log: waits for the transaction in progress, then releases
    /// the file. Every clone answers [`LogError::Closed`] afterwards.
    pub fn close(&self) {
        if let Ok(mut db) = self.inner.db.write() {
            *db = Db::Closed;
        }
    }

    /// Every topic with its partition count, sorted by name.
    pub fn topics(&self) -> Result<Vec<(String, u32)>, LogError> {
        let map = self.inner.topics.read().map_err(|_| LogError::Closed)?;
        let mut out: Vec<_> = map
            .values()
            .map(|t| (t.name.clone(), t.partitions()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Partition count of `topic`, `None` when there is no such topic.
    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        self.inner.topic(topic).ok().map(|t| t.partitions())
    }

    /// Low and high watermarks of a partition, without waiting.
    pub fn offsets(&self, topic: &str, partition: u32) -> Result<(u64, u64), LogError> {
        let topic = self.inner.topic(topic)?;
        let high = topic
            .high
            .get(partition as usize)
            .ok_or_else(|| LogError::UnknownPartition {
                topic: topic.name.clone(),
                partition,
            })?
            .load(Ordering::Acquire);
        Ok((topic.low[partition as usize].load(Ordering::Acquire), high))
    }

    /// Appends Kafka-protocol records, each partition all or nothing, in one
    /// group-committed transaction; answers once it is durable. Idempotent
    /// batches are checked against the producer's state and a retry of an
    /// appended batch is answered with its original offset.
    pub async fn append(&self, parts: Vec<PartitionAppend>) -> Result<Vec<AppendResult>, LogError> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        self.queue_append(parts)
            .await?
            .await
            .map_err(|_| LogError::Closed)?
    }

    /// Queues a Kafka-protocol append and returns the receiver of its
    /// answer: appends queued in this order are applied in this order (a
    /// connection's pipelined produce requests keep their order).
    pub async fn queue_append(
        &self,
        parts: Vec<PartitionAppend>,
    ) -> Result<oneshot::Receiver<Result<Vec<AppendResult>, LogError>>, LogError> {
        self.queue(|reply| Request::Append { parts, reply }).await
    }

    /// Queues a request for the writer; returns the receiver of its answer.
    async fn queue<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, LogError>>) -> Request,
    ) -> Result<oneshot::Receiver<Result<T, LogError>>, LogError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(request(reply))
            .await
            .map_err(|_| LogError::Closed)?;
        Ok(answer)
    }

    /// Queues a request for the writer and waits for its answer.
    async fn call<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, LogError>>) -> Request,
    ) -> Result<T, LogError> {
        self.queue(request)
            .await?
            .await
            .map_err(|_| LogError::Closed)?
    }

    /// A new producer id, durably allocated (never handed out twice).
    pub async fn allocate_producer_id(&self) -> Result<i64, LogError> {
        self.call(|reply| Request::ProducerId { reply }).await
    }

    /// Commits next-offsets of `group` on `topic`; returns once durable.
    pub async fn commit_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: Vec<(u32, u64)>,
    ) -> Result<(), LogError> {
        self.call(|reply| Request::Commit {
            group: group.to_owned(),
            topic: topic.to_owned(),
            offsets,
            reply: Some(reply),
        })
        .await
    }

    /// Every committed offset of `group`: `(topic, partition, next offset)`.
    pub fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, u64)>, LogError> {
        self.inner.with_db(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(GROUPS).map_err(unavailable)?;
            let prefix = format!("{group}\u{0}");
            let mut out = Vec::new();
            for entry in table.range(prefix.as_str()..).map_err(unavailable)? {
                let (key, offset) = entry.map_err(unavailable)?;
                let key = key.value();
                if !key.starts_with(&prefix) {
                    break;
                }
                if let Some((_, topic, partition)) = parse_group_key(key) {
                    out.push((topic.to_owned(), partition, offset.value()));
                }
            }
            Ok(out)
        })
    }

    /// Every group that has committed offsets, sorted.
    pub fn groups(&self) -> Result<Vec<String>, LogError> {
        self.inner.with_db(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(GROUPS).map_err(unavailable)?;
            let mut out: Vec<String> = Vec::new();
            for entry in table.iter().map_err(unavailable)? {
                let (key, _) = entry.map_err(unavailable)?;
                if let Some((group, _, _)) = parse_group_key(key.value()) {
                    if out.last().map(String::as_str) != Some(group) {
                        out.push(group.to_owned());
                    }
                }
            }
            Ok(out)
        })
    }

    /// Stored records of a partition from `from`, at most about `max_bytes`
    /// (at least one record when there is one), bytes exactly as appended.
    pub async fn read_stored(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, StoredRecord)>, LogError> {
        let inner = self.inner.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            inner.with_db(|db| read_stored_in(db, &topic, partition, from, max_bytes))
        })
        .await
        .map_err(unavailable)?
    }

    /// The first offset whose append time is at least `ts` (Kafka
    /// `ListOffsets` by time), with its time.
    pub async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        ts: i64,
    ) -> Result<Option<(u64, i64)>, LogError> {
        let inner = self.inner.clone();
        let topic = self.inner.topic(topic)?;
        tokio::task::spawn_blocking(move || {
            inner.with_db(|db| offset_for_time_in(db, &topic, partition, ts))
        })
        .await
        .map_err(unavailable)?
    }

    /// Waits until anything is appended to any topic, or `timeout` passes.
    pub async fn wait_for_append(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.inner.any_appended.notified()).await;
    }

    /// A future that completes at the next append to any topic; create it
    /// before checking for data so that no append is missed.
    pub fn appended(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        self.inner.any_appended.notified()
    }
}

/// Registers missing topics; returns the ones created.
fn create_topics(db: &Database, topics: &[TopicConfig]) -> Result<Vec<(String, u32)>, LogError> {
    let txn = db.begin_write().map_err(unavailable)?;
    let mut created = Vec::new();
    {
        let mut table = txn.open_table(TOPICS).map_err(unavailable)?;
        for t in topics {
            if table.get(t.name.as_str()).map_err(unavailable)?.is_none() {
                let partitions = t.partitions.max(1);
                table
                    .insert(t.name.as_str(), partitions)
                    .map_err(unavailable)?;
                created.push((t.name.clone(), partitions));
            }
        }
    }
    txn.commit().map_err(unavailable)?;
    Ok(created)
}

impl Topic {
    fn new(name: String, high: Vec<AtomicU64>, low: Vec<AtomicU64>) -> Self {
        Self {
            name,
            high,
            low,
            appended: Notify::new(),
            round_robin: AtomicU64::new(0),
        }
    }
}

/// Rewrites every record of format 1 in format 2, once, in the transaction
/// that opens the log (all or nothing), then records the format.
fn migrate_records(txn: &redb::WriteTransaction) -> Result<(), LogError> {
    let mut meta = txn.open_table(META).map_err(unavailable)?;
    if meta
        .get(META_FORMAT)
        .map_err(unavailable)?
        .is_some_and(|v| v.value() >= u64::from(codec::FORMAT))
    {
        return Ok(());
    }
    let topics: Vec<(String, u32)> = {
        let table = txn.open_table(TOPICS).map_err(unavailable)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(unavailable)? {
            let (name, partitions) = entry.map_err(unavailable)?;
            out.push((name.value().to_owned(), partitions.value()));
        }
        out
    };
    let mut migrated = 0u64;
    for (topic, partitions) in topics {
        for p in 0..partitions {
            let name = partition_table(&topic, p);
            let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
            let mut table = txn.open_table(def).map_err(unavailable)?;
            let mut rewritten = Vec::new();
            for entry in table.iter().map_err(unavailable)? {
                let (offset, bytes) = entry.map_err(unavailable)?;
                let bytes = bytes.value();
                // A record that does not decode is kept as it is: readers
                // hand it out as corrupt (a dead letter), never stop on it.
                if let Some(record) = codec::decode_v1(bytes) {
                    rewritten.push((
                        offset.value(),
                        codec::encode_stored(record.timestamp_ms, &record),
                    ));
                }
            }
            for (offset, bytes) in &rewritten {
                table
                    .insert(*offset, bytes.as_slice())
                    .map_err(unavailable)?;
            }
            migrated += rewritten.len() as u64;
        }
    }
    meta.insert(META_FORMAT, u64::from(codec::FORMAT))
        .map_err(unavailable)?;
    if migrated > 0 {
        info!(records = migrated, "log records migrated to format 2");
    }
    Ok(())
}

/// State owned by the writer thread.
struct Writer {
    producers: Producers,
    next_producer_id: u64,
    /// Append times never go backwards, so offsets are ordered by time.
    last_timestamp: i64,
}

/// One transaction's view of the writer state: changes become visible to
/// the next transaction only if this one commits.
#[derive(Default)]
struct Staged {
    producers: HashMap<producers::Key, producers::Entry>,
    next_producer_id: Option<u64>,
}

impl Writer {
    /// Loads producer state (forgetting what expired) and the producer-id
    /// counter.
    fn load(db: &Database) -> Result<Self, LogError> {
        let now = now_ms();
        let txn = db.begin_write().map_err(unavailable)?;
        let mut loaded = Producers::default();
        {
            let mut table = txn.open_table(PRODUCERS).map_err(unavailable)?;
            let mut expired = Vec::new();
            for entry in table.iter().map_err(unavailable)? {
                let (key, value) = entry.map_err(unavailable)?;
                let parsed =
                    producers::parse_key(key.value()).zip(producers::Entry::decode(value.value()));
                match parsed {
                    Some((k, e)) if now - e.last_write_ms < producers::EXPIRY_MS => {
                        loaded.entries.insert(k, e);
                    }
                    _ => expired.push(key.value().to_owned()),
                }
            }
            for key in expired {
                table.remove(key.as_str()).map_err(unavailable)?;
            }
        }
        let next_producer_id = txn
            .open_table(META)
            .map_err(unavailable)?
            .get(META_NEXT_PRODUCER_ID)
            .map_err(unavailable)?
            .map_or(0, |v| v.value());
        txn.commit().map_err(unavailable)?;
        Ok(Self {
            producers: loaded,
            next_producer_id,
            last_timestamp: 0,
        })
    }

    /// The writer thread: group-commits pending requests.
    fn run(mut self, inner: &Inner, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut requests = vec![first];
            while requests.len() < MAX_REQUESTS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            self.commit_requests(inner, requests);
        }
    }

    fn commit_requests(&mut self, inner: &Inner, requests: Vec<Request>) {
        // Offsets are assigned from a local copy of the high watermarks and
        // published only after the transaction is durable.
        let mut next: HashMap<(String, u32), u64> = HashMap::new();
        let mut staged = Staged::default();
        let mut results: Vec<Answer> = Vec::with_capacity(requests.len());
        let timestamp = now_ms().max(self.last_timestamp);
        let txn_result = inner.with_db(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            for request in &requests {
                results.push(match request {
                    Request::Produce { records, .. } => {
                        Answer::Produce(append_all(inner, &txn, records, timestamp, &mut next))
                    }
                    Request::Append { parts, .. } => Answer::Append(self.append_parts(
                        inner,
                        &txn,
                        parts,
                        timestamp,
                        &mut next,
                        &mut staged,
                    )),
                    Request::Commit {
                        group,
                        topic,
                        offsets,
                        ..
                    } => {
                        let mut table = txn.open_table(GROUPS).map_err(unavailable)?;
                        for (p, o) in offsets {
                            table
                                .insert(group_key(group, topic, *p).as_str(), *o)
                                .map_err(unavailable)?;
                        }
                        Answer::Commit
                    }
                    Request::ProducerId { .. } => {
                        let id = staged.next_producer_id.unwrap_or(self.next_producer_id);
                        staged.next_producer_id = Some(id + 1);
                        Answer::ProducerId(i64::try_from(id).map_err(unavailable))
                    }
                });
            }
            if let Some(id) = staged.next_producer_id {
                txn.open_table(META)
                    .map_err(unavailable)?
                    .insert(META_NEXT_PRODUCER_ID, id)
                    .map_err(unavailable)?;
            }
            if !staged.producers.is_empty() {
                let mut table = txn.open_table(PRODUCERS).map_err(unavailable)?;
                for (key, entry) in &staged.producers {
                    table
                        .insert(producers::key_text(key).as_str(), entry.encode().as_slice())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        });
        match txn_result {
            Ok(()) => {
                self.last_timestamp = timestamp;
                if let Some(id) = staged.next_producer_id {
                    self.next_producer_id = id;
                }
                self.producers.entries.extend(staged.producers);
                // Publish the new high watermarks before anyone is answered.
                let mut touched: HashMap<String, Arc<Topic>> = HashMap::new();
                for ((topic, partition), high) in next {
                    if let Ok(t) = inner.topic(&topic) {
                        t.high[partition as usize].fetch_max(high, Ordering::AcqRel);
                        touched.insert(topic, t);
                    }
                }
                for (request, answer) in requests.into_iter().zip(results) {
                    answer.send(request);
                }
                for topic in touched.values() {
                    topic.appended.notify_waiters();
                }
                if !touched.is_empty() {
                    inner.any_appended.notify_waiters();
                }
            }
            Err(e) => {
                if matches!(e, LogError::Closed) {
                    // Requests that raced a close: each caller is told.
                    tracing::debug!("embedded log closed; requests refused");
                } else {
                    error!(error = %e, "embedded log commit failed");
                    inner.reopen(Some(&e));
                }
                for request in requests {
                    let e = match &e {
                        LogError::Closed => LogError::Closed,
                        LogError::Unavailable(message) => LogError::Unavailable(message.clone()),
                        other => LogError::Unavailable(other.to_string()),
                    };
                    Answer::Failed(e).send(request);
                }
            }
        }
    }

    /// Checks and appends each partition's records; a refused partition
    /// appends nothing, the others go on.
    fn append_parts(
        &self,
        inner: &Inner,
        txn: &redb::WriteTransaction,
        parts: &[PartitionAppend],
        timestamp: i64,
        next: &mut HashMap<(String, u32), u64>,
        staged: &mut Staged,
    ) -> Result<Vec<AppendResult>, LogError> {
        let mut out = Vec::with_capacity(parts.len());
        for part in parts {
            let topic = match inner.topic(&part.topic) {
                Ok(t) => t,
                Err(_) => {
                    out.push(Err(AppendRefusal::UnknownTopic(part.topic.clone())));
                    continue;
                }
            };
            if part.partition >= topic.partitions() {
                out.push(Err(AppendRefusal::UnknownPartition(part.partition)));
                continue;
            }
            let key = part
                .producer
                .map(|b| (b.producer_id, part.topic.clone(), part.partition));
            if let (Some(batch), Some(key)) = (&part.producer, &key) {
                let entry = staged
                    .producers
                    .get(key)
                    .or_else(|| self.producers.entries.get(key));
                // No state (a new producer, or one whose state expired):
                // accepted at any sequence, as Kafka does.
                match entry.map_or(Check::Append, |e| e.check(batch)) {
                    Check::Append => {}
                    Check::Duplicate(base_offset) => {
                        out.push(Ok(AppendOutcome::Duplicate { base_offset }));
                        continue;
                    }
                    Check::Refuse(why) => {
                        out.push(Err(AppendRefusal::Sequence(why)));
                        continue;
                    }
                }
            }
            let offset = next
                .entry((topic.name.clone(), part.partition))
                .or_insert_with(|| topic.high[part.partition as usize].load(Ordering::Acquire));
            let base_offset = *offset;
            let name = partition_table(&topic.name, part.partition);
            let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
            let mut table = txn.open_table(def).map_err(unavailable)?;
            for record in &part.records {
                let bytes = codec::encode_stored(timestamp, record);
                table
                    .insert(*offset, bytes.as_slice())
                    .map_err(unavailable)?;
                *offset += 1;
            }
            if let (Some(batch), Some(key)) = (&part.producer, key) {
                let mut entry = staged
                    .producers
                    .get(&key)
                    .or_else(|| self.producers.entries.get(&key))
                    .cloned()
                    .unwrap_or_default();
                entry.record(batch, base_offset, timestamp);
                staged.producers.insert(key, entry);
            }
            out.push(Ok(AppendOutcome::Appended {
                base_offset,
                log_append_time_ms: timestamp,
                log_start_offset: topic.low[part.partition as usize].load(Ordering::Acquire),
            }));
        }
        Ok(out)
    }
}

/// The answer to one request of a group commit, sent once it is durable.
enum Answer {
    Produce(Result<AppendedIn, LogError>),
    Append(Result<Vec<AppendResult>, LogError>),
    Commit,
    ProducerId(Result<i64, LogError>),
    Failed(LogError),
}

impl Answer {
    fn send(self, request: Request) {
        match (request, self) {
            (Request::Produce { reply, .. }, Answer::Produce(result)) => {
                let _ = reply.send(result.map(|appended| {
                    appended
                        .into_iter()
                        .map(|(_, partition, offset)| Appended { partition, offset })
                        .collect()
                }));
            }
            (Request::Append { reply, .. }, Answer::Append(result)) => {
                let _ = reply.send(result);
            }
            (Request::Commit { reply, .. }, Answer::Commit) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            (Request::ProducerId { reply }, Answer::ProducerId(result)) => {
                let _ = reply.send(result);
            }
            (request, answer) => {
                let e = match answer {
                    Answer::Failed(e) => e,
                    _ => LogError::Unavailable("internal: mismatched answer".into()),
                };
                match request {
                    Request::Produce { reply, .. } => {
                        let _ = reply.send(Err(e));
                    }
                    Request::Append { reply, .. } => {
                        let _ = reply.send(Err(e));
                    }
                    Request::Commit { reply, .. } => {
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(e));
                        }
                    }
                    Request::ProducerId { reply } => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }
}

type AppendedIn = Vec<(Arc<Topic>, u32, u64)>;

fn append_all(
    inner: &Inner,
    txn: &redb::WriteTransaction,
    records: &[OutRecord],
    timestamp: i64,
    next: &mut HashMap<(String, u32), u64>,
) -> Result<AppendedIn, LogError> {
    // Validate the whole request first so that it is all-or-nothing.
    let mut placed = Vec::with_capacity(records.len());
    for record in records {
        let topic = inner.topic(&record.topic)?;
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p < topic.partitions() => p,
            (Some(p), _) => {
                return Err(LogError::UnknownPartition {
                    topic: record.topic.clone(),
                    partition: p,
                })
            }
            (None, Some(key)) => partition_for(key, topic.partitions()),
            (None, None) => {
                (topic.round_robin.fetch_add(1, Ordering::Relaxed) % u64::from(topic.partitions()))
                    as u32
            }
        };
        placed.push((topic, partition));
    }
    let mut out = Vec::with_capacity(records.len());
    for (record, (topic, partition)) in records.iter().zip(placed) {
        let name = partition_table(&topic.name, partition);
        let offset = next
            .entry((topic.name.clone(), partition))
            .or_insert_with(|| topic.high[partition as usize].load(Ordering::Acquire));
        let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
        let mut table = txn.open_table(def).map_err(unavailable)?;
        let bytes = codec::encode(
            timestamp,
            record.key.as_deref(),
            record
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), Some(v.as_slice()))),
            Some(record.value.as_slice()),
        );
        table
            .insert(*offset, bytes.as_slice())
            .map_err(unavailable)?;
        out.push((topic, partition, *offset));
        *offset += 1;
    }
    Ok(out)
}

fn read_range(
    inner: &Inner,
    topic: &str,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<Record>, LogError> {
    inner.with_db(|db| read_range_in(db, topic, partition, from, max))
}

/// A partition's table in a read transaction; `None` before its first
/// append.
fn open_partition(
    txn: &redb::ReadTransaction,
    topic: &str,
    partition: u32,
) -> Result<Option<redb::ReadOnlyTable<u64, &'static [u8]>>, LogError> {
    let name = partition_table(topic, partition);
    let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

fn read_range_in(
    db: &Database,
    topic: &str,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<Record>, LogError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let Some(table) = open_partition(&txn, topic, partition)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in table.range(from..).map_err(unavailable)?.take(max) {
        let (offset, bytes) = entry.map_err(unavailable)?;
        let offset = offset.value();
        let bytes = bytes.value();
        out.push(match codec::decode(bytes) {
            Some(r) => r.into_record(partition, offset),
            None => {
                error!(%topic, partition, offset, "stored record does not decode; handed out as corrupt");
                codec::corrupt(partition, offset, bytes)
            }
        });
    }
    Ok(out)
}

/// Reads stored records of a partition from `from`: at most `max_bytes` of
/// payload, but always the first record if there is one (as Kafka's fetch
/// does, so a record larger than a fetch limit never blocks a consumer).
/// Bytes that do not decode come back as a record whose value is those bytes
/// and whose `waymark.log.corrupt` header says so.
fn read_stored_in(
    db: &Database,
    topic: &str,
    partition: u32,
    from: u64,
    max_bytes: usize,
) -> Result<Vec<(u64, StoredRecord)>, LogError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let Some(table) = open_partition(&txn, topic, partition)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut size = 0usize;
    for entry in table.range(from..).map_err(unavailable)? {
        let (offset, bytes) = entry.map_err(unavailable)?;
        let bytes = bytes.value();
        if !out.is_empty() && size + bytes.len() > max_bytes {
            break;
        }
        size += bytes.len();
        let record = codec::decode(bytes).unwrap_or_else(|| {
            let r = codec::corrupt(partition, offset.value(), bytes);
            StoredRecord {
                timestamp_ms: r.timestamp_ms,
                key: None,
                value: r.value,
                headers: r
                    .headers
                    .into_iter()
                    .map(|(n, v)| (n.into_bytes(), Some(v)))
                    .collect(),
            }
        });
        out.push((offset.value(), record));
    }
    Ok(out)
}

/// The first offset of a partition whose append time is at least `ts`,
/// with that time; `None` when every record is older. Append times never
/// decrease along a partition, so this is a binary search.
fn offset_for_time_in(
    db: &Database,
    topic: &Topic,
    partition: u32,
    ts: i64,
) -> Result<Option<(u64, i64)>, LogError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let Some(table) = open_partition(&txn, &topic.name, partition)? else {
        return Ok(None);
    };
    let time_at = |offset: u64| -> Result<Option<i64>, LogError> {
        Ok(table
            .get(offset)
            .map_err(unavailable)?
            .and_then(|v| codec::timestamp(v.value())))
    };
    let (Some(first), Some(last)) = (
        table.first().map_err(unavailable)?.map(|(k, _)| k.value()),
        table.last().map_err(unavailable)?.map(|(k, _)| k.value()),
    ) else {
        return Ok(None);
    };
    let (mut lo, mut hi) = (first, last + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match time_at(mid)? {
            Some(t) if t >= ts => hi = mid,
            _ => lo = mid + 1,
        }
    }
    if lo > last {
        return Ok(None);
    }
    Ok(time_at(lo)?.map(|t| (lo, t)))
}

#[async_trait]
impl Log for EmbeddedLog {
    async fn ensure_topics(&self, topics: &[TopicConfig]) -> Result<(), LogError> {
        let inner = self.inner.clone();
        let topics = topics.to_vec();
        tokio::task::spawn_blocking(move || {
            let created = inner.with_db(|db| create_topics(db, &topics))?;
            let mut map = inner.topics.write().map_err(|_| LogError::Closed)?;
            for (name, partitions) in created {
                info!(topic = %name, partitions, "topic created");
                let high = (0..partitions).map(|_| AtomicU64::new(0)).collect();
                let low = (0..partitions).map(|_| AtomicU64::new(0)).collect();
                map.insert(name.clone(), Arc::new(Topic::new(name, high, low)));
            }
            Ok(())
        })
        .await
        .map_err(unavailable)?
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        Ok(self.inner.topic(topic)?.partitions())
    }

    async fn produce(&self, records: Vec<OutRecord>) -> Result<Vec<Appended>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|reply| Request::Produce { records, reply }).await
    }

    async fn subscribe(&self, group: &str, topic: &str) -> Result<Box<dyn LogConsumer>, LogError> {
        let topic = self.inner.topic(topic)?;
        *self
            .inner
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(group.to_owned())
            .or_default() += 1;
        Ok(Box::new(EmbeddedConsumer {
            log: self.clone(),
            group: group.to_owned(),
            positions: (0..topic.partitions()).map(|p| (p, 0)).collect(),
            topic,
            announced: false,
            rotation: 0,
        }))
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64), LogError> {
        let topic = self.inner.topic(topic)?;
        let high =
            topic
                .high
                .get(partition as usize)
                .ok_or_else(|| LogError::UnknownPartition {
                    topic: topic.name.clone(),
                    partition,
                })?;
        let low = topic.low[partition as usize].load(Ordering::Acquire);
        Ok((low, high.load(Ordering::Acquire)))
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        let inner = self.inner.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || read_range(&inner, &topic, partition, from, max))
            .await
            .map_err(unavailable)?
    }

    async fn group_members(&self, group: &str) -> Result<usize, LogError> {
        Ok(group_members_of(self, group))
    }
}

fn group_members_of(log: &EmbeddedLog, group: &str) -> usize {
    log.inner
        .members
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(group)
        .copied()
        .unwrap_or(0)
}

impl Drop for EmbeddedConsumer {
    /// Leaves the group.
    fn drop(&mut self) {
        let mut members = self
            .log
            .inner
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = members.get_mut(&self.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                members.remove(&self.group);
            }
        }
    }
}

/// A consumer of the embedded log. Embedded consumer groups have one
/// member (`waymark dev` is one process): it is assigned every partition.
struct EmbeddedConsumer {
    log: EmbeddedLog,
    group: String,
    topic: Arc<Topic>,
    positions: HashMap<u32, u64>,
    announced: bool,
    rotation: u32,
}

impl EmbeddedConsumer {
    fn ready(&self) -> Vec<(u32, u64)> {
        let n = self.topic.partitions();
        (0..n)
            .map(|i| (self.rotation + i) % n)
            .filter_map(|p| {
                let pos = *self.positions.get(&p)?;
                (pos < self.topic.high[p as usize].load(Ordering::Acquire)).then_some((p, pos))
            })
            .collect()
    }
}

#[async_trait]
impl LogConsumer for EmbeddedConsumer {
    async fn next(&mut self, max: usize) -> Result<ConsumerEvent, LogError> {
        if !self.announced {
            self.announced = true;
            return Ok(ConsumerEvent::Assigned(
                (0..self.topic.partitions()).collect(),
            ));
        }
        loop {
            let notified = self.topic.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ready = self.ready();
            if !ready.is_empty() {
                let inner = self.log.inner.clone();
                let name = self.topic.name.clone();
                let max = max.max(1);
                let records = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    for (p, from) in ready {
                        if out.len() >= max {
                            break;
                        }
                        out.extend(read_range(&inner, &name, p, from, max - out.len())?);
                    }
                    Ok::<_, LogError>(out)
                })
                .await
                .map_err(unavailable)??;
                self.rotation = (self.rotation + 1) % self.topic.partitions().max(1);
                for r in &records {
                    self.positions.insert(r.partition, r.offset + 1);
                }
                if !records.is_empty() {
                    return Ok(ConsumerEvent::Records(records));
                }
            }
            notified.await;
        }
    }

    async fn seek(&mut self, partition: u32, offset: u64) -> Result<(), LogError> {
        if partition >= self.topic.partitions() {
            return Err(LogError::UnknownPartition {
                topic: self.topic.name.clone(),
                partition,
            });
        }
        self.positions.insert(partition, offset);
        Ok(())
    }

    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        self.log
            .writer
            .send(Request::Commit {
                group: self.group.clone(),
                topic: self.topic.name.clone(),
                offsets: offsets.to_vec(),
                reply: None,
            })
            .await
            .map_err(|_| LogError::Closed)
    }
}
