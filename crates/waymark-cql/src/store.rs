//! [`CqlStore`]: the projection store on ScyllaDB or Cassandra.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Statement;
use scylla::value::CqlValue;
use tracing::{debug, info};
use waymark_runtime::{PositionWrite, ProjectionStore, RowWrite, StoreError, WriteBatch};

use crate::config::CqlConfig;
use crate::cql::{
    self, split_key, Ident, InternalCql, Layout, Replication, TableCql, MIGRATIONS,
    MIGRATIONS_TABLE, POSITIONS_TABLE,
};
use crate::error::{
    execution_to_connect, execution_to_store, name_to_store, prepare_to_connect, prepare_to_store,
    ConnectError,
};

/// The driver's TLS context for `tls`: the nodes' certificates must chain
/// to the CA and name the node's IP address.
fn tls_context(
    tls: &crate::config::CqlTls,
) -> Result<scylla::client::session::TlsContext, ConnectError> {
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod};
    let config = |what: &str, e: openssl::error::ErrorStack| ConnectError::Config {
        problems: vec![format!("tls: {what}: {e}")],
    };
    let mut builder = SslConnector::builder(SslMethod::tls()).map_err(|e| config("openssl", e))?;
    builder
        .set_ca_file(&tls.ca)
        .map_err(|e| config(&format!("CA file {}", tls.ca.display()), e))?;
    if let Some((cert, key)) = &tls.client {
        builder
            .set_certificate_chain_file(cert)
            .map_err(|e| config(&format!("client certificate {}", cert.display()), e))?;
        builder
            .set_private_key_file(key, SslFiletype::PEM)
            .map_err(|e| config(&format!("client key {}", key.display()), e))?;
        builder
            .check_private_key()
            .map_err(|e| config("client key does not match its certificate", e))?;
    }
    Ok(scylla::client::session::OpenSsl010Config::new(builder).into())
}

/// The projection store on ScyllaDB or Cassandra. Cheap to clone; clones
/// share one session and one statement cache.
#[derive(Clone)]
pub struct CqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    keyspace: Ident,
    concurrency: usize,
    row_cache_bytes: usize,
    /// Prepared statements by table name.
    tables: Mutex<HashMap<String, Arc<TableStatements>>>,
    positions: PositionStatements,
    clock: Clock,
}

/// The largest value bytes of one head's rows written as one batch. A
/// single-partition batch is one mutation, and a mutation may not exceed
/// half a commit log segment (16 MiB by default on ScyllaDB and
/// Cassandra, and a request frame 16 MiB on Cassandra); a head's rows over
/// this are written one statement each, sub rows before the head. The
/// runner's batches are bounded to 16 MiB of records, so it takes one
/// person with most of a full batch to get there.
const MAX_GROUP_BYTES: usize = 12 << 20;

struct TableStatements {
    layout: Layout,
    select: PreparedStatement,
    upsert: PreparedStatement,
    delete: PreparedStatement,
    /// Compare-and-set on an absent row.
    insert_if_absent: PreparedStatement,
    /// Compare-and-set over a row.
    update_if: PreparedStatement,
    text: TableCql,
}

impl TableStatements {
    /// The key's bind values in this table's layout.
    fn key(&self, key: &str) -> Vec<CqlValue> {
        match self.layout {
            Layout::Partitioned => {
                let (head, sub) = split_key(key);
                vec![
                    CqlValue::Text(head.to_owned()),
                    CqlValue::Text(sub.to_owned()),
                ]
            }
            Layout::KeyPerPartition => vec![CqlValue::Text(key.to_owned())],
        }
    }

    /// The statement writing `row` and its bind values.
    fn write(&self, row: &PlannedRow<'_>) -> (&PreparedStatement, Vec<CqlValue>) {
        let timestamp = CqlValue::BigInt(row.timestamp);
        match row.value {
            Some(value) => {
                let mut values = self.key(row.key);
                values.push(CqlValue::Blob(value.to_vec()));
                values.push(timestamp);
                (&self.upsert, values)
            }
            None => {
                let mut values = vec![timestamp];
                values.extend(self.key(row.key));
                (&self.delete, values)
            }
        }
    }
}

struct PositionStatements {
    select: PreparedStatement,
    upsert: PreparedStatement,
}

impl std::fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlStore")
            .field("keyspace", &self.inner.keyspace.as_str())
            .field("concurrency", &self.inner.concurrency)
            .finish_non_exhaustive()
    }
}

