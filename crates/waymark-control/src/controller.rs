//! The [`Controller`] that runs the projection versions the catalog asks
//! for, and the tracker that points queries at the active versions.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use waymark_runtime::catalog::{
    self, consumer_id, CatalogEntry, Configured, VersionGate, VersionState,
};
use waymark_runtime::decode::{SharedDecoder, DEFAULT_DECODER_BYTES};
use waymark_runtime::plugin::Registry;
use waymark_runtime::{Log, ProjectionStore, RunError, Runner, RunnerConfig, StoreError};
use waymark_schemas::Validator;
use waymark_server::{ActiveVersion, ActiveVersions, Projections};
use waymark_topology::Topology;

/// How often controllers and trackers re-read the catalog.
pub const CATALOG_POLL: Duration = Duration::from_secs(1);

/// Gauge: 1 for the state a projection version is in, 0 for the others
/// (and for every state once it is dropped), by `processor`, `version` and
/// `state` (`building`, `live`, `retired`). Set by every controller on each
/// catalog poll, so alerts can tell the versions queries read from those
/// being rebuilt (which start at offset 0, behind by design).
pub const PROJECTION_STATE: &str = "waymark_projection_state";

/// Registers the controller's metric descriptions.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        PROJECTION_STATE,
        metrics::Unit::Count,
        "1 for the state (building, live, retired) a projection version is in"
    );
}

const STATES: [(VersionState, &str); 3] = [
    (VersionState::Building, "building"),
    (VersionState::Live, "live"),
    (VersionState::Retired, "retired"),
];

/// Reports the state of every version of `entry`, and no state for the
/// versions dropped since the last report (`reported`: the versions last
/// reported per processor).
fn report_states(reported: &mut HashMap<String, BTreeSet<u32>>, name: &str, entry: &CatalogEntry) {
    let now: BTreeSet<u32> = entry.versions.keys().copied().collect();
    let before = reported.insert(name.to_owned(), now).unwrap_or_default();
    for (version, info) in &entry.versions {
        report_state(name, *version, Some(info.state));
    }
    for dropped in before.iter().filter(|v| !entry.versions.contains_key(v)) {
        report_state(name, *dropped, None);
    }
}

/// Sets [`PROJECTION_STATE`] for `version` of `processor`: `state`, or
/// none when dropped.
fn report_state(processor: &str, version: u32, state: Option<VersionState>) {
    for (s, label) in STATES {
        let value = if Some(s) == state { 1.0 } else { 0.0 };
        metrics::gauge!(
            PROJECTION_STATE,
            "processor" => processor.to_owned(),
            "version" => version.to_string(),
            "state" => label
        )
        .set(value);
    }
}

/// The version `topology.yaml` configures for `name` (the version a fresh
/// catalog starts with).
pub(crate) fn configured_version(topology: &Topology, name: &str) -> u32 {
    topology.processor(name).map_or(1, |p| p.projection_version)
}

/// The version `topology.yaml` configures for `name` and the state
/// encoding of this build's `name`.
pub(crate) fn configured(registry: &Registry, topology: &Topology, name: &str) -> Configured {
    Configured::new(
        configured_version(topology, name),
        registry.encoding(name).unwrap_or_default(),
    )
}

/// What an operator is told about version `version` of `entry`'s
/// processor when this build (of state encoding `encoding`) cannot read
/// it: what it is stored in, and which `projection_version` to configure.
pub fn unreadable_message(entry: &CatalogEntry, version: u32, encoding: u32) -> String {
    let name = &entry.processor;
    let stored = entry.encoding(version).map_or_else(
        || "no recorded state encoding (it was stored by an older Waymark)".to_owned(),
        |e| format!("state encoding {e}"),
    );
    format!(
        "{name} projection version {version} is stored in {stored}, and this build of \
         waymark reads and writes state encoding {encoding} for {name}, so it can neither run \
         nor read that version. Raise processors.{name}.projection_version in topology.yaml \
         to {next}: that version is rebuilt from the log in the new encoding (queries of \
         {name} answer UNAVAILABLE until it has caught up), and version {version} can be \
         dropped afterwards",
        next = entry.highest + 1
    )
}

/// The versions `topology` configures, as queries read them before the
/// catalog was read.
pub fn configured_versions(registry: &Registry, topology: &Topology) -> ActiveVersions {
    ActiveVersions::new(
        registry
            .configured(topology)
            .into_iter()
            .map(|n| {
                let c = configured(registry, topology, n);
                let active = ActiveVersion {
                    version: c.version,
                    encoding: c.encoding,
                    catching_up: false,
                };
                (n.to_owned(), active)
            })
            .collect(),
    )
}

/// Reads (creating when missing) the catalog of every configured processor.
async fn catalog_of(
    store: &dyn ProjectionStore,
    registry: &Registry,
    topology: &Topology,
) -> Result<BTreeMap<String, CatalogEntry>, StoreError> {
    let mut out = BTreeMap::new();
    for name in registry.configured(topology) {
        let entry =
            catalog::load_or_init(store, name, configured(registry, topology, name)).await?;
        out.insert(name.to_owned(), entry);
    }
    Ok(out)
}

