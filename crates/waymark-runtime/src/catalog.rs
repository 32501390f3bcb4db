//! The projection catalog: which versions of each processor's projections
//! exist, which one queries read, and how side effects are handed from one
//! version to the next.
//!
//! # Versions
//! A processor's projection version `N` is its own set of tables
//! (`journey_vN`, `identity_vN_links`, …), its own positions (consumer
//! `journey.vN`) and its own consumer group, so version `N + 1` can be built
//! from offset 0 while version `N` keeps serving. The catalog, one row per
//! processor in the store table [`CATALOG_TABLE`], records every version and
//! its [`VersionState`]; [`CatalogEntry::active`] is the version queries
//! read. Switching rewrites that one row, so readers see either the old or
//! the new version, never a mix within one projection.
//!
//! # Side effects across versions (the hand-off)
//! Two versions of a processor read the same input, but only one of them
//! may write its side effects (the identity processor's `waymark.events`
//! records, every processor's dead letters), or a rebuild would publish the
//! history a second time. [`VersionGate`] decides, per batch and partition,
//! which offsets' side effects a version writes:
//! - a **building** version writes none: its input was already handled by
//!   the active version;
//! - the **retired** predecessor keeps running. When it first sees it was
//!   retired it *acknowledges*, per partition, the position it stands at:
//!   it wrote no side effect at or above it. From then on it writes only
//!   those below the active version's *hand-off marker*, and waits while
//!   there is none; once its position has reached the marker on every
//!   partition it stops ([`handed_off`]);
//! - the **active** version records, before the first batch it handles as
//!   active on a partition, its hand-off marker there: the larger of that
//!   batch's first offset and the predecessor's acknowledged position (it
//!   waits for the acknowledgement). It writes the side effects from the
//!   marker on.
//!
//! So every record's side effects are written exactly once: below the
//! marker by the predecessor (before its acknowledgement it had not been
//! retired, after it writes below the marker, and it runs until it got
//! there), from the marker on by the active version. Both versions run in
//! the same processes (a controller runs every version the catalog wants),
//! so the wait for each other's record is short.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::log::{Log, LogError};
use crate::store::{PositionWrite, ProjectionStore, StoreError, WriteBatch};

/// The store table holding one [`CatalogEntry`] per processor (JSON).
pub const CATALOG_TABLE: &str = "waymark_projections";

/// The consumer id under which version `version` of `processor` stores its
/// positions, e.g. `journey.v2`.
pub fn consumer_id(processor: &str, version: u32) -> String {
    format!("{processor}.v{version}")
}

/// The consumer id of the hand-off markers of a version.
pub fn marker_id(processor: &str, version: u32) -> String {
    format!("{processor}.v{version}.handoff")
}

/// The consumer id under which a retired version acknowledges, per
/// partition, the position at which it learned it was retired.
pub fn ack_id(processor: &str, version: u32) -> String {
    format!("{processor}.v{version}.retired")
}

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    /// Being built from offset 0; not read by queries.
    Building,
    /// The version queries read (exactly one per processor).
    Live,
    /// Replaced by a newer version; kept until dropped.
    Retired,
}

impl VersionState {
    /// Lower-case name, as printed by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Building => "building",
            VersionState::Live => "live",
            VersionState::Retired => "retired",
        }
    }
}

/// One version of a processor's projections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Its state.
    pub state: VersionState,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When it became live, if it did.
    #[serde(default)]
    pub switched_at: Option<DateTime<Utc>>,
    /// When it was retired, if it was.
    #[serde(default)]
    pub retired_at: Option<DateTime<Utc>>,
    /// Switch to it automatically once it has caught up.
    #[serde(default)]
    pub switch_when_caught_up: bool,
    /// The state encoding its rows are written with ([`crate::row`]);
    /// `None` for a version registered before the catalog recorded it
    /// (whose rows carry no encoding either). Only a build of this encoding
    /// can run or read the version.
    #[serde(default)]
    pub encoding: Option<u32>,
    /// It went live before it had caught up, because the version it
    /// replaced was stored in an encoding the running build cannot read
    /// ([`CatalogEntry::replace_unreadable`]); queries answer `UNAVAILABLE`
    /// until the controller clears this once it has caught up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catching_up: bool,
}

/// What the topology and the build say about a processor: the projection
/// version to run and the state encoding of its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Configured {
    /// `projection_version` in `topology.yaml`.
    pub version: u32,
    /// The build's [`crate::plugin::ProcessorFactory::state_encoding`].
    pub encoding: u32,
}

impl Configured {
    /// Version `version`, rows of state encoding `encoding`.
    pub fn new(version: u32, encoding: u32) -> Self {
        Self { version, encoding }
    }
}

