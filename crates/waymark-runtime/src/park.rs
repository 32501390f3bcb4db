//! Parked keys: a key's records held back, in order, after one of them
//! failed for good, while every other key keeps flowing (Axon's sequenced
//! dead letters, KurrentDB's parked messages).
//!
//! # What parks
//! A batch that fails with a *permanent* error (a stored row that cannot be
//! read, a write the store refuses: the runner's permanent failure kinds,
//! see [`StoreError::is_retryable`]) is not retried as it is. The runner
//! applies it again in halves, each half written and committed before the
//! next, until the failing record stands alone. Then:
//! - for a handler whose rows follow the input's partitioning (every fold:
//!   rows keyed by person id, the key of `waymark.events`), the record's
//!   **key is parked**: the record is stored in the version's parked table
//!   with the reason, the position past it is committed, and every later
//!   record of that key is stored there too, in log order, instead of
//!   handled. The person's state stays exactly as it was before the failing
//!   event; every other person is applied as usual.
//! - for any other handler (identity, whose rows are shared across keys, so
//!   holding one key back would not keep what depends on it in order) the
//!   record becomes a **dead letter** of kind `processing_failed`, which
//!   `waymark dlq replay` can publish again once the cause is fixed.
//!
//! A permanent error that more than [`MAX_ISOLATED_PER_BATCH`] records of
//! one batch hit is not any record's fault (a schema the store refuses for
//! every row): the runner backs off and retries that record, like a
//! transient error, and reports the partition as failing
//! ([`crate::status`]).
//!
//! # Retry and skip
//! An operator lists parked keys (`Admin.ListParked`, `waymark parked`) and
//! asks for a retry (after a fix, e.g. a new build or a raised limit) or a
//! skip (`Admin.RetryParked`, `waymark parked retry|skip`). The request is a
//! row of the parked table; the runner that owns the key's partition reads
//! it within a second and applies the parked records **in their original
//! order** through the handler, as one batch per [`RESUME_CHUNK`] records,
//! deleting each chunk from the parked table in the same write. If they
//! fail again the key stays parked with its retry count and the last error.
//! A skip first turns the oldest parked record (the one that failed) into a
//! dead letter of kind `processing_failed`, then retries the rest. Once
//! nothing is left the key is no longer parked and its new records are
//! handled again. A retry's side effects (outputs, dead letters) are written
//! by the version whose they are ([`crate::catalog::VersionGate`]), like any
//! other batch's.
//!
//! # Layout
//! Table [`parked_table`] of each projection version (`<processor>_v<n>_parked`,
//! a suffix no processor may use), rows of state encoding
//! [`PARKED_ENCODING`] ([`crate::row`]):
//! - `h/<key hex>`: the [`ParkedKey`];
//! - `e/<key hex>/<seq, 20 digits>`: each parked record ([`ParkedRecord`]);
//! - `r/<key hex>`: an operator's pending [`ParkRequest`].
//!
//! Parking is written in the same [`WriteBatch`] as the batch's rows and
//! positions, so on the embedded store a record is parked exactly when the
//! position past it is stored.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::log::Record;
use crate::plugin::table_name;
use crate::row::{decode_row, encode_row};
use crate::store::{ProjectionStore, RowWrite, StoreError, WriteBatch};

/// The table suffix of parked keys (reserved: no processor table may use it).
pub const PARKED_SUFFIX: &str = "parked";

/// The state encoding of the parked table's rows.
pub const PARKED_ENCODING: u32 = 1;

/// Most records of one batch a permanent error is blamed on (parked or
/// dead-lettered) before it is taken for a fault of the whole processor and
/// retried instead.
pub const MAX_ISOLATED_PER_BATCH: usize = 8;

/// Most parked records applied by one write when a key is resumed.
pub const RESUME_CHUNK: u64 = 500;