impl CqlStore {
    /// Connects, creates the keyspace when missing, applies the schema files
    /// not yet recorded in `schema_migrations` and prepares the positions
    /// statements.
    ///
    /// The session routes each statement to a replica of its partition
    /// (token-aware, and shard-aware on ScyllaDB), in the local datacenter
    /// when one is configured, with `LOCAL_QUORUM` and the configured
    /// per-request timeout.
    pub async fn connect(config: CqlConfig) -> Result<Self, ConnectError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ConnectError::Config { problems });
        }
        let keyspace = Ident::keyspace(&config.keyspace).map_err(|e| ConnectError::Config {
            problems: vec![e.to_string()],
        })?;
        let replication = Replication::parse(&config.replication)
            .map_err(|e| ConnectError::Config { problems: vec![e] })?;

        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = &config.local_datacenter {
            policy = policy.prefer_datacenter(dc.clone());
        }
        let profile = ExecutionProfile::builder()
            .request_timeout(Some(config.request_timeout))
            .consistency(scylla::statement::Consistency::LocalQuorum)
            .load_balancing_policy(policy.build())
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(config.connect_timeout)
            .default_execution_profile_handle(profile.into_handle());
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            builder = builder.user(user, password.expose());
        }
        if let Some(tls) = &config.tls {
            builder = builder.tls_context(Some(tls_context(tls)?));
        }
        let session = builder
            .build()
            .await
            .map_err(|e| ConnectError::opening(&e, config.username.as_deref()))?;
        info!(nodes = ?config.nodes, keyspace = keyspace.as_str(), "cql session open");

        for ddl in cql::keyspace_ddl(&keyspace, &replication) {
            run_ddl(&session, &ddl).await?;
        }
        migrate(&session, &keyspace).await?;

        let internal = InternalCql::new(&keyspace);
        let positions = PositionStatements {
            select: prepare_setup(&session, &internal.select_positions).await?,
            upsert: prepare_setup(&session, &internal.upsert_position).await?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                session,
                keyspace,
                concurrency: config.concurrency,
                row_cache_bytes: config.row_cache_bytes,
                tables: Mutex::new(HashMap::new()),
                positions,
                clock: Clock::default(),
            }),
        })
    }

    /// The keyspace this store writes to.
    pub fn keyspace(&self) -> &str {
        self.inner.keyspace.as_str()
    }

    /// The schema versions recorded in `schema_migrations`, ascending.
    pub async fn schema_versions(&self) -> Result<Vec<i32>, StoreError> {
        let text = InternalCql::new(&self.inner.keyspace).select_migrations;
        applied_versions(&self.inner.session, &text)
            .await
            .map_err(|e| match e {
                VersionsError::Execution(e) => execution_to_store(MIGRATIONS_TABLE, &e),
                VersionsError::Decode(reason) => StoreError::Corrupt {
                    table: MIGRATIONS_TABLE.to_owned(),
                    key: String::new(),
                    reason,
                },
            })
    }

    /// The prepared statements of `table`, prepared on first use.
    async fn table(&self, table: &str) -> Result<Arc<TableStatements>, StoreError> {
        if let Some(found) = self.cached(table) {
            return Ok(found);
        }
        let ident = Ident::table(table).map_err(|e| name_to_store(table, &e))?;
        let layout = self.layout(&ident).await?;
        let text = TableCql::new(&self.inner.keyspace, &ident, layout);
        let session = &self.inner.session;
        let (select, upsert, delete, mut insert_if_absent, mut update_if) = futures::try_join!(
            prepare(session, table, &text.select),
            prepare(session, table, &text.upsert),
            prepare(session, table, &text.delete),
            prepare(session, table, &text.insert_if_absent),
            prepare(session, table, &text.update_if),
        )?;
        // A lightweight transaction retried after a timeout may answer
        // "not applied" for its own earlier write: callers read again and
        // decide, the driver must not repeat it on its own.
        insert_if_absent.set_is_idempotent(false);
        update_if.set_is_idempotent(false);
        let statements = Arc::new(TableStatements {
            layout,
            text,
            select,
            upsert,
            delete,
            insert_if_absent,
            update_if,
        });
        // Two callers may prepare the same table at once; either result is
        // fine.
        self.inner
            .tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(table.to_owned(), statements.clone());
        Ok(statements)
    }

    /// The layout of an existing table, from its columns: a table created
    /// before the partitioned layout has a `key` column. A table without
    /// columns does not exist.
    async fn layout(&self, table: &Ident) -> Result<Layout, StoreError> {
        let mut statement = Statement::new(cql::SELECT_COLUMNS);
        statement.set_is_idempotent(true);
        let result = self
            .inner
            .session
            .query_unpaged(statement, (self.inner.keyspace.as_str(), table.as_str()))
            .await
            .map_err(|e| execution_to_store(table.as_str(), &e))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            table: table.as_str().to_owned(),
            key: String::new(),
            reason: format!("reading its columns: {reason}"),
        };
        let rows = result
            .into_rows_result()
            .map_err(|e| corrupt(e.to_string()))?;
        let mut columns = Vec::new();
        for row in rows
            .rows::<(String,)>()
            .map_err(|e| corrupt(e.to_string()))?
        {
            columns.push(row.map_err(|e| corrupt(e.to_string()))?.0);
        }
        if columns.is_empty() {
            return Err(StoreError::UnknownTable(table.as_str().to_owned()));
        }
        Ok(if columns.iter().any(|c| c == "key") {
            Layout::KeyPerPartition
        } else {
            Layout::Partitioned
        })
    }

    fn cached(&self, table: &str) -> Option<Arc<TableStatements>> {
        self.inner
            .tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(table)
            .cloned()
    }

    /// The statements of every table in `rows`, before anything is written.
    async fn tables_of(
        &self,
        rows: &[PlannedRow<'_>],
    ) -> Result<HashMap<String, Arc<TableStatements>>, StoreError> {
        let mut out: HashMap<String, Arc<TableStatements>> = HashMap::new();
        for row in rows {
            if !out.contains_key(row.table) {
                out.insert(row.table.to_owned(), self.table(row.table).await?);
            }
        }
        Ok(out)
    }

    async fn read_row(
        &self,
        statements: &TableStatements,
        table: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let result = self
            .inner
            .session
            .execute_unpaged(&statements.select, statements.key(key))
            .await
            .map_err(|e| execution_to_store(table, &e))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            table: table.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let rows = result
            .into_rows_result()
            .map_err(|e| corrupt(e.to_string()))?;
        let row = rows
            .maybe_first_row::<(Option<Vec<u8>>,)>()
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(row.and_then(|(value,)| value))
    }

    async fn write_row(
        &self,
        statements: &TableStatements,
        row: &PlannedRow<'_>,
    ) -> Result<(), StoreError> {
        let (statement, values) = statements.write(row);
        self.inner
            .session
            .execute_unpaged(statement, values)
            .await
            .map(|_| ())
            .map_err(|e| execution_to_store(row.table, &e))
    }

    /// Writes the rows of one head of a partitioned table as one unlogged
    /// single-partition batch: all of them or none, and no reader sees a
    /// part.
    async fn write_group(
        &self,
        statements: &TableStatements,
        rows: &[&PlannedRow<'_>],
    ) -> Result<(), StoreError> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        if rows.len() == 1 {
            return self.write_row(statements, first).await;
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        // Every statement binds its own timestamp: repeating the batch
        // writes the same cells again.
        batch.set_is_idempotent(true);
        let mut values = Vec::with_capacity(rows.len());
        for row in rows {
            let (statement, row_values) = statements.write(row);
            batch.append_statement(statement.clone());
            values.push(row_values);
        }
        self.inner
            .session
            .batch(&batch, values)
            .await
            .map(|_| ())
            .map_err(|e| execution_to_store(first.table, &e))
    }

    async fn write_position(&self, p: &PositionWrite, timestamp: i64) -> Result<(), StoreError> {
        let partition = i32::try_from(p.partition).map_err(|_| StoreError::Corrupt {
            table: POSITIONS_TABLE.to_owned(),
            key: format!("{}/{}/{}", p.consumer, p.topic, p.partition),
            reason: "partition does not fit a cql int".to_owned(),
        })?;
        let next_offset = i64::try_from(p.next_offset).map_err(|_| StoreError::Corrupt {
            table: POSITIONS_TABLE.to_owned(),
            key: format!("{}/{}/{}", p.consumer, p.topic, p.partition),
            reason: format!("next offset {} does not fit a cql bigint", p.next_offset),
        })?;
        self.inner
            .session
            .execute_unpaged(
                &self.inner.positions.upsert,
                (
                    p.consumer.as_str(),
                    p.topic.as_str(),
                    partition,
                    next_offset,
                    timestamp,
                ),
            )
            .await
            .map(|_| ())
            .map_err(|e| execution_to_store(POSITIONS_TABLE, &e))
    }
}

/// A row write checked and given its write timestamp.
#[derive(Debug, PartialEq, Eq)]
struct PlannedRow<'a> {
    table: &'a str,
    key: &'a str,
    value: Option<&'a [u8]>,
    timestamp: i64,
}