/// The catalog row of one processor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Processor name.
    pub processor: String,
    /// The version queries read.
    pub active: u32,
    /// The version `active` replaced; it writes side effects until it has
    /// handed off (see the module docs).
    #[serde(default)]
    pub previous: Option<u32>,
    /// The highest version ever registered (dropped ones included), so a
    /// version number is never reused.
    pub highest: u32,
    /// Every version that was not dropped.
    pub versions: BTreeMap<u32, VersionInfo>,
}

/// A catalog operation that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// The version does not exist (or was dropped).
    #[error("{processor} has no projection version {version}")]
    UnknownVersion {
        /// Processor.
        processor: String,
        /// Version asked for.
        version: u32,
    },
    /// The operation does not fit the version's state.
    #[error("{0}")]
    NotAllowed(String),
}

impl CatalogEntry {
    /// A catalog whose only version, the configured one, is live.
    pub fn initial(processor: &str, configured: Configured, now: DateTime<Utc>) -> Self {
        let version = configured.version;
        let mut versions = BTreeMap::new();
        versions.insert(
            version,
            VersionInfo {
                state: VersionState::Live,
                created_at: now,
                switched_at: Some(now),
                retired_at: None,
                switch_when_caught_up: false,
                encoding: Some(configured.encoding),
                catching_up: false,
            },
        );
        Self {
            processor: processor.to_owned(),
            active: version,
            previous: None,
            highest: version,
            versions,
        }
    }

    /// The state encoding `version`'s rows are written with, if recorded.
    pub fn encoding(&self, version: u32) -> Option<u32> {
        self.versions.get(&version).and_then(|i| i.encoding)
    }

    /// Whether a build writing state encoding `encoding` can run and read
    /// `version`.
    pub fn readable(&self, version: u32, encoding: u32) -> bool {
        self.encoding(version) == Some(encoding)
    }

    /// Whether the active version is live before having caught up (see
    /// [`VersionInfo::catching_up`]).
    pub fn active_catching_up(&self) -> bool {
        self.versions
            .get(&self.active)
            .is_some_and(|i| i.catching_up)
    }

    /// The versions that must run: the active one, every building one, and
    /// the previous one until it has handed off (`previous_handed_off`).
    pub fn running(&self, previous_handed_off: bool) -> Vec<u32> {
        self.versions
            .iter()
            .filter(|(v, info)| match info.state {
                VersionState::Live | VersionState::Building => true,
                VersionState::Retired => Some(**v) == self.previous && !previous_handed_off,
            })
            .map(|(v, _)| *v)
            .collect()
    }

    /// Registers version `to` (default: the highest version + 1) for a
    /// rebuild. Asking again for a version that is still building only
    /// updates `switch_when_caught_up`. Returns the version.
    pub fn start_rebuild(
        &mut self,
        to: Option<u32>,
        switch_when_caught_up: bool,
        encoding: u32,
        now: DateTime<Utc>,
    ) -> Result<u32, CatalogError> {
        let to = to.unwrap_or(self.highest.max(self.active) + 1);
        if let Some(info) = self.versions.get_mut(&to) {
            return match info.state {
                VersionState::Building => {
                    info.switch_when_caught_up |= switch_when_caught_up;
                    Ok(to)
                }
                state => Err(CatalogError::NotAllowed(format!(
                    "{} version {to} is {}; a rebuild needs a new version (next: {})",
                    self.processor,
                    state.as_str(),
                    self.highest + 1
                ))),
            };
        }
        if to <= self.highest {
            return Err(CatalogError::NotAllowed(format!(
                "{} version {to} was used before and dropped; version numbers are never \
                 reused (next: {})",
                self.processor,
                self.highest + 1
            )));
        }
        self.versions.insert(
            to,
            VersionInfo {
                state: VersionState::Building,
                created_at: now,
                switched_at: None,
                retired_at: None,
                switch_when_caught_up,
                encoding: Some(encoding),
                catching_up: false,
            },
        );
        self.highest = to;
        Ok(to)
    }

    /// Makes building version `to` live and retires the active one. The
    /// caller checks that `to` has caught up.
    pub fn switch(&mut self, to: u32, now: DateTime<Utc>) -> Result<(), CatalogError> {
        if to == self.active {
            return Ok(());
        }
        let state = self.state(to)?;
        if state != VersionState::Building {
            return Err(CatalogError::NotAllowed(format!(
                "{} version {to} is {}; only a building version that has caught up can \
                 become live",
                self.processor,
                state.as_str()
            )));
        }
        if let Some(old) = self.versions.get_mut(&self.active) {
            old.state = VersionState::Retired;
            old.retired_at = Some(now);
        }
        if let Some(new) = self.versions.get_mut(&to) {
            new.state = VersionState::Live;
            new.switched_at = Some(now);
            new.switch_when_caught_up = false;
        }
        self.previous = Some(self.active);
        self.active = to;
        Ok(())
    }

