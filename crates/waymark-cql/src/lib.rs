//! The projection store on ScyllaDB or Cassandra 5: [`CqlStore`]
//! implements [`waymark_runtime::ProjectionStore`] with the `scylla` driver.
//!
//! # Layout
//! - [`config`]: [`CqlConfig`], its defaults and its validation.
//! - [`cql`]: table and keyspace name validation, the schema files and the
//!   text of every prepared statement. Only a validated name
//!   (`[a-z0-9_]{1,48}`, written double-quoted) or a validated replication
//!   map is ever put into CQL text; keys, values, offsets and timestamps are
//!   always bound.
//! - [`store`]: [`CqlStore`] — connect, migrate, the statement cache per
//!   table, reads and writes.
//! - [`error`]: [`ConnectError`] and how driver errors become
//!   [`StoreError`](waymark_runtime::StoreError)s.
//! - `schema/`: the CQL, applied at every start, all `IF NOT EXISTS`:
//!   `keyspace.cql` (created when missing), `schema_migrations.cql` (which
//!   versions are applied), the versioned files `NNNN_name.cql` (listed in
//!   [`cql::MIGRATIONS`]; `0001_positions.cql` is the positions table
//!   `PRIMARY KEY ((consumer, topic), partition)`) and
//!   `projection_table.cql`, the template of one projection table
//!   (`head text, sub text, value blob, PRIMARY KEY (head, sub)`) created
//!   by `ensure_tables`: a row key is split at its first `/`, so a head row
//!   (`<person>`) and its sub rows (`<person>/<sub>`, decision 0006) are
//!   one CQL partition. A table an older Waymark created with `key text
//!   PRIMARY KEY` is recognised by its columns and used as it is.
//!
//! # Guarantees
//! A batch as a whole is not written atomically (that would need a logged
//! batch across partitions, which is slow, limited in size and still not
//! isolated); each head with its sub rows is. Beyond that:
//!
//! - **Credentials and TLS.** [`CqlConfig::username`] and
//!   [`CqlConfig::password`] log in with `PasswordAuthenticator`;
//!   [`CqlConfig::tls`] encrypts every connection (OpenSSL; the node's
//!   certificate must chain to the CA and name its IP address). Refused
//!   credentials or a failed handshake are [`ConnectError::Refused`], which
//!   is not retryable, so a wrong password stops start-up with the reason
//!   instead of a retry loop (`tests/secure_engines.rs` of `waymark-cli`).
//!   The password is a [`Secret`]: it is never printed.
//! - **Row cache.** The store asks each fold runner to keep
//!   [`CqlConfig::row_cache_bytes`] (64 MiB by default) of rows cached in
//!   front of it (`waymark_runtime::cache::RowCache`), so a fold reads from
//!   the cluster only rows it has not seen since its partitions were
//!   assigned; a write goes to the cluster first and then to the cache.
//! - **Rows, then positions.** All row writes of a batch run concurrently
//!   (at most [`CqlConfig::concurrency`] in flight) and all must succeed
//!   before any position of the batch is written. A crash or an error in
//!   between leaves rows ahead of the stored position; the runtime then
//!   replays from the position and the rows make the replay harmless. A
//!   position is never stored before its rows.
//! - **A late write never overwrites a newer one.** A row write with
//!   `order: Some(n)` is written `USING TIMESTAMP n` (a delete too: its
//!   tombstone has timestamp `n`). ScyllaDB and Cassandra keep, per cell,
//!   the write with the highest timestamp, whatever the order of arrival,
//!   so a redelivered, retried or delayed write with a smaller order loses.
//!   This is safe because a row key belongs to exactly one partition of the
//!   input topic (events are keyed by the person or identity the row is
//!   about) and a partition is applied in offset order by one owner at a
//!   time, so the orders (`offset + 1`) of one key only grow. A stale owner
//!   after a rebalance only re-applies records the new owner also applies,
//!   so it writes the same values at orders no larger than the new
//!   owner's. Equal timestamps are broken by comparing values, so the same
//!   order must always mean the same value: folds are deterministic.
//! - **Orders are not clock time.** A row with `order: None` is written
//!   with this process's clock (microseconds since the epoch, strictly
//!   increasing within the process, taken once per batch), which is far
//!   above any offset. A table must therefore be written always with
//!   orders or always without (the runtime does: folds always have one,
//!   the identity tables never). To rebuild a table from offset 0, or after
//!   the input topic is recreated, write a new table version
//!   (`journey_v2`) rather than reusing the old one. Keep time-window
//!   compaction and Cassandra 5's `minimum_timestamp_*` guardrails (off by
//!   default) away from these tables.
//! - **Rows without an order.** The identity processor's rows, which no
//!   input partition owns, are written by compare-and-set only
//!   (lightweight transactions): they change by transitions against the
//!   row read (decision 0008, `waymark-identity`'s `shared.rs`), because
//!   the store says several processes write it
//!   (`written_by_several_processes`); a key written this way is never
//!   written with `USING TIMESTAMP`. The other rows without an order (the
//!   parked records of a partition) are written by the partition's owner
//!   only, last writer wins by its clock.
//! - **A head and its sub rows are one write.** A batch's rows of one head
//!   in one table (a person's timeline head, its chunks and id rows) are
//!   one unlogged single-partition `BATCH`, which ScyllaDB and Cassandra
//!   apply atomically and in isolation (and which no batch size guardrail
//!   refuses: those count multi-partition batches only). So a crash never
//!   leaves a head with part of its sub rows, and a reader never sees half
//!   of an update. Two cases keep the older order instead, sub rows before
//!   every head, heads before positions (the head is the commit point, and
//!   the handlers treat sub rows written past their head as not there:
//!   `processors/person/tests/torn.rs`): a head whose rows in one batch
//!   count more than 12 MiB (a single-partition batch is one mutation,
//!   which may not exceed half a commit log segment), and tables of the
//!   older key-per-partition layout. Rows of different tables (`person`'s
//!   fold row and its history) are separate writes; the handlers order
//!   and check them (see `waymark-person`).
//! - **Positions never move back (fencing).** A position is written
//!   `USING TIMESTAMP 2^53 + next_offset`, so the larger position wins
//!   whatever the order of arrival: a member that lost its partitions
//!   (paused past its session timeout, stuck in an outage past
//!   `max.poll.interval.ms`) and writes an older one late changes nothing.
//!   The base 2^53 lies above every clock timestamp (µs) an earlier build
//!   wrote positions with. Consumer ids include the projection version and
//!   are never reused, so positions only ever grow; a dropped version's are
//!   deleted for good, by a tombstone at 2^54, above every position.
//! - **Exactly-once effects, LWT only where owners meet.** The position
//!   guard (the runtime reads from the stored position and rows record
//!   what they applied) and `USING TIMESTAMP` make every fold's write
//!   idempotent and ordered per key, so folds need no compare-and-set and
//!   no Paxos round trip (four per write). LWT (`IF ...`, serial
//!   consistency) is used where two writers can change one key
//!   concurrently from different reads: the identity rows (a key not owned
//!   by one log partition), the identity resolutions that fence a zombie
//!   member, the projection catalog and the recorded partition counts.
//! - **Retries.** Every statement binds its own timestamp, so repeating it
//!   writes the same cell again; all are marked idempotent, and the driver
//!   may retry or speculate them. Reads and writes use `LOCAL_QUORUM`, so a
//!   partition's new owner reads what the previous owner wrote (R + W > RF
//!   in the local datacenter).
//! - **Errors.** Connection failures, timeouts, too few replicas and
//!   overload are [`StoreError::Unavailable`](waymark_runtime::StoreError)
//!   (the runtime backs off and retries the batch); a table that does not
//!   exist, or a name that can never be one, is `UnknownTable` with the
//!   reason; a stored value of the wrong shape is `Corrupt`.
//!
//! # ScyllaDB at scale
//! - Sessions are token-aware (each statement goes to a replica of its
//!   partition) and, on ScyllaDB, shard-aware: one connection per shard,
//!   each statement sent to the shard that owns its token. List nodes with
//!   the shard-aware port 19042 where it is reachable (behind NAT the
//!   driver then still reaches the right shard).
//! - Every head (a person, an identity key) is its own partition, with its
//!   sub rows, so load spreads with the number of people. `get_many` issues concurrent single-partition
//!   SELECTs rather than one `IN` query, so no coordinator fans out.
//! - Tablets (ScyllaDB 6+) split and move a hot table's data across shards
//!   and nodes; create the keyspace yourself with `AND tablets = {...}` and
//!   `NetworkTopologyStrategy`, since that syntax is ScyllaDB's only. A
//!   hot key (one person with a flood of events) is one partition: ScyllaDB's
//!   `per_partition_rate_limit` table option can cap it.
//! - Schema: ScyllaDB changes schema through Raft, so concurrent
//!   `CREATE ... IF NOT EXISTS` from many processes is safe; on Cassandra 5
//!   let one process create new tables first (concurrent creation of one
//!   table on different nodes can leave a schema disagreement).
//!
//! # Portability
//! The CQL used is accepted by both ScyllaDB and Cassandra 5: `CREATE
//! KEYSPACE/TABLE IF NOT EXISTS`, the types `text`, `blob`, `int`, `bigint`,
//! `timestamp`, `INSERT`/`DELETE ... USING TIMESTAMP ?`, single-partition
//! `SELECT`s and `toTimestamp(now())`, and lightweight transactions (`IF
//! NOT EXISTS`, `IF value = ?`) only for compare-and-set: the projection
//! catalog, the recorded partition counts and the identity rows (prepared,
//! like every statement on a projection table), unlogged single-partition
//! `BATCH`es of statements that each carry `USING TIMESTAMP`, and
//! `system_schema.columns` (to tell a table's layout). No logged or
//! multi-partition batches, materialized views, secondary indexes or vendor
//! table options. A row key may not start with `/` (its partition key
//! would be empty, which both refuse).

pub mod config;
pub mod cql;
pub mod error;
pub mod store;

pub use config::{CqlConfig, CqlTls, Secret, DEFAULT_REPLICATION, DEFAULT_ROW_CACHE_BYTES};
pub use cql::{validate_table_name, NameError};
pub use error::ConnectError;
pub use store::CqlStore;