/// Checks every row of a batch before anything is written and gives each
/// its write timestamp: `order` when the writer has one, else one reading of
/// the store's clock for the whole batch. When a batch names one row twice,
/// the later write wins (it is the only one written).
fn plan_rows<'a>(rows: &'a [RowWrite], clock: &Clock) -> Result<Vec<PlannedRow<'a>>, StoreError> {
    let now = clock.next();
    let mut last: HashMap<(&str, &str), usize> = HashMap::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        Ident::table(&row.table).map_err(|e| name_to_store(&row.table, &e))?;
        last.insert((row.table.as_str(), row.key.as_str()), i);
    }
    let mut planned = Vec::with_capacity(last.len());
    for (i, row) in rows.iter().enumerate() {
        if last.get(&(row.table.as_str(), row.key.as_str())) != Some(&i) {
            continue;
        }
        let timestamp = match row.order {
            Some(order) => i64::try_from(order).map_err(|_| StoreError::Corrupt {
                table: row.table.clone(),
                key: row.key.clone(),
                reason: format!("write order {order} does not fit a cql timestamp"),
            })?,
            None => now,
        };
        planned.push(PlannedRow {
            table: &row.table,
            key: &row.key,
            value: row.value.as_deref(),
            timestamp,
        });
    }
    Ok(planned)
}