    /// Makes building version `to` live at once, before it has caught up,
    /// because the active version is stored in an encoding this build
    /// (`encoding`) cannot read, so it can neither run nor answer queries.
    /// `to` must be of `encoding`. The replaced version becomes the
    /// previous one as in [`CatalogEntry::switch`]; the controller
    /// acknowledges its retirement where it stands, since it cannot run.
    /// Queries answer `UNAVAILABLE` until `to` has caught up.
    pub fn replace_unreadable(
        &mut self,
        to: u32,
        encoding: u32,
        now: DateTime<Utc>,
    ) -> Result<(), CatalogError> {
        if self.readable(self.active, encoding) {
            return Err(CatalogError::NotAllowed(format!(
                "{} version {} is readable; switch when {to} has caught up",
                self.processor, self.active
            )));
        }
        if !self.readable(to, encoding) {
            return Err(CatalogError::NotAllowed(format!(
                "{} version {to} is not of state encoding {encoding}",
                self.processor
            )));
        }
        self.switch(to, now)?;
        if let Some(new) = self.versions.get_mut(&to) {
            new.catching_up = true;
        }
        Ok(())
    }

    /// Removes a building or retired version (its data is deleted by the
    /// caller). The live version cannot be dropped, nor the previous one
    /// before it has handed off.
    pub fn drop_version(
        &mut self,
        version: u32,
        previous_handed_off: bool,
    ) -> Result<(), CatalogError> {
        let state = self.state(version)?;
        if state == VersionState::Live {
            return Err(CatalogError::NotAllowed(format!(
                "{} version {version} is live; switch to another version before dropping it",
                self.processor
            )));
        }
        if Some(version) == self.previous && !previous_handed_off {
            return Err(CatalogError::NotAllowed(format!(
                "{} version {version} is still handing its side effects over to version {}; \
                 try again in a few seconds",
                self.processor, self.active
            )));
        }
        self.versions.remove(&version);
        if Some(version) == self.previous {
            self.previous = None;
        }
        Ok(())
    }

    /// The state of `version`.
    pub fn state(&self, version: u32) -> Result<VersionState, CatalogError> {
        self.versions
            .get(&version)
            .map(|i| i.state)
            .ok_or_else(|| CatalogError::UnknownVersion {
                processor: self.processor.clone(),
                version,
            })
    }
}

/// Reads the catalog row of `processor`.
pub async fn load(
    store: &dyn ProjectionStore,
    processor: &str,
) -> Result<Option<CatalogEntry>, StoreError> {
    Ok(load_stored(store, processor).await?.map(|(entry, _)| entry))
}

/// The catalog row of `processor` and its stored bytes (what a
/// compare-and-set expects).
async fn load_stored(
    store: &dyn ProjectionStore,
    processor: &str,
) -> Result<Option<(CatalogEntry, Vec<u8>)>, StoreError> {
    match store.get(CATALOG_TABLE, processor).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(|entry| Some((entry, bytes)))
            .map_err(|e| StoreError::Corrupt {
                table: CATALOG_TABLE.to_owned(),
                key: processor.to_owned(),
                reason: e.to_string(),
            }),
    }
}

/// Why [`update`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// The change does not fit the catalog as it is.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Reading or writing the row failed (or it kept changing under us).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many times [`update`] re-reads a row that changed under it.
const UPDATE_ATTEMPTS: usize = 16;

/// Applies `change` to the catalog row of `processor` with a
/// compare-and-set ([`ProjectionStore::compare_and_set`]): when another
/// process changed the row meanwhile, it is read again and `change` is
/// applied to the new row, so no change is ever lost or applied over a row
/// it did not see. A missing row is first created with version
/// `configured` live. Nothing is written when `change` leaves the row as it
/// was. Returns the row as stored and what `change` returned.
///
/// (`configured.version` is the version a missing row starts with.)
pub async fn update<T>(
    store: &dyn ProjectionStore,
    processor: &str,
    configured: Configured,
    mut change: impl FnMut(&mut CatalogEntry) -> Result<T, CatalogError>,
) -> Result<(CatalogEntry, T), UpdateError> {
    store.ensure_tables(&[CATALOG_TABLE.to_owned()]).await?;
    for _ in 0..UPDATE_ATTEMPTS {
        let stored = load_stored(store, processor).await?;
        let (mut entry, expected) = match stored {
            Some((entry, bytes)) => (entry, Some(bytes)),
            None => (
                CatalogEntry::initial(processor, configured, Utc::now()),
                None,
            ),
        };
        let before = entry.clone();
        let out = change(&mut entry)?;
        if expected.is_some() && entry == before {
            return Ok((entry, out));
        }
        let value = serde_json::to_vec(&entry).map_err(|e| StoreError::Corrupt {
            table: CATALOG_TABLE.to_owned(),
            key: processor.to_owned(),
            reason: e.to_string(),
        })?;
        if store
            .compare_and_set(CATALOG_TABLE, processor, expected.as_deref(), &value)
            .await?
        {
            return Ok((entry, out));
        }
    }
    Err(StoreError::Unavailable(format!(
        "the catalog row of {processor} changed under {UPDATE_ATTEMPTS} updates in a row"
    ))
    .into())
}

