//! The [`PlatformOperator`] behind the `Admin` projection rpcs: list,
//! rebuild, switch, drop and verify the versions of every processor.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use waymark_proto::v1 as pb;
use waymark_runtime::catalog::{
    self, ack_id, consumer_id, marker_id, CatalogEntry, CatalogError, ProgressError, UpdateError,
    VersionProgress, VersionState,
};
use waymark_runtime::park;
use waymark_runtime::plugin::Registry;
use waymark_runtime::{Log, ProjectionStore, RunnerConfig, StoreError};
use waymark_schemas::Validator;
use waymark_server::{ApiError, Operator, Projections};
use waymark_topology::Topology;

use crate::controller::{configured, refresh, unreadable_message, ControllerHandle, CATALOG_POLL};
use crate::verify;

/// Longest a drop waits for the runners of the version to leave its
/// consumer group (a crashed one leaves at its session timeout, 45 s by
/// default on Kafka).
pub const DROP_WAIT: Duration = Duration::from_secs(60);

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
    registry: Registry,
    group_prefix: String,
    log: Arc<dyn Log>,
    store: Arc<dyn ProjectionStore>,
    topology: Topology,
    validator: Arc<Validator>,
    projections: Projections,
    controller: Option<ControllerHandle>,
    samples: Mutex<HashMap<(String, u32), Samples>>,
}

impl PlatformOperator {
    /// The prefix of the runners' consumer groups (`waymark` by default), as
    /// the controllers were given it.
    pub fn with_group_prefix(mut self, prefix: &str) -> Self {
        self.group_prefix = prefix.to_owned();
        self
    }

    /// The registry operated.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The log read.
    pub(crate) fn log(&self) -> &Arc<dyn Log> {
        &self.log
    }

    /// The store operated.
    pub(crate) fn store(&self) -> &Arc<dyn ProjectionStore> {
        &self.store
    }

    /// The topology operated.
    pub(crate) fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The validator handlers are built with.
    pub(crate) fn validator(&self) -> &Arc<Validator> {
        &self.validator
    }

    /// Operates the versions of `topology`'s processors; `controller` is
    /// the local controller when this process runs the processors.
    pub fn new(
        registry: Registry,
        log: Arc<dyn Log>,
        store: Arc<dyn ProjectionStore>,
        topology: Topology,
        validator: Arc<Validator>,
        projections: Projections,
        controller: Option<ControllerHandle>,
    ) -> Self {
        Self {
            registry,
            group_prefix: "waymark".to_owned(),
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
            for name in self.registry.configured(&self.topology) {
                let _ = self.describe(name, false).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    pub(crate) fn known(&self, processor: &str) -> Result<String, ApiError> {
        if !self.registry.contains(processor) || self.topology.processor(processor).is_none() {
            return Err(ApiError::InvalidArgument(format!(
                "unknown processor {processor:?}; known processors: {}",
                self.registry.names().join(", ")
            )));
        }
        self.registry
            .input_topic(processor, &self.topology)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))
    }

    /// The parked-keys table of `version` of `processor` (the live version
    /// when `None`), which must exist, and the version.
    async fn parked_table(
        &self,
        processor: &str,
        version: Option<u32>,
    ) -> Result<(String, u32), ApiError> {
        self.known(processor)?;
        let entry = self.entry(processor).await?;
        let version = version.unwrap_or(entry.active);
        entry.state(version).map_err(catalog_error)?;
        Ok((park::parked_table(processor, version), version))
    }

    pub(crate) async fn entry(&self, processor: &str) -> Result<CatalogEntry, ApiError> {
        Ok(catalog::load_or_init(
            self.store.as_ref(),
            processor,
            configured(&self.registry, &self.topology, processor),
        )
        .await?)
    }

    /// Waits until no runner of `version` of `processor` is left in its
    /// consumer group, for at most [`DROP_WAIT`] (a crashed member leaves
    /// when its session times out); after that the drop goes on, with a
    /// warning.
    async fn wait_for_runners_to_stop(
        &self,
        processor: &str,
        version: u32,
    ) -> Result<(), ApiError> {
        let group = RunnerConfig::new(consumer_id(processor, version), "", "")
            .with_group_prefix(&self.group_prefix)
            .group;
        let deadline = Instant::now() + DROP_WAIT;
        loop {
            let members = self.log.group_members(&group).await?;
            if members == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                warn!(%processor, version, members, %group, "runners of a dropped version are still in its group; dropping its data anyway");
                return Ok(());
            }
            tokio::time::sleep(CATALOG_POLL / 5).await;
        }
    }

