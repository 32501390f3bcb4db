//! Per-person event history: every event applied to a person, in log
//! order, as the `person` processor stores it next to its projection
//! (`Query.ListEvents`, `waymark inspect`): its table [`HISTORY`].
//!
//! # Layout of the history table (`person_vN_history`)
//! | key | row |
//! |---|---|
//! | `<person>` | [`Tracked`]`<`[`HistoryHead`]`>`: the number of events, plus the position and the ids that make appends exactly-once |
//! | `<person>/<index, 12 digits>` | [`HistoryEntry`]: event `index` of the person |
//!
//! An event is one row of its own, so an append writes one new row per
//! event plus the head and never reads or rewrites an earlier row, however
//! large the events (with chunks of several events, every batch rewrote a
//! person's last chunk: 32 events of 60 KB made every append of such a
//! person rewrite up to 1.9 MB). A page of history is one key read per
//! event of the page. Duplicates (same id within the dedupe window) and
//! redelivered records are not appended, exactly as the folds ignore them.
//!
//! The head is the commit point: readers use only the first `count`
//! entries, and an append writes entry `count` onwards. On a store that
//! writes a batch's rows one by one (CQL), a crash can store entries
//! without their head; the batch applied again writes the same entries
//! again (test `a_torn_write_applied_again_leaves_no_duplicate`).

use std::collections::HashMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use waymark_core::{ApplyOutcome, Event, Fold, Position, Tracked};

use waymark_runtime::handler::{decode_indexed, BatchOutput, Decoded, HandleError, Handler};
use waymark_runtime::row::{decode_row, encode_row};
use waymark_runtime::ProjectionHandler;
use waymark_runtime::{ProjectionStore, Record, RowWrite, StoreError};

/// Suffix of the history table.
pub const HISTORY: &str = "history";

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

/// The key of event `index` (from 0) of `person`'s history.
pub fn entry_key(person: &str, index: u64) -> String {
    format!("{person}/{index:012}")
}

/// The log position a history row reflects: the head's (a
/// [`Tracked`] row), or an entry's own.
pub fn row_position(key: &str, row: &[u8]) -> Option<Position> {
    if key.contains('/') {
        let entry: HistoryEntry = postcard::from_bytes(row).ok()?;
        return Some(Position::new(entry.partition, entry.offset));
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

/// Runs a fold's [`ProjectionHandler`] over `waymark.events` and also
/// appends every event it applies to the person's history in `table`; each
/// record is decoded once for both.
pub struct WithHistory<F: Fold> {
    inner: ProjectionHandler<F>,
    table: String,
    encoding: u32,
    window: chrono::Duration,
}

impl<F: Fold> WithHistory<F> {
    /// Adds history in `table` (rows of state encoding `encoding`, dedupe
    /// `window`) to `inner`.
    pub fn new(
        inner: ProjectionHandler<F>,
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

    /// The history rows of `events` (decoded records; `bytes`: each one's
    /// record value, the canonical event, stored as it is).
    async fn history_rows(
        &self,
        store: &dyn ProjectionStore,
        events: &[Decoded],
        bytes: &[&[u8]],
    ) -> Result<Vec<RowWrite>, HandleError> {
        let mut keys: Vec<String> = events
            .iter()
            .filter_map(|d| d.event.person_id.map(|p| p.to_string()))
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
        let mut rows = Vec::new();
        for (decoded, bytes) in events.iter().zip(bytes) {
            let Some(person) = decoded.event.person_id.map(|p| p.to_string()) else {
                continue;
            };
            let Some(head) = heads.get_mut(&person) else {
                continue;
            };
            let position = decoded.position;
            let index = head.state.count;
            if decoded.apply_to(head, &Count, self.window) == ApplyOutcome::Applied {
                let entry = HistoryEntry {
                    partition: position.partition,
                    offset: position.offset,
                    event: bytes.to_vec(),
                };
                rows.push(RowWrite {
                    table: self.table.clone(),
                    key: entry_key(&person, index),
                    value: Some(encode_row(self.encoding, &entry)),
                    order: Some(position.offset + 1),
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
impl<F: Fold> Handler for WithHistory<F> {
    fn processor(&self) -> &str {
        self.inner.processor()
    }

    fn tables(&self) -> Vec<String> {
        let mut tables = self.inner.tables();
        tables.push(self.table.clone());
        tables
    }

    /// History rows are keyed by person id (and event index).
    fn rows_follow_partitioning(&self) -> bool {
        self.inner.rows_follow_partitioning()
    }

    async fn handle(
        &self,
        store: &dyn ProjectionStore,
        _topic: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError> {
        let mut out = BatchOutput::default();
        let mut events: Vec<Decoded> = Vec::with_capacity(records.len());
        let mut bytes: Vec<&[u8]> = Vec::with_capacity(records.len());
        for (i, decoded) in decode_indexed(records, &mut out.rejected) {
            events.push(decoded);
            bytes.push(records[i].value.as_deref().unwrap_or_default());
        }
        out.rows = self
            .inner
            .fold_events(store, &events, &mut out.stats)
            .await?;
        out.rows
            .extend(self.history_rows(store, &events, &bytes).await?);
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
    let keys: Vec<String> = (from..end).map(|i| entry_key(person, i)).collect();
    let rows = store.get_many(table, &keys).await?;
    let mut out = Vec::with_capacity(keys.len());
    for (key, row) in keys.iter().zip(rows) {
        // Written before its head: an entry below the count is there.
        let Some(bytes) = row else {
            return Err(StoreError::Corrupt {
                table: table.to_owned(),
                key: key.clone(),
                reason: format!("history entry missing below the count {count}"),
            });
        };
        out.push(decode_row(encoding, table, key, &bytes)?);
    }
    Ok(Some((out, count)))
}
