//! Per-person event history: every event applied to a person, in log
//! order, as the `person` processor stores it next to its projection
//! (`Query.ListEvents`, `waymark inspect`): its table [`HISTORY`].
//!
//! # Layout of the history table (`person_vN_history`)
//! | key | row |
//! |---|---|
//! | `<person>` | [`Tracked`]`<`[`HistoryHead`]`>`: the number of events, plus the position and the ids that make appends exactly-once |
//! | `<person>/<chunk, 12 digits>` | `Vec<`[`HistoryEntry`]`>`: events `chunk * CHUNK ..` |
//!
//! Events are appended in chunks of [`CHUNK`], so an append rewrites at
//! most one small row per person and batch, and a page of history is a few
//! key reads. Duplicates (same id within the dedupe window) and redelivered
//! records are not appended, exactly as the folds ignore them.
//!
//! The head is the commit point: readers and writers use only the first
//! `count` entries. On a store that writes a batch's rows one by one (CQL),
//! a crash can store a chunk without its head; the batch applied again
//! replaces what that torn write left past the count (test
//! `a_torn_write_applied_again_leaves_no_duplicate`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use waymark_core::{ApplyOutcome, Event, Fold, Position, Tracked};

use waymark_runtime::handler::{
    decode_event, record_source, BatchOutput, Decoded, HandleError, Handler,
};
use waymark_runtime::row::{decode_row, encode_row};
use waymark_runtime::{ProjectionStore, Record, RowWrite, StoreError};

/// Suffix of the history table.
pub const HISTORY: &str = "history";

/// Events per history chunk row.
pub const CHUNK: u64 = 32;

/// The head row of a person's history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryHead {
    /// Number of events in the history.
    pub count: u64,
}

/// One event of a person's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Partition of `waymark.events` it was read from.
    pub partition: u32,
    /// Offset in that partition.
    pub offset: u64,
    /// The event, canonical JSON.
    pub event: Vec<u8>,
}

/// The key of chunk `chunk` of `person`'s history.
pub fn chunk_key(person: &str, chunk: u64) -> String {
    format!("{person}/{chunk:012}")
}

/// The log position a history row reflects: the head's (a
/// [`Tracked`] row), or a chunk's newest entry.
pub fn row_position(key: &str, row: &[u8]) -> Option<Position> {
    if key.contains('/') {
        let chunk: Vec<HistoryEntry> = postcard::from_bytes(row).ok()?;
        return chunk.last().map(|e| Position::new(e.partition, e.offset));
    }
    waymark_runtime::plugin::tracked_position(key, row)
}

struct Count;

impl Fold for Count {
    type State = HistoryHead;
    fn apply(&self, state: &mut HistoryHead, _: &Event) {
        state.count += 1;
    }
}

/// Wraps a handler of `waymark.events` and also appends every event it
/// applies to the person's history in `table`.
pub struct WithHistory {
    inner: Arc<dyn Handler>,
    table: String,
    encoding: u32,
    window: chrono::Duration,
}

impl WithHistory {
    /// Adds history in `table` (rows of state encoding `encoding`, dedupe
    /// `window`) to `inner`.
    pub fn new(
        inner: Arc<dyn Handler>,
        table: impl Into<String>,
        encoding: u32,
        window: chrono::Duration,
    ) -> Self {
        Self {
            inner,
            table: table.into(),
            encoding,
            window,
        }
    }

