//! A runner's row cache: the rows of the partitions a runner owns, kept in
//! memory in front of the projection store, so that folding a batch reads
//! only the rows it has not seen yet, and (write-back) so that a row
//! changed by many batches is written once per flush instead of once per
//! batch — Kafka Streams' record cache and `commit.interval.ms`.
//!
//! # Why it is correct
//! A [`RowCache`] is only put in front of the store for a handler whose
//! rows are keyed by the input's partitioning key
//! ([`crate::Handler::rows_follow_partitioning`]: every fold keys its rows
//! by person id, and `waymark.events` is partitioned by person id). Such a
//! row is written only by the runner that owns its partition, so what the
//! runner last wrote or read is what the store holds, until the partition
//! moves. The runner therefore:
//! - writes what it deferred and clears the cache on every assignment
//!   change (a partition it gets back may have been written by another
//!   member meanwhile);
//! - caches a written-through row only after the store acknowledged its
//!   write, and clears the cache when such a write fails (the store may
//!   hold part of the batch).
//!
//! # Write-back
//! A batch whose effects are all in the store (no output, no dead letter:
//! what [`crate::ProjectionStore::write_replayable`] is for) may be
//! *deferred* ([`RowCache::defer`]): its rows become dirty entries of the
//! cache, which later batches read, and its positions are kept with them.
//! [`RowCache::flush`] writes every dirty row and the positions they
//! reflect in one store batch, so rows and positions still reach the store
//! together and a crash before a flush only means the same records are
//! applied again from the stored positions, as after a crash before a
//! replayable write. Dirty entries are never evicted; a failed flush keeps
//! them (they are what the store must end up holding, and every row write
//! carries its order) and a later flush writes them again. The runner
//! flushes when it has nothing more to read, when the oldest deferred
//! batch is older than its commit interval, when the dirty bytes reach
//! their budget, before anything else is written, before an assignment
//! change and on shutdown; a flush the store refuses for good makes it
//! discard the deferred rows and read its partitions again from the
//! stored positions, writing through ([`crate::runner`]).
//!
//! Only the handler's own tables are cached; everything else read through
//! the cache (the projection catalog, hand-off markers), which other
//! processes write, is always read from the store.
//!
//! Absent rows are cached too (a rebuild into empty tables reads each key
//! once). Rows are kept as the stored bytes; the cache is bounded in bytes
//! and evicts the least recently used quarter of its clean entries when it
//! is full.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;

use crate::store::{PositionWrite, ProjectionStore, RowWrite, StoreError, WriteBatch};

/// Bytes an entry costs besides its key and value (map slots, strings).
const ENTRY_OVERHEAD: usize = 64;

struct Entry {
    value: Option<Vec<u8>>,
    last_used: u64,
    /// `Some(order)` while the entry is a deferred write not yet in the
    /// store ([`RowWrite::order`]).
    dirty: Option<Option<u64>>,
}

impl Entry {
    fn cost(&self, key: &str) -> usize {
        key.len() + self.value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD
    }
}

/// A deferred position: (consumer, topic, partition) → next offset.
type PositionKey = (String, String, u32);

#[derive(Default)]
struct State {
    tables: HashMap<String, HashMap<String, Entry>>,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
    /// Bytes of the dirty entries.
    dirty_bytes: usize,
    /// Dirty entries.
    dirty_rows: usize,
    /// When the oldest deferred batch not yet flushed was deferred.
    dirty_since: Option<Instant>,
    /// Positions of the deferred batches.
    positions: BTreeMap<PositionKey, u64>,
}

