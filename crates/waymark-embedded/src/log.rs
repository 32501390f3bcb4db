//! The durable embedded log: topics of partitions of records on redb.
//!
//! Each partition is a redb table `offset → record`. Appends go through one
//! writer thread that group-commits every pending produce and commit request
//! into a single fsynced transaction, then wakes the topic's consumers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{error, info};
use waymark_runtime::log::ConsumerEvent;
use waymark_runtime::{
    partition_for, Appended, Log, LogConsumer, LogError, OutRecord, Record, TopicConfig,
};

use crate::codec;

const TOPICS: TableDefinition<'static, &str, u32> = TableDefinition::new("_topics");
const GROUPS: TableDefinition<'static, &str, u64> = TableDefinition::new("_group_offsets");
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

struct Inner {
    /// `None` once closed: dropping the database releases its file lock.
    db: RwLock<Option<Database>>,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
}

impl Inner {
    /// Runs `f` on the open database.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, LogError>) -> Result<T, LogError> {
        let guard = self.db.read().map_err(|_| LogError::Closed)?;
        let db = guard.as_ref().ok_or(LogError::Closed)?;
        f(db)
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
    Commit {
        group: String,
        topic: String,
        offsets: Vec<(u32, u64)>,
    },
}

/// The durable embedded log of `waymark dev`. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
    writer: mpsc::Sender<Request>,
}

impl EmbeddedLog {
    /// Opens (or creates) the log in file `path`.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let db = Database::builder()
            .set_cache_size(LOG_CACHE_BYTES)
            .create(path)
            .map_err(unavailable)?;
        let mut topics = HashMap::new();
        {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(TOPICS).map_err(unavailable)?;
            txn.open_table(GROUPS).map_err(unavailable)?;
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
        let inner = Arc::new(Inner {
            db: RwLock::new(Some(db)),
            topics: RwLock::new(topics),
        });
        let (tx, rx) = mpsc::channel(1024);
        let writer_inner = inner.clone();
        std::thread::Builder::new()
            .name("waymark-log-writer".into())
            .spawn(move || writer_loop(&writer_inner, rx))
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
    /// growing across restarts and are never reused.
    pub fn apply_retention(
        &self,
        topic: &str,
        max_age: std::time::Duration,
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
                let name = partition_table(&topic.name, p);
                let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
                let mut table = txn.open_table(def).map_err(unavailable)?;
                let mut expired = Vec::new();
                for entry in table.range(..high.saturating_sub(1)).map_err(unavailable)? {
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
            db.take();
        }
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

/// The writer thread: group-commits pending requests.
fn writer_loop(inner: &Inner, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.blocking_recv() {
        let mut requests = vec![first];
        while requests.len() < MAX_REQUESTS_PER_COMMIT {
            match rx.try_recv() {
                Ok(r) => requests.push(r),
                Err(_) => break,
            }
        }
        commit_requests(inner, requests);
    }
}

fn commit_requests(inner: &Inner, requests: Vec<Request>) {
    // Offsets are assigned from a local copy of the high watermarks and
    // published only after the transaction is durable.
    let mut next: HashMap<(String, u32), u64> = HashMap::new();
    let mut results: Vec<Result<AppendedIn, LogError>> = Vec::new();
    let mut replies = Vec::new();
    let txn_result = inner.with_db(|db| {
        let txn = db.begin_write().map_err(unavailable)?;
        let timestamp = now_ms();
        for request in &requests {
            match request {
                Request::Produce { records, .. } => {
                    let result = append_all(inner, &txn, records, timestamp, &mut next);
                    results.push(result);
                }
                Request::Commit {
                    group,
                    topic,
                    offsets,
                } => {
                    let mut table = txn.open_table(GROUPS).map_err(unavailable)?;
                    for (p, o) in offsets {
                        table
                            .insert(group_key(group, topic, *p).as_str(), *o)
                            .map_err(unavailable)?;
                    }
                }
            }
        }
        txn.commit().map_err(unavailable)
    });
    for request in requests {
        if let Request::Produce { reply, .. } = request {
            replies.push(reply);
        }
    }
    match txn_result {
        Ok(()) => {
            let mut touched: HashMap<String, Arc<Topic>> = HashMap::new();
            for (reply, result) in replies.into_iter().zip(results) {
                let answer = result.map(|appended| {
                    appended
                        .into_iter()
                        .map(|(topic, partition, offset)| {
                            topic.high[partition as usize].fetch_max(offset + 1, Ordering::AcqRel);
                            touched.insert(topic.name.clone(), topic);
                            Appended { partition, offset }
                        })
                        .collect()
                });
                let _ = reply.send(answer);
            }
            for topic in touched.values() {
                topic.appended.notify_waiters();
            }
        }
        Err(e) => {
            error!(error = %e, "embedded log commit failed");
            for reply in replies {
                let _ = reply.send(Err(LogError::Unavailable(e.to_string())));
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
            &record.headers,
            &record.value,
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

fn read_range_in(
    db: &Database,
    topic: &str,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<Record>, LogError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let name = partition_table(topic, partition);
    let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
    let table = match txn.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(unavailable(e)),
    };
    let mut out = Vec::new();
    for entry in table.range(from..).map_err(unavailable)?.take(max) {
        let (offset, bytes) = entry.map_err(unavailable)?;
        let offset = offset.value();
        let record = codec::decode(partition, offset, bytes.value()).ok_or_else(|| {
            LogError::Unavailable(format!("corrupt record {topic}/{partition}@{offset}"))
        })?;
        out.push(record);
    }
    Ok(out)
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
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Request::Produce { records, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    async fn subscribe(&self, group: &str, topic: &str) -> Result<Box<dyn LogConsumer>, LogError> {
        let topic = self.inner.topic(topic)?;
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
            })
            .await
            .map_err(|_| LogError::Closed)
    }
}