/// How the rows of a batch are written.
#[derive(Debug, Default, PartialEq, Eq)]
struct WritePlan<'r, 'a> {
    /// The rows of one head of a partitioned table, each group written as
    /// one single-partition batch.
    groups: Vec<Vec<&'r PlannedRow<'a>>>,
    /// Sub rows written one statement each, with the groups.
    subs: Vec<&'r PlannedRow<'a>>,
    /// Heads written one statement each, after every sub row and group.
    heads: Vec<&'r PlannedRow<'a>>,
}

/// Groups the rows of partitioned tables by head (one group per table and
/// head, at most [`MAX_GROUP_BYTES`] of keys and values; a larger one is
/// written row by row), and splits the rest into sub rows and heads.
fn plan_writes<'r, 'a>(
    rows: &'r [PlannedRow<'a>],
    layout: impl Fn(&str) -> Result<Layout, StoreError>,
) -> Result<WritePlan<'r, 'a>, StoreError> {
    type Group<'r, 'a> = (Vec<&'r PlannedRow<'a>>, usize);
    fn one_by_one<'r, 'a>(plan: &mut WritePlan<'r, 'a>, row: &'r PlannedRow<'a>) {
        if row.key.contains('/') {
            plan.subs.push(row);
        } else {
            plan.heads.push(row);
        }
    }
    let mut groups: BTreeMap<(&'a str, &'a str), Group<'r, 'a>> = BTreeMap::new();
    let mut plan = WritePlan::default();
    for row in rows {
        match layout(row.table)? {
            Layout::Partitioned => {
                let (group, bytes) = groups.entry((row.table, split_key(row.key).0)).or_default();
                *bytes += row.key.len() + row.value.map_or(0, <[u8]>::len);
                group.push(row);
            }
            Layout::KeyPerPartition => one_by_one(&mut plan, row),
        }
    }
    for (group, bytes) in groups.into_values() {
        if bytes > MAX_GROUP_BYTES && group.len() > 1 {
            for row in group {
                one_by_one(&mut plan, row);
            }
        } else {
            plan.groups.push(group);
        }
    }
    Ok(plan)
}

/// The base of position write timestamps: 2^53 µs (the year 2255), above
/// every clock timestamp an earlier build wrote positions with, so those
/// rows are overwritten and never shadow a newer position.
pub(crate) const POSITION_EPOCH: i64 = 1 << 53;

/// The timestamp of the tombstone of a dropped consumer's positions:
/// above every position's ([`position_timestamp`] stays below 2^54).
const POSITIONS_DELETED: i64 = 1 << 54;

/// The write timestamp of a position: [`POSITION_EPOCH`] plus the offset,
/// so a larger position always wins over a smaller one (fencing). Offsets
/// are below 2^53 (Kafka's are far from it).
fn position_timestamp(next_offset: u64) -> Result<i64, StoreError> {
    i64::try_from(next_offset)
        .ok()
        .filter(|o| *o < POSITION_EPOCH)
        .map(|o| POSITION_EPOCH + o)
        .ok_or_else(|| StoreError::Corrupt {
            table: POSITIONS_TABLE.to_owned(),
            key: String::new(),
            reason: format!("next offset {next_offset} does not fit a cql timestamp"),
        })
}

/// The positions of a batch, the later one winning when a batch names one
/// (consumer, topic, partition) twice.
fn plan_positions(positions: &[PositionWrite]) -> Vec<&PositionWrite> {
    let mut last: HashMap<(&str, &str, u32), usize> = HashMap::with_capacity(positions.len());
    for (i, p) in positions.iter().enumerate() {
        last.insert((&p.consumer, &p.topic, p.partition), i);
    }
    positions
        .iter()
        .enumerate()
        .filter(|(i, p)| last.get(&(&p.consumer, &p.topic, p.partition)) == Some(i))
        .map(|(_, p)| p)
        .collect()
}