impl State {
    fn insert(
        &mut self,
        table: &str,
        key: String,
        value: Option<Vec<u8>>,
        dirty: Option<Option<u64>>,
    ) {
        self.clock += 1;
        let entry = Entry {
            value,
            last_used: self.clock,
            dirty,
        };
        let cost = entry.cost(&key);
        self.bytes += cost;
        if entry.dirty.is_some() {
            self.dirty_bytes += cost;
            self.dirty_rows += 1;
        }
        let rows = self.tables.entry(table.to_owned()).or_default();
        if let Some(old) = rows.insert(key.clone(), entry) {
            let old_cost = old.cost(&key);
            self.bytes -= old_cost;
            if old.dirty.is_some() {
                self.dirty_bytes -= old_cost;
                self.dirty_rows -= 1;
            }
        }
    }

    fn has_deferred(&self) -> bool {
        self.dirty_rows > 0 || !self.positions.is_empty()
    }

    /// Forgets every entry, dirty ones too.
    fn clear(&mut self) {
        self.tables.clear();
        self.bytes = 0;
        self.dirty_bytes = 0;
        self.dirty_rows = 0;
        self.dirty_since = None;
        self.positions.clear();
    }

    /// Evicts the least recently used clean entries until at most 3/4 of
    /// `budget` is used (or only dirty entries are left).
    fn shrink(&mut self, budget: usize) {
        if self.bytes <= budget {
            return;
        }
        // Drop the oldest clean entries until under 3/4 of the budget:
        // find the age threshold by walking them oldest first.
        let goal = budget / 4 * 3;
        let mut costs: BTreeMap<u64, usize> = BTreeMap::new();
        for rows in self.tables.values() {
            for (key, e) in rows.iter().filter(|(_, e)| e.dirty.is_none()) {
                *costs.entry(e.last_used).or_default() += e.cost(key);
            }
        }
        let mut bytes = self.bytes;
        let mut threshold = 0;
        for (age, cost) in costs {
            if bytes <= goal {
                break;
            }
            bytes -= cost;
            threshold = age;
        }
        for rows in self.tables.values_mut() {
            rows.retain(|_, e| e.dirty.is_some() || e.last_used > threshold);
        }
        self.bytes = bytes;
    }
}

/// A bounded cache of rows in front of `inner`, for one runner (see the
/// module docs for when it is correct).
pub struct RowCache {
    inner: Arc<dyn ProjectionStore>,
    /// The runner's own tables: the only ones cached. Every other table
    /// (the projection catalog, hand-off markers) is written by others and
    /// always read from the store.
    tables: HashSet<String>,
    budget: usize,
    state: Mutex<State>,
}

