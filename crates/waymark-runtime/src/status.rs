//! Partitions that keep failing, as this process's runners see them.
//!
//! A runner retrying a batch records here, per partition, the oldest
//! record it cannot get past, how many times it retried and the last error;
//! the entry is gone once the batch is applied. `Admin.GetStatus` reports
//! the entries of the process it runs in (every processor in `waymark dev`);
//! a processor in its own process (`waymark run`) reports the same through
//! the metric `waymark_processor_failing_retries` (see [`crate::metrics`])
//! and a warning with the record's position on every retry.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex, PoisonError};

/// One partition that a runner cannot get past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failing {
    /// Processor.
    pub processor: String,
    /// Projection version.
    pub version: u32,
    /// Input topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset of the oldest record not applied.
    pub offset: u64,
    /// Retries so far.
    pub retries: u64,
    /// When it first failed, ms since the Unix epoch.
    pub since_ms: i64,
    /// The last error.
    pub error: String,
}

type Key = (String, u32, u32);

static FAILING: LazyLock<Mutex<BTreeMap<Key, Failing>>> = LazyLock::new(Default::default);

fn failing_map() -> std::sync::MutexGuard<'static, BTreeMap<Key, Failing>> {
    FAILING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every partition failing now, by processor, version and partition.
pub fn failing() -> Vec<Failing> {
    failing_map().values().cloned().collect()
}

/// Records one more failed attempt at `offset` of `partition`; returns the
/// retries so far.
pub(crate) fn failed(
    processor: &str,
    version: u32,
    topic: &str,
    partition: u32,
    offset: u64,
    error: &str,
) -> u64 {
    let mut map = failing_map();
    let entry = map
        .entry((processor.to_owned(), version, partition))
        .or_insert_with(|| Failing {
            processor: processor.to_owned(),
            version,
            topic: topic.to_owned(),
            partition,
            offset,
            retries: 0,
            since_ms: chrono::Utc::now().timestamp_millis(),
            error: String::new(),
        });
    if entry.offset != offset {
        // Another record now: its retries start over.
        entry.offset = offset;
        entry.retries = 0;
        entry.since_ms = chrono::Utc::now().timestamp_millis();
    }
    entry.retries += 1;
    entry.error = error.to_owned();
    entry.retries
}

/// Forgets `partition` (applied past it, or no longer this runner's).
pub(crate) fn recovered(processor: &str, version: u32, partition: u32) {
    failing_map().remove(&(processor.to_owned(), version, partition));
}