#[async_trait]
impl ProjectionStore for CqlStore {
    fn runner_cache_bytes(&self) -> usize {
        self.inner.row_cache_bytes
    }

    /// Every member of every consumer group writes this one store.
    fn written_by_several_processes(&self) -> bool {
        true
    }

    async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        let idents = tables
            .iter()
            .map(|t| Ident::table(t).map_err(|e| name_to_store(t, &e)))
            .collect::<Result<Vec<_>, _>>()?;
        for ident in idents {
            if self.cached(ident.as_str()).is_some() {
                continue;
            }
            for ddl in cql::projection_table_ddl(&self.inner.keyspace, &ident) {
                let mut statement = Statement::new(ddl);
                statement.set_is_idempotent(true);
                self.inner
                    .session
                    .query_unpaged(statement, ())
                    .await
                    .map_err(|e| execution_to_store(ident.as_str(), &e))?;
            }
            self.table(ident.as_str()).await?;
            debug!(table = ident.as_str(), "projection table ready");
        }
        Ok(())
    }

    async fn compare_and_set(
        &self,
        table: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        let statements = self.table(table).await?;
        let session = &self.inner.session;
        // A lightweight transaction answers `[applied]` first, then the
        // current row.
        let result = match expected {
            None => {
                let mut values = statements.key(key);
                values.push(CqlValue::Blob(value.to_vec()));
                session
                    .execute_unpaged(&statements.insert_if_absent, values)
                    .await
            }
            Some(expected) => {
                let mut values = vec![CqlValue::Blob(value.to_vec())];
                values.extend(statements.key(key));
                values.push(CqlValue::Blob(expected.to_vec()));
                session.execute_unpaged(&statements.update_if, values).await
            }
        }
        .map_err(|e| execution_to_store(table, &e))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            table: table.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let rows = result
            .into_rows_result()
            .map_err(|e| corrupt(e.to_string()))?;
        let row = rows
            .maybe_first_row::<scylla::value::Row>()
            .map_err(|e| corrupt(e.to_string()))?;
        match row.and_then(|r| r.columns.into_iter().next().flatten()) {
            Some(scylla::value::CqlValue::Boolean(applied)) => Ok(applied),
            other => Err(corrupt(format!(
                "a lightweight transaction answered {other:?} for [applied]"
            ))),
        }
    }

    async fn get_many(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let statements = self.table(table).await?;
        // The futures are made up front (they do nothing until polled) so
        // that the stream holds no borrowing closure, which the `Send`
        // bound of the trait's boxed future cannot see through.
        let reads: Vec<_> = keys
            .iter()
            .map(|key| self.read_row(&statements, table, key))
            .collect();
        futures::stream::iter(reads)
            .buffered(self.inner.concurrency)
            .try_collect()
            .await
    }

    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let rows = plan_rows(&batch.rows, &self.inner.clock)?;
        let statements = self.tables_of(&rows).await?;
        // Rows first, all of them; a failure stops here, before any position.
        // In a partitioned table a head and its sub rows are one atomic
        // batch. Elsewhere (a table of the older layout, a head's rows
        // past `MAX_GROUP_BYTES`) sub rows (`<head>/<sub>`) go before every
        // head, so that a head, the commit point of its sub rows, is never
        // stored without them.
        let plan = plan_writes(&rows, |table| {
            statements
                .get(table)
                .map(|s| s.layout)
                .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))
        })?;
        let statements_of = |table: &str| {
            statements
                .get(table)
                .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))
        };
        let mut first = Vec::with_capacity(plan.groups.len() + plan.subs.len());
        for group in &plan.groups {
            first.push(self.write_group(statements_of(group[0].table)?, group));
        }
        for row in &plan.subs {
            first.push(self.write_group(statements_of(row.table)?, std::slice::from_ref(row)));
        }
        futures::stream::iter(first)
            .buffer_unordered(self.inner.concurrency)
            .try_for_each(|()| futures::future::ready(Ok(())))
            .await?;
        let mut heads = Vec::with_capacity(plan.heads.len());
        for row in &plan.heads {
            heads.push(self.write_row(statements_of(row.table)?, row));
        }
        futures::stream::iter(heads)
            .buffer_unordered(self.inner.concurrency)
            .try_for_each(|()| futures::future::ready(Ok(())))
            .await?;
        // Then the positions the rows reflect, each written at a timestamp
        // that grows with it: a position never moves back, even when a
        // member that lost its partitions (paused past its session, stuck in
        // an outage) writes an older one late.
        let mut writes = Vec::new();
        for p in plan_positions(&batch.positions) {
            writes.push(self.write_position(p, position_timestamp(p.next_offset)?));
        }
        futures::stream::iter(writes)
            .buffer_unordered(self.inner.concurrency)
            .try_for_each(|()| futures::future::ready(Ok(())))
            .await
    }

    async fn positions(
        &self,
        consumer: &str,
        topic: &str,
    ) -> Result<BTreeMap<u32, u64>, StoreError> {
        let result = self
            .inner
            .session
            .execute_unpaged(&self.inner.positions.select, (consumer, topic))
            .await
            .map_err(|e| execution_to_store(POSITIONS_TABLE, &e))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            table: POSITIONS_TABLE.to_owned(),
            key: format!("{consumer}/{topic}"),
            reason,
        };
        let rows = result
            .into_rows_result()
            .map_err(|e| corrupt(e.to_string()))?;
        let mut out = BTreeMap::new();
        for row in rows
            .rows::<(i32, i64)>()
            .map_err(|e| corrupt(e.to_string()))?
        {
            let (partition, next_offset) = row.map_err(|e| corrupt(e.to_string()))?;
            let partition = u32::try_from(partition)
                .map_err(|_| corrupt(format!("negative partition {partition}")))?;
            let next_offset = u64::try_from(next_offset)
                .map_err(|_| corrupt(format!("negative next offset {next_offset}")))?;
            out.insert(partition, next_offset);
        }
        Ok(out)
    }
    async fn scan(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let statements = self.table(table).await?;
        let text = &statements.text;
        let limit = i32::try_from(limit.max(1)).unwrap_or(i32::MAX);
        let mut out = Vec::new();
        match (after, &text.scan_within) {
            (None, _) => {
                let values = vec![CqlValue::Int(limit)];
                self.scan_page(&statements, table, &text.scan_first, values, &mut out)
                    .await?;
            }
            (Some(after), None) => {
                let values = vec![CqlValue::Text(after.to_owned()), CqlValue::Int(limit)];
                self.scan_page(&statements, table, &text.scan_after, values, &mut out)
                    .await?;
            }
            // Partitioned: the rest of `after`'s partition, then the
            // partitions after it in token order.
            (Some(after), Some(within)) => {
                let (head, sub) = split_key(after);
                let values = vec![
                    CqlValue::Text(head.to_owned()),
                    CqlValue::Text(sub.to_owned()),
                    CqlValue::Int(limit),
                ];
                self.scan_page(&statements, table, within, values, &mut out)
                    .await?;
                let left = limit.saturating_sub(i32::try_from(out.len()).unwrap_or(limit));
                if left > 0 {
                    let values = vec![CqlValue::Text(head.to_owned()), CqlValue::Int(left)];
                    self.scan_page(&statements, table, &text.scan_after, values, &mut out)
                        .await?;
                }
            }
        }
        Ok(out)
    }

    async fn drop_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        for table in tables {
            let ident = Ident::table(table).map_err(|e| name_to_store(table, &e))?;
            let mut statement = Statement::new(format!(
                "DROP TABLE IF EXISTS {}.{ident}",
                self.inner.keyspace
            ));
            statement.set_is_idempotent(true);
            self.inner
                .session
                .query_unpaged(statement, ())
                .await
                .map_err(|e| execution_to_store(table, &e))?;
            self.inner
                .tables
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(table.as_str());
        }
        Ok(())
    }

    async fn delete_positions(&self, consumer: &str, topic: &str) -> Result<(), StoreError> {
        // Above every position's timestamp (see `position_timestamp`): the
        // consumer id is never used again, so its positions go for good.
        let mut statement = Statement::new(format!(
            "DELETE FROM {}.{} USING TIMESTAMP ? WHERE consumer = ? AND topic = ?",
            self.inner.keyspace,
            Ident::internal(POSITIONS_TABLE)
        ));
        statement.set_is_idempotent(true);
        self.inner
            .session
            .query_unpaged(statement, (POSITIONS_DELETED, consumer, topic))
            .await
            .map_err(|e| execution_to_store(POSITIONS_TABLE, &e))?;
        Ok(())
    }
}

