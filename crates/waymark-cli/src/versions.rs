//! Projection versions at run time: the [`Controller`] that runs the
//! versions the catalog asks for, the tracker that points queries at the
//! active versions, and the [`PlatformOperator`] behind the `Admin` rpcs
//! (list, rebuild, switch, drop, verify).
//!
//! The catalog ([`waymark_runtime::catalog`]) lives in the projection
//! store, so every process sees the same versions: `waymark dev` runs all of
//! this in one process; at scale `waymark run` processes run controllers for
//! their processors and `waymark serve` serves `Admin`, all meeting in the
//! catalog (controllers and trackers re-read it every second).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use waymark_core::Position;
use waymark_proto::v1 as pb;
use waymark_runtime::catalog::{
    self, ack_id, consumer_id, marker_id, CatalogEntry, CatalogError, ProgressError, VersionGate,
    VersionProgress, VersionState,
};
use waymark_runtime::history::{history_table, HistoryEntry};
use waymark_runtime::identity::IdentityTables;
use waymark_runtime::{
    Log, ProjectionStore, RunError, Runner, RunnerConfig, StoreError, WriteBatch,
};
use waymark_schemas::Validator;
use waymark_server::{ApiError, Operator, ProjectionTables, Projections};
use waymark_topology::Topology;

use crate::registry::{self, PROCESSORS};

/// How often controllers and trackers re-read the catalog.
pub const CATALOG_POLL: Duration = Duration::from_secs(1);

/// Records read from the log per step of `verify`.
const VERIFY_CHUNK: usize = 2000;

/// Differences listed per verify report.
const MAX_DIFFERENCES: usize = 100;

fn input_topic(topology: &Topology, name: &str) -> anyhow::Result<String> {
    topology
        .processor(name)
        .and_then(|p| p.inputs.first().cloned())
        .ok_or_else(|| anyhow!("processor {name} has no input topic in the topology"))
}

fn configured_version(topology: &Topology, name: &str) -> u32 {
    topology.processor(name).map_or(1, |p| p.projection_version)
}

/// The tables queries read for the active versions `active(name)`.
pub fn projection_tables(active: impl Fn(&str) -> u32) -> ProjectionTables {
    ProjectionTables {
        identity: IdentityTables::for_version(active("identity")),
        person: registry::projection_table("person", active("person")),
        interactions: registry::projection_table("interactions", active("interactions")),
        journey: registry::projection_table("journey", active("journey")),
        learning: registry::projection_table("learning", active("learning")),
        history: history_table(active("person")),
    }
}

/// Reads (creating when missing) the catalog of every configured processor.
async fn catalog_of(
    store: &dyn ProjectionStore,
    topology: &Topology,
) -> Result<BTreeMap<String, CatalogEntry>, StoreError> {
    let mut out = BTreeMap::new();
    for name in PROCESSORS {
        if topology.processor(name).is_some() {
            let entry =
                catalog::load_or_init(store, name, configured_version(topology, name)).await?;
            out.insert((*name).to_owned(), entry);
        }
    }
    Ok(out)
}

/// Points `projections` at the active versions now.
pub(crate) async fn refresh(
    projections: &Projections,
    topology: &Topology,
) -> Result<(), StoreError> {
    let catalog = catalog_of(projections.store().as_ref(), topology).await?;
    projections.set_tables(projection_tables(|name| {
        catalog
            .get(name)
            .map_or_else(|| configured_version(topology, name), |e| e.active)
    }));
    Ok(())
}

/// Keeps `projections` pointed at the active versions until `shutdown`.
pub async fn track_active(
    projections: Projections,
    topology: Topology,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(e) = refresh(&projections, &topology).await {
            warn!(error = %e, "reading the projection catalog failed; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CATALOG_POLL) => {}
        }
    }
}

type RunnerTask = (CancellationToken, JoinHandle<Result<(), RunError>>);

/// Runs, for each of its processors, every version the catalog wants
/// running: the active one, building ones, and the previous one until it
/// has handed off. Performs the automatic switches of versions built with
/// `switch_when_caught_up`.
pub struct Controller {
    log: Arc<dyn Log>,
    store: Arc<dyn ProjectionStore>,
    topology: Topology,
    validator: Arc<Validator>,
    names: Vec<String>,
    group_prefix: String,
    runners: HashMap<(String, u32), RunnerTask>,
    requests: mpsc::Receiver<oneshot::Sender<()>>,
}