impl RowCache {
    /// A cache of at most about `budget` bytes of clean rows of `tables`
    /// in front of `inner` (dirty rows are bounded by the runner, which
    /// flushes them at its own budget).
    pub fn new(inner: Arc<dyn ProjectionStore>, tables: Vec<String>, budget: usize) -> Self {
        Self {
            inner,
            tables: tables.into_iter().collect(),
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every row, deferred ones too (on an assignment change, after
    /// a [`RowCache::flush`]; or to give up what a refused flush held).
    pub fn clear(&self) {
        self.state().clear();
    }

    /// Forgets the clean rows of `head` (rows keyed `head` or
    /// `head/...`), so they are read from the store again: before the
    /// records of a parked key are applied again, the store may hold rows
    /// an operator mended. Deferred rows stay until they are written.
    pub fn forget(&self, head: &str) {
        let mut s = self.state();
        let prefix = format!("{head}/");
        let mut freed = 0;
        for rows in s.tables.values_mut() {
            rows.retain(|key, e| {
                let keep = e.dirty.is_some() || (key != head && !key.starts_with(&prefix));
                if !keep {
                    freed += e.cost(key);
                }
                keep
            });
        }
        s.bytes -= freed;
    }

    /// (hits, misses) of reads so far.
    pub fn hits_misses(&self) -> (u64, u64) {
        let s = self.state();
        (s.hits, s.misses)
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }

    /// Bytes of the deferred rows not yet flushed.
    pub fn dirty_bytes(&self) -> usize {
        self.state().dirty_bytes
    }

    /// When the oldest batch not yet flushed was deferred; `None` when
    /// nothing is deferred.
    pub fn dirty_since(&self) -> Option<Instant> {
        let s = self.state();
        if s.has_deferred() {
            s.dirty_since
        } else {
            None
        }
    }

    /// Whether deferred rows or positions wait for a flush.
    pub fn has_deferred(&self) -> bool {
        self.state().has_deferred()
    }

    /// Takes `batch` as a deferred write: its rows become dirty entries that
    /// reads see at once, its positions are kept with them, and both reach
    /// the store with the next [`RowCache::flush`]. Only for a batch whose
    /// effects are all in the store (see
    /// [`ProjectionStore::write_replayable`]); a batch with a row of a
    /// table the cache does not hold is handed back, to be written through.
    pub fn defer(&self, batch: WriteBatch) -> Result<(), WriteBatch> {
        if batch.rows.iter().any(|r| !self.tables.contains(&r.table)) {
            return Err(batch);
        }
        let mut s = self.state();
        if !s.has_deferred() {
            s.dirty_since = Some(Instant::now());
        }
        for row in batch.rows {
            s.insert(&row.table, row.key, row.value, Some(row.order));
        }
        for p in batch.positions {
            let e = s
                .positions
                .entry((p.consumer, p.topic, p.partition))
                .or_insert(p.next_offset);
            *e = (*e).max(p.next_offset);
        }
        s.shrink(self.budget);
        Ok(())
    }

    /// Writes every deferred row and the positions they reflect in one
    /// (replayable) store batch; returns how many rows and the positions
    /// it wrote. On failure everything deferred stays deferred: a later
    /// flush writes it again (the caller decides, for an error that is not
    /// retryable, to [`RowCache::clear`] it and apply its records again).
    pub async fn flush(&self) -> Result<(usize, Vec<PositionWrite>), StoreError> {
        let batch = {
            let s = self.state();
            if !s.has_deferred() {
                return Ok((0, Vec::new()));
            }
            let mut rows = Vec::with_capacity(s.dirty_rows);
            for (table, entries) in &s.tables {
                for (key, e) in entries {
                    if let Some(order) = e.dirty {
                        rows.push(RowWrite {
                            table: table.clone(),
                            key: key.clone(),
                            value: e.value.clone(),
                            order,
                        });
                    }
                }
            }
            WriteBatch {
                rows,
                positions: s
                    .positions
                    .iter()
                    .map(|((consumer, topic, partition), next)| PositionWrite {
                        consumer: consumer.clone(),
                        topic: topic.clone(),
                        partition: *partition,
                        next_offset: *next,
                    })
                    .collect(),
            }
        };
        let rows = batch.rows.len();
        let positions = batch.positions.clone();
        self.inner.write_replayable(batch).await?;
        // The runner defers nothing while a flush is in flight, so what was
        // written is exactly what is dirty now.
        let mut s = self.state();
        for entries in s.tables.values_mut() {
            for e in entries.values_mut() {
                e.dirty = None;
            }
        }
        s.dirty_bytes = 0;
        s.dirty_rows = 0;
        s.dirty_since = None;
        s.positions.clear();
        let budget = self.budget;
        s.shrink(budget);
        Ok((rows, positions))
    }

    async fn write_through(&self, batch: WriteBatch, replayable: bool) -> Result<(), StoreError> {
        // What was deferred reaches the store before anything written
        // after it.
        self.flush().await?;
        // The written values, cached once the store has them.
        let rows: Vec<(String, String, Option<Vec<u8>>)> = batch
            .rows
            .iter()
            .filter(|r| self.tables.contains(&r.table))
            .map(|r| (r.table.clone(), r.key.clone(), r.value.clone()))
            .collect();
        let written = if replayable {
            self.inner.write_replayable(batch).await
        } else {
            self.inner.write(batch).await
        };
        let mut s = self.state();
        match written {
            Ok(()) => {
                for (table, key, value) in rows {
                    s.insert(&table, key, value, None);
                }
                s.shrink(self.budget);
                Ok(())
            }
            Err(e) => {
                // The store may hold any part of the batch now (nothing is
                // deferred: the flush above wrote it).
                s.clear();
                Err(e)
            }
        }
    }
}

#[async_trait]
impl ProjectionStore for RowCache {
    async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        self.inner.ensure_tables(tables).await
    }

    async fn get_many(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if !self.tables.contains(table) {
            return self.inner.get_many(table, keys).await;
        }
        let mut out: Vec<Option<Option<Vec<u8>>>> = Vec::with_capacity(keys.len());
        let mut missing: Vec<String> = Vec::new();
        {
            let mut s = self.state();
            s.clock += 1;
            let clock = s.clock;
            let mut hits = 0;
            if let Some(rows) = s.tables.get_mut(table) {
                for key in keys {
                    match rows.get_mut(key) {
                        Some(e) => {
                            e.last_used = clock;
                            hits += 1;
                            out.push(Some(e.value.clone()));
                        }
                        None => {
                            missing.push(key.clone());
                            out.push(None);
                        }
                    }
                }
            } else {
                missing.extend(keys.iter().cloned());
                out.extend(keys.iter().map(|_| None));
            }
            s.hits += hits;
            s.misses += missing.len() as u64;
        }
        if missing.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let loaded = self.inner.get_many(table, &missing).await?;
        let mut loaded_by_key: HashMap<&str, Option<Vec<u8>>> = HashMap::new();
        {
            let mut s = self.state();
            for (key, value) in missing.iter().zip(loaded) {
                s.insert(table, key.clone(), value.clone(), None);
                loaded_by_key.insert(key.as_str(), value);
            }
            s.shrink(self.budget);
        }
        Ok(keys
            .iter()
            .zip(out)
            .map(|(key, cached)| match cached {
                Some(value) => value,
                None => loaded_by_key.get(key.as_str()).cloned().flatten(),
            })
            .collect())
    }

    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write_through(batch, false).await
    }

    async fn write_replayable(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write_through(batch, true).await
    }

    async fn compare_and_set(
        &self,
        table: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        // Never a cached table (the runner writes those only by batch);
        // forget the row anyway should it be one.
        if self.tables.contains(table) {
            self.flush().await?;
            self.state().clear();
        }
        self.inner
            .compare_and_set(table, key, expected, value)
            .await
    }

    async fn positions(
        &self,
        consumer: &str,
        topic: &str,
    ) -> Result<BTreeMap<u32, u64>, StoreError> {
        self.inner.positions(consumer, topic).await
    }

    async fn scan(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan(table, after, limit).await
    }

    async fn drop_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        {
            let mut s = self.state();
            for t in tables {
                s.tables.remove(t);
            }
            s.bytes = s
                .tables
                .values()
                .flat_map(|rows| rows.iter().map(|(k, e)| e.cost(k)))
                .sum();
            let dirty: Vec<usize> = s
                .tables
                .values()
                .flat_map(|rows| rows.iter().filter(|(_, e)| e.dirty.is_some()))
                .map(|(k, e)| e.cost(k))
                .collect();
            s.dirty_rows = dirty.len();
            s.dirty_bytes = dirty.iter().sum();
        }
        self.inner.drop_tables(tables).await
    }