impl CqlStore {
    /// Runs one scan statement and appends its rows (key, value) to `out`.
    async fn scan_page(
        &self,
        statements: &TableStatements,
        table: &str,
        text: &str,
        values: Vec<CqlValue>,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let mut statement = Statement::new(text.to_owned());
        statement.set_is_idempotent(true);
        let result = self
            .inner
            .session
            .query_unpaged(statement, values)
            .await
            .map_err(|e| execution_to_store(table, &e))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            table: table.to_owned(),
            key: String::new(),
            reason,
        };
        let rows = result
            .into_rows_result()
            .map_err(|e| corrupt(e.to_string()))?;
        match statements.layout {
            Layout::Partitioned => {
                for row in rows
                    .rows::<(String, String, Option<Vec<u8>>)>()
                    .map_err(|e| corrupt(e.to_string()))?
                {
                    let (head, sub, value) = row.map_err(|e| corrupt(e.to_string()))?;
                    out.push((head + &sub, value.unwrap_or_default()));
                }
            }
            Layout::KeyPerPartition => {
                for row in rows
                    .rows::<(String, Option<Vec<u8>>)>()
                    .map_err(|e| corrupt(e.to_string()))?
                {
                    let (key, value) = row.map_err(|e| corrupt(e.to_string()))?;
                    out.push((key, value.unwrap_or_default()));
                }
            }
        }
        Ok(())
    }
}