/// Asks a running [`Controller`] to act on the catalog now.
#[derive(Clone)]
pub struct ControllerHandle {
    requests: mpsc::Sender<oneshot::Sender<()>>,
}

impl ControllerHandle {
    /// Returns once the controller has re-read the catalog and started and
    /// stopped runners accordingly (stopped runners have finished).
    pub async fn sync(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(reply).await.is_ok() {
            let _ = done.await;
        }
    }
}

impl Controller {
    /// A controller of processors `names`.
    pub fn new(
        log: Arc<dyn Log>,
        store: Arc<dyn ProjectionStore>,
        topology: Topology,
        validator: Arc<Validator>,
        names: Vec<String>,
        group_prefix: impl Into<String>,
    ) -> (Self, ControllerHandle) {
        let (tx, rx) = mpsc::channel(16);
        (
            Self {
                log,
                store,
                topology,
                validator,
                names,
                group_prefix: group_prefix.into(),
                runners: HashMap::new(),
                requests: rx,
            },
            ControllerHandle { requests: tx },
        )
    }

    /// Runs until `shutdown`, then stops every runner (each finishes its
    /// batch in hand). A runner that fails for good fails the controller.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let result = self.control(&shutdown).await;
        for (_, (token, _)) in self.runners.iter() {
            token.cancel();
        }
        for ((name, version), (_, task)) in self.runners.drain() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(%name, version, error = %e, "processor ended with an error"),
                Err(e) => warn!(%name, version, error = %e, "processor task failed"),
            }
        }
        result
    }

    /// Acts on the catalog of every processor once; the first error stops.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        for name in self.names.clone() {
            self.reconcile(&name).await?;
        }
        Ok(())
    }

    async fn control(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        loop {
            let reply = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(CATALOG_POLL) => None,
                request = self.requests.recv() => request,
            };
            for name in self.names.clone() {
                if let Err(e) = self.reconcile(&name).await {
                    warn!(processor = %name, error = %e, "acting on the projection catalog failed; retrying");
                }
            }
            if let Some(reply) = reply {
                let _ = reply.send(());
            }
            let finished: Vec<(String, u32)> = self
                .runners
                .iter()
                .filter(|(_, (_, task))| task.is_finished())
                .map(|(k, _)| k.clone())
                .collect();
            for key in finished {
                if let Some((_, task)) = self.runners.remove(&key) {
                    match task.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(anyhow!("processor {} v{}: {e}", key.0, key.1)),
                        Err(e) => {
                            return Err(anyhow!("processor {} v{} panicked: {e}", key.0, key.1))
                        }
                    }
                }
            }
        }
    }

    /// Starts and stops the runners of `name` as its catalog entry says.
    pub(crate) async fn reconcile(&mut self, name: &str) -> anyhow::Result<()> {
        let store = self.store.as_ref();
        let topic = input_topic(&self.topology, name)?;
        let mut entry =
            catalog::load_or_init(store, name, configured_version(&self.topology, name)).await?;
        let building: Vec<u32> = entry
            .versions
            .iter()
            .filter(|(_, i)| i.state == VersionState::Building && i.switch_when_caught_up)
            .map(|(v, _)| *v)
            .collect();
        for version in building {
            let candidate =
                catalog::progress(store, self.log.as_ref(), &topic, name, version).await?;
            let active =
                catalog::progress(store, self.log.as_ref(), &topic, name, entry.active).await?;
            if candidate.reached(&active) {
                let from = entry.active;
                entry.switch(version, Utc::now())?;
                catalog::save(store, &entry).await?;
                info!(processor = %name, from, to = version, "switched projection version (caught up)");
            }
        }
        let handed_off = catalog::handed_off(store, self.log.as_ref(), &topic, &entry).await?;
        let wanted: BTreeSet<u32> = entry.running(handed_off).into_iter().collect();
        let stale: Vec<(String, u32)> = self
            .runners
            .keys()
            .filter(|(n, v)| n == name && !wanted.contains(v))
            .cloned()
            .collect();
        for key in stale {
            if let Some((token, task)) = self.runners.remove(&key) {
                token.cancel();
                let _ = task.await;
                info!(processor = %name, version = key.1, "projection version stopped");
            }
        }
        for version in wanted {
            let key = (name.to_owned(), version);
            if self.runners.contains_key(&key) {
                continue;
            }
            let handler = registry::handler(name, version, &self.topology, &self.validator)?;
            store.ensure_tables(&handler.tables()).await?;
            let config = RunnerConfig::new(
                consumer_id(name, version),
                topic.clone(),
                self.topology.topics.dlq.name.clone(),
            )
            .with_group_prefix(&self.group_prefix);
            let runner = Runner::new(self.log.clone(), self.store.clone(), handler, config)
                .with_gate(Arc::new(VersionGate::new(name, version, topic.clone())));
            let token = CancellationToken::new();
            let task = tokio::spawn(runner.run(token.clone()));
            info!(processor = %name, version, "projection version running");
            self.runners.insert(key, (token, task));
        }
        Ok(())
    }
}

