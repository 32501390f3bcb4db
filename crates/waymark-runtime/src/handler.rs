//! Batch handlers: how a processor turns a batch of records into row
//! writes, output records and dead letters. The runner owns everything
//! else (polling, retries, store writes, positions, commits).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use waymark_core::{ApplyOutcome, Event, Fold, Position, RejectKind, Rejection, Tracked};

use crate::log::{OutRecord, Record};
use crate::row::{decode_row, encode_row};
use crate::store::{ProjectionStore, RowWrite, StoreError};

/// Counts of what a batch did, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Events that changed state (or were forwarded).
    pub applied: u64,
    /// Events ignored as duplicate ids within the dedupe window.
    pub duplicates: u64,
    /// Records ignored because their position was already applied.
    pub redelivered: u64,
}

/// The effects of one batch, written by the runner in this order: output
/// records (durable), then rows with positions (atomic), then the commit.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// Records to append to output topics, in order, each with the index in
    /// the batch of the record it came from (the runner writes them only
    /// when that record's side effects are this version's to write, see
    /// [`crate::catalog`]).
    pub produce: Vec<(usize, OutRecord)>,
    /// Records of the batch that are bad input, by index in the batch.
    pub rejected: Vec<(usize, Rejection)>,
    /// Row writes.
    pub rows: Vec<RowWrite>,
    /// Counts.
    pub stats: BatchStats,
}

/// Why a batch could not be handled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// Reading state failed; retry the batch.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another member has applied `partition` past `offset`, where the
    /// batch starts: this process lost the partition (a zombie after a
    /// rebalance). The runner drops the batch and reads the partition again
    /// from the stored position.
    #[error("partition {partition} was applied past offset {offset} by another member")]
    Fenced {
        /// The input partition.
        partition: u32,
        /// Where the batch starts.
        offset: u64,
    },
}

impl HandleError {
    /// Whether retrying can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            HandleError::Store(e) => e.is_retryable(),
            HandleError::Fenced { .. } => true,
        }
    }
}

/// A processor as the runner sees it.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Processor name (metrics, dead-letter header).
    fn processor(&self) -> &str;

    /// The store tables it writes.
    fn tables(&self) -> Vec<String>;

    /// Whether every row it writes is keyed so that only the owner of one
    /// input partition ever writes it (rows keyed by the input's
    /// partitioning key, e.g. person id on `waymark.events`). The runner
    /// then may cache rows across batches ([`crate::cache::RowCache`]).
    /// `false` by default.
    fn rows_follow_partitioning(&self) -> bool {
        false
    }

    /// Handles records read from `topic`, in log order per partition.
    async fn handle(
        &self,
        store: &dyn ProjectionStore,
        topic: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError>;
}

/// Runs a [`Fold`] over `waymark.events`: one [`Tracked`] row per person in
/// `table`, applied exactly once per log position and event id.
pub struct ProjectionHandler<F: Fold> {
    processor: String,
    table: String,
    encoding: u32,
    fold: F,
    window: chrono::Duration,
}

impl<F: Fold> ProjectionHandler<F> {
    /// A handler for `fold`, storing into `table` rows of state encoding
    /// `encoding` ([`crate::row`]), deduplicating within `window`.
    pub fn new(
        processor: impl Into<String>,
        table: impl Into<String>,
        encoding: u32,
        fold: F,
        window: chrono::Duration,
    ) -> Self {
        Self {
            processor: processor.into(),
            table: table.into(),
            encoding,
            fold,
            window,
        }
    }

    /// Applies decoded events to loaded rows (the pure part, shared with tests).
    pub fn apply_all(
        &self,
        rows: &mut HashMap<String, Tracked<F::State>>,
        events: &[Decoded],
        stats: &mut BatchStats,
    ) {
        for decoded in events {
            let Some(person) = decoded.event.person_id else {
                continue;
            };
            let row = rows.entry(person.to_string()).or_default();
            match decoded.apply_to(row, &self.fold, self.window) {
                ApplyOutcome::Applied => stats.applied += 1,
                ApplyOutcome::Duplicate => stats.duplicates += 1,
                ApplyOutcome::Redelivered => stats.redelivered += 1,
            }
        }
    }
}

#[async_trait]
impl<F: Fold> Handler for ProjectionHandler<F> {
    fn processor(&self) -> &str {
        &self.processor
    }

    fn tables(&self) -> Vec<String> {
        vec![self.table.clone()]
    }

    /// Rows are keyed by person id, the key `waymark.events` is
    /// partitioned by.
    fn rows_follow_partitioning(&self) -> bool {
        true
    }