/// Runs one schema statement during setup.
async fn run_ddl(session: &Session, ddl: &str) -> Result<(), ConnectError> {
    let mut statement = Statement::new(ddl.to_owned());
    statement.set_is_idempotent(true);
    session
        .query_unpaged(statement, ())
        .await
        .map(|_| ())
        .map_err(|e| execution_to_connect(ddl, &e))
}

/// Creates `schema_migrations` and applies the schema files it does not
/// record yet, in version order. Every file is `IF NOT EXISTS` throughout,
/// so two processes migrating at once, or a crash between a file and its
/// record, only repeat harmless statements.
async fn migrate(session: &Session, keyspace: &Ident) -> Result<(), ConnectError> {
    for ddl in cql::migrations_table_ddl(keyspace) {
        run_ddl(session, &ddl).await?;
    }
    let internal = InternalCql::new(keyspace);
    let applied = applied_versions(session, &internal.select_migrations)
        .await
        .map_err(|e| match e {
            VersionsError::Execution(e) => execution_to_connect(&internal.select_migrations, &e),
            VersionsError::Decode(reason) => ConnectError::Schema {
                statement: internal.select_migrations.clone(),
                reason,
            },
        })?;
    let record = prepare_setup(session, &internal.record_migration).await?;
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        for ddl in cql::migration_ddl(keyspace, migration) {
            run_ddl(session, &ddl).await?;
        }
        session
            .execute_unpaged(&record, (migration.version, migration.name))
            .await
            .map_err(|e| execution_to_connect(&internal.record_migration, &e))?;
        info!(
            keyspace = keyspace.as_str(),
            version = migration.version,
            name = migration.name,
            "schema migration applied"
        );
    }
    Ok(())
}

/// Why the applied schema versions could not be read.
enum VersionsError {
    Execution(Box<scylla::errors::ExecutionError>),
    Decode(String),
}

async fn applied_versions(session: &Session, select: &str) -> Result<Vec<i32>, VersionsError> {
    let mut statement = Statement::new(select.to_owned());
    statement.set_is_idempotent(true);
    let result = session
        .query_unpaged(statement, ())
        .await
        .map_err(|e| VersionsError::Execution(Box::new(e)))?;
    let decode = |e: &dyn std::fmt::Display| VersionsError::Decode(e.to_string());
    let rows = result.into_rows_result().map_err(|e| decode(&e))?;
    let mut versions = Vec::new();
    for row in rows.rows::<(i32,)>().map_err(|e| decode(&e))? {
        versions.push(row.map_err(|e| decode(&e))?.0);
    }
    versions.sort_unstable();
    Ok(versions)
}

/// Prepares an idempotent statement on `table`.
async fn prepare(
    session: &Session,
    table: &str,
    text: &str,
) -> Result<PreparedStatement, StoreError> {
    let mut prepared = session
        .prepare(text.to_owned())
        .await
        .map_err(|e| prepare_to_store(table, &e))?;
    prepared.set_is_idempotent(true);
    Ok(prepared)
}

/// Prepares an idempotent statement during setup.
async fn prepare_setup(session: &Session, text: &str) -> Result<PreparedStatement, ConnectError> {
    let mut prepared = session
        .prepare(text.to_owned())
        .await
        .map_err(|e| prepare_to_connect(text, &e))?;
    prepared.set_is_idempotent(true);
    Ok(prepared)
}

/// Write timestamps for writes without an order: microseconds since the
/// epoch, strictly increasing within the process, so two batches written
/// one after the other apply in that order even if the wall clock steps
/// back. Taken once per write, so a retried statement rewrites exactly the
/// same cell.
#[derive(Debug, Default)]
struct Clock {
    last: AtomicI64,
}

