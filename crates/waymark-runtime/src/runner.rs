//! The processor loop: poll a batch → handle → produce outputs and dead
//! letters → write rows and positions atomically → commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use metrics::Label;
use waymark_core::{RejectKind, Rejection};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cache::RowCache;
use crate::catalog::{EmitRanges, GateError, VersionGate};
use crate::dead_letter::{dead_letter, HEADER_MESSAGE, HEADER_TRUNCATED};
use crate::decode::{self, SharedDecoder};
use crate::handler::{BatchOutput, HandleError, Handler};
use crate::log::{ConsumerEvent, Log, LogConsumer, LogError, OutRecord, Record};
use crate::metrics as m;
use crate::park::{self, ParkAction, ParkRequest, Parked, PendingHeads, PARKED_ENCODING};
use crate::row::decode_row;
use crate::status;
use crate::store::{PositionWrite, ProjectionStore, StoreError, WriteBatch};

/// How one processor instance runs.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Consumer id under which positions are stored, e.g. `journey.v1`.
    pub consumer: String,
    /// The projection version this runner builds (the `version` label of
    /// its metrics); 1 by default.
    pub version: u32,
    /// The consumer group this processor joins, `waymark.<consumer>` by
    /// default.
    pub group: String,
    /// Input topic.
    pub input_topic: String,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// Most records per batch.
    pub max_batch: usize,
    /// Most bytes (keys and values) per batch; a batch holds at least one
    /// record, however large.
    pub max_batch_bytes: usize,
    /// First retry delay.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How long polls may fail in a row before the runner replaces its
    /// consumer with a fresh subscription ([`RESUBSCRIBE_AFTER`] by
    /// default).
    pub resubscribe_after: Duration,
    /// With a row cache ([`crate::cache`]): the longest a batch without
    /// outputs may stay deferred in the cache before its rows and positions
    /// are written, while the runner is behind: its last poll was full
    /// (`max_batch` records); a poll with room to spare writes the batch at
    /// once, with what was deferred before it ([`COMMIT_INTERVAL`] by
    /// default; zero writes every batch at once). Like Kafka Streams'
    /// `commit.interval.ms`, it trades how much is applied again after a
    /// crash for how often a row changed by many batches is written.
    pub commit_interval: Duration,
    /// How long a runner with deferred rows waits for more records before
    /// it writes them ([`LINGER`] by default): once it has caught up, what
    /// it applied is in the store this much later.
    pub linger: Duration,
}

impl RunnerConfig {
    /// Defaults for `consumer` reading `input_topic`.
    pub fn new(
        consumer: impl Into<String>,
        input_topic: impl Into<String>,
        dlq_topic: impl Into<String>,
    ) -> Self {
        let consumer = consumer.into();
        Self {
            group: format!("waymark.{consumer}"),
            consumer,
            version: 1,
            input_topic: input_topic.into(),
            dlq_topic: dlq_topic.into(),
            max_batch: 10000,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            resubscribe_after: RESUBSCRIBE_AFTER,
            commit_interval: COMMIT_INTERVAL,
            linger: LINGER,
        }
    }

    /// Labels its metrics as projection version `version`.
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Joins the group `<prefix>.<consumer>` instead (isolated test or
    /// tenant deployments sharing one cluster).
    pub fn with_group_prefix(mut self, prefix: &str) -> Self {
        self.group = format!("{prefix}.{}", self.consumer);
        self
    }
}

/// Why a runner stopped with an error. A runner stops for no record: a
/// permanent failure parks the record's key or dead-letters the record
/// ([`crate::park`]), a transient one is retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The runner's own table of parked keys cannot be created.
    #[error("processor {processor} cannot start: {source}")]
    Fatal {
        /// Processor.
        processor: String,
        /// Cause.
        source: StoreError,
    },
}

/// Runs one processor until `shutdown` is cancelled.
pub struct Runner {
    log: Arc<dyn Log>,
    /// The store, or the row cache in front of it.
    store: Arc<dyn ProjectionStore>,
    cache: Option<Arc<RowCache>>,
    /// The row cache's byte budget (0 without one).
    cache_budget: usize,
    /// Whether batches may be deferred in the row cache (only where this
    /// process is the store's one writer).
    write_back: bool,
    handler: Arc<dyn Handler>,
    config: RunnerConfig,
    gate: Option<Arc<VersionGate>>,
    /// `processor` and `version`, on every metric.
    labels: Vec<Label>,
    /// Whether the last poll was full: the runner is behind, and batches
    /// may be deferred in the row cache. A poll with room to spare means it
    /// has caught up, and each batch is written at once (with whatever was
    /// deferred before it), so what it applies is visible within a batch.
    behind: AtomicBool,
    /// Where the handler's decoded records are shared with the process's
    /// other runners ([`crate::decode`]), if anywhere.
    decoder: Option<Arc<SharedDecoder>>,
    /// The version's parked-keys table ([`crate::park`]).
    park_table: String,
    /// Whether a failing record's key is parked (rows follow the input's
    /// partitioning) or the record dead-lettered.
    park_keys: bool,
    /// The parked keys of the partitions this runner owns.
    parked: Mutex<Parked>,
    /// Partitions read again from their stored positions after the store
    /// refused a flush of deferred rows: up to the offset reached before,
    /// their batches are written through, so a record the store refuses
    /// for good is found and parked like any other.
    replaying: Mutex<BTreeMap<u32, u64>>,
}

/// The default [`RunnerConfig::resubscribe_after`].
pub const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(30);

/// The default [`RunnerConfig::commit_interval`].
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// The default [`RunnerConfig::linger`].
pub const LINGER: Duration = Duration::from_millis(5);

/// The default [`RunnerConfig::max_batch_bytes`]: 16 MiB.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 << 20;

/// `records` cut, in order, into runs of at most `max_bytes` of keys and
/// values each (a run holds at least one record).
fn byte_chunks(records: &[Record], max_bytes: usize) -> Vec<&[Record]> {
    let size =
        |r: &Record| r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len);
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let n = size(r);
        if i > start && bytes + n > max_bytes {
            chunks.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < records.len() {
        chunks.push(&records[start..]);
    }
    chunks
}

/// What a record to append is, by the index of the input record it came
/// from.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// An output of the handler.
    Output(usize),
    /// The dead letter of an input record.
    DeadLetter(usize),
}

impl Origin {
    fn input(self) -> usize {
        match self {
            Origin::Output(i) | Origin::DeadLetter(i) => i,
        }
    }
}

/// `record` (a dead letter) made smaller: its value halved (the first time
/// with header [`HEADER_TRUNCATED`] added), then, once it is empty, its
/// message header cut to 1 KiB; `None` when there is nothing left to cut.
fn truncated(mut record: OutRecord) -> Option<OutRecord> {
    if record.value.is_empty() {
        let (_, message) = record
            .headers
            .iter_mut()
            .find(|(k, _)| k == HEADER_MESSAGE)?;
        if message.len() <= 1024 {
            return None;
        }
        message.truncate(1024);
        return Some(record);
    }
    if !record.headers.iter().any(|(k, _)| k == HEADER_TRUNCATED) {
        let original = record.value.len().to_string().into_bytes();
        record.headers.push((HEADER_TRUNCATED.to_owned(), original));
    }
    let keep = record.value.len() / 2;
    record.value.truncate(keep);
    Some(record)
}

/// What became of one batch.
enum Outcome {
    /// Applied: the next offset per partition.
    Applied(Vec<(u32, u64)>),
    /// Shut down before it was durably applied.
    Stopped,
    /// Failed in a way retrying cannot mend.
    Permanent(StepError),
    /// Another member has applied the batch's partition past it
    /// ([`HandleError::Fenced`]): nothing of it is this process's to write.
    Fenced,
    /// The store refused for good to write the rows deferred before the
    /// batch: they were discarded, and the partitions must be read again
    /// from the stored positions.
    Rewind,
}

/// What [`Runner::apply_isolating`] got done.
struct Isolated {
    /// The next offset per partition it applied (or found applied).
    positions: Vec<(u32, u64)>,
    /// Whether the rest of the poll is dropped, and from where the
    /// partitions are read again.
    interrupted: Interrupted,
}

impl Isolated {
    /// Stopped by a refused flush, after `positions` were applied.
    fn rewind(positions: BTreeMap<u32, u64>) -> Self {
        Self {
            positions: positions.into_iter().collect(),
            interrupted: Interrupted::Rewind,
        }
    }
}

/// Why [`Runner::apply_isolating`] stopped before the end of its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupted {
    /// It did not.
    No,
    /// Another member had applied part of it: its partitions are read again
    /// from where they stand now.
    Fenced,
    /// A flush of deferred rows was refused for good: every partition is
    /// read again from its stored position ([`Runner::rewind`]).
    Rewind,
}

/// Where the batch got to, so a retry resumes instead of redoing effects.
#[derive(Default)]
struct Progress {
    output: Option<BatchOutput>,
    /// Parked keys the batch changes, applied once it is written.
    parked: PendingHeads,
    produced: bool,
    /// Whether output records or dead letters were written.
    emitted: bool,
    written: bool,
    /// Whether the rows were deferred in the row cache (written, with the
    /// positions, by a later flush).
    deferred: bool,
}

