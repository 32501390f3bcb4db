//! The partition count of every topic is fixed for the life of a
//! deployment.
//!
//! Waymark keys every projection by the partitioning of its input: a
//! person's events are in one partition of `waymark.events`, its rows
//! record the positions of that partition, and on CQL its rows are written
//! with the partition's offsets as timestamps. Adding partitions to a topic
//! moves keys to other partitions: per-key order is lost while both carry
//! a key's records, and writes carrying the new partition's smaller offsets
//! are silently discarded. So the count a deployment first ran with is
//! recorded in the store ([`TOPICS_TABLE`]), and a start-up that finds
//! another one is refused with the remedy ([`check`]).

use std::fmt::Write as _;

use waymark_runtime::{Log, LogError, ProjectionStore, StoreError, TopicConfig};

/// The store table recording each topic's partition count (key: topic
/// name, value: the count in decimal ASCII).
pub const TOPICS_TABLE: &str = "waymark_topics";

/// Why [`check`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionsError {
    /// A topic's partition count differs from the one recorded.
    #[error("{0}")]
    Changed(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Records the partition count of each of `topics` the first time, and
/// refuses (listing every changed topic, with the remedy) when one has
/// another count than recorded. A count that only differs from the
/// topology's (a topic created beforehand with another count) is what the
/// deployment runs with, and is recorded as it is.
pub async fn check(
    store: &dyn ProjectionStore,
    log: &dyn Log,
    topics: &[TopicConfig],
) -> Result<(), PartitionsError> {
    store.ensure_tables(&[TOPICS_TABLE.to_owned()]).await?;
    let mut changed = String::new();
    for topic in topics {
        let actual = log.partitions(&topic.name).await?;
        let value = actual.to_string().into_bytes();
        match store.get(TOPICS_TABLE, &topic.name).await? {
            None => {
                // First start: record it (a concurrent first start records
                // the same count, or finds it recorded on its next start).
                let _ = store
                    .compare_and_set(TOPICS_TABLE, &topic.name, None, &value)
                    .await?;
                if actual != topic.partitions {
                    tracing::warn!(
                        topic = %topic.name, partitions = actual, configured = topic.partitions,
                        "topic exists with another partition count than the topology's; running with it"
                    );
                }
            }
            Some(recorded) if recorded == value => {}
            Some(recorded) => {
                let recorded = String::from_utf8_lossy(&recorded).into_owned();
                let _ = write!(
                    changed,
                    "\n  - {} has {actual} partitions, but this deployment's projections were \
                     built on {recorded}",
                    topic.name
                );
            }
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    Err(PartitionsError::Changed(format!(
        "the partition count of a topic changed:{changed}\nWaymark keys every projection by the \
         partitions of its input, so a changed count would reorder keys and silently drop \
         writes. Restore the recorded partition count (recreate the topic with it from the \
         same data), or start a new deployment (an empty data directory or CQL keyspace) and \
         publish the events into it."
    )))
}