/// Reads the catalog row of `processor`, creating it when missing with
/// `configured` (the topology's `projection_version`) live. A configured
/// version above every version the catalog knows is registered as a
/// rebuild that switches once caught up (bumping the version in the
/// topology rebuilds without downtime).
pub async fn load_or_init(
    store: &dyn ProjectionStore,
    processor: &str,
    configured: Configured,
) -> Result<CatalogEntry, StoreError> {
    let now = Utc::now();
    let registered = update(store, processor, configured, |entry| {
        if configured.version > entry.highest {
            // A version above every known one can always be registered.
            let _ = entry.start_rebuild(Some(configured.version), true, configured.encoding, now);
        }
        Ok(())
    })
    .await;
    match registered {
        Ok((entry, ())) => Ok(entry),
        Err(UpdateError::Store(e)) => Err(e),
        Err(UpdateError::Catalog(e)) => Err(StoreError::Unavailable(e.to_string())),
    }
}

/// Where one version of a processor is on its input topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VersionProgress {
    /// Per partition: (next offset to apply, high-water mark).
    pub partitions: BTreeMap<u32, (u64, u64)>,
}

impl VersionProgress {
    /// Records still to apply.
    pub fn lag(&self) -> u64 {
        self.partitions
            .values()
            .map(|(pos, high)| high.saturating_sub(*pos))
            .sum()
    }

    /// Records applied (sum of positions).
    pub fn applied(&self) -> u64 {
        self.partitions.values().map(|(pos, _)| *pos).sum()
    }

    /// Whether this version is at least where `other` is on every partition.
    pub fn reached(&self, other: &VersionProgress) -> bool {
        other
            .partitions
            .iter()
            .all(|(p, (theirs, _))| self.partitions.get(p).map_or(0, |(ours, _)| *ours) >= *theirs)
    }
}

/// Why progress could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProgressError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The positions of `processor` version `version` on `topic` against the
/// topic's high-water marks.
pub async fn progress(
    store: &dyn ProjectionStore,
    log: &dyn Log,
    topic: &str,
    processor: &str,
    version: u32,
) -> Result<VersionProgress, ProgressError> {
    let positions = store
        .positions(&consumer_id(processor, version), topic)
        .await?;
    let mut out = VersionProgress::default();
    for p in 0..log.partitions(topic).await? {
        let (_, high) = log.watermarks(topic, p).await?;
        out.partitions
            .insert(p, (positions.get(&p).copied().unwrap_or(0), high));
    }
    Ok(out)
}