impl Runner {
    /// A runner for `handler`.
    pub fn new(
        log: Arc<dyn Log>,
        store: Arc<dyn ProjectionStore>,
        handler: Arc<dyn Handler>,
        config: RunnerConfig,
    ) -> Self {
        // Rows only this runner writes can be cached across batches, when
        // the store asks for it (see `crate::cache`).
        let budget = store.runner_cache_bytes();
        // Batches are deferred only where this process is the store's one
        // writer: with several (CQL), a member that lost its partitions
        // while stopped would write a backlog of deferred rows late, and
        // the fault suite's zombie case found an interactions head that
        // then differed from the fold. There the cache stays write-through.
        let write_back = !store.written_by_several_processes();
        let cache = (budget > 0 && handler.rows_follow_partitioning())
            .then(|| Arc::new(RowCache::new(store.clone(), handler.tables(), budget)));
        let store = match &cache {
            Some(cache) => cache.clone() as Arc<dyn ProjectionStore>,
            None => store,
        };
        let labels = vec![
            Label::new("processor", handler.processor().to_owned()),
            Label::new("version", config.version.to_string()),
        ];
        let park_table = park::parked_table(handler.processor(), config.version);
        let park_keys = handler.rows_follow_partitioning();
        Self {
            log,
            store,
            cache,
            cache_budget: budget,
            write_back,
            handler,
            config,
            gate: None,
            behind: AtomicBool::new(false),
            decoder: None,
            labels,
            park_table,
            park_keys,
            parked: Mutex::new(Parked::default()),
            replaying: Mutex::new(BTreeMap::new()),
        }
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes side effects (outputs, dead letters) only as `gate` decides:
    /// the runner is one version of a versioned projection (see
    /// [`crate::catalog`]). Without a gate every side effect is written.
    pub fn with_gate(mut self, gate: Arc<VersionGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Shares the records its handler decodes with the other runners
    /// given the same `decoder` (one per process: [`crate::decode`]).
    pub fn with_decoder(mut self, decoder: Arc<SharedDecoder>) -> Self {
        self.decoder = Some(decoder);
        self
    }

    /// The handler's batch, inside the shared decoder's scope when the
    /// runner has one.
    async fn handle_records(
        &self,
        store: &dyn ProjectionStore,
        topic: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError> {
        let Some(decoder) = &self.decoder else {
            return self.handler.handle(store, topic, records).await;
        };
        let handle = self.handler.handle(store, topic, records);
        let (output, scope) = decode::scope(decoder.clone(), topic, handle).await;
        if scope.shared() > 0 {
            metrics::counter!(m::DECODED, self.shared_labels(true)).increment(scope.shared());
        }
        if scope.decoded() > 0 {
            metrics::counter!(m::DECODED, self.shared_labels(false)).increment(scope.decoded());
        }
        output
    }

    /// The runner's labels and whether a decoded record was shared.
    fn shared_labels(&self, shared: bool) -> Vec<Label> {
        let mut labels = self.labels.clone();
        labels.push(Label::new("shared", if shared { "true" } else { "false" }));
        labels
    }

    /// Polls and applies batches until `shutdown` is cancelled. On
    /// cancellation the batch in hand is finished (written and committed)
    /// unless it is stuck retrying, in which case nothing past it is
    /// committed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let processor = self.handler.processor().to_owned();
        let mut backoff = Backoff::new(&self.config);
        loop {
            match self
                .store
                .ensure_tables(std::slice::from_ref(&self.park_table))
                .await
            {
                Ok(()) => break,
                Err(e) if !e.is_retryable() => {
                    return Err(RunError::Fatal {
                        processor,
                        source: e,
                    })
                }
                Err(e) => {
                    warn!(%processor, error = %e, "creating the parked-keys table failed, retrying");
                    if !backoff.sleep(&shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
        let mut consumer = loop {
            match self
                .log
                .subscribe(&self.config.group, &self.config.input_topic)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    warn!(%processor, error = %e, "subscribe failed, retrying");
                    if !backoff.sleep(&shutdown).await {
                        return Ok(());
                    }
                }
            }
        };
        // Next offset to apply per assigned partition; records below it are
        // stale fetches from before a seek.
        let mut next: HashMap<u32, u64> = HashMap::new();
        // What the lag reporter reads, every second, batch or no batch.
        let lag = Arc::new(Mutex::new(LagState::default()));
        let reporter = tokio::spawn(report_lag(
            self.log.clone(),
            self.config.input_topic.clone(),
            self.labels.clone(),
            lag.clone(),
            shutdown.child_token(),
        ));
        let _stop_reporter = StopLagReport {
            task: reporter,
            lag: lag.clone(),
            labels: self.labels.clone(),
        };
        // Since when every poll has failed, if they do.
        let mut polls_failing_since: Option<Instant> = None;
        let mut idle = tokio::time::interval(Duration::from_secs(1));
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(%processor, topic = %self.config.input_topic, "processor started");
        // When the rows deferred in the row cache are written next: once the
        // runner has nothing more to read for `linger`, and at the latest
        // `commit_interval` after the oldest of them was deferred.
        let mut quiet_at = Instant::now();
        loop {
            let flush_at = self
                .cache
                .as_ref()
                .and_then(|c| c.dirty_since())
                .map(|since| {
                    let due =
                        (quiet_at + self.config.linger).min(since + self.config.commit_interval);
                    tokio::time::Instant::from_std(due)
                });
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = sleep_until(flush_at), if flush_at.is_some() => {
                    if !self.settle(&mut consumer, &mut next, &lag, &shutdown, &mut backoff).await {
                        break;
                    }
                    continue;
                }
                _ = idle.tick() => {
                    self.serve_park_requests(&next).await;
                    if let Some(gate) = &self.gate {
                        let next: std::collections::BTreeMap<u32, u64> =
                            next.iter().map(|(p, o)| (*p, *o)).collect();
                        if let Err(e) = gate.mark_idle(self.store.as_ref(), &next).await {
                            debug!(%processor, error = %e, "recording hand-off markers failed; retrying");
                        }
                    }
                    continue;
                }
                event = consumer.next(self.config.max_batch) => event,
            };
            let event = match event {
                Ok(event) => {
                    backoff.reset();
                    polls_failing_since = None;
                    event
                }
                Err(e) => {
                    warn!(%processor, error = %e, "poll failed, retrying");
                    let since = *polls_failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.resubscribe_after {
                        // A client that keeps failing may never recover
                        // (seen with librdkafka after a broker was stopped
                        // and killed): start over with a fresh one. The
                        // group assigns its partitions again and the runner
                        // seeks to the stored positions.
                        match self
                            .log
                            .subscribe(&self.config.group, &self.config.input_topic)
                            .await
                        {
                            Ok(fresh) => {
                                if !self
                                    .settle(&mut consumer, &mut next, &lag, &shutdown, &mut backoff)
                                    .await
                                {
                                    break;
                                }
                                warn!(%processor, seconds = since.elapsed().as_secs(), "polls kept failing; subscribed again with a new consumer");
                                let old = std::mem::replace(&mut consumer, fresh);
                                // Closing may wait for the broker: not on an
                                // async worker.
                                drop(tokio::task::spawn_blocking(move || drop(old)));
                                self.forget_cached_rows();
                                let partitions: Vec<u32> = next.keys().copied().collect();
                                self.parked().forget(&partitions);
                                for p in partitions {
                                    lag_state(&lag).revoked(p, &self.labels);
                                    status::recovered(&processor, self.config.version, p);
                                }
                                next.clear();
                                polls_failing_since = None;
                            }
                            Err(e) => {
                                warn!(%processor, error = %e, "subscribing again failed; retrying");
                            }
                        }
                    }
                    if !backoff.sleep(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            match event {
                ConsumerEvent::Assigned(partitions) => {
                    // What was deferred is written before anything about
                    // the assignment changes.
                    if !self
                        .settle(&mut consumer, &mut next, &lag, &shutdown, &mut backoff)
                        .await
                    {
                        break;
                    }
                    self.forget_cached_rows();
                    let Some(stored) = self.positions(&shutdown, &mut backoff).await else {
                        break;
                    };
                    if !self.load_parked(&partitions, &shutdown, &mut backoff).await {
                        break;
                    }
                    for p in partitions {
                        let offset = stored.get(&p).copied().unwrap_or(0);
                        if let Err(e) = consumer.seek(p, offset).await {
                            warn!(%processor, partition = p, error = %e, "seek failed");
                        }
                        next.insert(p, offset);
                        lag_state(&lag).assigned(p, offset);
                        debug!(%processor, partition = p, offset, "partition assigned");
                    }
                }
                ConsumerEvent::Revoked(partitions) => {
                    // A member that gets these partitions may read them from
                    // the stored positions already: a late write of ours
                    // changes nothing of what it writes (rows and positions
                    // carry their order).
                    if !self
                        .settle(&mut consumer, &mut next, &lag, &shutdown, &mut backoff)
                        .await
                    {
                        break;
                    }
                    self.forget_cached_rows();
                    self.parked().forget(&partitions);
                    for p in partitions {
                        next.remove(&p);
                        lag_state(&lag).revoked(p, &self.labels);
                        status::recovered(&processor, self.config.version, p);
                    }
                    self.report_parked();
                }
                ConsumerEvent::Records(records) => {
                    self.behind
                        .store(records.len() >= self.config.max_batch, Ordering::Relaxed);
                    let records: Vec<Record> = records
                        .into_iter()
                        .filter(|r| next.get(&r.partition).is_some_and(|n| r.offset >= *n))
                        .collect();
                    if records.is_empty() {
                        continue;
                    }
                    lag_state(&lag).polled(&records);
                    // Batches are bounded in bytes as well as in records, so
                    // what a batch loads and writes stays bounded too.
                    let mut stopped = false;
                    for batch in byte_chunks(&records, self.config.max_batch_bytes) {
                        let started = Instant::now();
                        let Some(Isolated {
                            positions,
                            interrupted,
                        }) = self
                            .apply_isolating(batch, &mut consumer, &shutdown, &mut backoff)
                            .await
                        else {
                            stopped = true;
                            break;
                        };
                        for (p, offset) in &positions {
                            next.insert(*p, *offset);
                        }
                        lag_state(&lag).applied(&positions);
                        let deferred = self.cache.as_ref().is_some_and(|c| c.has_deferred());
                        if interrupted == Interrupted::Rewind
                            || (interrupted == Interrupted::Fenced && deferred)
                        {
                            // Deferred rows were refused (or belong to a
                            // process that lost a partition): read every
                            // partition again from its stored position.
                            if !self
                                .rewind(&mut consumer, &mut next, &lag, &shutdown, &mut backoff)
                                .await
                            {
                                stopped = true;
                            }
                            break;
                        }
                        if interrupted == Interrupted::Fenced {
                            // Read every partition of the poll again from
                            // where it stands now.
                            let partitions: BTreeSet<u32> =
                                records.iter().map(|r| r.partition).collect();
                            for p in partitions {
                                if let Some(&offset) = next.get(&p) {
                                    if let Err(e) = consumer.seek(p, offset).await {
                                        warn!(%processor, partition = p, error = %e, "seek failed");
                                    }
                                }
                            }
                            break;
                        }
                        metrics::histogram!(m::BATCH_DURATION, self.labels.clone())
                            .record(started.elapsed().as_secs_f64());
                        metrics::histogram!(m::BATCH_SIZE, self.labels.clone())
                            .record(batch.len() as f64);
                    }
                    if stopped {
                        break;
                    }
                    quiet_at = Instant::now();
                    // Deferred rows are bounded: half the cache at most.
                    if let Some(cache) = &self.cache {
                        if cache.dirty_bytes() >= self.max_deferred_bytes()
                            && !self
                                .settle(&mut consumer, &mut next, &lag, &shutdown, &mut backoff)
                                .await
                        {
                            break;
                        }
                    }
                }
            }
        }
        // What was deferred is written before the runner returns (a failure
        // loses nothing: the records are applied again from the stored
        // positions on the next start).
        if let Some(cache) = &self.cache {
            match cache.flush().await {
                Ok((rows, positions)) => self.flushed(&mut consumer, rows, &positions).await,
                Err(e) => {
                    warn!(%processor, error = %e, "writing the deferred rows on shutdown failed; they are applied again on the next start")
                }
            }
        }
        info!(%processor, "processor stopped");
        Ok(())
    }

    /// The most bytes of deferred rows the row cache holds before they are
    /// written: half its budget.
    fn max_deferred_bytes(&self) -> usize {
        self.cache_budget / 2
    }

    /// Writes the rows and positions deferred in the row cache, retrying a
    /// transient failure. A refusal for good discards them and reads every
    /// partition again from its stored position ([`Runner::rewind`]).
    /// `false` when shut down first.
    async fn settle(
        &self,
        consumer: &mut Box<dyn LogConsumer>,
        next: &mut HashMap<u32, u64>,
        lag: &Mutex<LagState>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> bool {
        let Some(cache) = &self.cache else {
            return true;
        };
        let processor = self.handler.processor();
        loop {
            let started = Instant::now();
            match cache.flush().await {
                Ok((rows, positions)) => {
                    if rows > 0 || !positions.is_empty() {
                        self.stage("flush", started);
                    }
                    self.flushed(consumer, rows, &positions).await;
                    backoff.reset();
                    return true;
                }
                Err(e) if !e.is_retryable() => {
                    warn!(%processor, error = %e, "the store refused the deferred rows for good; applying their records again, written batch by batch");
                    return self.rewind(consumer, next, lag, shutdown, backoff).await;
                }
                Err(e) => {
                    warn!(%processor, error = %e, "writing the deferred rows failed, retrying");
                    self.retried("flush");
                    if !backoff.sleep(shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// After a flush of `rows` rows and `positions`: metrics, and the
    /// positions committed to the group (lag tooling; the store is the
    /// truth).
    async fn flushed(
        &self,
        consumer: &mut Box<dyn LogConsumer>,
        rows: usize,
        positions: &[PositionWrite],
    ) {
        if rows > 0 {
            metrics::counter!(m::ROWS_WRITTEN, self.labels.clone()).increment(rows as u64);
        }
        let ours: Vec<(u32, u64)> = positions
            .iter()
            .filter(|p| p.consumer == self.config.consumer && p.topic == self.config.input_topic)
            .map(|p| (p.partition, p.next_offset))
            .collect();
        if !ours.is_empty() {
            if let Err(e) = consumer.commit(&ours).await {
                debug!(processor = %self.handler.processor(), error = %e, "commit failed; positions are safe in the store");
            }
        }
    }

    /// Discards what the row cache deferred and reads every partition again
    /// from its stored position; up to where each had got, its batches are
    /// written through. `false` when shut down first.
    async fn rewind(
        &self,
        consumer: &mut Box<dyn LogConsumer>,
        next: &mut HashMap<u32, u64>,
        lag: &Mutex<LagState>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> bool {
        self.forget_cached_rows();
        let Some(stored) = self.positions(shutdown, backoff).await else {
            return false;
        };
        let processor = self.handler.processor();
        for (p, reached) in next.iter_mut() {
            let from = stored.get(p).copied().unwrap_or(0);
            if from < *reached {
                let mut replaying = self.replaying();
                let until = replaying.entry(*p).or_insert(*reached);
                *until = (*until).max(*reached);
            }
            *reached = from;
            if let Err(e) = consumer.seek(*p, from).await {
                warn!(%processor, partition = *p, error = %e, "seek failed");
            }
            lag_state(lag).assigned(*p, from);
        }
        true
    }

    fn replaying(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, u64>> {
        self.replaying
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `records` may be deferred in the row cache: not while a
    /// partition of theirs is read again after a refused flush.
    fn may_defer(&self, records: &[Record]) -> bool {
        let mut replaying = self.replaying();
        if replaying.is_empty() {
            return true;
        }
        let behind = records.iter().any(|r| {
            replaying
                .get(&r.partition)
                .is_some_and(|until| r.offset < *until)
        });
        if !behind {
            for r in records {
                replaying.remove(&r.partition);
            }
        }
        !behind
    }

    fn stage(&self, name: &'static str, started: Instant) {
        let mut labels = self.labels.clone();
        labels.push(Label::new("stage", name));
        metrics::histogram!(m::STAGE_DURATION, labels).record(started.elapsed().as_secs_f64());
    }

    /// Clears the row cache: another member may write the rows of a
    /// partition this runner gets (back).
    fn forget_cached_rows(&self) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    async fn positions(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Option<std::collections::BTreeMap<u32, u64>> {
        loop {
            match self
                .store
                .positions(&self.config.consumer, &self.config.input_topic)
                .await
            {
                Ok(p) => return Some(p),
                Err(e) => {
                    warn!(processor = %self.handler.processor(), error = %e, "reading positions failed, retrying");
                    self.retried("positions");
                    if !backoff.sleep(shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Applies `records` as [`Runner::apply_batch`] does; a batch that fails
    /// for good is applied again in halves, each written and committed
    /// before the next, until the failing record stands alone, which is
    /// then parked with its key or dead-lettered ([`crate::park`]). Returns
    /// the next offset per partition, or `None` when shut down first.
    async fn apply_isolating(
        &self,
        records: &[Record],
        consumer: &mut Box<dyn LogConsumer>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Option<Isolated> {
        let processor = self.handler.processor();
        let mut queue: VecDeque<&[Record]> = VecDeque::from([records]);
        let mut positions: BTreeMap<u32, u64> = BTreeMap::new();
        let mut isolated = 0;
        let merge = |positions: &mut BTreeMap<u32, u64>, applied: Vec<(u32, u64)>| {
            for (p, o) in applied {
                let e = positions.entry(p).or_insert(o);
                *e = (*e).max(o);
            }
        };
        while let Some(slice) = queue.pop_front() {
            let error = match self
                .apply_batch(slice, None, consumer, shutdown, backoff)
                .await
            {
                Outcome::Applied(applied) => {
                    merge(&mut positions, applied);
                    continue;
                }
                Outcome::Stopped => return None,
                Outcome::Fenced => return self.fenced(slice, positions, shutdown, backoff).await,
                Outcome::Rewind => return Some(Isolated::rewind(positions)),
                Outcome::Permanent(e) => e,
            };
            if slice.len() > 1 {
                let (first, second) = slice.split_at(slice.len() / 2);
                debug!(%processor, records = slice.len(), error = %error, "batch failed for good; applying it in halves");
                queue.push_front(second);
                queue.push_front(first);
                continue;
            }
            let record = &slice[0];
            if isolated >= park::MAX_ISOLATED_PER_BATCH || error.is_systemic() {
                // Not this record's fault: retry it like a transient error.
                tracing::error!(
                    %processor,
                    partition = record.partition,
                    offset = record.offset,
                    error = %error,
                    "processor failing on every record; retrying without committing"
                );
                self.failed_at(slice, &error);
                if !backoff.sleep(shutdown).await {
                    return None;
                }
                queue.push_front(slice);
                continue;
            }
            isolated += 1;
            // Parked (when the handler's rows follow the partitioning), or
            // a dead letter when parking is refused too; if even that
            // fails, the record is retried like a transient error.
            let mut last = None;
            for park in [true, false] {
                let output = self.isolate(record, &error, park);
                match self
                    .apply_batch(slice, Some(output), consumer, shutdown, backoff)
                    .await
                {
                    Outcome::Applied(applied) => {
                        merge(&mut positions, applied);
                        last = None;
                        break;
                    }
                    Outcome::Stopped => return None,
                    Outcome::Fenced => {
                        return self.fenced(slice, positions, shutdown, backoff).await
                    }
                    Outcome::Rewind => return Some(Isolated::rewind(positions)),
                    Outcome::Permanent(e) => {
                        if park {
                            warn!(%processor, partition = record.partition, offset = record.offset, error = %e, "parking refused; dead letter instead");
                        }
                        last = Some(e);
                    }
                }
            }
            if let Some(e) = last {
                self.failed_at(slice, &e);
                if !backoff.sleep(shutdown).await {
                    return None;
                }
                queue.push_front(slice);
            }
        }
        Some(Isolated {
            positions: positions.into_iter().collect(),
            interrupted: Interrupted::No,
        })
    }

    /// After [`Outcome::Fenced`] on `slice`: the stored positions of its
    /// partitions, which another member moved past it, merged into
    /// `positions`, the partitions already applied.
    async fn fenced(
        &self,
        slice: &[Record],
        mut positions: BTreeMap<u32, u64>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Option<Isolated> {
        let stored = self.positions(shutdown, backoff).await?;
        for r in slice {
            if let Some(&offset) = stored.get(&r.partition) {
                let e = positions.entry(r.partition).or_insert(offset);
                *e = (*e).max(offset);
            }
        }
        Some(Isolated {
            positions: positions.into_iter().collect(),
            interrupted: Interrupted::Fenced,
        })
    }

    /// The output of a one-record batch whose record failed for good with
    /// `error`: its key parked (when `park` and the handler's rows follow
    /// the partitioning), else a `processing_failed` dead letter.
    fn isolate(
        &self,
        record: &Record,
        error: &StepError,
        park: bool,
    ) -> (BatchOutput, PendingHeads) {
        let processor = self.handler.processor();
        let reason = error.to_string();
        let mut pending = PendingHeads::new();
        let mut output = BatchOutput::default();
        match record.key.as_deref() {
            Some(key) if park && self.park_keys => {
                warn!(
                    %processor,
                    partition = record.partition,
                    offset = record.offset,
                    key = %park::key_text(key),
                    %reason,
                    "record failed for good; its key is parked"
                );
                output.rows.push(park::start(
                    &self.park_table,
                    record,
                    key,
                    &reason,
                    &mut pending,
                ));
                output
                    .rows
                    .extend(park::head_rows(&self.park_table, &pending));
                metrics::counter!(m::PARKED, self.labels.clone()).increment(1);
            }
            _ => {
                output.rejected.push((
                    0,
                    Rejection::new(
                        RejectKind::ProcessingFailed,
                        format!("{processor} failed on it for good: {reason}"),
                    ),
                ));
            }
        }
        (output, pending)
    }

    /// Records a failed attempt at each partition of `records` (status,
    /// gauge).
    fn failed_at(&self, records: &[Record], error: &StepError) {
        let mut first: BTreeMap<u32, u64> = BTreeMap::new();
        for r in records {
            let e = first.entry(r.partition).or_insert(r.offset);
            *e = (*e).min(r.offset);
        }
        for (partition, offset) in first {
            let retries = status::failed(
                self.handler.processor(),
                self.config.version,
                &self.config.input_topic,
                partition,
                offset,
                &error.to_string(),
            );
            metrics::gauge!(
                m::FAILING_RETRIES,
                partition_labels(&self.labels, partition)
            )
            .set(retries as f64);
        }
    }

    /// Loads the parked keys of newly assigned `partitions`, retrying;
    /// `false` when shut down first.
    async fn load_parked(
        &self,
        partitions: &[u32],
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> bool {
        loop {
            match park::load(self.store.as_ref(), &self.park_table, partitions).await {
                Ok(loaded) => {
                    self.parked().extend(loaded);
                    self.report_parked();
                    return true;
                }
                Err(e) => {
                    warn!(processor = %self.handler.processor(), error = %e, "reading parked keys failed, retrying");
                    self.retried("parked");
                    if !backoff.sleep(shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    fn report_parked(&self) {
        let keys = self.parked().len();
        metrics::gauge!(m::PARKED_KEYS, self.labels.clone()).set(keys as f64);
    }

    /// Serves the operators' requests for parked keys of this runner's
    /// partitions (`next`: its next offset per partition).
    async fn serve_park_requests(&self, next: &HashMap<u32, u64>) {
        let processor = self.handler.processor();
        let keys = self.parked().keys();
        for chunk in keys.chunks(1000) {
            let rows: Vec<String> = chunk.iter().map(|k| park::request_row(k)).collect();
            let values = match self.store.get_many(&self.park_table, &rows).await {
                Ok(values) => values,
                Err(e) => {
                    debug!(%processor, error = %e, "reading parked-key requests failed; next tick");
                    return;
                }
            };
            for ((key, row), value) in chunk.iter().zip(&rows).zip(values) {
                let Some(bytes) = value else { continue };
                let action = match decode_row::<ParkRequest>(
                    PARKED_ENCODING,
                    &self.park_table,
                    row,
                    &bytes,
                ) {
                    Ok(request) => request.action,
                    Err(e) => {
                        warn!(%processor, key = %park::key_text(key), error = %e, "unreadable request for a parked key; dropped");
                        let _ = self
                            .store
                            .write(WriteBatch {
                                rows: vec![park::put(&self.park_table, row.clone(), None)],
                                positions: Vec::new(),
                            })
                            .await;
                        continue;
                    }
                };
                if let Err(e) = self.resume(key, action, next).await {
                    warn!(%processor, key = %park::key_text(key), error = %e, "resuming a parked key failed; retrying next tick");
                }
            }
        }
        self.report_parked();
    }

    /// Does what an operator asked for parked `key`: a skip dead-letters its
    /// oldest parked record; then (retry and skip) its parked records are
    /// applied in order, a chunk per write. Records failing for good keep
    /// the key parked with one more retry and the error; a transient error
    /// leaves the request for the next tick.
    async fn resume(
        &self,
        key: &[u8],
        action: ParkAction,
        next: &HashMap<u32, u64>,
    ) -> Result<(), StepError> {
        let processor = self.handler.processor();
        let table = self.park_table.as_str();
        let store = self.store.as_ref();
        let Some(mut head) = self.parked().get(key).cloned() else {
            return Ok(());
        };
        // The store may hold rows an operator mended since: read them anew.
        if let (Some(cache), Ok(text)) = (&self.cache, std::str::from_utf8(key)) {
            cache.forget(text);
        }
        let first_of = |head: &park::ParkedKey| {
            BTreeMap::from([(
                head.partition,
                next.get(&head.partition).copied().unwrap_or(head.offset),
            )])
        };
        if action == ParkAction::Skip && head.count() > 0 {
            let skipped = park::records(store, table, key, head.first_seq..head.first_seq + 1)
                .await
                .map_err(StepError::Store)?;
            if !skipped.is_empty() {
                let records: Vec<Record> = skipped.into_iter().map(|(_, r)| r).collect();
                let mut output = BatchOutput::default();
                output.rejected.push((
                    0,
                    Rejection::new(
                        RejectKind::ProcessingFailed,
                        format!(
                            "skipped by an operator; {processor} had failed on it: {}",
                            head.reason
                        ),
                    ),
                ));
                let emit = self.emit_ranges(&first_of(&head)).await?;
                let effects = self.side_effects(&records, &output, emit.as_ref());
                self.produce_fitting(&records, effects)
                    .await
                    .map_err(StepError::Log)?;
                metrics::counter!(
                    m::DEAD_LETTERS,
                    self.kind_labels(RejectKind::ProcessingFailed)
                )
                .increment(1);
            }
            let mut rows = vec![park::put(
                table,
                park::record_row(key, head.first_seq),
                None,
            )];
            head.first_seq += 1;
            rows.extend(self.head_update(key, &head));
            store
                .write(WriteBatch {
                    rows,
                    positions: Vec::new(),
                })
                .await
                .map_err(StepError::Store)?;
            info!(%processor, key = %park::key_text(key), "oldest parked record skipped into the dead letters");
            if self.commit_head(key, &head) {
                return Ok(());
            }
        }
        loop {
            let end = head
                .first_seq
                .saturating_add(park::RESUME_CHUNK)
                .min(head.next_seq);
            let loaded = park::records(store, table, key, head.first_seq..end)
                .await
                .map_err(StepError::Store)?;
            let records: Vec<Record> = loaded.into_iter().map(|(_, r)| r).collect();
            let attempt = async {
                let output = if records.is_empty() {
                    BatchOutput::default()
                } else {
                    self.handler
                        .handle(store, &self.config.input_topic, &records)
                        .await
                        .map_err(StepError::Handle)?
                };
                let emit = self.emit_ranges(&first_of(&head)).await?;
                let effects = self.side_effects(&records, &output, emit.as_ref());
                if !effects.is_empty() {
                    self.produce_fitting(&records, effects)
                        .await
                        .map_err(StepError::Log)?;
                }
                let mut next_head = head.clone();
                next_head.first_seq = end;
                let mut rows = output.rows;
                rows.extend(
                    (head.first_seq..end).map(|s| park::put(table, park::record_row(key, s), None)),
                );
                rows.extend(self.head_update(key, &next_head));
                store
                    .write(WriteBatch {
                        rows,
                        positions: Vec::new(),
                    })
                    .await
                    .map_err(StepError::Store)?;
                Ok::<_, StepError>(next_head)
            };
            match attempt.await {
                Ok(next_head) => {
                    head = next_head;
                    metrics::counter!(m::EVENTS_APPLIED, self.labels.clone())
                        .increment(records.len() as u64);
                    if self.commit_head(key, &head) {
                        info!(%processor, key = %park::key_text(key), "parked key resumed: every parked record applied in order");
                        return Ok(());
                    }
                }
                Err(e) if e.is_permanent() => {
                    head.retries += 1;
                    head.last_error = Some(e.to_string());
                    warn!(%processor, key = %park::key_text(key), retries = head.retries, error = %e, "parked key failed again; it stays parked");
                    let mut rows = vec![park::put(table, park::request_row(key), None)];
                    rows.push(park::put(
                        table,
                        park::head_row(key),
                        Some(crate::row::encode_row(PARKED_ENCODING, &head)),
                    ));
                    store
                        .write(WriteBatch {
                            rows,
                            positions: Vec::new(),
                        })
                        .await
                        .map_err(StepError::Store)?;
                    self.commit_head(key, &head);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The rows storing `head` (and, once nothing is parked, deleting it and
    /// the key's request).
    fn head_update(&self, key: &[u8], head: &park::ParkedKey) -> Vec<crate::store::RowWrite> {
        let table = self.park_table.as_str();
        if head.count() == 0 {
            vec![
                park::put(table, park::head_row(key), None),
                park::put(table, park::request_row(key), None),
            ]
        } else {
            vec![park::put(
                table,
                park::head_row(key),
                Some(crate::row::encode_row(PARKED_ENCODING, head)),
            )]
        }
    }

    /// Keeps `head` as this runner's view of `key`; `true` when nothing is
    /// parked under it any more.
    fn commit_head(&self, key: &[u8], head: &park::ParkedKey) -> bool {
        let done = head.count() == 0;
        let pending = PendingHeads::from([(key.to_vec(), (!done).then(|| head.clone()))]);
        self.parked().commit(pending);
        done
    }

    fn kind_labels(&self, kind: RejectKind) -> Vec<Label> {
        let mut labels = self.labels.clone();
        labels.push(Label::new("kind", kind.as_str()));
        labels
    }

    /// Applies one batch, retrying each transient failure until it
    /// succeeds; `preset` is its output when it is not to be handled (a
    /// record parked or dead-lettered by [`Runner::apply_isolating`]).
    async fn apply_batch(
        &self,
        records: &[Record],
        preset: Option<(BatchOutput, PendingHeads)>,
        consumer: &mut Box<dyn LogConsumer>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Outcome {
        let processor = self.handler.processor();
        let mut positions: HashMap<u32, u64> = HashMap::new();
        for r in records {
            let e = positions.entry(r.partition).or_insert(0);
            *e = (*e).max(r.offset + 1);
        }
        let mut positions: Vec<(u32, u64)> = positions.into_iter().collect();
        positions.sort_unstable();

        let mut progress = Progress::default();
        if let Some((output, parked)) = preset {
            progress.output = Some(output);
            progress.parked = parked;
        }
        let mut failing = false;
        loop {
            match self.try_apply(records, &positions, &mut progress).await {
                Ok(()) => break,
                Err(StepError::Flush(e)) if !e.is_retryable() => {
                    warn!(%processor, error = %e, "the store refused the deferred rows for good; applying their records again, written batch by batch");
                    return Outcome::Rewind;
                }
                Err(e) if e.is_permanent() => return Outcome::Permanent(e),
                Err(StepError::Handle(e @ HandleError::Fenced { .. })) => {
                    warn!(%processor, error = %e, "batch dropped: another member owns its partition now");
                    return Outcome::Fenced;
                }
                // A hand-off in progress: wait for the other version, it is
                // not a failure.
                Err(StepError::Gate(GateError::Waiting { .. })) => {
                    debug!(%processor, "waiting for the other version of a hand-off");
                    if !backoff.sleep(shutdown).await {
                        return Outcome::Stopped;
                    }
                }
                Err(e) => {
                    let (partition, offset) =
                        records.first().map_or((0, 0), |r| (r.partition, r.offset));
                    warn!(%processor, partition, offset, records = records.len(), error = %e, "batch failed, retrying without committing");
                    self.retried(e.stage());
                    self.failed_at(records, &e);
                    failing = true;
                    if !backoff.sleep(shutdown).await {
                        return Outcome::Stopped;
                    }
                }
            }
        }
        backoff.reset();
        if failing {
            for (partition, _) in &positions {
                status::recovered(processor, self.config.version, *partition);
                metrics::gauge!(
                    m::FAILING_RETRIES,
                    partition_labels(&self.labels, *partition)
                )
                .set(0.0);
            }
        }
        if !progress.parked.is_empty() {
            self.parked().commit(std::mem::take(&mut progress.parked));
            self.report_parked();
        }
        if let Some(output) = progress.output {
            let stats = output.stats;
            metrics::counter!(m::EVENTS_APPLIED, self.labels.clone()).increment(stats.applied);
            if stats.duplicates > 0 {
                metrics::counter!(m::EVENTS_DUPLICATE, self.labels.clone())
                    .increment(stats.duplicates);
            }
            if stats.redelivered > 0 {
                metrics::counter!(m::EVENTS_REDELIVERED, self.labels.clone())
                    .increment(stats.redelivered);
            }
            for (_, rejection) in &output.rejected {
                metrics::counter!(m::DEAD_LETTERS, self.kind_labels(rejection.kind)).increment(1);
            }
        }
        // Kafka's committed offsets are for lag tooling; the store is the
        // truth (a deferred batch's are committed when it is written).
        if !progress.deferred {
            if let Err(e) = consumer.commit(&positions).await {
                debug!(%processor, error = %e, "commit failed; positions are safe in the store");
            }
        }
        Outcome::Applied(positions)
    }

    /// Appends `pending`. Records the log refuses for good as too large
    /// ([`LogError::TooLarge`]) are made to fit instead of retried as they
    /// are: an output becomes a dead letter of the input record it came
    /// from, and a dead letter's value is cut in half (header
    /// [`HEADER_TRUNCATED`]: the original length) until it fits. A dead
    /// letter that does not fit even empty is dropped with an error log and
    /// the `waymark_processor_dropped_total` metric, never retried forever.
    async fn produce_fitting(
        &self,
        records: &[Record],
        mut pending: Vec<(Origin, OutRecord)>,
    ) -> Result<(), LogError> {
        let processor = self.handler.processor();
        loop {
            let batch: Vec<OutRecord> = pending.iter().map(|(_, r)| r.clone()).collect();
            let (refused, reason) = match self.log.produce(batch).await {
                Ok(_) => return Ok(()),
                Err(LogError::TooLarge {
                    refused, reason, ..
                }) => (refused, reason),
                Err(e) => return Err(e),
            };
            let mut next = Vec::new();
            for index in refused {
                let Some((origin, record)) = pending.get(index).cloned() else {
                    continue;
                };
                let input = origin.input();
                let (partition, offset) = (records[input].partition, records[input].offset);
                match origin {
                    Origin::Output(_) => {
                        let rejection = Rejection::new(
                            RejectKind::TooLarge,
                            format!(
                                "its output to {} is {} bytes, more than the topic accepts \
                                 ({reason})",
                                record.topic,
                                record.value.len()
                            ),
                        );
                        warn!(%processor, partition, offset, %reason, "output too large for its topic; dead letter instead");
                        next.push((
                            Origin::DeadLetter(input),
                            dead_letter(
                                &self.config.dlq_topic,
                                &self.config.input_topic,
                                &records[input],
                                &rejection,
                                processor,
                            ),
                        ));
                    }
                    Origin::DeadLetter(_) => match truncated(record) {
                        Some(smaller) => {
                            warn!(%processor, partition, offset, %reason, "dead letter too large; truncating its value");
                            next.push((origin, smaller));
                        }
                        None => {
                            tracing::error!(%processor, partition, offset, %reason, "dead letter too large even without its value; dropped");
                            metrics::counter!(m::DROPPED, self.labels.clone()).increment(1);
                        }
                    },
                }
            }
            if next.is_empty() {
                return Ok(());
            }
            pending = next;
        }
    }

    /// Which offsets of a batch starting at `first` (by partition) have
    /// their side effects written by this version; `None`: all of them.
    async fn emit_ranges(
        &self,
        first: &BTreeMap<u32, u64>,
    ) -> Result<Option<EmitRanges>, StepError> {
        match &self.gate {
            Some(gate) => Ok(Some(
                gate.emit_ranges(self.store.as_ref(), first)
                    .await
                    .map_err(StepError::Gate)?,
            )),
            None => Ok(None),
        }
    }

    /// The outputs and dead letters of `output` that are this version's to
    /// write (`emit`), each with the record it came from.
    fn side_effects(
        &self,
        records: &[Record],
        output: &BatchOutput,
        emit: Option<&EmitRanges>,
    ) -> Vec<(Origin, OutRecord)> {
        let ours = |i: usize| {
            let r = &records[i];
            emit.is_none_or(|ranges| {
                ranges
                    .get(&r.partition)
                    .is_none_or(|range| range.contains(&r.offset))
            })
        };
        let mut produce: Vec<(Origin, OutRecord)> = output
            .produce
            .iter()
            .filter(|(i, _)| ours(*i))
            .map(|(i, r)| (Origin::Output(*i), r.clone()))
            .collect();
        for (i, rejection) in output.rejected.iter().filter(|(i, _)| ours(*i)) {
            warn!(
                processor = %self.handler.processor(),
                partition = records[*i].partition,
                offset = records[*i].offset,
                kind = %rejection.kind,
                message = %rejection.message,
                "dead letter"
            );
            produce.push((
                Origin::DeadLetter(*i),
                dead_letter(
                    &self.config.dlq_topic,
                    &self.config.input_topic,
                    &records[*i],
                    rejection,
                    self.handler.processor(),
                ),
            ));
        }
        produce
    }

    /// Handles `records`, except those of parked keys, which are parked
    /// behind them instead (rows of the output; `parked` gets the heads).
    async fn handle(
        &self,
        records: &[Record],
        parked: &mut PendingHeads,
    ) -> Result<BatchOutput, StepError> {
        let store = self.store.as_ref();
        let topic = &self.config.input_topic;
        let held: Vec<bool> = {
            let p = self.parked();
            if p.is_empty() {
                Vec::new()
            } else {
                records
                    .iter()
                    .map(|r| p.is_parked(r.key.as_deref()))
                    .collect()
            }
        };
        if !held.contains(&true) {
            return self
                .handle_records(store, topic, records)
                .await
                .map_err(StepError::Handle);
        }
        let kept: Vec<usize> = (0..records.len()).filter(|i| !held[*i]).collect();
        let subset: Vec<Record> = kept.iter().map(|i| records[*i].clone()).collect();
        let mut output = if subset.is_empty() {
            BatchOutput::default()
        } else {
            self.handle_records(store, topic, &subset)
                .await
                .map_err(StepError::Handle)?
        };
        for (i, _) in &mut output.produce {
            *i = kept[*i];
        }
        for (i, _) in &mut output.rejected {
            *i = kept[*i];
        }
        let held: Vec<&Record> = records
            .iter()
            .zip(&held)
            .filter_map(|(r, h)| h.then_some(r))
            .collect();
        {
            let p = self.parked();
            for r in &held {
                output.rows.push(p.append(&self.park_table, r, parked));
            }
        }
        output
            .rows
            .extend(park::head_rows(&self.park_table, parked));
        metrics::counter!(m::PARKED, self.labels.clone()).increment(held.len() as u64);
        Ok(output)
    }

    async fn try_apply(
        &self,
        records: &[Record],
        positions: &[(u32, u64)],
        progress: &mut Progress,
    ) -> Result<(), StepError> {
        let stage = |name: &'static str, started: Instant| {
            let mut labels = self.labels.clone();
            labels.push(Label::new("stage", name));
            metrics::histogram!(m::STAGE_DURATION, labels).record(started.elapsed().as_secs_f64());
        };
        if progress.output.is_none() {
            let started = Instant::now();
            let mut parked = PendingHeads::new();
            let output = self.handle(records, &mut parked).await?;
            stage("handle", started);
            progress.output = Some(output);
            progress.parked = parked;
        }
        let output = progress.output.as_ref().ok_or(StepError::Internal)?;
        if !progress.produced {
            let mut first: BTreeMap<u32, u64> = BTreeMap::new();
            for r in records {
                let e = first.entry(r.partition).or_insert(r.offset);
                *e = (*e).min(r.offset);
            }
            let emit = self.emit_ranges(&first).await?;
            let produce = self.side_effects(records, output, emit.as_ref());
            if !produce.is_empty() {
                let started = Instant::now();
                self.produce_fitting(records, produce)
                    .await
                    .map_err(StepError::Log)?;
                stage("produce", started);
                progress.emitted = true;
            }
            progress.produced = true;
        }
        if !progress.written {
            let batch = WriteBatch {
                rows: output.rows.clone(),
                positions: positions
                    .iter()
                    .map(|(partition, next_offset)| PositionWrite {
                        consumer: self.config.consumer.clone(),
                        topic: self.config.input_topic.clone(),
                        partition: *partition,
                        next_offset: *next_offset,
                    })
                    .collect(),
            };
            // With no output or dead letter written for it, the batch can be
            // applied again after a crash without anyone noticing, so it
            // need not be durable at once (the embedded store then skips
            // the fsync, see `ProjectionStore::write_replayable`), and with
            // a row cache it is deferred: written with later batches by a
            // flush (see `crate::cache`).
            let batch = match &self.cache {
                Some(cache)
                    if self.write_back
                        && self.behind.load(Ordering::Relaxed)
                        && !progress.emitted
                        && !self.config.commit_interval.is_zero()
                        && self.may_defer(records) =>
                {
                    match cache.defer(batch) {
                        Ok(()) => {
                            progress.deferred = true;
                            progress.written = true;
                            return Ok(());
                        }
                        Err(batch) => batch,
                    }
                }
                _ => batch,
            };
            if let Some(cache) = &self.cache {
                // Its own step, so that a refusal of what was deferred is
                // not blamed on this batch.
                let started = Instant::now();
                let (rows, _) = cache.flush().await.map_err(StepError::Flush)?;
                if rows > 0 {
                    stage("flush", started);
                    metrics::counter!(m::ROWS_WRITTEN, self.labels.clone()).increment(rows as u64);
                }
            }
            let started = Instant::now();
            let rows = batch.rows.len() as u64;
            if progress.emitted {
                self.store.write(batch).await
            } else {
                self.store.write_replayable(batch).await
            }
            .map_err(StepError::Store)?;
            stage("write", started);
            metrics::counter!(m::ROWS_WRITTEN, self.labels.clone()).increment(rows);
            progress.written = true;
        }
        Ok(())
    }

    fn retried(&self, stage: &'static str) {
        let mut labels = self.labels.clone();
        labels.push(Label::new("stage", stage));
        metrics::counter!(m::RETRIES, labels).increment(1);
    }
}

/// Per assigned partition: the next offset to apply and the append time of
/// the oldest record polled but not applied yet.
#[derive(Debug, Default)]
struct LagState {
    partitions: BTreeMap<u32, PartitionLag>,
}

#[derive(Debug, Clone, Copy)]
struct PartitionLag {
    next: u64,
    /// Append time (ms) of the record at `next`, once polled.
    oldest_ms: Option<i64>,
}

impl LagState {
    fn assigned(&mut self, partition: u32, next: u64) {
        self.partitions.insert(
            partition,
            PartitionLag {
                next,
                oldest_ms: None,
            },
        );
    }

    fn revoked(&mut self, partition: u32, labels: &[Label]) {
        self.partitions.remove(&partition);
        // Another member reports it now; this one no longer lags on it.
        let labels = partition_labels(labels, partition);
        metrics::gauge!(m::LAG, labels.clone()).set(0.0);
        metrics::gauge!(m::LAG_SECONDS, labels).set(0.0);
    }

    fn polled(&mut self, records: &[Record]) {
        for r in records {
            if let Some(p) = self.partitions.get_mut(&r.partition) {
                if p.oldest_ms.is_none() && r.offset == p.next {
                    p.oldest_ms = Some(r.timestamp_ms);
                }
            }
        }
    }

    fn applied(&mut self, positions: &[(u32, u64)]) {
        for (partition, next) in positions {
            if let Some(p) = self.partitions.get_mut(partition) {
                p.next = *next;
                // The next record's time is known once it is polled.
                p.oldest_ms = None;
            }
        }
    }
}

fn lag_state(lag: &Mutex<LagState>) -> std::sync::MutexGuard<'_, LagState> {
    lag.lock().unwrap_or_else(PoisonError::into_inner)
}

fn partition_labels(labels: &[Label], partition: u32) -> Vec<Label> {
    let mut labels = labels.to_vec();
    labels.push(Label::new("partition", partition.to_string()));
    labels
}

/// Sets the lag gauges of every assigned partition once a second until
/// `stop`: records between the next offset to apply and the high
/// watermark, and seconds since the oldest of them was appended (0 when
/// none; while the runner has not polled it yet, the time of the last
/// known oldest record is kept).
async fn report_lag(
    log: Arc<dyn Log>,
    topic: String,
    labels: Vec<Label>,
    lag: Arc<Mutex<LagState>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_oldest: HashMap<u32, i64> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let partitions: Vec<(u32, PartitionLag)> = lag_state(&lag)
            .partitions
            .iter()
            .map(|(p, l)| (*p, *l))
            .collect();
        for (partition, state) in partitions {
            let Ok((_, high)) = log.watermarks(&topic, partition).await else {
                continue;
            };
            let records = high.saturating_sub(state.next);
            let seconds = if records == 0 {
                last_oldest.remove(&partition);
                0.0
            } else {
                if let Some(ms) = state.oldest_ms {
                    last_oldest.insert(partition, ms);
                }
                last_oldest.get(&partition).map_or(0.0, |ms| {
                    let now = chrono::Utc::now().timestamp_millis();
                    (now.saturating_sub(*ms)).max(0) as f64 / 1000.0
                })
            };
            let labels = partition_labels(&labels, partition);
            metrics::gauge!(m::POSITION, labels.clone()).set(state.next as f64);
            metrics::gauge!(m::LAG, labels.clone()).set(records as f64);
            metrics::gauge!(m::LAG_SECONDS, labels).set(seconds);
        }
    }
}

/// Ends the lag reporter with the runner, and zeroes the lag gauges of the
/// partitions it still owned: a runner that stopped (shut down, or a
/// retired version that handed off) leaves no stale lag behind for an
/// alert to fire on.
struct StopLagReport {
    task: tokio::task::JoinHandle<()>,
    lag: Arc<Mutex<LagState>>,
    labels: Vec<Label>,
}

impl Drop for StopLagReport {
    fn drop(&mut self) {
        self.task.abort();
        let partitions: Vec<u32> = lag_state(&self.lag).partitions.keys().copied().collect();
        for partition in partitions {
            let labels = partition_labels(&self.labels, partition);
            metrics::gauge!(m::LAG, labels.clone()).set(0.0);
            metrics::gauge!(m::LAG_SECONDS, labels).set(0.0);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("handling failed: {0}")]
    Handle(HandleError),
    #[error("producing failed: {0}")]
    Log(LogError),
    #[error("writing failed: {0}")]
    Store(StoreError),
    #[error("writing the deferred rows failed: {0}")]
    Flush(StoreError),
    #[error("{0}")]
    Gate(GateError),
    #[error("batch output missing")]
    Internal,
}

impl StepError {
    /// Whether retrying the same batch cannot help.
    fn is_permanent(&self) -> bool {
        match self {
            StepError::Handle(e) => !e.is_retryable(),
            StepError::Store(e) | StepError::Flush(e) => !e.is_retryable(),
            StepError::Log(_) | StepError::Gate(_) | StepError::Internal => false,
        }
    }

    /// Whether it is a fault of the whole processor version, never of one
    /// record: rows of another state encoding mean the version must be
    /// rebuilt (the controller says so at start-up).
    fn is_systemic(&self) -> bool {
        matches!(
            self,
            StepError::Handle(HandleError::Store(StoreError::Encoding { .. }))
                | StepError::Store(StoreError::Encoding { .. })
        )
    }

    fn stage(&self) -> &'static str {
        match self {
            StepError::Handle(_) => "read",
            StepError::Log(_) => "produce",
            StepError::Store(_) => "write",
            StepError::Flush(_) => "flush",
            StepError::Gate(_) => "handoff",
            StepError::Internal => "internal",
        }
    }
}

/// Sleeps until `at`; forever when `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff that gives up when shutdown is requested.
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(config: &RunnerConfig) -> Self {
        Self {
            min: config.backoff_min,
            max: config.backoff_max,
            current: config.backoff_min,
        }
    }

    fn reset(&mut self) {
        self.current = self.min;
    }

    /// Sleeps; `false` when shutdown was requested meanwhile.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use uuid::Uuid;
    use waymark_core::{Event, EventData, Fold, Tracked};

    use super::*;
    use crate::handler::ProjectionHandler;
    use crate::log::TopicConfig;
    use crate::memory::MemoryStore;
    use crate::memory_log::MemoryLog;
    use crate::row::decode_row;

    const INPUT: &str = "events";
    const DLQ: &str = "dlq";
    const TABLE: &str = "count_v1";

    struct Count;

    impl Fold for Count {
        type State = u64;
        fn apply(&self, state: &mut u64, _: &Event) {
            *state += 1;
        }
    }

    fn person(i: u128) -> Uuid {
        Uuid::from_u128(i + 1)
    }

    fn record(id: &str, who: u128) -> OutRecord {
        let event = Event {
            id: id.into(),
            time: "2026-01-01T00:00:00Z".parse().unwrap(),
            source: None,
            person_id: Some(person(who)),
            data: EventData::JourneyCompleted {
                journey_id: "j".into(),
            },
        };
        OutRecord::keyed(INPUT, person(who).to_string(), event.to_json())
    }

    async fn setup() -> (MemoryLog, MemoryStore) {
        let log = MemoryLog::new();
        let topics = [(INPUT, 3), (DLQ, 1)].map(|(name, partitions)| TopicConfig {
            name: name.into(),
            partitions,
            retention: None,
            compaction: false,
        });
        log.ensure_topics(&topics).await.unwrap();
        let store = MemoryStore::new();
        store.ensure_tables(&[TABLE.to_owned()]).await.unwrap();
        (log, store)
    }

    fn runner(log: &MemoryLog, store: &MemoryStore) -> Runner {
        let handler = Arc::new(ProjectionHandler::new(
            "count",
            TABLE,
            1,
            Count,
            chrono::Duration::days(7),
        ));
        let mut config = RunnerConfig::new("count.v1", INPUT, DLQ);
        config.backoff_min = Duration::from_millis(1);
        config.backoff_max = Duration::from_millis(5);
        Runner::new(
            Arc::new(log.clone()),
            Arc::new(store.clone()),
            handler,
            config,
        )
    }

    async fn caught_up(log: &MemoryLog, store: &MemoryStore) {
        for _ in 0..2_000 {
            let stored = store.positions("count.v1", INPUT).await.unwrap();
            let mut done = true;
            for p in 0..3 {
                let (_, high) = log.watermarks(INPUT, p).await.unwrap();
                done &= stored.get(&p).copied().unwrap_or(0) >= high;
            }
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the runner never caught up");
    }

    async fn counts(store: &MemoryStore) -> BTreeMap<String, u64> {
        store
            .rows(TABLE)
            .into_iter()
            .map(|(k, v)| {
                let row: Tracked<u64> = decode_row(1, TABLE, &k, &v).unwrap();
                (k, row.state)
            })
            .collect()
    }

    /// Store and log outages, a duplicate id and bad records: every good
    /// record is applied exactly once, every bad one dead-lettered once,
    /// and a restarted runner changes nothing.
    #[tokio::test]
    async fn effects_are_exactly_once_through_outages_and_restarts() {
        let (log, store) = setup().await;
        let mut records: Vec<OutRecord> = (0..60)
            .map(|i| record(&format!("e{i}"), (i % 4) as u128))
            .collect();
        records.push(record("e0", 0)); // a duplicate id: ignored
        records.push(OutRecord::keyed(
            INPUT,
            person(1).to_string(),
            b"{not json".to_vec(),
        ));
        log.produce(records).await.unwrap();
        store.fail_next_writes(3);
        log.fail_next_produces(2);

        let token = CancellationToken::new();
        let task = tokio::spawn(runner(&log, &store).run(token.clone()));
        caught_up(&log, &store).await;
        token.cancel();
        task.await.unwrap().unwrap();

        let expected: BTreeMap<String, u64> = (0..4).map(|i| (person(i).to_string(), 15)).collect();
        assert_eq!(counts(&store).await, expected);
        let dead = log.records(DLQ);
        assert_eq!(dead.len(), 1, "one dead letter, written once");
        assert_eq!(
            dead[0].header(crate::dead_letter::HEADER_PROCESSOR),
            Some(&b"count"[..])
        );

        // A restart resumes from the stored positions: nothing changes.
        let writes = store.writes();
        let token = CancellationToken::new();
        let task = tokio::spawn(runner(&log, &store).run(token.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(store.writes(), writes);
        assert_eq!(counts(&store).await, expected);
        assert_eq!(log.records(DLQ).len(), 1);
    }

    /// The lag gauges of every (processor, version, partition): sum of the
    /// records gauge and the smallest seconds gauge.
    fn lag_gauges(snapshotter: &metrics_util::debugging::Snapshotter) -> (f64, f64, usize) {
        let (mut records, mut min_seconds, mut series) = (0.0, f64::MAX, 0);
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let metrics_util::debugging::DebugValue::Gauge(v) = value else {
                continue;
            };
            let name = key.key().name();
            if name == m::LAG {
                records += v.into_inner();
                series += 1;
            } else if name == m::LAG_SECONDS {
                min_seconds = min_seconds.min(v.into_inner());
            }
        }
        (records, min_seconds, series)
    }

    /// The lag gauges follow the runner on a timer: the records behind and
    /// their age while it cannot apply them, 0 once it has caught up (no
    /// stale value after a burst), and 0 once it stops.
    #[tokio::test]
    async fn lag_gauges_are_refreshed_and_cleared_when_the_runner_stops() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // The test runtime has one thread: every task records here.
        let _local = metrics::set_default_local_recorder(&recorder);
        let (log, store) = setup().await;
        let records: Vec<OutRecord> = (0..30)
            .map(|i| record(&format!("e{i}"), (i % 5) as u128))
            .collect();
        log.produce(records).await.unwrap();

        // Behind: the store refuses every write.
        store.fail_next_writes(usize::MAX);
        let token = CancellationToken::new();
        let task = tokio::spawn(runner(&log, &store).run(token.clone()));
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let (behind, oldest, series) = lag_gauges(&snapshotter);
        assert_eq!(series, 3, "one series per partition");
        assert_eq!(behind, 30.0);
        assert!(oldest >= 1.0, "the oldest record is {oldest} s old");
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(
            lag_gauges(&snapshotter).0,
            0.0,
            "a stopped runner leaves no lag"
        );

        // Caught up: back to 0 within a tick.
        store.fail_next_writes(0);
        let token = CancellationToken::new();
        let task = tokio::spawn(runner(&log, &store).run(token.clone()));
        caught_up(&log, &store).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (behind, oldest, series) = lag_gauges(&snapshotter);
        assert_eq!((behind, oldest, series), (0.0, 0.0, 3));
        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// Forwards every record's value to [`OUT`] (an output per record).
    struct Forward;

    #[async_trait::async_trait]
    impl Handler for Forward {
        fn processor(&self) -> &str {
            "forward"
        }
        fn tables(&self) -> Vec<String> {
            Vec::new()
        }
        async fn handle(
            &self,
            _: &dyn ProjectionStore,
            _: &str,
            records: &[Record],
        ) -> Result<BatchOutput, HandleError> {
            let mut out = BatchOutput::default();
            for (i, r) in records.iter().enumerate() {
                let value = r.value.clone().unwrap_or_default();
                out.produce.push((i, OutRecord::keyed(OUT, "k", value)));
            }
            Ok(out)
        }
    }

    const OUT: &str = "out";

    /// What the log refuses for good as too large is made to fit, and the
    /// runner moves on: an output too large for its topic becomes the
    /// dead letter of its input, and a dead letter too large for the
    /// dead-letter topic is truncated, saying so in a header.
    #[tokio::test]
    async fn records_too_large_for_their_topic_are_made_to_fit_not_retried_forever() {
        let (log, store) = setup().await;
        log.ensure_topics(&[TopicConfig {
            name: OUT.into(),
            partitions: 1,
            retention: None,
            compaction: false,
        }])
        .await
        .unwrap();
        let inputs: Vec<OutRecord> = [100, 5_000, 100]
            .iter()
            .map(|n| OutRecord::keyed(INPUT, "k", vec![b'x'; *n]))
            .collect();
        log.produce(inputs).await.unwrap();
        log.limit_record_bytes(2_000);

        let mut config = RunnerConfig::new("forward.v1", INPUT, DLQ);
        config.backoff_min = Duration::from_millis(1);
        config.backoff_max = Duration::from_millis(5);
        let runner = Runner::new(
            Arc::new(log.clone()),
            Arc::new(store.clone()),
            Arc::new(Forward),
            config,
        );
        let token = CancellationToken::new();
        let task = tokio::spawn(runner.run(token.clone()));
        for _ in 0..2_000 {
            let stored = store.positions("forward.v1", INPUT).await.unwrap();
            if stored.values().sum::<u64>() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        token.cancel();
        task.await.unwrap().unwrap();

        let stored = store.positions("forward.v1", INPUT).await.unwrap();
        assert_eq!(stored.values().sum::<u64>(), 3, "the runner went on");
        let out = log.records(OUT);
        assert_eq!(out.len(), 2, "the outputs that fit");
        let dead = log.records(DLQ);
        assert_eq!(dead.len(), 1, "{dead:?}");
        let letter = &dead[0];
        assert_eq!(
            letter.header(crate::dead_letter::HEADER_ERROR),
            Some(&b"too_large"[..])
        );
        assert_eq!(letter.header(HEADER_TRUNCATED), Some(&b"5000"[..]));
        let value = letter.value.as_deref().unwrap_or_default();
        assert!(value.len() < 2_000 && !value.is_empty(), "{}", value.len());
        assert!(value.iter().all(|b| *b == b'x'), "a prefix of the input");
    }

    #[test]
    fn batches_are_cut_by_bytes_in_order_and_never_empty() {
        let record = |n: usize| Record {
            partition: 0,
            offset: n as u64,
            key: None,
            value: Some(vec![0; n]),
            headers: Vec::new(),
            timestamp_ms: 0,
        };
        let records: Vec<Record> = [3, 4, 2, 10, 1, 1].into_iter().map(record).collect();
        let sizes: Vec<Vec<u64>> = byte_chunks(&records, 7)
            .iter()
            .map(|c| c.iter().map(|r| r.offset).collect())
            .collect();
        // 3+4 fits, 2 alone (10 would pass 7), 10 alone (over, but never
        // empty), then 1+1.
        assert_eq!(sizes, [vec![3, 4], vec![2], vec![10], vec![1, 1]]);
        assert!(byte_chunks(&[], 7).is_empty());
        assert_eq!(byte_chunks(&records, usize::MAX).len(), 1);
    }

    #[test]
    fn truncating_ends() {
        let mut record = OutRecord::keyed(DLQ, "k", vec![1; 100]);
        record
            .headers
            .push((HEADER_MESSAGE.to_owned(), vec![b'm'; 5_000]));
        let mut steps = 0;
        while let Some(smaller) = truncated(record.clone()) {
            record = smaller;
            steps += 1;
            assert!(steps < 100);
        }
        assert!(record.value.is_empty());
        assert_eq!(
            record
                .headers
                .iter()
                .find(|(k, _)| k == HEADER_MESSAGE)
                .map(|(_, v)| v.len()),
            Some(1024)
        );
        assert_eq!(
            record
                .headers
                .iter()
                .find(|(k, _)| k == HEADER_TRUNCATED)
                .map(|(_, v)| v.clone()),
            Some(b"100".to_vec())
        );
    }

    /// A runner is a member of its group while it runs (what a drop waits
    /// for), and not after.
    #[tokio::test]
    async fn a_runner_leaves_its_group_when_it_stops() {
        let (log, store) = setup().await;
        let token = CancellationToken::new();
        let task = tokio::spawn(runner(&log, &store).run(token.clone()));
        for _ in 0..1_000 {
            if log.group_members("waymark.count.v1").await.unwrap() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(log.group_members("waymark.count.v1").await.unwrap(), 1);
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(log.group_members("waymark.count.v1").await.unwrap(), 0);
    }

    /// [`runner`] with batches of at most `max_batch` records and a 20 ms
    /// linger.
    fn runner_with(log: &MemoryLog, store: &MemoryStore, max_batch: usize) -> Runner {
        let mut runner = runner(log, store);
        runner.config.max_batch = max_batch;
        runner.config.linger = Duration::from_millis(20);
        runner
    }

    /// With a row cache, batches without outputs are deferred: rows changed
    /// by many batches reach the store in a few writes, together with their
    /// positions, and a restart applies nothing twice.
    #[tokio::test]
    async fn deferred_batches_reach_the_store_in_few_writes_exactly_once() {
        let (log, store) = setup().await;
        let store = store.with_runner_cache(1 << 20);
        let records: Vec<OutRecord> = (0..300)
            .map(|i| record(&format!("e{i}"), (i % 4) as u128))
            .collect();
        log.produce(records).await.unwrap();
        store.fail_next_writes(2);

        let token = CancellationToken::new();
        let task = tokio::spawn(runner_with(&log, &store, 7).run(token.clone()));
        caught_up(&log, &store).await;
        // More than 40 batches of at most 7 records; the store saw a
        // handful of writes (the first two failed and were retried).
        assert!(store.writes() <= 5, "{} writes", store.writes());
        token.cancel();
        task.await.unwrap().unwrap();
        let expected: BTreeMap<String, u64> = (0..4).map(|i| (person(i).to_string(), 75)).collect();
        assert_eq!(counts(&store).await, expected);

        // Deferred rows are written on shutdown too: a full poll appended
        // now is in the store once the runner has stopped.
        log.produce((0..7).map(|i| record(&format!("late{i}"), 0)).collect())
            .await
            .unwrap();
        let token = CancellationToken::new();
        let mut runner = runner_with(&log, &store, 7);
        runner.config.linger = Duration::from_secs(3600);
        let task = tokio::spawn(runner.run(token.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            counts(&store).await[&person(0).to_string()],
            75,
            "deferred while running"
        );
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(counts(&store).await[&person(0).to_string()], 82);
        caught_up(&log, &store).await;
    }

    /// A runner that has caught up (its poll had room to spare) writes each
    /// batch at once, whatever its linger and commit interval: live records
    /// are visible within a batch.
    #[tokio::test]
    async fn a_caught_up_runner_writes_each_batch_at_once() {
        let (log, store) = setup().await;
        let store = store.with_runner_cache(1 << 20);
        let token = CancellationToken::new();
        let mut runner = runner_with(&log, &store, 7);
        runner.config.linger = Duration::from_secs(3600);
        runner.config.commit_interval = Duration::from_secs(3600);
        let task = tokio::spawn(runner.run(token.clone()));
        for round in 1..=3u64 {
            log.produce(
                (0..3)
                    .map(|i| record(&format!("r{round}-{i}"), 0))
                    .collect(),
            )
            .await
            .unwrap();
            caught_up(&log, &store).await;
            assert_eq!(counts(&store).await[&person(0).to_string()], 3 * round);
        }
        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// A flush the store refuses for good is not retried forever: the
    /// deferred rows are discarded, the partitions read again from the
    /// stored positions and written batch by batch, so the record whose row
    /// the store refuses is found and its person parked while everyone else
    /// is applied exactly once.
    #[tokio::test]
    async fn a_refused_flush_is_applied_again_and_the_culprit_parked() {
        let (log, store) = setup().await;
        let store = store.with_runner_cache(1 << 20);
        // Person 0's row grows with every event id it keeps; the others
        // stay small.
        let mut records: Vec<OutRecord> = (0..120).map(|i| record(&format!("p0-{i}"), 0)).collect();
        records.extend((0..30).map(|i| record(&format!("px-{i}"), 1 + (i % 3) as u128)));
        log.produce(records).await.unwrap();
        let small = {
            let mut row = Tracked::<u64>::default();
            for i in 0..60 {
                let event = Event::from_json(&record(&format!("p0-{i}"), 0).value).unwrap();
                row.apply(
                    &Count,
                    &event,
                    waymark_core::Position::new(0, i),
                    chrono::Duration::days(7),
                );
            }
            crate::row::encode_row(1, &row).len()
        };
        // Person 0's row is refused from its 61st event on.
        store.refuse_values_over(small);

        let token = CancellationToken::new();
        let task = tokio::spawn(runner_with(&log, &store, 50).run(token.clone()));
        caught_up(&log, &store).await;
        token.cancel();
        task.await.unwrap().unwrap();

        let counts = counts(&store).await;
        assert_eq!(
            counts[&person(0).to_string()],
            60,
            "applied up to the refused row"
        );
        for i in 1..4 {
            assert_eq!(counts[&person(i).to_string()], 10, "person {i}");
        }
        let parked = store.rows(&park::parked_table("count", 1));
        let head = park::head_row(person(0).to_string().as_bytes());
        assert!(
            parked.iter().any(|(k, _)| *k == head),
            "person 0 is parked: {:?}",
            parked.iter().map(|(k, _)| k).collect::<Vec<_>>()
        );
        assert!(log.records(DLQ).is_empty());
    }
}