/// Points `projections` at the active versions now.
pub async fn refresh(
    projections: &Projections,
    registry: &Registry,
    topology: &Topology,
) -> Result<(), StoreError> {
    let catalog = catalog_of(projections.store().as_ref(), registry, topology).await?;
    projections.set_active(ActiveVersions::new(
        catalog
            .into_iter()
            .map(|(n, e)| {
                let active = ActiveVersion {
                    version: e.active,
                    encoding: registry.encoding(&n).unwrap_or_default(),
                    catching_up: e.active_catching_up(),
                };
                (n, active)
            })
            .collect(),
    ));
    Ok(())
}

/// Keeps `projections` pointed at the active versions until `shutdown`.
pub async fn track_active(
    projections: Projections,
    registry: Registry,
    topology: Topology,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(e) = refresh(&projections, &registry, &topology).await {
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
    registry: Registry,
    log: Arc<dyn Log>,
    store: Arc<dyn ProjectionStore>,
    topology: Topology,
    validator: Arc<Validator>,
    names: Vec<String>,
    group_prefix: String,
    runners: HashMap<(String, u32), RunnerTask>,
    /// One per process: every runner decodes each record of its input once
    /// for all ([`waymark_runtime::decode`]).
    decoder: Arc<SharedDecoder>,
    /// Versions not run because this build cannot read them (warned once).
    skipped: HashSet<(String, u32)>,
    /// The versions of each processor last reported in
    /// [`PROJECTION_STATE`].
    reported: HashMap<String, BTreeSet<u32>>,
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
    /// A controller of processors `names` of `registry`.
    pub fn new(
        registry: Registry,
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
                registry,
                log,
                store,
                topology,
                validator,
                names,
                group_prefix: group_prefix.into(),
                runners: HashMap::new(),
                decoder: Arc::new(SharedDecoder::new(DEFAULT_DECODER_BYTES)),
                skipped: HashSet::new(),
                reported: HashMap::new(),
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
    ///
    /// Versions stored in another state encoding than this build's
    /// ([`waymark_runtime::row`]) never run here. When the live one is such
    /// a version, the configured version replaces it at once if it is a
    /// building version of this build's encoding
    /// ([`CatalogEntry::replace_unreadable`]; queries answer `UNAVAILABLE`
    /// until it has caught up); otherwise this fails with
    /// [`unreadable_message`], which says which `projection_version` to
    /// configure.
    pub async fn reconcile(&mut self, name: &str) -> anyhow::Result<()> {
        let store = self.store.as_ref();
        let topic = self.registry.input_topic(name, &self.topology)?;
        let configured = configured(&self.registry, &self.topology, name);
        let encoding = configured.encoding;
        let mut entry = catalog::load_or_init(store, name, configured).await?;
        if !entry.readable(entry.active, encoding) {
            entry = self
                .replace_unreadable(name, &topic, entry, configured)
                .await?;
        }
        if entry.active_catching_up() {
            entry = self
                .finish_catching_up(name, &topic, entry, configured)
                .await?;
        }
        let building: Vec<u32> = entry
            .versions
            .iter()
            .filter(|(v, i)| {
                i.state == VersionState::Building
                    && i.switch_when_caught_up
                    && entry.readable(**v, encoding)
            })
            .map(|(v, _)| *v)
            .collect();
        for version in building {
            let candidate =
                catalog::progress(store, self.log.as_ref(), &topic, name, version).await?;
            let active =
                catalog::progress(store, self.log.as_ref(), &topic, name, entry.active).await?;
            if candidate.reached(&active) {
                // Only over the row the progress was measured against.
                let from = entry.active;
                let (updated, switched) = catalog::update(store, name, configured, |e| {
                    if e.active != from || e.state(version)? != VersionState::Building {
                        return Ok(false);
                    }
                    e.switch(version, Utc::now())?;
                    Ok(true)
                })
                .await?;
                entry = updated;
                if switched {
                    info!(processor = %name, from, to = version, "switched projection version (caught up)");
                }
            }
        }
        report_states(&mut self.reported, name, &entry);
        let mut handed_off = catalog::handed_off(store, self.log.as_ref(), &topic, &entry).await?;
        if let Some(previous) = entry.previous.filter(|p| !entry.readable(*p, encoding)) {
            // It cannot run here: it stands where it stopped, and has
            // acknowledged that (see `replace_unreadable`).
            let partitions = self.log.partitions(&topic).await?;
            catalog::acknowledge_stopped(store, name, previous, &topic, partitions).await?;
            handed_off = true;
        }
        let wanted: BTreeSet<u32> = entry
            .running(handed_off)
            .into_iter()
            .filter(|v| {
                let readable = entry.readable(*v, encoding);
                if !readable && self.skipped.insert((name.to_owned(), *v)) {
                    warn!(processor = %name, version = *v, "{}", unreadable_message(&entry, *v, encoding));
                }
                readable
            })
            .collect();
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
            let handler = self
                .registry
                .handler(name, version, &self.topology, &self.validator)?;
            store
                .ensure_tables(&self.registry.tables(name, version))
                .await?;
            let config = RunnerConfig::new(
                consumer_id(name, version),
                topic.clone(),
                self.topology.topics.dlq.name.clone(),
            )
            .with_version(version)
            .with_group_prefix(&self.group_prefix);
            let runner = Runner::new(self.log.clone(), self.store.clone(), handler, config)
                .with_gate(Arc::new(VersionGate::new(name, version, topic.clone())))
                .with_decoder(self.decoder.clone());
            let token = CancellationToken::new();
            let task = tokio::spawn(runner.run(token.clone()));
            info!(processor = %name, version, "projection version running");
            self.runners.insert(key, (token, task));
        }
        Ok(())
    }

    /// Replaces the live version of `name`, which this build cannot read,
    /// by the configured version (see [`Controller::reconcile`]).
    async fn replace_unreadable(
        &self,
        name: &str,
        topic: &str,
        entry: CatalogEntry,
        configured: Configured,
    ) -> anyhow::Result<CatalogEntry> {
        let store = self.store.as_ref();
        let (from, to, encoding) = (entry.active, configured.version, configured.encoding);
        let heir =
            entry.state(to).ok() == Some(VersionState::Building) && entry.readable(to, encoding);
        if !heir {
            return Err(anyhow!(unreadable_message(&entry, from, encoding)));
        }
        // It does not run anywhere (every process runs this build): it
        // acknowledges its retirement where it stands, so the new version
        // writes the side effects of everything after that.
        let partitions = self.log.partitions(topic).await?;
        catalog::acknowledge_stopped(store, name, from, topic, partitions).await?;
        let (entry, replaced) = catalog::update(store, name, configured, |e| {
            if e.active != from || e.readable(from, encoding) {
                return Ok(false);
            }
            e.replace_unreadable(to, encoding, Utc::now())?;
            Ok(true)
        })
        .await?;
        if replaced {
            warn!(
                processor = %name, from, to,
                "projection version {from} is stored in a state encoding this build cannot read; \
                 version {to} replaces it and is rebuilt from the log (queries answer UNAVAILABLE \
                 until it has caught up)"
            );
        }
        Ok(entry)
    }

    /// Clears [`waymark_runtime::catalog::VersionInfo::catching_up`] of the
    /// active version of `name` once it has reached where the version it
    /// replaced stopped.
    async fn finish_catching_up(
        &self,
        name: &str,
        topic: &str,
        entry: CatalogEntry,
        configured: Configured,
    ) -> anyhow::Result<CatalogEntry> {
        let store = self.store.as_ref();
        let log = self.log.as_ref();
        let active = entry.active;
        let caught_up = match entry.previous {
            Some(previous) => {
                let ours = catalog::progress(store, log, topic, name, active).await?;
                let theirs = catalog::progress(store, log, topic, name, previous).await?;
                ours.reached(&theirs)
            }
            None => true,
        };
        if !caught_up {
            return Ok(entry);
        }
        let (entry, cleared) = catalog::update(store, name, configured, |e| {
            let Some(info) = e.versions.get_mut(&active) else {
                return Ok(false);
            };
            let was = std::mem::take(&mut info.catching_up);
            Ok(was)
        })
        .await?;
        if cleared {
            info!(processor = %name, version = active, "projection version caught up; queries read it");
        }
        Ok(entry)
    }
}

/// Per partition of `topic`, the smallest next offset of every version
/// that still reads it (the active one, building ones, and the previous one
/// until it is dropped) of every configured processor whose input it is:
/// what retention must keep. A partition no such version has a position on
/// is at 0. Empty when no processor reads `topic`.
pub async fn unapplied_floor(
    store: &dyn ProjectionStore,
    log: &dyn Log,
    registry: &Registry,
    topology: &Topology,
    topic: &str,
) -> anyhow::Result<BTreeMap<u32, u64>> {
    let mut floor: BTreeMap<u32, u64> = BTreeMap::new();
    let mut read = false;
    for name in registry.configured(topology) {
        if registry.input_topic(name, topology)? != topic {
            continue;
        }
        let entry = match catalog::load(store, name).await {
            Ok(entry) => entry,
            Err(StoreError::UnknownTable(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let Some(entry) = entry else {
            // Not started yet: it will read from offset 0.
            read = true;
            continue;
        };
        for version in entry.running(false) {
            read = true;
            let positions = store.positions(&consumer_id(name, version), topic).await?;
            for p in 0..log.partitions(topic).await? {
                let next = positions.get(&p).copied().unwrap_or(0);
                let e = floor.entry(p).or_insert(next);
                *e = (*e).min(next);
            }
        }
    }
    if read {
        for p in 0..log.partitions(topic).await? {
            floor.entry(p).or_insert(0);
        }
    }
    Ok(floor)
}
