//! The processor runtime shared by every Waymark processor.
//!
//! # Layout
//! - [`log`]: the log seam ([`Log`], [`LogConsumer`]) and the key partitioner.
//! - [`store`]: the projection-store seam ([`ProjectionStore`]).
//! - [`plugin`]: what a processor crate provides
//!   ([`plugin::ProcessorFactory`]) and the [`plugin::Registry`] of them;
//!   the runtime itself names no processor.
//! - [`handler`]: what a processor does with a batch ([`Handler`]);
//!   [`ProjectionHandler`] runs any [`waymark_core::Fold`].
//! - [`row`]: how rows are stored; every row carries its state encoding.
//! - [`runner`]: the loop that owns polling, retries, store writes,
//!   positions, commits and dead letters ([`Runner`]).
//! - [`catalog`]: projection versions (building / live / retired), which
//!   one queries read, and the exactly-once hand-off of side effects between
//!   versions ([`catalog::VersionGate`]).
//! - [`cache`]: a runner's row cache in front of a remote store.
//! - [`memory`], [`memory_log`]: an in-memory [`ProjectionStore`] and
//!   [`Log`], the deterministic doubles of the runtime's own tests (runner,
//!   catalog, version hand-off).
//! - [`dead_letter`]: dead-letter records and their headers (contract §5).
//! - [`park`]: parked keys, the records of a key held back in order after
//!   one failed for good; [`status`]: the partitions a runner keeps
//!   failing on.
//! - [`metrics`]: metric names.
//!
//! # Guarantees
//! - **Per-key ordering.** Records of one partition are handled in offset
//!   order, one batch at a time, and producers key events by identity or
//!   person, so every person's events are applied in log order.
//! - **At-least-once delivery, exactly-once effects.** A batch's outputs are
//!   appended (durably) before its rows, and its rows are written together
//!   with the next offsets they reflect ([`store::WriteBatch`]), atomically;
//!   a batch without outputs may be committed lazily
//!   ([`ProjectionStore::write_replayable`]): a crash then loses rows and
//!   positions together and the records are applied again. On
//!   assignment a partition is read from the position stored with the rows,
//!   not from the group's committed offset. Every row also records the
//!   position it reflects and the event ids applied within the dedupe window
//!   ([`waymark_core::Tracked`]), so a redelivered record or a duplicate
//!   event id changes nothing. Outputs of a batch that is retried after a
//!   crash are appended again; they carry the position of the input record
//!   they came from ([`handler::SOURCE_HEADER`]), and the folds apply a
//!   record of a source partition at or before one already applied as a
//!   duplicate ([`waymark_core::Tracked::apply_from`]), whatever its event
//!   time (test
//!   `crash_after_output_before_state_applies_nothing_twice_whatever_the_event_time`).
//! - **Dead letters.** A record that cannot be decoded or validated is
//!   appended to the dead-letter topic with its original key, value and the
//!   headers of contract §5 before the position past it is stored; it never
//!   stops the processor.
//! - **Failures.** Every error is transient or permanent, decided once per
//!   seam ([`StoreError::is_retryable`], [`LogError::is_retryable`],
//!   [`HandleError::is_retryable`]). A transient one is retried with
//!   exponential backoff; nothing past the failing batch is stored or
//!   committed meanwhile, and the partition is reported failing
//!   ([`status`], metric `waymark_processor_failing_retries`, a warning with
//!   the record's position). A permanent one never stops the partition: the
//!   batch is applied again in halves until the failing record stands alone,
//!   and a fold **parks that record's key** (the person), holding its later
//!   records back in order while every other key flows, until an operator
//!   retries or skips it; other handlers dead-letter the record as
//!   `processing_failed` ([`park`]; tests in `tests/parking.rs` and
//!   `waymark-cli/tests/parked.rs`). A record its topic refuses for good as
//!   too large is made to fit (an output becomes a dead letter, a dead
//!   letter is truncated), never retried forever. A consumer whose polls
//!   keep failing for [`RunnerConfig::resubscribe_after`] (30 s) is
//!   replaced by a fresh subscription, which seeks to the stored positions
//!   (a librdkafka client did not recover from a broker stopped and then
//!   killed: fault case `real_broker_sigstop_and_sigkill`).
//! - **Bounded batches.** A batch holds at most
//!   [`RunnerConfig::max_batch`] records and
//!   [`RunnerConfig::max_batch_bytes`] of keys and values (at least one
//!   record).
//! - **Shutdown.** On cancellation the runner stops polling, finishes the
//!   batch in hand (outputs, rows, positions, commit) and returns.
//! - **Row cache, write-back.** In front of a store that asks for it (both
//!   stores do), a fold's runner keeps the rows it read or wrote in a
//!   bounded cache ([`cache::RowCache`]). Only rows keyed by the input's
//!   partitioning key are cached, so the runner is their only writer while
//!   it owns the partition; the cache is cleared on every assignment change
//!   and after a failed write-through, so it changes no result. Where this
//!   process is the store's one writer (not on CQL,
//!   [`ProjectionStore::written_by_several_processes`]), a batch
//!   without outputs or dead letters read while the runner is behind (its
//!   poll was full) is *deferred* in the cache and written
//!   with later ones, rows and positions together, by a flush: when the
//!   runner has nothing more to read for [`RunnerConfig::linger`], at the
//!   latest [`RunnerConfig::commit_interval`] after the oldest deferred
//!   batch, when the deferred rows reach half the cache, before any other
//!   write, before an assignment change and on shutdown. A crash before a
//!   flush loses rows and positions together (the records are applied
//!   again); a transient flush failure is retried with everything kept; a
//!   flush refused for good discards the deferred rows and reads the
//!   partitions again from the stored positions, written batch by batch,
//!   so the refused record is parked like any other (tests `row_cache_*`
//!   in `waymark-cli/tests/runtime_guarantees.rs`,
//!   `deferred_batches_reach_the_store_in_few_writes_exactly_once` and
//!   `a_refused_flush_is_applied_again_and_the_culprit_parked`).
//! - **Decoded once per process.** Runners given the same
//!   [`decode::SharedDecoder`] (the controller gives one to all it starts)
//!   decode each record of `waymark.events` once between them; an entry
//!   serves only the bytes it was decoded from (fingerprinted), and the
//!   decoder is bounded ([`decode`]).
//! - **Metrics.** Every runner metric has the labels `processor` and
//!   `version`, so a rebuild's runner and the live one never share a
//!   series; the lag gauges (records, and seconds since the oldest record
//!   not yet applied was appended) are set every second by a task of the
//!   runner's own, whether or not it has work ([`metrics`]).
//! - **Rebuilds.** Every projection version has its own tables, positions
//!   and consumer group, so a rebuild from offset 0 never touches the live
//!   version. A runner with a [`catalog::VersionGate`] writes side effects
//!   (outputs, dead letters) only for the offsets that are its version's to
//!   write: none while building, and across a switch each record's side
//!   effects exactly once (see [`catalog`]; proven under crashes at every
//!   step by `catalog::tests::every_offset_is_emitted_by_exactly_one_version_whatever_crashes`).
//!   A version waiting for the other side of the hand-off is
//!   [`catalog::GateError::Waiting`], backed off on quietly, never a
//!   failure. Catalog changes are compare-and-set ([`catalog::update`]).

pub mod cache;
pub mod catalog;
pub mod dead_letter;
pub mod decode;
pub mod handler;
pub mod log;
pub mod memory;
pub mod memory_log;
pub mod metrics;
pub mod park;
pub mod plugin;
pub mod row;
pub mod runner;
pub mod status;
pub mod store;

pub use handler::{BatchOutput, BatchStats, HandleError, Handler, ProjectionHandler};
pub use log::{
    partition_for, Appended, ConsumerEvent, Log, LogConsumer, LogError, OutRecord, Record,
    TopicConfig,
};
pub use runner::{RunError, Runner, RunnerConfig};
pub use store::{PositionWrite, ProjectionStore, RowWrite, StoreError, WriteBatch};
