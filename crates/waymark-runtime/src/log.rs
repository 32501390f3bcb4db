//! The log seam: a partitioned, ordered, durable log of records.
//!
//! Implemented by Kafka (`waymark-kafka`, through rdkafka) and by the
//! embedded log of `waymark dev` (`waymark-embedded`). Nothing here assumes
//! either: partitions are assigned by a consumer group, positions are offsets,
//! and a produce is acknowledged only once it is durable.

use std::time::Duration;

use async_trait::async_trait;

/// A record read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partition it was read from.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub value: Option<Vec<u8>>,
    /// Record headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Append (or create) time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

impl Record {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Destination topic.
    pub topic: String,
    /// Explicit partition; `None` partitions by key ([`crate::partition_for`]).
    pub partition: Option<u32>,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub value: Vec<u8>,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutRecord {
    /// A keyed record with no headers.
    pub fn keyed(topic: impl Into<String>, key: impl Into<Vec<u8>>, value: Vec<u8>) -> Self {
        Self {
            topic: topic.into(),
            partition: None,
            key: Some(key.into()),
            value,
            headers: Vec::new(),
        }
    }
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
}

/// A topic to create when missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Retention; `None` keeps records forever.
    pub retention: Option<Duration>,
    /// Log compaction.
    pub compaction: bool,
}

/// What a consumer saw next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerEvent {
    /// These partitions were assigned to this member; the runtime seeks each
    /// to the position stored with its projection before reading.
    Assigned(Vec<u32>),
    /// These partitions were taken away (rebalance).
    Revoked(Vec<u32>),
    /// Records, in log order per partition.
    Records(Vec<Record>),
}

/// A log error. Every log error but [`LogError::TooLarge`] is retryable:
/// the runtime backs off and does not commit past what it has not durably
/// applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The topic does not exist.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// The partition does not exist.
    #[error("unknown partition {partition} of topic {topic}")]
    UnknownPartition {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// The log cannot be reached or failed to persist.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The log is shut down.
    #[error("log closed")]
    Closed,
    /// Some records of a produce call are larger than their topic accepts:
    /// permanent, retrying them as they are cannot help. Every other record
    /// of the call was appended.
    #[error("{} record(s) too large for the log: {reason}", refused.len())]
    TooLarge {
        /// Indices, in the call's records, of those refused.
        refused: Vec<usize>,
        /// Where each of the others was appended, in the call's order.
        appended: Vec<Appended>,
        /// The log's reason.
        reason: String,
    },
}

impl LogError {
    /// Whether retrying the same call can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, LogError::TooLarge { .. })
    }
}

/// A partitioned, durable, ordered log.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Creates the topics that are missing (existing ones are left alone).
    async fn ensure_topics(&self, topics: &[TopicConfig]) -> Result<(), LogError>;

    /// Partition count of `topic`.
    async fn partitions(&self, topic: &str) -> Result<u32, LogError>;

    /// Appends records, in order; returns once every one is durable
    /// (acks=all on Kafka, fsync on the embedded log).
    async fn produce(&self, records: Vec<OutRecord>) -> Result<Vec<Appended>, LogError>;

    /// Joins consumer group `group` on `topic`.
    async fn subscribe(&self, group: &str, topic: &str) -> Result<Box<dyn LogConsumer>, LogError>;

    /// Low and high watermarks of a partition: the first offset still stored
    /// and the offset the next append will get.
    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64), LogError>;

    /// Reads up to `max` records of a partition from `from` (random access,
    /// for the admin API and tools).
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// How many consumers are members of consumer group `group` now (0 for
    /// an unknown group). A runner is a member from `subscribe` until its
    /// consumer is dropped, so 0 acknowledges that every runner of a
    /// projection version has stopped.
    async fn group_members(&self, group: &str) -> Result<usize, LogError>;
}

/// One member of a consumer group.
#[async_trait]
pub trait LogConsumer: Send {
    /// Waits for the next assignment change or batch of at most `max`
    /// records. Cancel-safe.
    async fn next(&mut self, max: usize) -> Result<ConsumerEvent, LogError>;

    /// Moves the read position of an assigned partition.
    async fn seek(&mut self, partition: u32, offset: u64) -> Result<(), LogError>;

    /// Commits next-offsets to the group (for lag tooling; the projection
    /// store holds the positions the runtime starts from).
    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError>;
}

/// The partition of `key` among `partitions`: murmur2 as in Kafka's Java
/// client default partitioner, so Waymark and Java producers agree.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Kafka's murmur2 (seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        for n in 1..10 {
            let p = partition_for(b"telegram:42", n);
            assert!(p < n);
            assert_eq!(p, partition_for(b"telegram:42", n));
        }
    }
}