    async fn history_rows(
        &self,
        store: &dyn ProjectionStore,
        records: &[Record],
    ) -> Result<Vec<RowWrite>, HandleError> {
        // The record's bytes are the canonical event: stored as they are.
        let events: Vec<(Decoded, &[u8])> = records
            .iter()
            .filter_map(|r| {
                let event = decode_event(r).ok()?;
                let decoded = Decoded {
                    position: Position::new(r.partition, r.offset),
                    source: record_source(r),
                    event,
                };
                Some((decoded, r.value.as_deref()?))
            })
            .collect();
        let mut keys: Vec<String> = events
            .iter()
            .filter_map(|(d, _)| d.event.person_id.map(|p| p.to_string()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let loaded = store.get_many(&self.table, &keys).await?;
        let mut heads: HashMap<String, Tracked<HistoryHead>> = HashMap::new();
        for (key, value) in keys.iter().zip(loaded) {
            let head = match value {
                Some(bytes) => decode_row(self.encoding, &self.table, key, &bytes)?,
                None => Tracked::default(),
            };
            heads.insert(key.clone(), head);
        }
        let first_new: HashMap<String, u64> = heads
            .iter()
            .map(|(k, h)| (k.clone(), h.state.count))
            .collect();
        let mut appended: BTreeMap<String, Vec<HistoryEntry>> = BTreeMap::new();
        for (decoded, bytes) in &events {
            let Some(person) = decoded.event.person_id.map(|p| p.to_string()) else {
                continue;
            };
            let Some(head) = heads.get_mut(&person) else {
                continue;
            };
            let position = decoded.position;
            if decoded.apply_to(head, &Count, self.window) == ApplyOutcome::Applied {
                appended.entry(person).or_default().push(HistoryEntry {
                    partition: position.partition,
                    offset: position.offset,
                    event: bytes.to_vec(),
                });
            }
        }

        // Load the last, partly filled chunk of each person that grew.
        let partial: Vec<String> = appended
            .keys()
            .filter_map(|person| {
                let first = *first_new.get(person)?;
                (first % CHUNK != 0).then(|| chunk_key(person, first / CHUNK))
            })
            .collect();
        let loaded = store.get_many(&self.table, &partial).await?;
        let mut chunks: HashMap<String, Vec<HistoryEntry>> = HashMap::new();
        for (key, value) in partial.into_iter().zip(loaded) {
            let chunk = match value {
                Some(bytes) => decode_row(self.encoding, &self.table, &key, &bytes)?,
                None => Vec::new(),
            };
            chunks.insert(key, chunk);
        }

        let mut rows = Vec::new();
        for (person, entries) in appended {
            let first = first_new.get(&person).copied().unwrap_or(0);
            let order = entries.last().map(|e| e.offset + 1);
            let mut touched: BTreeMap<String, Vec<HistoryEntry>> = BTreeMap::new();
            for (index, entry) in (first..).zip(entries) {
                let key = chunk_key(&person, index / CHUNK);
                let chunk = match touched.get_mut(&key) {
                    Some(chunk) => chunk,
                    None => {
                        let mut existing = chunks.remove(&key).unwrap_or_default();
                        // The head is the truth: entries past its count
                        // are what a torn write (a chunk stored, its head
                        // not, on a store without atomic batches) left,
                        // and are appended again now.
                        existing.truncate((index % CHUNK) as usize);
                        touched.entry(key).or_insert(existing)
                    }
                };
                chunk.push(entry);
            }
            for (key, chunk) in touched {
                rows.push(RowWrite {
                    table: self.table.clone(),
                    key,
                    value: Some(encode_row(self.encoding, &chunk)),
                    order,
                });
            }
        }
        for (key, head) in heads {
            rows.push(RowWrite {
                table: self.table.clone(),
                order: head.position.map(|p| p.offset + 1),
                value: Some(encode_row(self.encoding, &head)),
                key,
            });
        }
        Ok(rows)
    }
}

#[async_trait]
impl Handler for WithHistory {
    fn processor(&self) -> &str {
        self.inner.processor()
    }

    fn tables(&self) -> Vec<String> {
        let mut tables = self.inner.tables();
        tables.push(self.table.clone());
        tables
    }

    /// History rows are keyed by person id (and chunk number).
    fn rows_follow_partitioning(&self) -> bool {
        self.inner.rows_follow_partitioning()
    }

    async fn handle(
        &self,
        store: &dyn ProjectionStore,
        topic: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError> {
        let mut out = self.inner.handle(store, topic, records).await?;
        out.rows.extend(self.history_rows(store, records).await?);
        Ok(out)
    }
}

/// One page of a person's history in `table` (rows of state encoding
/// `encoding`): events `from ..` (at most `limit`) and the total count;
/// `None` when the person has no history.
pub async fn read_page(
    store: &dyn ProjectionStore,
    table: &str,
    encoding: u32,
    person: &str,
    from: u64,
    limit: u64,
) -> Result<Option<(Vec<HistoryEntry>, u64)>, StoreError> {
    let Some(bytes) = store.get(table, person).await? else {
        return Ok(None);
    };
    let head: Tracked<HistoryHead> = decode_row(encoding, table, person, &bytes)?;
    let count = head.state.count;
    let end = from.saturating_add(limit).min(count);
    if from >= end {
        return Ok(Some((Vec::new(), count)));
    }
    let keys: Vec<String> = (from / CHUNK..=(end - 1) / CHUNK)
        .map(|c| chunk_key(person, c))
        .collect();
    let rows = store.get_many(table, &keys).await?;
    let mut out = Vec::with_capacity((end - from) as usize);
    for ((c, key), row) in (from / CHUNK..).zip(&keys).zip(rows) {
        let chunk: Vec<HistoryEntry> = match row {
            Some(bytes) => decode_row(encoding, table, key, &bytes)?,
            None => Vec::new(),
        };
        for (i, entry) in chunk.into_iter().enumerate() {
            let index = c * CHUNK + i as u64;
            if index >= from && index < end {
                out.push(entry);
            }
        }
    }
    Ok(Some((out, count)))
}
