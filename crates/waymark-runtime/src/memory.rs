//! An in-memory [`ProjectionStore`]: the deterministic double of the real
//! stores in the runtime's own tests (runner, row cache, catalog, version
//! hand-off), and for processor crates that want to run their handler
//! against a store without IO.
//!
//! It keeps the real stores' contract: a batch is applied atomically
//! (rows and positions together), unknown tables are an error until
//! created, scans are in key order, and `compare_and_set` is atomic.
//! [`MemoryStore::fail_next_writes`] injects outages,
//! [`MemoryStore::refuse_values_over`] refusals (as CQL refuses a mutation
//! over its size limit), and [`MemoryStore::with_runner_cache`] makes
//! runners put a row cache in front of it, as they do in front of the real
//! stores.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use crate::store::{ProjectionStore, StoreError, WriteBatch};

#[derive(Debug, Default)]
struct State {
    tables: HashMap<String, BTreeMap<String, Vec<u8>>>,
    /// (consumer, topic) → partition → next offset.
    positions: BTreeMap<(String, String), BTreeMap<u32, u64>>,
}

/// An in-memory projection store. Cheap to clone; clones share the data.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    failures: Arc<AtomicUsize>,
    writes: Arc<AtomicUsize>,
    /// A write with a row value longer than this is refused.
    refuse_over: Arc<AtomicUsize>,
    shared: bool,
    runner_cache: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            failures: Arc::default(),
            writes: Arc::default(),
            refuse_over: Arc::new(AtomicUsize::new(usize::MAX)),
            shared: false,
            runner_cache: 0,
        }
    }

    /// An empty store that says several processes write it
    /// ([`ProjectionStore::written_by_several_processes`]), as a CQL store
    /// does: handlers then take the path they take on CQL, which tests can
    /// race in one process.
    pub fn shared() -> Self {
        Self {
            shared: true,
            ..Self::new()
        }
    }

    /// Runners cache `bytes` of rows in front of it
    /// ([`ProjectionStore::runner_cache_bytes`]); clones share the data,
    /// not this setting.
    pub fn with_runner_cache(mut self, bytes: usize) -> Self {
        self.runner_cache = bytes;
        self
    }

    /// From now on, a batch with a row value longer than `bytes` is refused
    /// for good ([`StoreError::Refused`]) and changes nothing; `usize::MAX`
    /// takes everything again.
    pub fn refuse_values_over(&self, bytes: usize) {
        self.refuse_over.store(bytes, Ordering::SeqCst);
    }

    /// The next `n` writes (batches and compare-and-sets) fail with
    /// [`StoreError::Unavailable`] and change nothing.
    pub fn fail_next_writes(&self, n: usize) {
        self.failures.store(n, Ordering::SeqCst);
    }

    /// Write calls that changed the store so far.
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// Every row of `table`, in key order (empty when it does not exist).
    pub fn rows(&self, table: &str) -> Vec<(String, Vec<u8>)> {
        self.state()
            .tables
            .get(table)
            .map(|rows| rows.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn injected_failure(&self) -> Result<(), StoreError> {
        let failed = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl ProjectionStore for MemoryStore {
    async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        let mut s = self.state();
        for t in tables {
            s.tables.entry(t.clone()).or_default();
        }
        Ok(())
    }

    async fn get_many(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let s = self.state();
        let rows = s
            .tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        Ok(keys.iter().map(|k| rows.get(k).cloned()).collect())
    }

    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.injected_failure()?;
        let limit = self.refuse_over.load(Ordering::SeqCst);
        if let Some(row) = batch
            .rows
            .iter()
            .find(|r| r.value.as_ref().is_some_and(|v| v.len() > limit))
        {
            return Err(StoreError::Refused {
                table: row.table.clone(),
                reason: format!("a value over {limit} bytes"),
            });
        }
        let mut s = self.state();
        if let Some(row) = batch.rows.iter().find(|r| !s.tables.contains_key(&r.table)) {
            return Err(StoreError::UnknownTable(row.table.clone()));
        }
        for row in batch.rows {
            let rows = s.tables.entry(row.table).or_default();
            match row.value {
                Some(v) => rows.insert(row.key, v),
                None => rows.remove(&row.key),
            };
        }
        for p in batch.positions {
            s.positions
                .entry((p.consumer, p.topic))
                .or_default()
                .insert(p.partition, p.next_offset);
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn written_by_several_processes(&self) -> bool {
        self.shared
    }

    fn runner_cache_bytes(&self) -> usize {
        self.runner_cache
    }

    async fn compare_and_set(
        &self,
        table: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        self.injected_failure()?;
        let mut s = self.state();
        let rows = s
            .tables
            .get_mut(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        if rows.get(key).map(Vec::as_slice) != expected {
            return Ok(false);
        }
        rows.insert(key.to_owned(), value.to_vec());
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    async fn positions(
        &self,
        consumer: &str,
        topic: &str,
    ) -> Result<BTreeMap<u32, u64>, StoreError> {
        Ok(self
            .state()
            .positions
            .get(&(consumer.to_owned(), topic.to_owned()))
            .cloned()
            .unwrap_or_default())
    }

    async fn scan(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let s = self.state();
        let rows = s
            .tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        Ok(rows
            .iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn drop_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        let mut s = self.state();
        for t in tables {
            s.tables.remove(t);
        }
        Ok(())
    }

    async fn delete_positions(&self, consumer: &str, topic: &str) -> Result<(), StoreError> {
        self.state()
            .positions
            .remove(&(consumer.to_owned(), topic.to_owned()));
        Ok(())
    }
}
