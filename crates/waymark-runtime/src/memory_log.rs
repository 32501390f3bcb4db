//! An in-memory [`Log`]: the deterministic double of the embedded and
//! Kafka logs in the runtime's own tests.
//!
//! Like the embedded log, a consumer group has one member that is assigned
//! every partition; records are appended in order with dense offsets;
//! [`MemoryLog::fail_next_produces`] injects outages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::log::{
    partition_for, Appended, ConsumerEvent, Log, LogConsumer, LogError, OutRecord, Record,
    TopicConfig,
};

#[derive(Debug, Default)]
struct State {
    /// Topic → partitions → records.
    topics: HashMap<String, Vec<Vec<Record>>>,
    members: HashMap<String, usize>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    appended: Notify,
    failures: AtomicUsize,
    /// Records (key + value + headers) larger than this are refused as
    /// [`LogError::TooLarge`], like Kafka's `max.message.bytes`; 0: none.
    max_record_bytes: AtomicUsize,
    /// Subscriptions so far; each consumer knows its number.
    subscriptions: AtomicUsize,
    /// Consumers numbered below this fail every poll.
    broken_below: AtomicUsize,
}

/// An in-memory log. Cheap to clone; clones share the records.
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    shared: Arc<Shared>,
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `n` produce calls fail with [`LogError::Unavailable`] and
    /// append nothing.
    pub fn fail_next_produces(&self, n: usize) {
        self.shared.failures.store(n, Ordering::SeqCst);
    }

    /// Every consumer subscribed so far fails every poll from now on with
    /// [`LogError::Unavailable`], as a client that never recovers from an
    /// outage; consumers subscribed later work.
    pub fn break_consumers(&self) {
        let n = self.shared.subscriptions.load(Ordering::SeqCst);
        self.shared.broken_below.store(n, Ordering::SeqCst);
    }

    /// How many times anything subscribed.
    pub fn subscriptions(&self) -> usize {
        self.shared.subscriptions.load(Ordering::SeqCst)
    }

    /// Refuses, from now on, every record whose key, value and headers
    /// together are larger than `bytes` ([`LogError::TooLarge`]), appending
    /// the others of the call, as a Kafka topic's `max.message.bytes` does.
    pub fn limit_record_bytes(&self, bytes: usize) {
        self.shared.max_record_bytes.store(bytes, Ordering::SeqCst);
    }

    /// Every record of `topic`, partition by partition.
    pub fn records(&self, topic: &str) -> Vec<Record> {
        self.state()
            .topics
            .get(topic)
            .map(|ps| ps.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Log for MemoryLog {
    async fn ensure_topics(&self, topics: &[TopicConfig]) -> Result<(), LogError> {
        let mut s = self.state();
        for t in topics {
            s.topics
                .entry(t.name.clone())
                .or_insert_with(|| vec![Vec::new(); t.partitions.max(1) as usize]);
        }
        Ok(())
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.state()
            .topics
            .get(topic)
            .map(|p| p.len() as u32)
            .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))
    }

    async fn produce(&self, records: Vec<OutRecord>) -> Result<Vec<Appended>, LogError> {
        let failed = self
            .shared
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            return Err(LogError::Unavailable("injected outage".into()));
        }
        let mut s = self.state();
        if let Some(r) = records.iter().find(|r| !s.topics.contains_key(&r.topic)) {
            return Err(LogError::UnknownTopic(r.topic.clone()));
        }
        let limit = self.shared.max_record_bytes.load(Ordering::SeqCst);
        let size = |r: &OutRecord| {
            r.key.as_ref().map_or(0, Vec::len)
                + r.value.len()
                + r.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        };
        let mut refused = Vec::new();
        let mut out = Vec::with_capacity(records.len());
        for (i, r) in records.into_iter().enumerate() {
            if limit > 0 && size(&r) > limit {
                refused.push(i);
                continue;
            }
            let partitions = s.topics.entry(r.topic.clone()).or_default();
            let n = partitions.len() as u32;
            let partition = r
                .partition
                .unwrap_or_else(|| r.key.as_deref().map_or(0, |k| partition_for(k, n)));
            let records = partitions.get_mut(partition as usize).ok_or_else(|| {
                LogError::UnknownPartition {
                    topic: r.topic.clone(),
                    partition,
                }
            })?;
            let offset = records.len() as u64;
            records.push(Record {
                partition,
                offset,
                key: r.key,
                value: Some(r.value),
                headers: r.headers,
                timestamp_ms: chrono::Utc::now().timestamp_millis(),
            });
            out.push(Appended { partition, offset });
        }
        drop(s);
        self.shared.appended.notify_waiters();
        if !refused.is_empty() {
            return Err(LogError::TooLarge {
                refused,
                appended: out,
                reason: format!("larger than {limit} bytes"),
            });
        }
        Ok(out)
    }

    async fn subscribe(&self, group: &str, topic: &str) -> Result<Box<dyn LogConsumer>, LogError> {
        let partitions = self.partitions(topic).await?;
        *self.state().members.entry(group.to_owned()).or_default() += 1;
        let number = self.shared.subscriptions.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(MemoryConsumer {
            number,
            log: self.clone(),
            group: group.to_owned(),
            topic: topic.to_owned(),
            positions: (0..partitions).map(|p| (p, 0)).collect(),
            announced: false,
        }))
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64), LogError> {
        let s = self.state();
        let partitions = s
            .topics
            .get(topic)
            .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))?;
        let records =
            partitions
                .get(partition as usize)
                .ok_or_else(|| LogError::UnknownPartition {
                    topic: topic.to_owned(),
                    partition,
                })?;
        Ok((0, records.len() as u64))
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        let s = self.state();
        let partitions = s
            .topics
            .get(topic)
            .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))?;
        Ok(partitions
            .get(partition as usize)
            .map(|records| {
                records
                    .iter()
                    .skip(usize::try_from(from).unwrap_or(usize::MAX))
                    .take(max)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn group_members(&self, group: &str) -> Result<usize, LogError> {
        Ok(self.state().members.get(group).copied().unwrap_or(0))
    }
}

/// The one member of its group: every partition is its.
struct MemoryConsumer {
    /// Its subscription's number.
    number: usize,
    log: MemoryLog,
    group: String,
    topic: String,
    positions: HashMap<u32, u64>,
    announced: bool,
}

impl MemoryConsumer {
    fn ready(&self, max: usize) -> Vec<Record> {
        let s = self.log.state();
        let Some(partitions) = s.topics.get(&self.topic) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (p, records) in partitions.iter().enumerate() {
            let from = self.positions.get(&(p as u32)).copied().unwrap_or(0);
            let from = usize::try_from(from).unwrap_or(usize::MAX);
            out.extend(records.iter().skip(from).take(max - out.len()).cloned());
            if out.len() >= max {
                break;
            }
        }
        out
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let mut s = self.log.state();
        if let Some(n) = s.members.get_mut(&self.group) {
            *n = n.saturating_sub(1);
        }
    }
}

#[async_trait]
impl LogConsumer for MemoryConsumer {
    async fn next(&mut self, max: usize) -> Result<ConsumerEvent, LogError> {
        if self.number < self.log.shared.broken_below.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
            return Err(LogError::Unavailable("this consumer is broken".into()));
        }
        if !self.announced {
            self.announced = true;
            let mut partitions: Vec<u32> = self.positions.keys().copied().collect();
            partitions.sort_unstable();
            return Ok(ConsumerEvent::Assigned(partitions));
        }
        loop {
            let appended = self.log.shared.appended.notified();
            if self.number < self.log.shared.broken_below.load(Ordering::SeqCst) {
                return Err(LogError::Unavailable("this consumer is broken".into()));
            }
            let records = self.ready(max.max(1));
            if !records.is_empty() {
                for r in &records {
                    self.positions.insert(r.partition, r.offset + 1);
                }
                return Ok(ConsumerEvent::Records(records));
            }
            appended.await;
        }
    }

    async fn seek(&mut self, partition: u32, offset: u64) -> Result<(), LogError> {
        self.positions.insert(partition, offset);
        Ok(())
    }

    async fn commit(&mut self, _offsets: &[(u32, u64)]) -> Result<(), LogError> {
        Ok(())
    }
}
