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
//! - `codec.rs`: the record layout.
//!
//! # Guarantees
//! - An append is acknowledged only after its transaction is durable
//!   (redb `Durability::Immediate`: fsync), so an acknowledged record
//!   survives `kill -9` and power loss; a torn transaction is rolled back on
//!   open.
//! - Offsets within a partition are dense, start at 0 and never change.
//! - A store batch (rows + positions) is one atomic fjall write batch (one
//!   checksummed journal entry): after a crash the store holds either the
//!   whole batch or none of it, and the positions always match the rows. A batch that wrote outputs or dead
//!   letters is durable before the runner goes on; a replayable one (all of
//!   its effects are in the store) is made durable within 250 ms or on
//!   close, so a crash can roll the store back by at most that much, rows
//!   and positions together, and the records are applied again.
//! - Embedded consumer groups have exactly one member (one process); it is
//!   assigned every partition.

mod codec;
mod log;
mod store;

pub use log::EmbeddedLog;
pub use store::EmbeddedStore;
