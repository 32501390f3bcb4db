//! Metric names of the runtime, declared in one place.
//!
//! Every runner metric has the labels `processor` and `version` (the
//! projection version, so a rebuild's runner and the live one never share
//! a series); some add `partition`, `stage` or `kind` — never a person id.
//! Counters are bumped once per batch, not per event. The lag gauges are
//! set once a second by each runner, whether or not it has work.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Counter: records of `waymark.events` a handler decoded (`shared="false"`) or got
/// from another runner of the process (`shared="true"`,
/// [`crate::decode`]), by processor and version.
pub const DECODED: &str = "waymark_processor_decoded_records_total";
/// Events applied (state changed or forwarded), by processor.
pub const EVENTS_APPLIED: &str = "waymark_processor_events_applied_total";
/// Events ignored as duplicate ids, by processor.
pub const EVENTS_DUPLICATE: &str = "waymark_processor_events_duplicate_total";
/// Records ignored because already applied (redelivery), by processor.
pub const EVENTS_REDELIVERED: &str = "waymark_processor_events_redelivered_total";
/// Dead letters written, by processor and kind.
pub const DEAD_LETTERS: &str = "waymark_processor_dead_letters_total";
/// Counter: dead letters dropped because the dead-letter topic refused
/// them even without their value (logged as errors).
pub const DROPPED: &str = "waymark_processor_dropped_total";
/// Time from polling a batch to committing it, by processor.
pub const BATCH_DURATION: &str = "waymark_processor_batch_duration_seconds";
/// Records per batch, by processor.
pub const BATCH_SIZE: &str = "waymark_processor_batch_records";
/// Records not yet applied, by processor, version and partition.
pub const LAG: &str = "waymark_processor_lag_records";
/// Seconds since the oldest record not yet applied was appended (0 when
/// caught up), by processor, version and partition.
pub const LAG_SECONDS: &str = "waymark_processor_lag_seconds";
/// Gauge: the next offset to apply (records applied so far), by
/// processor, version and partition; its rate is a rebuild's speed.
pub const POSITION: &str = "waymark_processor_position";
/// Retries after a store or log error, by processor and stage.
pub const RETRIES: &str = "waymark_processor_retries_total";
/// Row writes (upserts and deletes) sent to the store, by processor: set
/// against the rows a projection holds, it is the write amplification of
/// folding batch by batch.
pub const ROWS_WRITTEN: &str = "waymark_processor_rows_written_total";
/// Gauge: retries of the batch a partition is stuck on (0 once it is
/// applied), by processor, version and partition.
pub const FAILING_RETRIES: &str = "waymark_processor_failing_retries";
/// Counter: records whose key was parked or that were parked behind it,
/// by processor and version (see [`crate::park`]).
pub const PARKED: &str = "waymark_processor_parked_records_total";
/// Gauge: keys parked now on the partitions a runner owns, by processor
/// and version.
pub const PARKED_KEYS: &str = "waymark_processor_parked_keys";
/// Time spent in one step of a batch, by processor and stage (`handle`:
/// reading rows and folding; `produce`: outputs and dead letters; `write`:
/// rows and positions).
pub const STAGE_DURATION: &str = "waymark_processor_stage_duration_seconds";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    describe_counter!(
        EVENTS_APPLIED,
        Unit::Count,
        "events applied to projections or forwarded"
    );
    describe_counter!(
        EVENTS_DUPLICATE,
        Unit::Count,
        "events ignored as duplicates (an id within the dedupe window, or a record appended again)"
    );
    describe_counter!(
        EVENTS_REDELIVERED,
        Unit::Count,
        "records ignored because their position was already applied"
    );
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "records written to the dead-letter topic"
    );
    describe_counter!(
        DROPPED,
        Unit::Count,
        "dead letters the dead-letter topic refused even without their value"
    );
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "time from poll to commit of one batch"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "records per batch");
    describe_gauge!(
        LAG,
        Unit::Count,
        "records in the input partition not yet applied"
    );
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "age of the oldest record in the input partition not yet applied"
    );
    describe_gauge!(
        POSITION,
        Unit::Count,
        "next offset of the input partition to apply (a rebuild's progress)"
    );
    describe_counter!(RETRIES, Unit::Count, "retries after a store or log error");
    describe_counter!(
        ROWS_WRITTEN,
        Unit::Count,
        "row upserts and deletes sent to the projection store"
    );
    describe_gauge!(
        FAILING_RETRIES,
        Unit::Count,
        "retries of the batch a partition is stuck on (0 when it is not)"
    );
    describe_counter!(
        PARKED,
        Unit::Count,
        "records parked because their key failed permanently"
    );
    describe_gauge!(PARKED_KEYS, Unit::Count, "keys parked now");
    describe_counter!(
        DECODED,
        Unit::Count,
        "records decoded by the handler (shared=false) or shared by another runner of the process (shared=true)"
    );
    describe_histogram!(
        STAGE_DURATION,
        Unit::Seconds,
        "time spent in one step of a batch (handle, produce, write)"
    );
}
