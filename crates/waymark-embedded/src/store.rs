//! The embedded projection store: a [fjall](https://docs.rs/fjall) database
//! (an LSM tree: journal, memtables, sorted tables) in its own directory,
//! one keyspace per projection table plus one for consumer positions.
//! Decision 0001 measured it against redb's copy-on-write B-tree for this
//! workload (random read-modify-writes of whole rows): 3× the rows per
//! second and 7.5× fewer bytes written.
//!
//! Every batch (rows + positions, across keyspaces) is one fjall
//! `WriteBatch`, which the journal applies atomically: after a crash the
//! store holds the whole batch or none of it. Batches that wrote outputs or
//! dead letters are committed durably (`fsync`) before the runner goes on.
//! Replayable batches (their effects are all here) are handed to the OS
//! without an fsync and made durable at least every `DURABLE_EVERY`
//! (250 ms) and on [`EmbeddedStore::close`]: a power loss may roll the store
//! back by that much, rows and positions together, and the runners apply
//! the same records again. Every commit hands its journal entry to the OS
//! (`PersistMode::Buffer` at least), so what was committed survives the
//! process, and a failed commit never takes earlier commits with it.
//!
//! A failed commit (the disk is full, any I/O error) or a failed
//! background flush poisons a fjall database: it refuses every write from
//! then on. The store then drops the database and opens the directory
//! again (fjall replays its journal and drops a torn tail): at once, then,
//! while it keeps failing, after waits doubling from 1 s to 30 s. So a
//! store whose disk filled up takes batches again once space returns,
//! without a restart.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tracing::{info, warn};
use waymark_runtime::{ProjectionStore, StoreError, WriteBatch};

/// Block cache of the store. With the log's 16 MiB page cache and the
/// memtables it bounds the resident size of `waymark dev` (S5 in
/// docs/performance.md).
const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Largest memtable of one keyspace before it is flushed to a sorted table
/// (fjall's default is 64 MiB; a store has about ten keyspaces, and sealed
/// memtables wait for their flush: with 8 MiB, S5 peaked at 528 MiB while
/// draining 10M events of lag).
const MEMTABLE_BYTES: u64 = 4 * 1024 * 1024;

/// Journal size after which memtables are flushed, which also bounds what
/// an open replays (fjall's minimum; its default is 512 MiB).
const JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// Bytes of rows each fold's runner keeps in its row cache in front of
/// this store (`waymark_runtime::cache`): what it read, and what it
/// deferred (half of it at most) until its next flush, so a row changed by
/// many batches is read once and written once per flush. With the block
/// cache and the memtables it bounds the resident size of `waymark dev`
/// (S5 in docs/performance.md).
pub(crate) const RUNNER_CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Replayable batches are made durable at least this often.
const DURABLE_EVERY: Duration = Duration::from_millis(250);

/// The first wait before a failed database is opened again; it doubles
/// while the database keeps failing soon after being opened again, up to
/// [`REOPEN_MAX`] (an open replays up to [`JOURNAL_BYTES`] of journal, not
/// to be repeated every moment while a disk stays full).
const REOPEN_MIN: Duration = Duration::from_secs(1);

/// The longest wait between two opens of a failing database.
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// A database that worked this long after being opened again starts over
/// at [`REOPEN_MIN`] when it fails.
const REOPEN_RECOVERED: Duration = Duration::from_secs(60);

/// The keyspace of consumer positions (table names are `[a-z0-9_]+`, so no
/// table can be called this).
const POSITIONS: &str = "#positions";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn position_key(consumer: &str, topic: &str, partition: u32) -> String {
    format!("{consumer}\u{0}{topic}\u{0}{partition:010}")
}

fn position_prefix(consumer: &str, topic: &str) -> String {
    format!("{consumer}\u{0}{topic}\u{0}")
}

fn keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
}

/// An open database and the keyspace handles opened so far.
struct Open {
    db: Database,
    positions: Keyspace,
    tables: Mutex<HashMap<String, Keyspace>>,
    /// Why a write failed, once one has: fjall then refuses every write,
    /// and the database is opened again.
    failure: Mutex<Option<String>>,
}

/// Opens the database in `path` with the store's settings.
fn open_database(path: &Path) -> Result<Open, StoreError> {
    let db = Database::builder(path)
        .cache_size(CACHE_BYTES)
        .max_journaling_size(JOURNAL_BYTES)
        .open()
        .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
    let positions = db
        .keyspace(POSITIONS, keyspace_options)
        .map_err(unavailable)?;
    Ok(Open {
        db,
        positions,
        tables: Mutex::new(HashMap::new()),
        failure: Mutex::new(None),
    })
}

