//! A runner's row cache: the rows of the partitions a runner owns, kept in
//! memory in front of a remote projection store (CQL), so that folding a
//! batch reads only the rows it has not seen yet.
//!
//! # Why it is correct
//! A [`RowCache`] is only put in front of the store for a handler whose
//! rows are keyed by the input's partitioning key
//! ([`crate::Handler::rows_follow_partitioning`]: every fold keys its rows
//! by person id, and `waymark.events` is partitioned by person id). Such a
//! row is written only by the runner that owns its partition, so what the
//! runner last wrote or read is what the store holds, until the partition
//! moves. The runner therefore:
//! - clears the cache on every assignment change (a partition it gets back
//!   may have been written by another member meanwhile);
//! - caches a row only after the store acknowledged its write, and clears
//!   the cache when a write fails (the store may hold part of the batch).
//!
//! Only the handler's own tables are cached; everything else read through
//! the cache (the projection catalog, hand-off markers), which other
//! processes write, is always read from the store.
//!
//! Absent rows are cached too (a rebuild into empty tables reads each key
//! once). Rows are kept as the stored bytes; the cache is bounded in bytes
//! and evicts the least recently used quarter when it is full.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use crate::store::{ProjectionStore, StoreError, WriteBatch};

/// Bytes an entry costs besides its key and value (map slots, strings).
const ENTRY_OVERHEAD: usize = 64;

struct Entry {
    value: Option<Vec<u8>>,
    last_used: u64,
}

impl Entry {
    fn cost(&self, key: &str) -> usize {
        key.len() + self.value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD
    }
}

#[derive(Default)]
struct State {
    tables: HashMap<String, HashMap<String, Entry>>,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl State {
    fn insert(&mut self, table: &str, key: String, value: Option<Vec<u8>>) {
        self.clock += 1;
        let entry = Entry {
            value,
            last_used: self.clock,
        };
        self.bytes += entry.cost(&key);
        let rows = self.tables.entry(table.to_owned()).or_default();
        if let Some(old) = rows.insert(key.clone(), entry) {
            self.bytes -= old.cost(&key);
        }
    }

    /// Evicts the least recently used entries until at most 3/4 of
    /// `budget` is used.
    fn shrink(&mut self, budget: usize) {
        if self.bytes <= budget {
            return;
        }
        // Drop the oldest entries until under 3/4 of the budget: find the
        // age threshold by walking the entries oldest first.
        let goal = budget / 4 * 3;
        let mut costs: BTreeMap<u64, usize> = BTreeMap::new();
        for rows in self.tables.values() {
            for (key, e) in rows {
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
            rows.retain(|_, e| e.last_used > threshold);
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
    /// A cache of at most about `budget` bytes of rows of `tables` in front
    /// of `inner`.
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

    /// Forgets every row (on an assignment change).
    pub fn clear(&self) {
        let mut s = self.state();
        s.tables.clear();
        s.bytes = 0;
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

    async fn write_through(&self, batch: WriteBatch, replayable: bool) -> Result<(), StoreError> {
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
                    s.insert(&table, key, value);
                }
                s.shrink(self.budget);
                Ok(())
            }
            Err(e) => {
                // The store may hold any part of the batch now.
                s.tables.clear();
                s.bytes = 0;
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
                s.insert(table, key.clone(), value.clone());
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
            let mut s = self.state();
            s.tables.clear();
            s.bytes = 0;
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
}