    async fn handle(
        &self,
        store: &dyn ProjectionStore,
        _topic: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError> {
        let mut out = BatchOutput::default();
        let events = decode_events(records, &mut out.rejected);
        out.rows = self.fold_events(store, &events, &mut out.stats).await?;
        Ok(out)
    }
}

impl<F: Fold> ProjectionHandler<F> {
    /// Loads the rows of the persons of `events` (decoded records of one
    /// batch, in log order), applies the events and returns the rows to
    /// write: [`Handler::handle`] after decoding, for handlers that decode
    /// a batch once for several uses.
    pub async fn fold_events(
        &self,
        store: &dyn ProjectionStore,
        events: &[Decoded],
        stats: &mut BatchStats,
    ) -> Result<Vec<RowWrite>, HandleError> {
        let mut keys: Vec<String> = events
            .iter()
            .filter_map(|d| d.event.person_id.map(|p| p.to_string()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let loaded = store.get_many(&self.table, &keys).await?;
        let mut rows = HashMap::with_capacity(keys.len());
        for (key, value) in keys.iter().zip(loaded) {
            if let Some(bytes) = value {
                rows.insert(
                    key.clone(),
                    decode_row(self.encoding, &self.table, key, &bytes)?,
                );
            }
        }
        self.apply_all(&mut rows, events, stats);
        Ok(rows
            .into_iter()
            .map(|(key, row)| RowWrite {
                table: self.table.clone(),
                order: row.position.map(|p| p.offset + 1),
                value: Some(encode_row(self.encoding, &row)),
                key,
            })
            .collect())
    }
}

/// The header naming the input record a record of `waymark.events` was
/// resolved from: `<partition>/<offset>` of the inputs topic, in ASCII.
/// Written by the identity processor; the folds use it to apply a record
/// appended again after a crash only once ([`Tracked::apply_from`]).
pub const SOURCE_HEADER: &str = "waymark.input";

/// The [`SOURCE_HEADER`] of the record resolved from input record
/// `partition`/`offset`.
pub fn source_header(partition: u32, offset: u64) -> (String, Vec<u8>) {
    (
        SOURCE_HEADER.to_owned(),
        format!("{partition}/{offset}").into_bytes(),
    )
}

/// The source of a record of `waymark.events`, if it has a well-formed
/// [`SOURCE_HEADER`] (records appended by anything but the identity
/// processor have none, and are deduplicated by event id only).
pub fn record_source(record: &Record) -> Option<Position> {
    let text = std::str::from_utf8(record.header(SOURCE_HEADER)?).ok()?;
    let (partition, offset) = text.split_once('/')?;
    Some(Position::new(partition.parse().ok()?, offset.parse().ok()?))
}

/// A decoded record of `waymark.events`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Where it is in `waymark.events`.
    pub position: Position,
    /// The input record it was resolved from ([`record_source`]).
    pub source: Option<Position>,
    /// The event, shared with the other runners of the process that read
    /// the same record ([`crate::decode`]).
    pub event: Arc<Event>,
}

impl Decoded {
    /// Applies it to `row` through `fold` ([`Tracked::apply_from`]).
    pub fn apply_to<F: Fold>(
        &self,
        row: &mut Tracked<F::State>,
        fold: &F,
        window: chrono::Duration,
    ) -> ApplyOutcome {
        row.apply_from(fold, &self.event, self.position, self.source, window)
    }
}

/// Decodes the records of a batch of `waymark.events` with
/// [`decode_event`], in order; the records that are no event go to
/// `rejected` by index in the batch. Inside a runner each record is
/// decoded once for all runners of the process ([`crate::decode`]).
pub fn decode_events(records: &[Record], rejected: &mut Vec<(usize, Rejection)>) -> Vec<Decoded> {
    decode_indexed(records, rejected)
        .into_iter()
        .map(|(_, decoded)| decoded)
        .collect()
}

/// [`decode_events`], each event with its index in the batch.
pub fn decode_indexed(
    records: &[Record],
    rejected: &mut Vec<(usize, Rejection)>,
) -> Vec<(usize, Decoded)> {
    let mut events = Vec::with_capacity(records.len());
    let results = crate::decode::decode_all(records);
    for (i, (record, result)) in records.iter().zip(results).enumerate() {
        match result {
            Ok(event) => events.push((
                i,
                Decoded {
                    position: Position::new(record.partition, record.offset),
                    source: record_source(record),
                    event,
                },
            )),
            Err(rejection) => rejected.push((i, rejection)),
        }
    }
    events
}

/// Decodes a record of `waymark.events`: a canonical event with a person id.
pub fn decode_event(record: &Record) -> Result<Event, Rejection> {
    let value = record
        .value
        .as_deref()
        .ok_or_else(|| Rejection::new(RejectKind::MalformedJson, "record has no value"))?;
    if value.len() > waymark_schemas::MAX_EVENT_BYTES {
        return Err(Rejection::new(
            RejectKind::TooLarge,
            format!(
                "event is {} bytes, more than {}",
                value.len(),
                waymark_schemas::MAX_EVENT_BYTES
            ),
        ));
    }
    let event = Event::from_json(value)?;
    if event.person_id.is_none() {
        return Err(Rejection::new(
            RejectKind::InvalidEnvelope,
            "events on the resolved topic must carry person_id",
        ));
    }
    Ok(event)
}