    async fn delete_positions(&self, consumer: &str, topic: &str) -> Result<(), StoreError> {
        self.inner.delete_positions(consumer, topic).await
    }

    async fn stored_bytes(&self, table: &str) -> Result<Option<u64>, StoreError> {
        self.inner.stored_bytes(table).await
    }

    fn runner_cache_bytes(&self) -> usize {
        0
    }

    fn written_by_several_processes(&self) -> bool {
        self.inner.written_by_several_processes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::store::RowWrite;

    fn put(table: &str, key: &str, value: &[u8]) -> WriteBatch {
        WriteBatch {
            rows: vec![RowWrite {
                table: table.into(),
                key: key.into(),
                value: Some(value.to_vec()),
                order: None,
            }],
            positions: Vec::new(),
        }
    }

    async fn setup(budget: usize) -> (MemoryStore, RowCache) {
        let store = MemoryStore::new();
        store
            .ensure_tables(&["mine".to_owned(), "other".to_owned()])
            .await
            .unwrap();
        let cache = RowCache::new(Arc::new(store.clone()), vec!["mine".to_owned()], budget);
        (store, cache)
    }

    #[tokio::test]
    async fn reads_each_row_once_and_writes_through() {
        let (store, cache) = setup(1 << 20).await;
        store.write(put("mine", "a", b"1")).await.unwrap();
        let keys = ["a".to_owned(), "b".to_owned()];
        assert_eq!(
            cache.get_many("mine", &keys).await.unwrap(),
            [Some(b"1".to_vec()), None]
        );
        assert_eq!(cache.hits_misses(), (0, 2));
        // Absent rows are cached too; written rows are what the store holds.
        cache.write(put("mine", "b", b"2")).await.unwrap();
        assert_eq!(
            cache.get_many("mine", &keys).await.unwrap(),
            [Some(b"1".to_vec()), Some(b"2".to_vec())]
        );
        assert_eq!(cache.hits_misses(), (2, 2));
        assert_eq!(store.get("mine", "b").await.unwrap(), Some(b"2".to_vec()));
        // Tables it does not own are always read from the store.
        store.write(put("other", "x", b"9")).await.unwrap();
        cache.get("other", "x").await.unwrap();
        store.write(put("other", "x", b"10")).await.unwrap();
        assert_eq!(cache.get("other", "x").await.unwrap(), Some(b"10".to_vec()));
    }

    #[tokio::test]
    async fn a_failed_write_or_a_clear_forgets_everything() {
        let (store, cache) = setup(1 << 20).await;
        cache.get("mine", "a").await.unwrap();
        store.fail_next_writes(1);
        assert!(cache.write(put("mine", "a", b"1")).await.is_err());
        assert_eq!(cache.bytes(), 0);
        // Another member wrote the row meanwhile: after a clear it is read.
        cache.get("mine", "a").await.unwrap();
        store.write(put("mine", "a", b"theirs")).await.unwrap();
        cache.clear();
        assert_eq!(
            cache.get("mine", "a").await.unwrap(),
            Some(b"theirs".to_vec())
        );
    }

    #[tokio::test]
    async fn stays_within_its_byte_budget() {
        let budget = 64 * 1024;
        let (_store, cache) = setup(budget).await;
        for i in 0..1_000 {
            cache
                .write(put("mine", &format!("k{i}"), &[0u8; 512]))
                .await
                .unwrap();
            assert!(cache.bytes() <= budget, "{} bytes", cache.bytes());
        }
        assert!(cache.bytes() > budget / 2);
        // Evicted rows are read again from the store, unchanged.
        assert_eq!(cache.get("mine", "k0").await.unwrap(), Some(vec![0u8; 512]));
    }

    fn position(next_offset: u64) -> PositionWrite {
        PositionWrite {
            consumer: "c".into(),
            topic: "t".into(),
            partition: 0,
            next_offset,
        }
    }

    fn deferred(key: &str, value: &[u8], next_offset: u64) -> WriteBatch {
        let mut batch = put("mine", key, value);
        batch.rows[0].order = Some(next_offset);
        batch.positions.push(position(next_offset));
        batch
    }

    #[tokio::test]
    async fn deferred_rows_are_read_back_and_written_once_with_their_positions() {
        let (store, cache) = setup(1 << 20).await;
        for (i, value) in [b"1", b"2", b"3"].iter().enumerate() {
            cache.defer(deferred("a", *value, i as u64 + 1)).unwrap();
        }
        cache.defer(deferred("b", b"x", 4)).unwrap();
        assert_eq!(store.writes(), 0);
        assert!(cache.has_deferred() && cache.dirty_since().is_some());
        assert_eq!(cache.get("mine", "a").await.unwrap(), Some(b"3".to_vec()));
        let (rows, positions) = cache.flush().await.unwrap();
        assert_eq!((rows, positions), (2, vec![position(4)]));
        assert_eq!(store.writes(), 1);
        assert_eq!(store.get("mine", "a").await.unwrap(), Some(b"3".to_vec()));
        assert_eq!(store.positions("c", "t").await.unwrap(), [(0, 4)].into());
        assert!(!cache.has_deferred() && cache.dirty_bytes() == 0);
        // Nothing left to write: no store write at all.
        assert_eq!(cache.flush().await.unwrap(), (0, Vec::new()));
        assert_eq!(store.writes(), 1);
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_what_was_deferred() {
        let (store, cache) = setup(1 << 20).await;
        cache.defer(deferred("a", b"1", 1)).unwrap();
        store.fail_next_writes(1);
        assert!(cache.flush().await.is_err());
        assert!(cache.has_deferred());
        assert_eq!(cache.get("mine", "a").await.unwrap(), Some(b"1".to_vec()));
        cache.flush().await.unwrap();
        assert_eq!(store.get("mine", "a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.positions("c", "t").await.unwrap(), [(0, 1)].into());
    }

    #[tokio::test]
    async fn writes_through_come_after_what_was_deferred() {
        let (store, cache) = setup(1 << 20).await;
        cache.defer(deferred("a", b"1", 1)).unwrap();
        // A batch with a row of a table the cache does not hold is handed
        // back to be written through, which writes the deferred rows first.
        let other = put("other", "x", b"9");
        let back = cache.defer(other.clone()).unwrap_err();
        assert_eq!(back, other);
        cache.write(back).await.unwrap();
        assert_eq!(store.writes(), 2);
        assert_eq!(store.get("mine", "a").await.unwrap(), Some(b"1".to_vec()));
        assert!(!cache.has_deferred());
    }

    #[tokio::test]
    async fn deferred_rows_are_never_evicted() {
        let budget = 16 * 1024;
        let (store, cache) = setup(budget).await;
        for i in 0..200 {
            cache
                .defer(deferred(&format!("k{i}"), &[1u8; 512], i + 1))
                .unwrap();
        }
        // Far over the budget, all of it still there to be written.
        assert!(cache.dirty_bytes() > budget);
        assert_eq!(cache.get("mine", "k0").await.unwrap(), Some(vec![1u8; 512]));
        let (rows, _) = cache.flush().await.unwrap();
        assert_eq!(rows, 200);
        assert_eq!(store.rows("mine").len(), 200);
        // Once written they are clean, and the cache shrinks to its budget.
        assert!(cache.bytes() <= budget, "{} bytes", cache.bytes());
    }

    #[tokio::test]
    async fn a_forgotten_head_is_read_from_the_store_again() {
        let (store, cache) = setup(1 << 20).await;
        for key in ["p", "p/1", "q"] {
            cache.write(put("mine", key, b"old")).await.unwrap();
        }
        cache.defer(deferred("p/2", b"mine", 1)).unwrap();
        // An operator mends the rows of `p` in the store.
        for key in ["p", "p/1"] {
            store.write(put("mine", key, b"mended")).await.unwrap();
        }
        cache.forget("p");
        let keys: Vec<String> = ["p", "p/1", "p/2", "q"].map(String::from).to_vec();
        assert_eq!(
            cache.get_many("mine", &keys).await.unwrap(),
            [
                Some(b"mended".to_vec()),
                Some(b"mended".to_vec()),
                Some(b"mine".to_vec()), // deferred: kept until written
                Some(b"old".to_vec()),
            ]
        );
    }
}
