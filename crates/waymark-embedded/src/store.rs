//! The embedded projection store: one redb table per projection table, and
//! a positions table, written in one atomic transaction per batch.
//!
//! Batches that wrote outputs or dead letters are committed durably before
//! the runner goes on. Replayable batches (their effects are all here) are
//! committed without an fsync (`Durability::None`) and made durable at least
//! every `DURABLE_EVERY` (250 ms) and on [`EmbeddedStore::close`]: a crash may roll
//! the store back by that much, rows and positions together, and the
//! runners apply the same records again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use tracing::info;
use waymark_runtime::{ProjectionStore, StoreError, WriteBatch};

/// Page cache of the store file (redb's default is 1 GiB). With the log's
/// 16 MiB it bounds the resident size of `waymark dev` (S5 in
/// docs/performance.md: about 290 MiB peak while draining a lag).
const STORE_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Replayable batches are made durable at least this often (redb
/// `Durability::None` commits in between skip the fsync).
const DURABLE_EVERY: Duration = Duration::from_millis(250);

const POSITIONS: TableDefinition<'static, &str, u64> = TableDefinition::new("_positions");

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn position_key(consumer: &str, topic: &str, partition: u32) -> String {
    format!("{consumer}\u{0}{topic}\u{0}{partition:010}")
}

fn position_prefix(consumer: &str, topic: &str) -> String {
    format!("{consumer}\u{0}{topic}\u{0}")
}

/// The embedded projection store of `waymark dev`. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// `None` once closed: dropping the database releases its file lock.
    db: Arc<RwLock<Option<Database>>>,
    /// When the last durable commit was made.
    last_durable: Arc<Mutex<Instant>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in file `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
            .map_err(unavailable)?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(POSITIONS).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        info!(path = %path.display(), "embedded store open");
        Ok(Self {
            db: Arc::new(RwLock::new(Some(db))),
            last_durable: Arc::new(Mutex::new(Instant::now())),
        })
    }

    /// Closes the store: waits for the transaction in progress, then
    /// releases the file. Every clone answers `Unavailable` afterwards.
    pub fn close(&self) {
        if let Ok(mut db) = self.db.write() {
            // Make the replayable batches committed since the last durable
            // commit durable too.
            if let Some(open) = db.as_ref() {
                let flushed = open
                    .begin_write()
                    .map_err(|e| e.to_string())
                    .and_then(|txn| txn.commit().map_err(|e| e.to_string()));
                if let Err(e) = flushed {
                    tracing::warn!(error = %e, "final durable commit of the store failed");
                }
            }
            db.take();
        }
    }

    /// Writes `batch` in one transaction; durably when `durable`, or when
    /// the last durable commit is older than [`DURABLE_EVERY`].
    async fn commit(&self, batch: WriteBatch, durable: bool) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let durable = durable || {
            let last = self
                .last_durable
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            last.elapsed() >= DURABLE_EVERY
        };
        let last_durable = self.last_durable.clone();
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(unavailable)?;
            if !durable {
                txn.set_durability(Durability::None).map_err(unavailable)?;
            }
            {
                let mut rows = batch.rows;
                rows.sort_by(|a, b| a.table.cmp(&b.table));
                let mut i = 0;
                while i < rows.len() {
                    let name = rows[i].table.clone();
                    let mut t = txn.open_table(table_def(&name)).map_err(unavailable)?;
                    while i < rows.len() && rows[i].table == name {
                        let row = &rows[i];
                        match &row.value {
                            Some(v) => {
                                t.insert(row.key.as_str(), v.as_slice())
                                    .map_err(unavailable)?;
                            }
                            None => {
                                t.remove(row.key.as_str()).map_err(unavailable)?;
                            }
                        }
                        i += 1;
                    }
                }
                let mut positions = txn.open_table(POSITIONS).map_err(unavailable)?;
                for p in &batch.positions {
                    positions
                        .insert(
                            position_key(&p.consumer, &p.topic, p.partition).as_str(),
                            p.next_offset,
                        )
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)?;
            if durable {
                *last_durable.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
            }
            Ok(())
        })
        .await
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let guard = db
                .read()
                .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?;
            let db = guard
                .as_ref()
                .ok_or_else(|| StoreError::Unavailable("store closed".into()))?;
            f(db)
        })
        .await
        .map_err(unavailable)?
    }
}

fn table_def(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// Opens `table` for reading; `UnknownTable` when it does not exist.
fn open_existing(
    txn: &redb::ReadTransaction,
    table: &str,
) -> Result<redb::ReadOnlyTable<&'static str, &'static [u8]>, StoreError> {
    match txn.open_table(table_def(table)) {
        Ok(t) => Ok(t),
        Err(redb::TableError::TableDoesNotExist(_)) => {
            Err(StoreError::UnknownTable(table.to_owned()))
        }
        Err(e) => Err(unavailable(e)),
    }
}

#[async_trait]
impl ProjectionStore for EmbeddedStore {
    async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        let tables = tables.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            for t in &tables {
                txn.open_table(table_def(t)).map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn get_many(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let table = table.to_owned();
        let keys = keys.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = open_existing(&txn, &table)?;
            keys.iter()
                .map(|k| {
                    Ok(t.get(k.as_str())
                        .map_err(unavailable)?
                        .map(|v| v.value().to_vec()))
                })
                .collect()
        })
        .await
    }

    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.commit(batch, true).await
    }

    async fn write_replayable(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.commit(batch, false).await
    }

    async fn positions(
        &self,
        consumer: &str,
        topic: &str,
    ) -> Result<BTreeMap<u32, u64>, StoreError> {
        let prefix = position_prefix(consumer, topic);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(POSITIONS).map_err(unavailable)?;
            let mut out = BTreeMap::new();
            for entry in t.range(prefix.as_str()..).map_err(unavailable)? {
                let (k, v) = entry.map_err(unavailable)?;
                let Some(partition) = k.value().strip_prefix(prefix.as_str()) else {
                    break;
                };
                if let Ok(p) = partition.parse() {
                    out.insert(p, v.value());
                }
            }
            Ok(out)
        })
        .await
    }

    async fn scan(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let table = table.to_owned();
        let after = after.map(str::to_owned);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = open_existing(&txn, &table)?;
            let range = match &after {
                Some(after) => t.range::<&str>((
                    std::ops::Bound::Excluded(after.as_str()),
                    std::ops::Bound::Unbounded,
                )),
                None => t.range::<&str>(..),
            }
            .map_err(unavailable)?;
            let mut out = Vec::new();
            for entry in range.take(limit) {
                let (k, v) = entry.map_err(unavailable)?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn drop_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        let tables = tables.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            for t in &tables {
                txn.delete_table(table_def(t)).map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn delete_positions(&self, consumer: &str, topic: &str) -> Result<(), StoreError> {
        let prefix = position_prefix(consumer, topic);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                use redb::ReadableTable;
                let mut t = txn.open_table(POSITIONS).map_err(unavailable)?;
                let keys: Vec<String> = t
                    .range(prefix.as_str()..)
                    .map_err(unavailable)?
                    .map_while(|entry| {
                        let (k, _) = entry.ok()?;
                        let k = k.value().to_owned();
                        k.starts_with(prefix.as_str()).then_some(k)
                    })
                    .collect();
                for k in keys {
                    t.remove(k.as_str()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn stored_bytes(&self, table: &str) -> Result<Option<u64>, StoreError> {
        let table = table.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            match txn.open_table(table_def(&table)) {
                Ok(t) => {
                    use redb::ReadableTableMetadata;
                    let stats = t.stats().map_err(unavailable)?;
                    Ok(Some(stats.stored_bytes() + stats.metadata_bytes()))
                }
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        })
        .await
    }
}