impl Open {
    /// Records that a write failed with `e` and returns the error for it.
    fn failed(&self, e: impl std::fmt::Display) -> StoreError {
        let reason = e.to_string();
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
        StoreError::Unavailable(reason)
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The keyspace of `table`, created when `create`; `UnknownTable` when
    /// it does not exist and may not be created.
    fn table(&self, table: &str, create: bool) -> Result<Keyspace, StoreError> {
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ks) = tables.get(table) {
            return Ok(ks.clone());
        }
        if table.is_empty() || table.len() > 255 || table.starts_with('#') {
            return Err(StoreError::UnknownTable(table.to_owned()));
        }
        if !create && !self.db.keyspace_exists(table) {
            return Err(StoreError::UnknownTable(table.to_owned()));
        }
        let ks = self
            .db
            .keyspace(table, keyspace_options)
            .map_err(|e| self.failed(e))?;
        tables.insert(table.to_owned(), ks.clone());
        Ok(ks)
    }
}

/// The database, as the store holds it.
enum Db {
    Open(Open),
    /// Closed for good: dropping the database released its lock.
    Closed,
    /// A write failed and opening the directory again has not worked yet.
    Failed {
        reason: String,
    },
}

/// When the database was last opened again, and the wait before the next.
#[derive(Debug, Default)]
struct Reopens {
    last: Option<Instant>,
    wait: Duration,
}

impl Reopens {
    /// Whether to open the database again now; if so, the wait before the
    /// next time: doubled when it failed again soon after this one.
    fn due(&mut self, now: Instant) -> bool {
        self.wait = match self.last {
            Some(last) if now.duration_since(last) < self.wait => return false,
            Some(last) if now.duration_since(last) < REOPEN_RECOVERED => {
                (self.wait * 2).clamp(REOPEN_MIN, REOPEN_MAX)
            }
            _ => REOPEN_MIN,
        };
        self.last = Some(now);
        true
    }
}

/// The database and where it lives.
struct Shared {
    db: RwLock<Db>,
    path: PathBuf,
    reopens: Mutex<Reopens>,
}

impl Shared {
    /// Runs `f` on the open database: first opening it again if a write
    /// failed before, and afterwards if `f` made a write fail.
    fn with_open<T>(
        &self,
        f: impl FnOnce(&Open) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.failed()? {
            self.reopen();
        }
        let result = {
            let guard = self.db.read().map_err(|_| closed())?;
            match &*guard {
                Db::Open(open) => match open.failure() {
                    None => f(open),
                    Some(reason) => return Err(failed_yet(&reason)),
                },
                Db::Closed => return Err(closed()),
                Db::Failed { reason, .. } => return Err(failed_yet(reason)),
            }
        };
        if result.is_err() {
            // Open it again right away if this write failed, so that the
            // next batch finds a database that takes writes.
            self.reopen();
        }
        result
    }

    /// Whether a write failed (and the database is to be opened again).
    fn failed(&self) -> Result<bool, StoreError> {
        let guard = self.db.read().map_err(|_| closed())?;
        Ok(match &*guard {
            Db::Open(open) => open.failure().is_some(),
            Db::Closed => false,
            Db::Failed { .. } => true,
        })
    }

    /// Drops a database whose write failed, or that failed to open again
    /// before, and opens the directory again: at once after a failure
    /// following a healthy minute, then after waits from [`REOPEN_MIN`]
    /// doubling to [`REOPEN_MAX`] while it keeps failing. Every batch the
    /// database acknowledged reached
    /// the journal file, so nothing committed is lost; the failed batch
    /// was never acknowledged.
    fn reopen(&self) {
        let Ok(mut guard) = self.db.write() else {
            return;
        };
        let reason = match &*guard {
            Db::Closed => return,
            Db::Open(open) => match open.failure() {
                None => return,
                Some(reason) => reason,
            },
            Db::Failed { reason } => reason.clone(),
        };
        if !self
            .reopens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .due(Instant::now())
        {
            return;
        }
        // Release the directory before opening it again.
        *guard = Db::Failed {
            reason: reason.clone(),
        };
        match open_database(&self.path) {
            Ok(open) => {
                info!(path = %self.path.display(), after = %reason, "embedded store opened again");
                *guard = Db::Open(open);
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "opening the embedded store again failed; retrying");
                *guard = Db::Failed {
                    reason: format!("{reason}; opening it again: {e}"),
                };
            }
        }
    }
}

fn failed_yet(reason: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the embedded store failed and cannot be opened again yet: {reason}"
    ))
}

