//! The embedded default of `waymark dev`: a durable log on
//! [redb](https://docs.rs/redb) (copy-on-write B-trees, checksummed
//! commits) and a projection store on [fjall](https://docs.rs/fjall) (an LSM
//! tree: checksummed journal, memtables, sorted tables), both crash-safe,
//! pure-Rust embedded databases. `docs/decisions/0001-embedded-storage.md`
//! has the measurements behind each choice.
//!
//! # Layout
//! - [`EmbeddedLog`] (`log.rs`): topics → partitions → `offset → record`
//!   tables; one writer thread group-commits appends and consumer commits.
//! - [`EmbeddedStore`] (`store.rs`): projection tables and consumer
//!   positions, one fjall keyspace each, in the data directory's `store/`;
//!   [`EmbeddedStore::import_redb`] carries over a store written by an
//!   older Waymark (one redb file).
//! - `codec.rs`: the record layout ([`StoredRecord`]: header names and
//!   values of any bytes and length, null keys, values and header values).
//! - `producers.rs`: idempotent-producer state for Kafka-protocol appends.
//!
//! # Guarantees
//! - An append is acknowledged only after its transaction is durable
//!   (redb `Durability::Immediate`: fsync), so an acknowledged record
//!   survives `kill -9` and power loss; a torn transaction is rolled back on
//!   open.
//! - Offsets within a partition are dense, start at 0 and never change;
//!   append times never decrease along a partition.
//! - A Kafka-protocol append ([`EmbeddedLog::append`]) of an idempotent
//!   producer is checked against that producer's state (epoch, sequence
//!   ranges of its last five batches per partition), which is written in
//!   the same transaction as the records: a retry of an appended batch,
//!   before or after a crash, is answered with the original offset and never
//!   appended twice; a gap in sequence numbers is refused.
//! - A stored record that does not decode never stops a reader: it is
//!   handed out as a record carrying the raw bytes and a
//!   [`CORRUPT_HEADER`] header, which processors dead-letter.
//! - A store batch (rows + positions) is one atomic fjall write batch (one
//!   checksummed journal entry): after a crash the store holds either the
//!   whole batch or none of it, and the positions always match the rows.
//!   A batch that wrote outputs or dead letters is durable before the
//!   runner goes on; a replayable one (all of
//!   its effects are in the store) is made durable within 250 ms or on
//!   close, so a crash can roll the store back by at most that much, rows
//!   and positions together, and the records are applied again.
//! - A full disk is an error, never a stop: a log commit that fails (no
//!   space, any I/O error) answers `LogError::Unavailable` to everything
//!   it carried and publishes nothing of it; redb then refuses every
//!   transaction, so the log drops the database and opens the file again
//!   (redb repairs it), at most once a second until that works. The store
//!   does the same with fjall, which refuses every write once a write or a
//!   background flush failed (at once, then after waits doubling from 1 s
//!   to 30 s while it keeps failing: an open replays the journal); each
//!   store commit reaches the OS before it is acknowledged, so opening it
//!   again loses nothing acknowledged. When
//!   space returns the same process takes appends and applies them again
//!   (fault cases `dev_disk_full_then_space_returns`,
//!   `dev_store_disk_full_then_space_returns`).
//! - Embedded consumer groups have exactly one member (one process); it is
//!   assigned every partition.

mod codec;
mod log;
mod producers;
mod store;

pub use codec::{StoredRecord, CORRUPT_HEADER};

/// The layout of a stored log record (see the `codec` module docs), for
/// fuzzing and tools: [`format::decode`] never panics on any bytes, and
/// what it decodes encodes back to the same bytes.
pub mod format {
    pub use crate::codec::{decode, decode_v1, encode_stored};
}
pub use log::{AppendOutcome, AppendRefusal, AppendResult, EmbeddedLog, PartitionAppend};
pub use producers::{ProducerBatch, SequenceRefusal};
pub use store::EmbeddedStore;