impl Clock {
    fn next(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(table: &str, key: &str, value: Option<&[u8]>, order: Option<u64>) -> RowWrite {
        RowWrite {
            table: table.to_owned(),
            key: key.to_owned(),
            value: value.map(<[u8]>::to_vec),
            order,
        }
    }

    #[test]
    fn clock_is_strictly_increasing_and_in_microseconds() {
        let clock = Clock::default();
        let mut last = 0;
        for _ in 0..10_000 {
            let t = clock.next();
            assert!(t > last);
            last = t;
        }
        // 2020-01-01 in microseconds.
        assert!(last > 1_577_836_800_000_000);
    }

    #[test]
    fn order_is_the_write_timestamp() {
        let clock = Clock::default();
        let rows = [
            row("journey_v1", "a", Some(b"x"), Some(6)),
            row("journey_v1", "b", None, Some(4)),
            row("identity_v1_links", "c", Some(b"y"), None),
        ];
        let planned = plan_rows(&rows, &clock).unwrap();
        assert_eq!(planned.len(), 3);
        assert_eq!(planned[0].timestamp, 6);
        assert_eq!(planned[1].timestamp, 4);
        assert_eq!(planned[1].value, None);
        assert!(planned[2].timestamp > 1_577_836_800_000_000);
    }

    #[test]
    fn a_row_named_twice_keeps_the_later_write() {
        let clock = Clock::default();
        let rows = [
            row("t", "a", Some(b"1"), None),
            row("u", "a", Some(b"other table"), None),
            row("t", "a", None, None),
        ];
        let planned = plan_rows(&rows, &clock).unwrap();
        assert_eq!(planned.len(), 2);
        assert_eq!(
            (planned[0].table, planned[0].value),
            ("u", Some(&b"other table"[..]))
        );
        assert_eq!((planned[1].table, planned[1].value), ("t", None));
    }

    #[test]
    fn a_bad_row_fails_the_batch_before_any_write() {
        let clock = Clock::default();
        let rows = [
            row("t", "a", Some(b"1"), None),
            row("T;DROP", "a", Some(b"1"), None),
        ];
        assert!(matches!(
            plan_rows(&rows, &clock),
            Err(StoreError::UnknownTable(msg)) if msg.starts_with("T;DROP (invalid table name")
        ));
        let rows = [row("t", "a", Some(b"1"), Some(u64::MAX))];
        assert!(matches!(
            plan_rows(&rows, &clock),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_heads_rows_are_one_group_in_a_partitioned_table() {
        let clock = Clock::default();
        let big = vec![0u8; MAX_GROUP_BYTES];
        let rows = [
            row("new_v1", "p1/c/1", Some(b"chunk"), Some(3)),
            row("new_v1", "p2", Some(b"head"), Some(3)),
            row("new_v1", "p1", Some(b"head"), Some(3)),
            row("new_v1", "p1/i/e1", None, Some(3)),
            row("old_v1", "p1/c/1", Some(b"chunk"), Some(3)),
            row("old_v1", "p1", Some(b"head"), Some(3)),
            row("new_v1", "hot/c/1", Some(&big), Some(3)),
            row("new_v1", "hot", Some(b"head"), Some(3)),
            row("new_v1", "alone/c/1", Some(&big), Some(3)),
        ];
        let planned = plan_rows(&rows, &clock).unwrap();
        let plan = plan_writes(&planned, |table| {
            Ok(if table == "old_v1" {
                Layout::KeyPerPartition
            } else {
                Layout::Partitioned
            })
        })
        .unwrap();
        let keys = |rows: &[&PlannedRow<'_>]| {
            rows.iter()
                .map(|r| format!("{}:{}", r.table, r.key))
                .collect::<Vec<_>>()
        };
        let groups: Vec<Vec<String>> = plan.groups.iter().map(|g| keys(g)).collect();
        assert_eq!(
            groups,
            [
                vec!["new_v1:alone/c/1".to_owned()],
                vec![
                    "new_v1:p1/c/1".to_owned(),
                    "new_v1:p1".to_owned(),
                    "new_v1:p1/i/e1".to_owned()
                ],
                vec!["new_v1:p2".to_owned()],
            ]
        );
        // The older layout, and a head's rows too large for one mutation:
        // sub rows first, heads after.
        assert_eq!(keys(&plan.subs), ["old_v1:p1/c/1", "new_v1:hot/c/1"]);
        assert_eq!(keys(&plan.heads), ["old_v1:p1", "new_v1:hot"]);
    }

    #[test]
    fn a_position_named_twice_keeps_the_later_one() {
        let p = |partition, next_offset| PositionWrite {
            consumer: "journey.v1".to_owned(),
            topic: "waymark.events".to_owned(),
            partition,
            next_offset,
        };
        let positions = [p(0, 10), p(1, 5), p(0, 12)];
        let planned: Vec<(u32, u64)> = plan_positions(&positions)
            .into_iter()
            .map(|p| (p.partition, p.next_offset))
            .collect();
        assert_eq!(planned, [(1, 5), (0, 12)]);
    }
}