/// The embedded projection store of `waymark dev`. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// When the last durable commit was made.
    last_durable: Arc<Mutex<Instant>>,
    /// Serializes [`ProjectionStore::compare_and_set`] (one process owns
    /// the directory, so a lock is enough).
    cas: Arc<Mutex<()>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in directory `path`, replaying its
    /// journal.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open = open_database(path)?;
        info!(path = %path.display(), "embedded store open");
        Ok(Self {
            shared: Arc::new(Shared {
                db: RwLock::new(Db::Open(open)),
                path: path.to_owned(),
                reopens: Mutex::new(Reopens::default()),
            }),
            last_durable: Arc::new(Mutex::new(Instant::now())),
            cas: Arc::new(Mutex::new(())),
        })
    }

    /// Copies every table and position of a projection store written by
    /// an older Waymark (one redb file) into this store, durably. Rows
    /// already here are overwritten; the file is left as it is.
    pub fn import_redb(&self, path: &Path) -> Result<u64, StoreError> {
        use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
        const OLD_POSITIONS: &str = "_positions";
        const CHUNK: usize = 10_000;
        let old = redb::Database::open(path).map_err(unavailable)?;
        let txn = old.begin_read().map_err(unavailable)?;
        self.shared.with_open(|open| {
            let mut copied = 0u64;
            for handle in txn.list_tables().map_err(unavailable)? {
                let name = handle.name().to_owned();
                let mut batch = open.db.batch();
                if name == OLD_POSITIONS {
                    let t = txn
                        .open_table(TableDefinition::<&str, u64>::new(OLD_POSITIONS))
                        .map_err(unavailable)?;
                    for entry in t.iter().map_err(unavailable)? {
                        let (k, v) = entry.map_err(unavailable)?;
                        batch.insert(&open.positions, k.value(), v.value().to_be_bytes());
                    }
                } else {
                    let ks = open.table(&name, true)?;
                    let t = txn
                        .open_table(TableDefinition::<&str, &[u8]>::new(&name))
                        .map_err(unavailable)?;
                    for entry in t.iter().map_err(unavailable)? {
                        let (k, v) = entry.map_err(unavailable)?;
                        batch.insert(&ks, k.value(), v.value());
                        copied += 1;
                        if batch.len() >= CHUNK {
                            let full = std::mem::replace(&mut batch, open.db.batch());
                            full.commit().map_err(|e| open.failed(e))?;
                        }
                    }
                }
                batch.commit().map_err(|e| open.failed(e))?;
            }
            open.db
                .persist(PersistMode::SyncAll)
                .map_err(|e| open.failed(e))?;
            Ok(copied)
        })
    }

    /// Closes the store: makes everything durable, then releases the
    /// directory. Every clone answers `Unavailable` afterwards.
    pub fn close(&self) {
        if let Ok(mut db) = self.shared.db.write() {
            if let Db::Open(open) = &*db {
                if let Err(e) = open.db.persist(PersistMode::SyncAll) {
                    warn!(error = %e, "final durable commit of the store failed");
                }
            }
            *db = Db::Closed;
        }
    }

    /// Writes `batch` atomically; durably when `durable`, or when the last
    /// durable commit is older than [`DURABLE_EVERY`].
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
        self.blocking(move |open| {
            // At least to the OS: a later failed commit, after which the
            // database is opened again, must not lose this one.
            let mut out = open.db.batch().durability(Some(if durable {
                PersistMode::SyncAll
            } else {
                PersistMode::Buffer
            }));
            let mut keyspaces: HashMap<&str, Keyspace> = HashMap::new();
            for row in &batch.rows {
                if !keyspaces.contains_key(row.table.as_str()) {
                    keyspaces.insert(row.table.as_str(), open.table(&row.table, true)?);
                }
                let ks = &keyspaces[row.table.as_str()];
                match &row.value {
                    Some(v) => out.insert(ks, row.key.as_str(), v.as_slice()),
                    None => out.remove(ks, row.key.as_str()),
                }
            }
            for p in &batch.positions {
                out.insert(
                    &open.positions,
                    position_key(&p.consumer, &p.topic, p.partition).as_str(),
                    p.next_offset.to_be_bytes(),
                );
            }
            out.commit().map_err(|e| open.failed(e))?;
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
        F: FnOnce(&Open) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.with_open(f))
            .await
            .map_err(unavailable)?
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("store closed".into())
}

fn key_text(table: &str, key: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt {
        table: table.to_owned(),
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "key is not UTF-8".into(),
    })
}

#[async_trait]
impl ProjectionStore for EmbeddedStore {
    fn runner_cache_bytes(&self) -> usize {
        RUNNER_CACHE_BYTES
    }