/// The parked table of version `version` of `processor`.
pub fn parked_table(processor: &str, version: u32) -> String {
    table_name(processor, version, PARKED_SUFFIX)
}

/// A parked key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedKey {
    /// The record key (a person id on `waymark.events`).
    pub key: Vec<u8>,
    /// Its partition of the input topic.
    pub partition: u32,
    /// Offset of the record that failed.
    pub offset: u64,
    /// Why it failed.
    pub reason: String,
    /// When it was parked, ms since the Unix epoch.
    pub parked_at_ms: i64,
    /// Sequence number of the oldest parked record.
    pub first_seq: u64,
    /// Sequence number the next parked record gets.
    pub next_seq: u64,
    /// Retries that failed.
    pub retries: u32,
    /// The error of the last failed retry.
    pub last_error: Option<String>,
}

impl ParkedKey {
    /// Records parked now.
    pub fn count(&self) -> u64 {
        self.next_seq.saturating_sub(self.first_seq)
    }
}

/// A parked record: everything the handler needs to apply it later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedRecord {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Append time, ms since the Unix epoch.
    pub timestamp_ms: i64,
}

impl From<&Record> for ParkedRecord {
    fn from(r: &Record) -> Self {
        Self {
            partition: r.partition,
            offset: r.offset,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
            timestamp_ms: r.timestamp_ms,
        }
    }
}

impl From<ParkedRecord> for Record {
    fn from(r: ParkedRecord) -> Self {
        Self {
            partition: r.partition,
            offset: r.offset,
            key: r.key,
            value: r.value,
            headers: r.headers,
            timestamp_ms: r.timestamp_ms,
        }
    }
}

/// What an operator asks for a parked key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParkAction {
    /// Apply the parked records again, in order.
    Retry,
    /// Dead-letter the oldest parked record, then retry the rest.
    Skip,
}

/// An operator's pending request for one parked key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkRequest {
    /// What to do.
    pub action: ParkAction,
    /// When it was asked, ms since the Unix epoch.
    pub requested_at_ms: i64,
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A key as operators see and type it: the key itself when it is UTF-8
/// (and does not start with `hex:`), otherwise `hex:` and its bytes in hex.
pub fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.starts_with("hex:") => text.to_owned(),
        _ => format!("hex:{}", hex(key)),
    }
}

/// The key [`key_text`] printed as `text`; `None` for a malformed `hex:`.
pub fn parse_key_text(text: &str) -> Option<Vec<u8>> {
    match text.strip_prefix("hex:") {
        Some(h) => unhex(h),
        None => Some(text.as_bytes().to_vec()),
    }
}

/// Row key of the [`ParkedKey`] of `key`.
pub fn head_row(key: &[u8]) -> String {
    format!("h/{}", hex(key))
}

/// Row key of parked record `seq` of `key`.
pub fn record_row(key: &[u8], seq: u64) -> String {
    format!("e/{}/{seq:020}", hex(key))
}

/// Row key of the pending [`ParkRequest`] of `key`.
pub fn request_row(key: &[u8]) -> String {
    format!("r/{}", hex(key))
}