fn catalog_error(e: CatalogError) -> ApiError {
    match e {
        CatalogError::UnknownVersion { .. } => ApiError::NotFound(e.to_string()),
        other => ApiError::FailedPrecondition(other.to_string()),
    }
}

fn progress_error(e: ProgressError) -> ApiError {
    match e {
        ProgressError::Store(e) => ApiError::Store(e),
        ProgressError::Log(e) => ApiError::Log(e),
        other => ApiError::Store(StoreError::Unavailable(other.to_string())),
    }
}

fn timestamp(t: &chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Records applied over time, by sample time.
type Samples = VecDeque<(Instant, u64)>;

/// The `Admin` projection rpcs over a log and a store.
pub struct PlatformOperator {
    log: Arc<dyn Log>,
    store: Arc<dyn ProjectionStore>,
    topology: Topology,
    validator: Arc<Validator>,
    projections: Projections,
    controller: Option<ControllerHandle>,
    samples: Mutex<HashMap<(String, u32), Samples>>,
}

impl PlatformOperator {
    /// Operates the versions of `topology`'s processors; `controller` is
    /// the local controller when this process runs the processors.
    pub fn new(
        log: Arc<dyn Log>,
        store: Arc<dyn ProjectionStore>,
        topology: Topology,
        validator: Arc<Validator>,
        projections: Projections,
        controller: Option<ControllerHandle>,
    ) -> Self {
        Self {
            log,
            store,
            topology,
            validator,
            projections,
            controller,
            samples: Mutex::new(HashMap::new()),
        }
    }

    /// Samples progress every few seconds so rates and ETAs are known.
    pub async fn sample_until(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            for name in PROCESSORS {
                if self.topology.processor(name).is_some() {
                    let _ = self.describe(name, false).await;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    fn known(&self, processor: &str) -> Result<String, ApiError> {
        if !PROCESSORS.contains(&processor) || self.topology.processor(processor).is_none() {
            return Err(ApiError::InvalidArgument(format!(
                "unknown processor {processor:?}; known processors: {}",
                PROCESSORS.join(", ")
            )));
        }
        input_topic(&self.topology, processor)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))
    }

    async fn entry(&self, processor: &str) -> Result<CatalogEntry, ApiError> {
        Ok(catalog::load_or_init(
            self.store.as_ref(),
            processor,
            configured_version(&self.topology, processor),
        )
        .await?)
    }

    async fn handed_off(&self, topic: &str, entry: &CatalogEntry) -> Result<bool, ApiError> {
        catalog::handed_off(self.store.as_ref(), self.log.as_ref(), topic, entry)
            .await
            .map_err(progress_error)
    }

    async fn progress(
        &self,
        topic: &str,
        processor: &str,
        v: u32,
    ) -> Result<VersionProgress, ApiError> {
        catalog::progress(self.store.as_ref(), self.log.as_ref(), topic, processor, v)
            .await
            .map_err(progress_error)
    }

    /// Records a sample and returns the rate over the last 30 s.
    fn rate(&self, processor: &str, version: u32, applied: u64) -> f64 {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let series = samples.entry((processor.to_owned(), version)).or_default();
        let now = Instant::now();
        series.push_back((now, applied));
        while series
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(30))
        {
            series.pop_front();
        }
        match series.front() {
            Some((t, first)) if now.duration_since(*t) >= Duration::from_millis(900) => {
                applied.saturating_sub(*first) as f64 / now.duration_since(*t).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    async fn describe(&self, processor: &str, sizes: bool) -> Result<pb::Projection, ApiError> {
        let topic = self.known(processor)?;
        let entry = self.entry(processor).await?;
        let active = self.progress(&topic, processor, entry.active).await?;
        let handed_off = self.handed_off(&topic, &entry).await?;
        let running: BTreeSet<u32> = entry.running(handed_off).into_iter().collect();
        let mut versions = Vec::new();
        for (v, info) in &entry.versions {
            let progress = if *v == entry.active {
                active.clone()
            } else {
                self.progress(&topic, processor, *v).await?
            };
            let lag = progress.lag();
            let rate = self.rate(processor, *v, progress.applied());
            let tables = registry::tables(processor, *v);
            let mut stored_bytes = None;
            for t in tables.iter().filter(|_| sizes) {
                if let Some(bytes) = self.store.stored_bytes(t).await? {
                    *stored_bytes.get_or_insert(0) += bytes;
                }
            }
            versions.push(pb::ProjectionVersion {
                version: *v,
                state: match info.state {
                    VersionState::Building => pb::VersionState::Building,
                    VersionState::Live => pb::VersionState::Live,
                    VersionState::Retired => pb::VersionState::Retired,
                } as i32,
                partitions: progress
                    .partitions
                    .iter()
                    .map(|(p, (pos, high))| pb::PartitionProgress {
                        partition: i32::try_from(*p).unwrap_or(i32::MAX),
                        position: i64::try_from(*pos).unwrap_or(i64::MAX),
                        high_watermark: i64::try_from(*high).unwrap_or(i64::MAX),
                        lag: i64::try_from(high.saturating_sub(*pos)).unwrap_or(i64::MAX),
                    })
                    .collect(),
                lag,
                rate,
                eta_seconds: (lag > 0 && rate > 0.0).then(|| lag as f64 / rate),
                caught_up: *v == entry.active || progress.reached(&active),
                switch_when_caught_up: info.switch_when_caught_up,
                running: running.contains(v),
                tables,
                stored_bytes,
                created_at: Some(timestamp(&info.created_at)),
                switched_at: info.switched_at.as_ref().map(timestamp),
            });
        }
        Ok(pb::Projection {
            processor: processor.to_owned(),
            active_version: entry.active,
            input_topic: topic,
            versions,
        })
    }

    async fn sync(&self) {
        if let Some(controller) = &self.controller {
            controller.sync().await;
        }
        if let Err(e) = refresh(&self.projections, &self.topology).await {
            warn!(error = %e, "reading the projection catalog failed");
        }
    }

    /// The input must still start at offset 0 for a rebuild to see all of it.
    async fn check_from_start(&self, topic: &str, processor: &str) -> Result<(), ApiError> {
        for p in 0..self.log.partitions(topic).await? {
            let (low, _) = self.log.watermarks(topic, p).await?;
            if low > 0 {
                return Err(ApiError::FailedPrecondition(format!(
                    "{processor} is built from {topic}, whose retention already removed \
                     offsets below {low} on partition {p}; a rebuild would miss them (keep \
                     {topic} forever to rebuild {processor})"
                )));
            }
        }
        Ok(())
    }

    async fn verify_one(&self, processor: &str) -> Result<pb::VerifyReport, ApiError> {
        let topic = self.known(processor)?;
        self.check_from_start(&topic, processor).await?;
        let entry = self.entry(processor).await?;
        let version = entry.active;
        let snapshot = self
            .store
            .positions(&consumer_id(processor, version), &topic)
            .await?;
        let scratch = Scratch::open()?;
        let handler = registry::handler(processor, version, &self.topology, &self.validator)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        scratch.store.ensure_tables(&handler.tables()).await?;
        let mut replayed = 0u64;
        for (partition, end) in &snapshot {
            let mut from = 0;
            while from < *end {
                let mut records = self
                    .log
                    .read(&topic, *partition, from, VERIFY_CHUNK)
                    .await?;
                records.retain(|r| r.offset < *end);
                let Some(last) = records.last() else { break };
                from = last.offset + 1;
                replayed += records.len() as u64;
                let out = handler
                    .handle(&scratch.store, &topic, &records)
                    .await
                    .map_err(|e| ApiError::Store(StoreError::Unavailable(e.to_string())))?;
                scratch
                    .store
                    .write(WriteBatch {
                        rows: out.rows,
                        positions: Vec::new(),
                    })
                    .await?;
            }
        }
        let mut report = pb::VerifyReport {
            processor: processor.to_owned(),
            version,
            records_replayed: replayed,
            ..Default::default()
        };
        for table in handler.tables() {
            compare_table(
                &table,
                &scratch.store,
                self.store.as_ref(),
                &snapshot,
                &mut report,
            )
            .await?;
        }
        Ok(report)
    }
}

/// A throw-away embedded store in a temporary directory.
struct Scratch {
    dir: PathBuf,
    store: waymark_embedded::EmbeddedStore,
}

impl Scratch {
    fn open() -> Result<Self, ApiError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("waymark-verify-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| {
            ApiError::Store(StoreError::Unavailable(format!(
                "cannot create scratch dir {}: {e}",
                dir.display()
            )))
        })?;
        let store = waymark_embedded::EmbeddedStore::open(&dir.join("scratch"))?;
        Ok(Self { dir, store })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.store.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The position a stored row reflects, when it has one: the
/// [`waymark_core::Tracked`] rows start with it; history chunks end with
/// their newest entry.
fn row_position(table: &str, key: &str, bytes: &[u8]) -> Option<Position> {
    if table.starts_with("identity_") {
        return None;
    }
    if key.contains('/') {
        let chunk: Vec<HistoryEntry> = postcard::from_bytes(bytes).ok()?;
        return chunk.last().map(|e| Position::new(e.partition, e.offset));
    }
    let (position, _): (Option<Position>, _) = postcard::take_from_bytes(bytes).ok()?;
    position
}

/// Whether live processing moved the stored row past the snapshot.
fn moved_on(table: &str, key: &str, stored: &[u8], snapshot: &BTreeMap<u32, u64>) -> bool {
    row_position(table, key, stored)
        .is_some_and(|p| p.offset >= snapshot.get(&p.partition).copied().unwrap_or(0))
}

fn difference(report: &mut pb::VerifyReport, table: &str, key: &str, kind: &str, detail: String) {
    report.difference_count += 1;
    if report.differences.len() < MAX_DIFFERENCES {
        report.differences.push(pb::Difference {
            table: table.to_owned(),
            key: key.to_owned(),
            kind: kind.to_owned(),
            detail,
        });
    }
}

/// Compares `table` row by row between the recomputation and the store.
async fn compare_table(
    table: &str,
    scratch: &dyn ProjectionStore,
    live: &dyn ProjectionStore,
    snapshot: &BTreeMap<u32, u64>,
    report: &mut pb::VerifyReport,
) -> Result<(), ApiError> {
    // Every recomputed row must be stored, equal.
    let mut after: Option<String> = None;
    loop {
        let page = scratch.scan(table, after.as_deref(), VERIFY_CHUNK).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let keys: Vec<String> = page.iter().map(|(k, _)| k.clone()).collect();
        let stored = match live.get_many(table, &keys).await {
            Ok(rows) => rows,
            Err(StoreError::UnknownTable(_)) => vec![None; keys.len()],
            Err(e) => return Err(e.into()),
        };
        for ((key, expected), stored) in page.iter().zip(stored) {
            report.rows_compared += 1;
            match stored {
                None => difference(
                    report,
                    table,
                    key,
                    "missing",
                    format!(
                        "recomputed a row of {} bytes; none is stored",
                        expected.len()
                    ),
                ),
                Some(actual) if actual == *expected => {}
                Some(actual) if moved_on(table, key, &actual, snapshot) => report.rows_skipped += 1,
                Some(actual) => difference(
                    report,
                    table,
                    key,
                    "different",
                    format!(
                        "stored {} bytes differ from the recomputed {} bytes",
                        actual.len(),
                        expected.len()
                    ),
                ),
            }
        }
    }
    // Every stored row must have been recomputed.
    let mut after: Option<String> = None;
    loop {
        let page = match live.scan(table, after.as_deref(), VERIFY_CHUNK).await {
            Ok(page) => page,
            Err(StoreError::UnknownTable(_)) => break,
            Err(e) => return Err(e.into()),
        };
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let keys: Vec<String> = page.iter().map(|(k, _)| k.clone()).collect();
        let expected = scratch.get_many(table, &keys).await?;
        for ((key, actual), expected) in page.iter().zip(expected) {
            if expected.is_none() {
                if moved_on(table, key, actual, snapshot) {
                    report.rows_skipped += 1;
                } else {
                    report.rows_compared += 1;
                    difference(
                        report,
                        table,
                        key,
                        "unexpected",
                        format!(
                            "a row of {} bytes is stored; none was recomputed",
                            actual.len()
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Operator for PlatformOperator {
    async fn list(&self) -> Result<Vec<pb::Projection>, ApiError> {
        // What this process's queries read follows what is listed as live.
        refresh(&self.projections, &self.topology).await?;
        let mut out = Vec::new();
        for name in PROCESSORS {
            if self.topology.processor(name).is_some() {
                out.push(self.describe(name, true).await?);
            }
        }
        Ok(out)
    }

    async fn start_rebuild(
        &self,
        processor: &str,
        to: Option<u32>,
        switch_when_caught_up: bool,
    ) -> Result<pb::Projection, ApiError> {
        let topic = self.known(processor)?;
        self.check_from_start(&topic, processor).await?;
        let mut entry = self.entry(processor).await?;
        let version = entry
            .start_rebuild(to, switch_when_caught_up, Utc::now())
            .map_err(catalog_error)?;
        catalog::save(self.store.as_ref(), &entry).await?;
        self.store
            .ensure_tables(&registry::tables(processor, version))
            .await?;
        info!(%processor, version, switch_when_caught_up, "projection rebuild started");
        self.sync().await;
        self.describe(processor, true).await
    }

    async fn switch(&self, processor: &str, version: u32) -> Result<pb::Projection, ApiError> {
        let topic = self.known(processor)?;
        let mut entry = self.entry(processor).await?;
        if version != entry.active {
            entry.state(version).map_err(catalog_error)?;
            let candidate = self.progress(&topic, processor, version).await?;
            let active = self.progress(&topic, processor, entry.active).await?;
            if !candidate.reached(&active) {
                return Err(ApiError::FailedPrecondition(format!(
                    "{processor} version {version} has not caught up with version {} yet \
                     ({} records behind the log); wait, or rebuild with --switch to switch \
                     as soon as it has",
                    entry.active,
                    candidate.lag()
                )));
            }
            let from = entry.active;
            entry.switch(version, Utc::now()).map_err(catalog_error)?;
            catalog::save(self.store.as_ref(), &entry).await?;
            info!(%processor, from, to = version, "switched projection version");
        }
        self.sync().await;
        self.describe(processor, true).await
    }

    async fn drop_version(
        &self,
        processor: &str,
        version: u32,
    ) -> Result<pb::Projection, ApiError> {
        let topic = self.known(processor)?;
        let mut entry = self.entry(processor).await?;
        let handed_off = self.handed_off(&topic, &entry).await?;
        entry
            .drop_version(version, handed_off)
            .map_err(catalog_error)?;
        catalog::save(self.store.as_ref(), &entry).await?;
        // Its runners stop on their next look at the catalog: here at once,
        // in other processes within a few polls.
        match &self.controller {
            Some(controller) => controller.sync().await,
            None => tokio::time::sleep(CATALOG_POLL * 3).await,
        }
        self.store
            .drop_tables(&registry::tables(processor, version))
            .await?;
        self.store
            .delete_positions(&consumer_id(processor, version), &topic)
            .await?;
        self.store
            .delete_positions(&marker_id(processor, version), &topic)
            .await?;
        self.store
            .delete_positions(&ack_id(processor, version), &topic)
            .await?;
        info!(%processor, version, "projection version dropped");
        self.describe(processor, true).await
    }

    async fn verify(&self, processor: Option<&str>) -> Result<Vec<pb::VerifyReport>, ApiError> {
        let names: Vec<String> = match processor {
            Some(p) => {
                self.known(p)?;
                vec![p.to_owned()]
            }
            None => PROCESSORS
                .iter()
                .filter(|n| self.topology.processor(n).is_some())
                .map(|n| (*n).to_owned())
                .collect(),
        };
        let mut reports = Vec::new();
        for name in names {
            reports.push(self.verify_one(&name).await?);
        }
        Ok(reports)
    }
}