    async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        let tables = tables.to_vec();
        self.blocking(move |open| {
            for t in &tables {
                open.table(t, true)?;
            }
            Ok(())
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
        self.blocking(move |open| {
            let ks = open.table(&table, false)?;
            keys.iter()
                .map(|k| {
                    Ok(ks
                        .get(k.as_bytes())
                        .map_err(unavailable)?
                        .map(|v| v.to_vec()))
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

    async fn compare_and_set(
        &self,
        table: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        let (table, key) = (table.to_owned(), key.to_owned());
        let expected = expected.map(<[u8]>::to_vec);
        let value = value.to_vec();
        let cas = self.cas.clone();
        self.blocking(move |open| {
            let _serialized = cas.lock().unwrap_or_else(PoisonError::into_inner);
            let ks = open.table(&table, true)?;
            let current = ks.get(key.as_str()).map_err(unavailable)?;
            if current.as_deref() != expected.as_deref() {
                return Ok(false);
            }
            let mut batch = open.db.batch().durability(Some(PersistMode::SyncAll));
            batch.insert(&ks, key.as_str(), value.as_slice());
            batch.commit().map_err(|e| open.failed(e))?;
            Ok(true)
        })
        .await
    }

    async fn positions(
        &self,
        consumer: &str,
        topic: &str,
    ) -> Result<BTreeMap<u32, u64>, StoreError> {
        let prefix = position_prefix(consumer, topic);
        self.blocking(move |open| {
            let mut out = BTreeMap::new();
            for entry in open.positions.prefix(prefix.as_bytes()) {
                let (k, v) = entry.into_inner().map_err(unavailable)?;
                let partition = k
                    .get(prefix.len()..)
                    .and_then(|p| std::str::from_utf8(p).ok())
                    .and_then(|p| p.parse::<u32>().ok());
                let offset = <[u8; 8]>::try_from(&v[..]).ok().map(u64::from_be_bytes);
                if let (Some(p), Some(offset)) = (partition, offset) {
                    out.insert(p, offset);
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
        self.blocking(move |open| {
            let ks = open.table(&table, false)?;
            let range = match &after {
                Some(after) => {
                    ks.range::<&[u8], _>((Bound::Excluded(after.as_bytes()), Bound::Unbounded))
                }
                None => ks.iter(),
            };
            let mut out = Vec::new();
            for entry in range.take(limit) {
                let (k, v) = entry.into_inner().map_err(unavailable)?;
                out.push((key_text(&table, &k)?, v.to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn drop_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        let tables = tables.to_vec();
        self.blocking(move |open| {
            for t in &tables {
                let ks = match open.table(t, false) {
                    Ok(ks) => ks,
                    Err(StoreError::UnknownTable(_)) => continue,
                    Err(e) => return Err(e),
                };
                open.tables
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(t);
                open.db.delete_keyspace(ks).map_err(|e| open.failed(e))?;
            }
            Ok(())
        })
        .await
    }

    async fn delete_positions(&self, consumer: &str, topic: &str) -> Result<(), StoreError> {
        let prefix = position_prefix(consumer, topic);
        self.blocking(move |open| {
            let mut batch = open.db.batch().durability(Some(PersistMode::SyncAll));
            for entry in open.positions.prefix(prefix.as_bytes()) {
                let k = entry.key().map_err(unavailable)?;
                batch.remove(&open.positions, k);
            }
            batch.commit().map_err(|e| open.failed(e))
        })
        .await
    }

    async fn stored_bytes(&self, table: &str) -> Result<Option<u64>, StoreError> {
        let table = table.to_owned();
        self.blocking(move |open| match open.table(&table, false) {
            Ok(ks) => Ok(Some(ks.disk_space() + ks.tree.active_memtable().size())),
            Err(StoreError::UnknownTable(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_database_is_opened_again_ever_less_often() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut r = Reopens::default();
        // The first failure: at once; failing again within the wait: not.
        assert!(r.due(at(0)));
        assert!(!r.due(at(0)));
        // Failing on: waits of 2, 4, 8, 16, 30, 30 s.
        let mut t = 1;
        assert!(r.due(at(t)));
        for wait in [2, 4, 8, 16, 30, 30] {
            assert!(!r.due(at(t + wait - 1)), "before {wait} s");
            t += wait;
            assert!(r.due(at(t)), "after {wait} s");
        }
        // Healthy for a minute: the next failure is met at once, and the
        // wait starts over.
        t += 61;
        assert!(r.due(at(t)));
        assert!(!r.due(at(t)));
        assert!(r.due(at(t + 1)));
    }
}