/// A row of the parked table (always ordered by the store's clock: only
/// the owner of the key's partition writes its heads and records).
pub(crate) fn put(table: &str, key: String, value: Option<Vec<u8>>) -> RowWrite {
    RowWrite {
        table: table.to_owned(),
        key,
        value,
        order: None,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Up to `limit` parked keys of `table` after row `after` (a page token
/// from a previous call; from the start when `None`), with the token of the
/// next page when there may be more.
pub async fn list(
    store: &dyn ProjectionStore,
    table: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<ParkedKey>, Option<String>), StoreError> {
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_owned);
    loop {
        let page = store.scan(table, cursor.as_deref(), 1000).await?;
        let last_page = page.len() < 1000;
        for (row, value) in page {
            cursor = Some(row.clone());
            if row.starts_with("h/") {
                out.push(decode_row(PARKED_ENCODING, table, &row, &value)?);
                if out.len() >= limit {
                    return Ok((out, cursor));
                }
            }
        }
        if last_page {
            return Ok((out, None));
        }
    }
}

/// Every parked key of `table` on `partitions`, by key.
pub(crate) async fn load(
    store: &dyn ProjectionStore,
    table: &str,
    partitions: &[u32],
) -> Result<HashMap<Vec<u8>, ParkedKey>, StoreError> {
    let mut out = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = list(store, table, after.as_deref(), 10_000).await?;
        for head in page {
            if partitions.contains(&head.partition) {
                out.insert(head.key.clone(), head);
            }
        }
        match next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

/// The parked key `key` of `table`, if it is parked.
pub async fn get(
    store: &dyn ProjectionStore,
    table: &str,
    key: &[u8],
) -> Result<Option<ParkedKey>, StoreError> {
    let row = head_row(key);
    match store.get(table, &row).await? {
        Some(bytes) => Ok(Some(decode_row(PARKED_ENCODING, table, &row, &bytes)?)),
        None => Ok(None),
    }
}

/// Asks the runner owning `key` to `action` it; returns the parked key, or
/// `None` (and asks nothing) when it is not parked.
pub async fn request(
    store: &dyn ProjectionStore,
    table: &str,
    key: &[u8],
    action: ParkAction,
) -> Result<Option<ParkedKey>, StoreError> {
    let Some(head) = get(store, table, key).await? else {
        return Ok(None);
    };
    let request = ParkRequest {
        action,
        requested_at_ms: now_ms(),
    };
    store
        .write(WriteBatch {
            rows: vec![put(
                table,
                request_row(key),
                Some(encode_row(PARKED_ENCODING, &request)),
            )],
            positions: Vec::new(),
        })
        .await?;
    Ok(Some(head))
}

/// The pending request of `key`, if any.
pub async fn pending(
    store: &dyn ProjectionStore,
    table: &str,
    key: &[u8],
) -> Result<Option<ParkRequest>, StoreError> {
    let row = request_row(key);
    match store.get(table, &row).await? {
        Some(bytes) => Ok(Some(decode_row(PARKED_ENCODING, table, &row, &bytes)?)),
        None => Ok(None),
    }
}

/// The parked records `seqs` of `key`, in order (missing ones left out).
pub(crate) async fn records(
    store: &dyn ProjectionStore,
    table: &str,
    key: &[u8],
    seqs: std::ops::Range<u64>,
) -> Result<Vec<(u64, Record)>, StoreError> {
    let rows: Vec<String> = seqs.clone().map(|s| record_row(key, s)).collect();
    let values = store.get_many(table, &rows).await?;
    let mut out = Vec::with_capacity(rows.len());
    for ((seq, row), value) in seqs.zip(&rows).zip(values) {
        if let Some(bytes) = value {
            let r: ParkedRecord = decode_row(PARKED_ENCODING, table, row, &bytes)?;
            out.push((seq, r.into()));
        }
    }
    Ok(out)
}

/// The parked keys a runner knows of (those of its partitions), and the
/// rows that park more records.
#[derive(Debug, Default)]
pub(crate) struct Parked {
    heads: HashMap<Vec<u8>, ParkedKey>,
}

/// Heads changed by a batch, applied to [`Parked`] once the batch is
/// written.
pub(crate) type PendingHeads = HashMap<Vec<u8>, Option<ParkedKey>>;

impl Parked {
    pub(crate) fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    pub(crate) fn is_parked(&self, key: Option<&[u8]>) -> bool {
        key.is_some_and(|k| self.heads.contains_key(k))
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&ParkedKey> {
        self.heads.get(key)
    }

    pub(crate) fn keys(&self) -> Vec<Vec<u8>> {
        self.heads.keys().cloned().collect()
    }

    /// Adds what was loaded for newly assigned partitions.
    pub(crate) fn extend(&mut self, loaded: HashMap<Vec<u8>, ParkedKey>) {
        self.heads.extend(loaded);
    }

    /// Forgets the keys of `partitions` (revoked).
    pub(crate) fn forget(&mut self, partitions: &[u32]) {
        self.heads.retain(|_, h| !partitions.contains(&h.partition));
    }

    /// Applies heads written by a batch.
    pub(crate) fn commit(&mut self, pending: PendingHeads) {
        for (key, head) in pending {
            match head {
                Some(h) => self.heads.insert(key, h),
                None => self.heads.remove(&key),
            };
        }
    }

    /// Parked keys known now.
    pub(crate) fn len(&self) -> usize {
        self.heads.len()
    }

    /// The row parking `record` behind its key's parked records (the key
    /// must be parked); `pending` gets the key's new head, whose row
    /// [`head_rows`] writes.
    pub(crate) fn append(
        &self,
        table: &str,
        record: &Record,
        pending: &mut PendingHeads,
    ) -> RowWrite {
        let key = record.key.clone().unwrap_or_default();
        let mut head = match pending.get(&key) {
            Some(Some(h)) => h.clone(),
            _ => self.heads.get(&key).cloned().unwrap_or_else(|| ParkedKey {
                key: key.clone(),
                partition: record.partition,
                offset: record.offset,
                reason: "parked behind an earlier record".to_owned(),
                parked_at_ms: now_ms(),
                first_seq: 0,
                next_seq: 0,
                retries: 0,
                last_error: None,
            }),
        };
        let seq = head.next_seq;
        head.next_seq += 1;
        pending.insert(key.clone(), Some(head));
        put(
            table,
            record_row(&key, seq),
            Some(encode_row(PARKED_ENCODING, &ParkedRecord::from(record))),
        )
    }
}

/// The row parking `record` (whose key is `key`) as the first of its key,
/// because of `reason`; `pending` gets the new head, whose row
/// [`head_rows`] writes.
pub(crate) fn start(
    table: &str,
    record: &Record,
    key: &[u8],
    reason: &str,
    pending: &mut PendingHeads,
) -> RowWrite {
    let head = ParkedKey {
        key: key.to_vec(),
        partition: record.partition,
        offset: record.offset,
        reason: reason.to_owned(),
        parked_at_ms: now_ms(),
        first_seq: 0,
        next_seq: 1,
        retries: 0,
        last_error: None,
    };
    pending.insert(key.to_vec(), Some(head));
    put(
        table,
        record_row(key, 0),
        Some(encode_row(PARKED_ENCODING, &ParkedRecord::from(record))),
    )
}

/// One row per head of `pending`: each written once per batch, so a store
/// without an order within a batch (CQL) cannot keep an older one.
pub(crate) fn head_rows(table: &str, pending: &PendingHeads) -> Vec<RowWrite> {
    pending
        .iter()
        .map(|(key, head)| {
            put(
                table,
                head_row(key),
                head.as_ref().map(|h| encode_row(PARKED_ENCODING, h)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_texts_round_trip() {
        for key in [&b"7d3c"[..], b"", b"hex:abc", &[0xff, 0x00, 0x10]] {
            let text = key_text(key);
            assert_eq!(parse_key_text(&text).as_deref(), Some(key), "{text}");
        }
        assert_eq!(key_text(b"person-1"), "person-1");
        assert_eq!(key_text(&[0xff]), "hex:ff");
        assert_eq!(parse_key_text("hex:f"), None);
        assert_eq!(parse_key_text("hex:zz"), None);
    }

    #[test]
    fn record_rows_sort_by_sequence() {
        let mut rows: Vec<String> = [10, 2, 1000, 0].map(|s| record_row(b"k", s)).to_vec();
        rows.sort();
        assert_eq!(rows, [0, 2, 10, 1000].map(|s| record_row(b"k", s)).to_vec());
    }
}
