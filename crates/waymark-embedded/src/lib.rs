//! The embedded default of `waymark dev`: a durable log and a projection
//! store on [redb](https://docs.rs/redb), a crash-safe, pure-Rust embedded
//! database (copy-on-write B-trees, checksummed commits). See
//! `docs/decisions/0001-embedded-storage.md` for why redb.
//!
//! # Layout
//! - [`EmbeddedLog`] (`log.rs`): topics → partitions → `offset → record`
//!   tables; one writer thread group-commits appends and consumer commits.
//! - [`EmbeddedStore`] (`store.rs`): projection tables and consumer
//!   positions in a second database file.
//! - `codec.rs`: the record layout.
//!
//! # Guarantees
//! - An append is acknowledged only after its transaction is durable
//!   (redb `Durability::Immediate`: fsync), so an acknowledged record
//!   survives `kill -9` and power loss; a torn transaction is rolled back on
//!   open.
//! - Offsets within a partition are dense, start at 0 and never change.
//! - A store batch (rows + positions) is one durable transaction: after a
//!   crash the store holds either the whole batch or none of it, and the
//!   positions always match the rows.
//! - Embedded consumer groups have exactly one member (one process); it is
//!   assigned every partition.

mod codec;
mod log;
mod store;

pub use log::EmbeddedLog;
pub use store::EmbeddedStore;