/// Whether the previous version of `entry` has handed its side effects
/// over to the active one: on every partition of `topic`, the active version
/// has recorded its hand-off marker and the previous one has reached it.
/// True when there is no previous version.
pub async fn handed_off(
    store: &dyn ProjectionStore,
    log: &dyn Log,
    topic: &str,
    entry: &CatalogEntry,
) -> Result<bool, ProgressError> {
    let Some(previous) = entry.previous else {
        return Ok(true);
    };
    let processor = &entry.processor;
    let markers = store
        .positions(&marker_id(processor, entry.active), topic)
        .await?;
    let reached = store
        .positions(&consumer_id(processor, previous), topic)
        .await?;
    for p in 0..log.partitions(topic).await? {
        match markers.get(&p) {
            Some(marker) if reached.get(&p).copied().unwrap_or(0) >= *marker => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Records the retirement acknowledgement of version `version` of
/// `processor`, which does not run (it is stored in a state encoding this
/// build cannot read), on each of `partitions` partitions of `topic` that
/// has none: the position it stands at, since a version that does not run
/// writes nothing. Its successor's hand-off markers then start there.
///
/// Only correct while no process runs that version, which holds when every
/// process runs the same build (see `docs/operations/replay.md`, "Changing
/// a state encoding").
pub async fn acknowledge_stopped(
    store: &dyn ProjectionStore,
    processor: &str,
    version: u32,
    topic: &str,
    partitions: u32,
) -> Result<(), StoreError> {
    let consumer = ack_id(processor, version);
    let acked = store.positions(&consumer, topic).await?;
    let stands = store
        .positions(&consumer_id(processor, version), topic)
        .await?;
    let positions: Vec<PositionWrite> = (0..partitions)
        .filter(|p| !acked.contains_key(p))
        .map(|p| PositionWrite {
            consumer: consumer.clone(),
            topic: topic.to_owned(),
            partition: p,
            next_offset: stands.get(&p).copied().unwrap_or(0),
        })
        .collect();
    if positions.is_empty() {
        return Ok(());
    }
    store
        .write(WriteBatch {
            rows: vec![],
            positions,
        })
        .await
}

/// Why a [`VersionGate`] cannot say yet which side effects are its
/// version's to write.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The other version of the hand-off has not recorded its part yet
    /// (the predecessor's acknowledgement, or the active version's marker).
    /// Normal control flow during a switch: the runner waits and asks
    /// again; nothing failed.
    #[error("{processor} version {version} waits for version {other} to record its {what} on partition {partition}")]
    Waiting {
        /// Processor.
        processor: String,
        /// The waiting version.
        version: u32,
        /// The version waited for.
        other: u32,
        /// What it waits for: "hand-off marker" or "retirement acknowledgement".
        what: &'static str,
        /// The partition.
        partition: u32,
    },
    /// Reading or writing the gate's records failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Decides from which offset a version writes its side effects (see the
/// module docs). One per running version.
pub struct VersionGate {
    processor: String,
    version: u32,
    topic: String,
    marked: Mutex<HashMap<u32, u64>>,
    acked: Mutex<std::collections::HashSet<u32>>,
}

/// Per partition, the offsets `[from, until)` whose side effects a version
/// writes.
pub type EmitRanges = HashMap<u32, std::ops::Range<u64>>;

impl VersionGate {
    /// The gate of `processor` version `version` reading `topic`.
    pub fn new(processor: impl Into<String>, version: u32, topic: impl Into<String>) -> Self {
        Self {
            processor: processor.into(),
            version,
            topic: topic.into(),
            marked: Mutex::new(HashMap::new()),
            acked: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The version this gate is for.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Which offsets of a batch starting at `first` (offset by partition)
    /// have their side effects written by this version. When the version
    /// is active this first records the hand-off markers of those
    /// partitions.
    pub async fn emit_ranges(
        &self,
        store: &dyn ProjectionStore,
        first: &BTreeMap<u32, u64>,
    ) -> Result<EmitRanges, GateError> {
        let all = |range: std::ops::Range<u64>| {
            first
                .keys()
                .map(|p| (*p, range.clone()))
                .collect::<EmitRanges>()
        };
        let Some(entry) = load(store, &self.processor).await? else {
            // No catalog (a bare runtime, as in unit tests): one version.
            return Ok(all(0..u64::MAX));
        };
        if entry.active == self.version {
            let Some(previous) = entry.previous else {
                return Ok(all(0..u64::MAX));
            };
            // From its markers on; the predecessor writes what lies below.
            let markers = self.mark(store, previous, first).await?;
            return Ok(first
                .keys()
                .map(|p| (*p, markers.get(p).copied().unwrap_or(0)..u64::MAX))
                .collect());
        }
        let retired_previous = entry.previous == Some(self.version)
            && entry.versions.get(&self.version).map(|i| i.state) == Some(VersionState::Retired);
        if !retired_previous {
            return Ok(all(u64::MAX..u64::MAX));
        }
        // The predecessor acknowledges its retirement where it stands,
        // then writes up to the active version's marker.
        self.ack(store, first).await?;
        let markers = store
            .positions(&marker_id(&self.processor, entry.active), &self.topic)
            .await?;
        first
            .keys()
            .map(|p| match markers.get(p) {
                Some(m) => Ok((*p, 0..*m)),
                None => Err(GateError::Waiting {
                    processor: self.processor.clone(),
                    version: self.version,
                    other: entry.active,
                    what: "hand-off marker",
                    partition: *p,
                }),
            })
            .collect()
    }

    /// Records, for the partitions of `first` that have none, the position
    /// at which this (retired) version learned it was retired: it has
    /// written no side effect at or above it, and writes none there until
    /// the active version's marker says which are its to write.
    async fn ack(
        &self,
        store: &dyn ProjectionStore,
        first: &BTreeMap<u32, u64>,
    ) -> Result<(), StoreError> {
        let missing: Vec<u32> = {
            let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
            first
                .keys()
                .filter(|p| !acked.contains(p))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let consumer = ack_id(&self.processor, self.version);
        let stored = store.positions(&consumer, &self.topic).await?;
        let new: Vec<(u32, u64)> = missing
            .iter()
            .filter(|p| !stored.contains_key(p))
            .filter_map(|p| Some((*p, *first.get(p)?)))
            .collect();
        self.record(store, &consumer, new).await?;
        self.acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(missing);
        Ok(())
    }

    /// Records acknowledgements and hand-off markers for the partitions
    /// this version holds while idle (`next`: next offset by partition), so
    /// versions hand off even without traffic.
    pub async fn mark_idle(
        &self,
        store: &dyn ProjectionStore,
        next: &BTreeMap<u32, u64>,
    ) -> Result<(), StoreError> {
        let Some(entry) = load(store, &self.processor).await? else {
            return Ok(());
        };
        if entry.active == self.version {
            if let Some(previous) = entry.previous {
                match self.mark(store, previous, next).await {
                    // The predecessor has not acknowledged yet: next tick.
                    Err(GateError::Waiting { .. }) | Ok(_) => {}
                    Err(GateError::Store(e)) => return Err(e),
                }
            }
        } else if entry.previous == Some(self.version) {
            self.ack(store, next).await?;
        }
        Ok(())
    }

    /// The hand-off markers of the partitions of `first`, recording the
    /// missing ones once the predecessor has acknowledged its retirement
    /// there: the batch's first offset, or the acknowledged position when
    /// that is further (the predecessor wrote the side effects below it).
    async fn mark(
        &self,
        store: &dyn ProjectionStore,
        previous: u32,
        first: &BTreeMap<u32, u64>,
    ) -> Result<BTreeMap<u32, u64>, GateError> {
        let mut out = BTreeMap::new();
        let missing: Vec<u32> = {
            let marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
            for p in first.keys() {
                if let Some(m) = marked.get(p) {
                    out.insert(*p, *m);
                }
            }
            first
                .keys()
                .filter(|p| !marked.contains_key(p))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            return Ok(out);
        }
        let consumer = marker_id(&self.processor, self.version);
        let stored = store.positions(&consumer, &self.topic).await?;
        let acks = store
            .positions(&ack_id(&self.processor, previous), &self.topic)
            .await?;
        let mut new = Vec::new();
        for p in &missing {
            let marker = match stored.get(p) {
                Some(m) => *m,
                None => {
                    let Some(ack) = acks.get(p) else {
                        return Err(GateError::Waiting {
                            processor: self.processor.clone(),
                            version: self.version,
                            other: previous,
                            what: "retirement acknowledgement",
                            partition: *p,
                        });
                    };
                    let m = first.get(p).copied().unwrap_or(0).max(*ack);
                    new.push((*p, m));
                    m
                }
            };
            out.insert(*p, marker);
        }
        self.record(store, &consumer, new).await?;
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        for p in missing {
            if let Some(m) = out.get(&p) {
                marked.insert(p, *m);
            }
        }
        Ok(out)
    }

    /// Durably records `(partition, offset)` pairs under `consumer` on the
    /// gate's topic (acknowledgements and markers).
    async fn record(
        &self,
        store: &dyn ProjectionStore,
        consumer: &str,
        pairs: Vec<(u32, u64)>,
    ) -> Result<(), StoreError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let positions = pairs
            .into_iter()
            .map(|(partition, next_offset)| PositionWrite {
                consumer: consumer.to_owned(),
                topic: self.topic.clone(),
                partition,
                next_offset,
            })
            .collect();
        store
            .write(WriteBatch {
                rows: Vec::new(),
                positions,
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use async_trait::async_trait;

    use super::*;
    use crate::memory::MemoryStore;

    /// Version 1, encoding 1.
    const C1: Configured = Configured {
        version: 1,
        encoding: 1,
    };

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    /// A store on which another process changes the catalog row right
    /// before our first compare-and-set.
    struct Interfering {
        inner: MemoryStore,
        interfered: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl ProjectionStore for Interfering {
        async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError> {
            self.inner.ensure_tables(tables).await
        }
        async fn get_many(
            &self,
            table: &str,
            keys: &[String],
        ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
            self.inner.get_many(table, keys).await
        }
        async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
            self.inner.write(batch).await
        }
        async fn compare_and_set(
            &self,
            table: &str,
            key: &str,
            expected: Option<&[u8]>,
            value: &[u8],
        ) -> Result<bool, StoreError> {
            if !self
                .interfered
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                update(&self.inner, key, C1, |e| {
                    e.start_rebuild(None, false, 1, now())
                })
                .await
                .unwrap();
            }
            self.inner
                .compare_and_set(table, key, expected, value)
                .await
        }
        async fn positions(
            &self,
            consumer: &str,
            topic: &str,
        ) -> Result<BTreeMap<u32, u64>, StoreError> {
            self.inner.positions(consumer, topic).await
        }
        async fn scan(
            &self,
            table: &str,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.scan(table, after, limit).await
        }
        async fn drop_tables(&self, tables: &[String]) -> Result<(), StoreError> {
            self.inner.drop_tables(tables).await
        }
        async fn delete_positions(&self, consumer: &str, topic: &str) -> Result<(), StoreError> {
            self.inner.delete_positions(consumer, topic).await
        }
    }

    #[tokio::test]
    async fn a_concurrent_catalog_change_is_never_lost() {
        let inner = MemoryStore::new();
        load_or_init(&inner, "journey", C1).await.unwrap();
        let store = Interfering {
            inner: inner.clone(),
            interfered: Default::default(),
        };
        // Our rebuild loses the race to another process's rebuild (v2),
        // is applied again over it and becomes v3; neither is lost.
        let (entry, ours) = update(&store, "journey", C1, |e| {
            e.start_rebuild(None, false, 1, now())
        })
        .await
        .unwrap();
        assert_eq!(ours, 3);
        assert_eq!(
            entry.versions.keys().copied().collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(load(&inner, "journey").await.unwrap(), Some(entry));
    }

    #[tokio::test]
    async fn an_update_that_changes_nothing_writes_nothing() {
        let store = MemoryStore::new();
        load_or_init(&store, "journey", C1).await.unwrap();
        let writes = store.writes();
        load_or_init(&store, "journey", C1).await.unwrap();
        update(&store, "journey", C1, |_| Ok(())).await.unwrap();
        assert_eq!(store.writes(), writes);
        // A refused change writes nothing either.
        let refused = update(&store, "journey", C1, |e| e.drop_version(1, true)).await;
        assert!(matches!(refused, Err(UpdateError::Catalog(_))));
        assert_eq!(store.writes(), writes);
    }

    const TOPIC: &str = "waymark.events";
    const P: u32 = 0;

    /// One version's runner as the hand-off sees it: its stored position
    /// and its gate, which a crash replaces by a fresh one (its memory of
    /// markers and acknowledgements lost; what it stored is kept).
    struct Version {
        number: u32,
        gate: VersionGate,
    }

    impl Version {
        fn new(number: u32) -> Self {
            Self {
                number,
                gate: VersionGate::new("journey", number, TOPIC),
            }
        }

        fn crash(&mut self) {
            self.gate = VersionGate::new("journey", self.number, TOPIC);
        }

        async fn position(&self, store: &MemoryStore) -> u64 {
            let stored = store
                .positions(&consumer_id("journey", self.number), TOPIC)
                .await
                .unwrap();
            stored.get(&P).copied().unwrap_or(0)
        }

        /// Handles the batch `[position, position + len)` as the runner
        /// does: asks the gate which offsets' side effects are its to
        /// write, writes them, then stores the position — unless it
        /// crashes in between (`crash_before_position`), so the batch is
        /// handled again later.
        async fn batch(
            &mut self,
            store: &MemoryStore,
            len: u64,
            end: u64,
            crash_before_position: bool,
            emitted: &mut BTreeMap<u64, BTreeSet<u32>>,
        ) {
            let from = self.position(store).await;
            let until = (from + len).min(end);
            if from >= until {
                return;
            }
            let ranges = match self.gate.emit_ranges(store, &[(P, from)].into()).await {
                Ok(ranges) => ranges,
                Err(GateError::Waiting { .. }) => return,
                Err(e) => panic!("{e}"),
            };
            if crash_before_position {
                // What it wrote is appended again when the batch is
                // retried, as after any crash (deduplicated downstream by
                // event id); only a committed batch's side effects count.
                self.crash();
                return;
            }
            for offset in from..until {
                if ranges.get(&P).is_some_and(|r| r.contains(&offset)) {
                    emitted.entry(offset).or_default().insert(self.number);
                }
            }
            store
                .write(WriteBatch {
                    rows: Vec::new(),
                    positions: vec![PositionWrite {
                        consumer: consumer_id("journey", self.number),
                        topic: TOPIC.into(),
                        partition: P,
                        next_offset: until,
                    }],
                })
                .await
                .unwrap();
        }

        async fn idle(&self, store: &MemoryStore) {
            let next = self.position(store).await;
            self.gate
                .mark_idle(store, &[(P, next)].into())
                .await
                .unwrap();
        }
    }

    /// A tiny deterministic generator (no dependency, same runs every time).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    /// Runs versions 1 (live, then retired) and 2 (building, then live)
    /// over one partition with crashes, idle ticks and batches of random
    /// sizes in a random order, switching at a random point, and checks
    /// that every offset's side effects were written, by the batch that
    /// committed it, by exactly one version. (A batch that crashed before
    /// committing wrote them too; they are appended again by its retry,
    /// whichever version that is, and deduplicated downstream by event id,
    /// exactly as for one version.)
    #[tokio::test]
    async fn every_offset_is_emitted_by_exactly_one_version_whatever_crashes() {
        const END: u64 = 40;
        for seed in 0..300 {
            let mut rng = Lcg(seed);
            let store = MemoryStore::new();
            load_or_init(&store, "journey", C1).await.unwrap();
            update(&store, "journey", C1, |e| {
                e.start_rebuild(Some(2), false, 1, now())
            })
            .await
            .unwrap();
            let (mut v1, mut v2) = (Version::new(1), Version::new(2));
            let mut emitted: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
            let mut switched = false;
            for _step in 0..2_000 {
                let done = v1.position(&store).await >= END && v2.position(&store).await >= END;
                if done && switched {
                    break;
                }
                let len = 1 + rng.next(7);
                let crash = rng.next(5) == 0;
                match rng.next(7) {
                    0 | 1 => v1.batch(&store, len, END, crash, &mut emitted).await,
                    2 | 3 => v2.batch(&store, len, END, crash, &mut emitted).await,
                    4 => v1.idle(&store).await,
                    5 => v2.idle(&store).await,
                    _ if !switched && v2.position(&store).await >= v1.position(&store).await => {
                        update(&store, "journey", C1, |e| e.switch(2, now()))
                            .await
                            .unwrap();
                        switched = true;
                    }
                    _ => {}
                }
            }
            assert!(switched, "seed {seed}: never switched");
            for offset in 0..END {
                let by = emitted.get(&offset).cloned().unwrap_or_default();
                assert_eq!(
                    by.len(),
                    1,
                    "seed {seed}: offset {offset} emitted by versions {by:?}"
                );
            }
        }
    }

    #[test]
    fn rebuild_switch_and_drop() {
        let mut c = CatalogEntry::initial("journey", C1, now());
        assert_eq!(c.running(false), vec![1]);
        assert_eq!(c.start_rebuild(None, false, 1, now()).unwrap(), 2);
        // asking again is idempotent and can add the switch
        assert_eq!(c.start_rebuild(Some(2), true, 1, now()).unwrap(), 2);
        assert!(c.versions[&2].switch_when_caught_up);
        assert_eq!(c.running(false), vec![1, 2]);
        assert!(c.drop_version(1, true).is_err(), "live cannot be dropped");
        c.switch(2, now()).unwrap();
        assert_eq!((c.active, c.previous), (2, Some(1)));
        assert_eq!(c.state(1).unwrap(), VersionState::Retired);
        assert_eq!(c.running(false), vec![1, 2]);
        assert_eq!(c.running(true), vec![2]);
        assert!(c.drop_version(1, false).is_err(), "not handed off yet");
        c.drop_version(1, true).unwrap();
        assert_eq!(c.previous, None);
        assert!(
            c.start_rebuild(Some(1), false, 1, now()).is_err(),
            "never reused"
        );
        assert!(
            c.start_rebuild(Some(2), false, 1, now()).is_err(),
            "2 is live"
        );
        assert_eq!(c.start_rebuild(None, false, 1, now()).unwrap(), 3);
        assert!(c.switch(1, now()).is_err());
        c.drop_version(3, true).unwrap();
        assert_eq!(c.start_rebuild(None, false, 1, now()).unwrap(), 4);
    }

    #[test]
    fn versions_record_their_state_encoding() {
        let mut c = CatalogEntry::initial("journey", C1, now());
        assert_eq!(c.encoding(1), Some(1));
        assert!(c.readable(1, 1) && !c.readable(1, 2));
        c.start_rebuild(None, true, 2, now()).unwrap();
        assert_eq!(c.encoding(2), Some(2));
        // A catalog row written before encodings were recorded.
        let mut old: serde_json::Value = serde_json::to_value(&c).unwrap();
        old["versions"]["1"]
            .as_object_mut()
            .unwrap()
            .remove("encoding");
        let old: CatalogEntry = serde_json::from_value(old).unwrap();
        assert_eq!(old.encoding(1), None);
        assert!(!old.readable(1, 1));
    }

    #[test]
    fn an_unreadable_active_version_is_replaced_at_once_and_catches_up() {
        let mut c = CatalogEntry::initial("journey", C1, now());
        c.start_rebuild(Some(2), true, 2, now()).unwrap();
        assert!(
            c.replace_unreadable(2, 1, now()).is_err(),
            "version 1 is readable by a build of encoding 1"
        );
        c.start_rebuild(Some(3), true, 1, now()).unwrap();
        assert!(
            c.replace_unreadable(3, 2, now()).is_err(),
            "version 3 is not of encoding 2"
        );
        c.replace_unreadable(2, 2, now()).unwrap();
        assert_eq!((c.active, c.previous), (2, Some(1)));
        assert!(c.active_catching_up());
        assert_eq!(c.state(1).unwrap(), VersionState::Retired);
        let json = serde_json::to_string(&c).unwrap();
        let back: CatalogEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }

    #[tokio::test]
    async fn a_stopped_version_acknowledges_where_it_stands() {
        let store = MemoryStore::new();
        let stands_at = |next_offset: u64| {
            store.write(WriteBatch {
                rows: vec![],
                positions: vec![PositionWrite {
                    consumer: consumer_id("journey", 1),
                    topic: "t".into(),
                    partition: 0,
                    next_offset,
                }],
            })
        };
        stands_at(7).await.unwrap();
        acknowledge_stopped(&store, "journey", 1, "t", 2)
            .await
            .unwrap();
        let acks = store.positions(&ack_id("journey", 1), "t").await.unwrap();
        assert_eq!(acks, [(0, 7), (1, 0)].into());
        // An acknowledgement, once recorded, never moves.
        stands_at(9).await.unwrap();
        acknowledge_stopped(&store, "journey", 1, "t", 2)
            .await
            .unwrap();
        let acks = store.positions(&ack_id("journey", 1), "t").await.unwrap();
        assert_eq!(acks, [(0, 7), (1, 0)].into());
    }

    #[test]
    fn reached_compares_every_partition() {
        let a = VersionProgress {
            partitions: [(0, (5, 9)), (1, (3, 3))].into(),
        };
        let b = VersionProgress {
            partitions: [(0, (5, 9)), (1, (2, 3))].into(),
        };
        assert!(a.reached(&b));
        assert!(!b.reached(&a));
        assert_eq!(a.lag(), 4);
    }
}
