//! The projection-store seam: batch reads and atomic batch writes of
//! projection rows together with consumer positions.
//!
//! Implemented by the embedded store of `waymark dev` (`waymark-embedded`)
//! and by the CQL store for ScyllaDB/Cassandra. Rows are opaque bytes keyed
//! by string within a named table; the runtime encodes them.

use std::collections::BTreeMap;

use async_trait::async_trait;

/// One row write: `value: None` deletes the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowWrite {
    /// Table name, e.g. `journey_v1`.
    pub table: String,
    /// Row key.
    pub key: String,
    /// New value, or `None` to delete.
    pub value: Option<Vec<u8>>,
    /// A number that grows with every write of this row (the log offset it
    /// reflects, + 1), when the writer has one. Stores that cannot write a
    /// batch atomically use it so that a late, redelivered write never
    /// overwrites a newer one (e.g. CQL `USING TIMESTAMP`); `None` means
    /// the store's own clock decides.
    pub order: Option<u64>,
}

/// The next offset a consumer reads from one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionWrite {
    /// Consumer id: processor and projection version, e.g. `journey.v1`.
    pub consumer: String,
    /// Input topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The next offset to read (last applied + 1).
    pub next_offset: u64,
}

/// Rows and positions written together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// Row writes.
    pub rows: Vec<RowWrite>,
    /// Consumer positions the rows reflect.
    pub positions: Vec<PositionWrite>,
}

impl WriteBatch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.positions.is_empty()
    }
}

/// A store error. Every store error is retryable unless it says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or failed to persist.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The table does not exist.
    #[error("unknown table {0}")]
    UnknownTable(String),
    /// A stored row could not be decoded (not retryable).
    #[error("corrupt row {key} in {table}: {reason}")]
    Corrupt {
        /// Table.
        table: String,
        /// Row key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The store refused a write or read as it is (a mutation over its size
    /// limit, a statement it rejects); not retryable: the same request
    /// would be refused again.
    #[error("store refused {table}: {reason}")]
    Refused {
        /// Table.
        table: String,
        /// The store's answer.
        reason: String,
    },
    /// A stored row was written with another state encoding than the one
    /// this build reads (see [`crate::row`]); not retryable: the projection
    /// version has to be rebuilt.
    #[error(
        "row {key} in {table} was stored with {}, this build reads state encoding {expected}: \
         raise the processor's projection_version in topology.yaml to rebuild it from the log",
        found.map_or_else(|| "no state encoding (an older Waymark)".to_owned(), |f| format!("state encoding {f}"))
    )]
    Encoding {
        /// Table.
        table: String,
        /// Row key.
        key: String,
        /// The encoding the row carries; `None` without a row header.
        found: Option<u32>,
        /// The encoding this build reads.
        expected: u32,
    },
}

impl StoreError {
    /// Whether retrying the same request can help (everything but a
    /// corrupt row, another state encoding and a refusal).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            StoreError::Corrupt { .. } | StoreError::Encoding { .. } | StoreError::Refused { .. }
        )
    }
}

/// A projection store.
#[async_trait]
pub trait ProjectionStore: Send + Sync + 'static {
    /// Creates the tables that are missing.
    async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError>;

    /// Reads rows by key, in the order of `keys`.
    async fn get_many(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError>;

    /// Reads one row.
    async fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut rows = self.get_many(table, &[key.to_owned()]).await?;
        Ok(rows.pop().flatten())
    }

    /// Writes rows and positions. On the embedded store the whole batch is
    /// one atomic, durable transaction; stores that cannot do that keep every
    /// row idempotent under redelivery (rows record the log position they
    /// reflect) and write positions only after the rows.
    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// Writes a batch whose effects are all in the store (no output record
    /// or dead letter was written for it), atomically, but possibly not
    /// durably yet: a crash may lose it, together with its positions, and
    /// the runner then simply applies the same records again. Stores that
    /// commit durably anyway keep the default, [`ProjectionStore::write`].
    async fn write_replayable(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write(batch).await
    }

    /// Writes `value` under `key` of `table`, durably, if the stored value
    /// is `expected` (`None`: no row); returns whether it wrote. Atomic
    /// against every other `compare_and_set` of the key, from any process
    /// (a lightweight transaction on CQL). A key written this way is
    /// written only this way (the projection catalog).
    async fn compare_and_set(
        &self,
        table: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError>;

    /// The stored next-offsets of `consumer` on `topic`, by partition.
    async fn positions(
        &self,
        consumer: &str,
        topic: &str,
    ) -> Result<BTreeMap<u32, u64>, StoreError>;

    /// Reads up to `limit` rows of `table` after the row keyed `after`
    /// (from the start when `None`), in the store's scan order (key order on
    /// the embedded store, token order on CQL). Used by `verify`.
    async fn scan(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Drops `tables` and frees their storage; missing tables are fine.
    async fn drop_tables(&self, tables: &[String]) -> Result<(), StoreError>;

    /// Forgets every stored position of `consumer` on `topic`.
    async fn delete_positions(&self, consumer: &str, topic: &str) -> Result<(), StoreError>;

    /// Bytes stored in `table`, when the store can tell.
    async fn stored_bytes(&self, table: &str) -> Result<Option<u64>, StoreError> {
        let _ = table;
        Ok(None)
    }

    /// How many bytes of rows each runner should cache in front of this
    /// store ([`crate::cache::RowCache`]), reads and deferred writes; 0,
    /// the default, for none (every batch read from and written to the
    /// store). Both of Waymark's stores answer a budget: the CQL store its
    /// configured one, the embedded store a smaller one that fits
    /// `waymark dev`'s memory bound.
    fn runner_cache_bytes(&self) -> usize {
        0
    }

    /// Whether several processes may write the same rows at once (CQL,
    /// where every member of a consumer group writes the one store): a
    /// handler whose rows are not owned by one input partition must then
    /// change them by [`ProjectionStore::compare_and_set`]. `false`, the
    /// default, for a store only this process writes (`waymark dev`), where
    /// one atomic [`ProjectionStore::write`] per batch is enough.
    fn written_by_several_processes(&self) -> bool {
        false
    }
}