    /// Changes the catalog row of `processor` with a compare-and-set (see
    /// [`catalog::update`]).
    async fn update<T>(
        &self,
        processor: &str,
        change: impl FnMut(&mut CatalogEntry) -> Result<T, CatalogError>,
    ) -> Result<(CatalogEntry, T), ApiError> {
        catalog::update(
            self.store.as_ref(),
            processor,
            configured(&self.registry, &self.topology, processor),
            change,
        )
        .await
        .map_err(|e| match e {
            UpdateError::Catalog(e) => catalog_error(e),
            UpdateError::Store(e) => ApiError::Store(e),
            other => ApiError::Store(StoreError::Unavailable(other.to_string())),
        })
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

    /// Seconds since the record at `position` of `topic`'s `partition`
    /// was appended (the oldest not applied); 0 when caught up or when it
    /// cannot be read (it left the retention: the lag in records still
    /// tells).
    async fn lag_seconds(
        &self,
        topic: &str,
        partition: u32,
        position: u64,
        high: u64,
        now_ms: i64,
    ) -> f64 {
        if position >= high {
            return 0.0;
        }
        match self.log.read(topic, partition, position, 1).await {
            Ok(records) => records.first().map_or(0.0, |r| {
                now_ms.saturating_sub(r.timestamp_ms).max(0) as f64 / 1000.0
            }),
            Err(_) => 0.0,
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
            let tables = self.registry.tables(processor, *v);
            let mut stored_bytes = None;
            for t in tables.iter().filter(|_| sizes) {
                if let Some(bytes) = self.store.stored_bytes(t).await? {
                    *stored_bytes.get_or_insert(0) += bytes;
                }
            }
            let now_ms = chrono::Utc::now().timestamp_millis();
            let mut partitions = Vec::new();
            for (p, (pos, high)) in &progress.partitions {
                partitions.push(pb::PartitionProgress {
                    partition: i32::try_from(*p).unwrap_or(i32::MAX),
                    position: i64::try_from(*pos).unwrap_or(i64::MAX),
                    high_watermark: i64::try_from(*high).unwrap_or(i64::MAX),
                    lag: i64::try_from(high.saturating_sub(*pos)).unwrap_or(i64::MAX),
                    lag_seconds: self.lag_seconds(&topic, *p, *pos, *high, now_ms).await,
                });
            }
            let lag_seconds = partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max);
            versions.push(pb::ProjectionVersion {
                version: *v,
                state: match info.state {
                    VersionState::Building => pb::VersionState::Building,
                    VersionState::Live => pb::VersionState::Live,
                    VersionState::Retired => pb::VersionState::Retired,
                } as i32,
                partitions,
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
                lag_seconds,
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
        if let Err(e) = refresh(&self.projections, &self.registry, &self.topology).await {
            warn!(error = %e, "reading the projection catalog failed");
        }
    }

    /// The input must still start at offset 0 for a rebuild to see all of it.
    pub(crate) async fn check_from_start(
        &self,
        topic: &str,
        processor: &str,
    ) -> Result<(), ApiError> {
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
}
#[tonic::async_trait]
impl Operator for PlatformOperator {
    async fn list(&self) -> Result<Vec<pb::Projection>, ApiError> {
        // What this process's queries read follows what is listed as live.
        refresh(&self.projections, &self.registry, &self.topology).await?;
        let mut out = Vec::new();
        for name in self.registry.configured(&self.topology) {
            out.push(self.describe(name, true).await?);
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
        let now = Utc::now();
        let encoding = configured(&self.registry, &self.topology, processor).encoding;
        let (_, version) = self
            .update(processor, |e| {
                e.start_rebuild(to, switch_when_caught_up, encoding, now)
            })
            .await?;
        self.store
            .ensure_tables(&self.registry.tables(processor, version))
            .await?;
        info!(%processor, version, switch_when_caught_up, "projection rebuild started");
        self.sync().await;
        self.describe(processor, true).await
    }

    async fn switch(&self, processor: &str, version: u32) -> Result<pb::Projection, ApiError> {
        let topic = self.known(processor)?;
        let entry = self.entry(processor).await?;
        if version != entry.active {
            entry.state(version).map_err(catalog_error)?;
            let encoding = configured(&self.registry, &self.topology, processor).encoding;
            if !entry.readable(version, encoding) {
                return Err(ApiError::FailedPrecondition(unreadable_message(
                    &entry, version, encoding,
                )));
            }
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
            let now = Utc::now();
            self.update(processor, |e| {
                if e.active != from {
                    return Err(CatalogError::NotAllowed(format!(
                        "{processor}'s live version changed to {} meanwhile; try again",
                        e.active
                    )));
                }
                e.switch(version, now)
            })
            .await?;
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
        let entry = self.entry(processor).await?;
        let handed_off = self.handed_off(&topic, &entry).await?;
        let previous = entry.previous;
        self.update(processor, |e| {
            // Handed off was measured for this predecessor only.
            let handed_off = handed_off && e.previous == previous;
            e.drop_version(version, handed_off)
        })
        .await?;
        // Its runners stop on their next look at the catalog: here at once,
        // in other processes within a poll. Their consumer group empties as
        // they do: that is their acknowledgement.
        if let Some(controller) = &self.controller {
            controller.sync().await;
        }
        self.wait_for_runners_to_stop(processor, version).await?;
        let mut tables = self.registry.tables(processor, version);
        tables.push(park::parked_table(processor, version));
        self.store.drop_tables(&tables).await?;
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
            None => self
                .registry
                .configured(&self.topology)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        };
        let mut reports = Vec::new();
        for name in names {
            reports.push(verify::verify_one(self, &name).await?);
        }
        Ok(reports)
    }

    async fn list_parked(
        &self,
        processor: &str,
        version: Option<u32>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<pb::ListParkedResponse, ApiError> {
        let (table, version) = self.parked_table(processor, version).await?;
        let store = self.store.as_ref();
        let (keys, next) = match park::list(store, &table, after, limit).await {
            Ok(page) => page,
            // A version whose runner never started has no parked table yet.
            Err(StoreError::UnknownTable(_)) => (Vec::new(), None),
            Err(e) => return Err(e.into()),
        };
        let requests: Vec<String> = keys.iter().map(|k| park::request_row(&k.key)).collect();
        let pending = store.get_many(&table, &requests).await?;
        let parked = keys
            .iter()
            .zip(pending)
            .map(|(k, request)| parked_key(processor, version, k, request.is_some()))
            .collect();
        Ok(pb::ListParkedResponse {
            parked,
            next_page_token: next.unwrap_or_default(),
        })
    }

    async fn retry_parked(
        &self,
        processor: &str,
        version: Option<u32>,
        key: &str,
        skip: bool,
    ) -> Result<pb::ParkedKey, ApiError> {
        let (table, version) = self.parked_table(processor, version).await?;
        let bytes = park::parse_key_text(key).ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "key {key:?}: \"hex:\" must be followed by hex digit pairs"
            ))
        })?;
        let action = if skip {
            park::ParkAction::Skip
        } else {
            park::ParkAction::Retry
        };
        let not_found = || {
            ApiError::NotFound(format!(
                "{key:?} is not parked in {processor} version {version}"
            ))
        };
        let head = match park::request(self.store.as_ref(), &table, &bytes, action).await {
            Ok(Some(head)) => head,
            Ok(None) | Err(StoreError::UnknownTable(_)) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        };
        info!(%processor, version, key, skip, "parked key retry requested");
        Ok(parked_key(processor, version, &head, true))
    }
}

/// At most this much of a reason or error is shown.
const MAX_REASON: usize = 1024;

fn clipped(text: &str) -> String {
    if text.len() <= MAX_REASON {
        return text.to_owned();
    }
    let mut end = MAX_REASON;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn parked_key(
    processor: &str,
    version: u32,
    k: &park::ParkedKey,
    retry_requested: bool,
) -> pb::ParkedKey {
    pb::ParkedKey {
        processor: processor.to_owned(),
        version,
        key: park::key_text(&k.key),
        partition: k.partition as i32,
        offset: k.offset as i64,
        reason: clipped(&k.reason),
        records: k.count(),
        retries: k.retries,
        last_error: k.last_error.as_deref().map(clipped).unwrap_or_default(),
        parked_at: Some(prost_types::Timestamp {
            seconds: k.parked_at_ms.div_euclid(1000),
            nanos: (k.parked_at_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        retry_requested,
    }
}
