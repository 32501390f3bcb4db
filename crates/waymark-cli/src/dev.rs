//! `waymark dev`: the whole platform in one process on the embedded log and
//! store, plus the Kafka-protocol front door.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use waymark_embedded::{EmbeddedLog, EmbeddedStore};
use waymark_kafka::FrontDoor;
use waymark_runtime::{Log, ProjectionStore, Runner, RunnerConfig, TopicConfig};
use waymark_schemas::Validator;
use waymark_server::{
    AdminService, IngestService, KafkaEndpointStatus, ProjectionTables, Projections, QueryService,
    Services,
};
use waymark_topology::Topology;

use crate::registry::{self, PROCESSORS};

/// How long shutdown may take to drain, flush and commit.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `waymark dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Where the log, the store and `dev.json` live.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Prometheus listen address; if busy, an ephemeral port is used.
    pub metrics_addr: SocketAddr,
    /// The topology.
    pub topology: Topology,
    /// Whether to start the Kafka-protocol front door.
    pub kafka_endpoint: bool,
}

/// The addresses `waymark dev` writes to `DIR/dev.json` once ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DevInfo {
    /// Kafka bootstrap of the front door (empty when disabled).
    pub kafka_bootstrap: String,
    /// gRPC address.
    pub grpc_addr: String,
    /// Prometheus metrics address.
    pub metrics_addr: String,
}

/// A running `waymark dev`.
pub struct Dev {
    /// Where it listens.
    pub info: DevInfo,
    /// The embedded log (for tests and tools).
    pub log: EmbeddedLog,
    /// The embedded store.
    pub store: EmbeddedStore,
    shutdown: CancellationToken,
    tasks: JoinSet<(String, anyhow::Result<()>)>,
    front_door: Option<FrontDoor>,
}

/// Table names of the projections each processor version writes.
pub fn projection_tables(topology: &Topology) -> ProjectionTables {
    let version = |name: &str| topology.processor(name).map_or(1, |p| p.projection_version);
    ProjectionTables {
        identity: waymark_runtime::identity::IdentityTables::for_version(version("identity")),
        person: registry::projection_table("person", version("person")),
        interactions: registry::projection_table("interactions", version("interactions")),
        journey: registry::projection_table("journey", version("journey")),
        learning: registry::projection_table("learning", version("learning")),
    }
}

/// The topics of `topology`, as the log creates them.
pub fn topic_configs(topology: &Topology) -> Vec<TopicConfig> {
    topology
        .topics
        .iter()
        .map(|(_, t)| TopicConfig {
            name: t.name.clone(),
            partitions: t.partitions,
            retention: t.retention.as_duration(),
            compaction: t.compaction,
        })
        .collect()
}

async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) => {
            warn!(%addr, error = %e, "metrics address busy, using an ephemeral port");
            Ok(TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?)
        }
    }
}

impl Dev {
    /// Opens the data directory and starts everything; returns once ready
    /// (listening, `dev.json` written).
    pub async fn start(options: DevOptions) -> anyhow::Result<Self> {
        let dir = &options.data_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let log = EmbeddedLog::open(&dir.join("log.redb"))
            .map_err(|e| anyhow!("cannot open the embedded log in {}: {e}", dir.display()))?;
        let store = EmbeddedStore::open(&dir.join("store.redb"))
            .map_err(|e| anyhow!("cannot open the embedded store in {}: {e}", dir.display()))?;
        // One inputs partition in dev: the identity processor then resolves
        // events in exactly the order they were published, across keys
        // (see docs/decisions/0002-dev-inputs-partition.md).
        let mut topology = options.topology.clone();
        topology.topics.inputs.partitions = 1;
        let topology = &topology;
        log.ensure_topics(&topic_configs(topology)).await?;
        let validator = Arc::new(Validator::new()?);
        let shared_log: Arc<dyn Log> = Arc::new(log.clone());
        let shared_store: Arc<dyn ProjectionStore> = Arc::new(store.clone());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();

        for name in PROCESSORS {
            let Some(spec) = topology.processor(name) else {
                continue;
            };
            let handler = registry::handler(name, topology, &validator)?;
            shared_store.ensure_tables(&handler.tables()).await?;
            let input = spec
                .inputs
                .first()
                .ok_or_else(|| anyhow!("processor {name} has no input topic"))?;
            let config = RunnerConfig::new(
                format!("{name}.v{}", spec.projection_version),
                input.clone(),
                topology.topics.dlq.name.clone(),
            );
            let runner = Runner::new(shared_log.clone(), shared_store.clone(), handler, config);
            let token = shutdown.clone();
            let task = format!("processor {name}");
            tasks
                .spawn(async move { (task, runner.run(token).await.map_err(anyhow::Error::from)) });
        }
        // Query tables must exist even before the first write.
        let tables = projection_tables(topology);
        shared_store
            .ensure_tables(&[
                tables.identity.links.clone(),
                tables.identity.persons.clone(),
                tables.person.clone(),
                tables.interactions.clone(),
                tables.journey.clone(),
                tables.learning.clone(),
            ])
            .await?;

        let grpc = TcpListener::bind(options.grpc_addr)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", options.grpc_addr))?;
        let grpc_addr = grpc.local_addr()?;
        let front_door = if options.kafka_endpoint {
            let inputs = &topology.topics.inputs;
            Some(
                FrontDoor::start(shared_log.clone(), &inputs.name, inputs.partitions)
                    .context("cannot start the kafka front door")?,
            )
        } else {
            None
        };
        let mut admin = AdminService::new(shared_log.clone(), topology.topics.dlq.name.clone());
        if let Some(door) = &front_door {
            let status = door.status();
            let bootstrap = door.bootstrap().to_owned();
            admin = admin.with_kafka_endpoint(Arc::new(move || {
                let s = status.lock().map(|s| s.clone()).unwrap_or_default();
                KafkaEndpointStatus {
                    bootstrap: bootstrap.clone(),
                    bridged: s.bridged,
                    lost: s.lost,
                    last_loss: s.last_loss,
                }
            }));
        }
        let services = Services {
            query: QueryService::new(Projections::new(shared_store.clone(), tables)),
            ingest: IngestService::new(
                shared_log.clone(),
                validator.clone(),
                topology.topics.inputs.name.clone(),
            ),
            admin,
        };
        let token = shutdown.clone();
        tasks.spawn(async move {
            let result = waymark_server::serve(grpc, services, token).await;
            (
                "grpc server".to_owned(),
                result.map_err(anyhow::Error::from),
            )
        });

        crate::metrics_http::recorder();
        let metrics = bind_metrics(options.metrics_addr).await?;
        let metrics_addr = metrics.local_addr()?;
        let token = shutdown.clone();
        tasks.spawn(async move {
            crate::metrics_http::serve(metrics, token).await;
            ("metrics".to_owned(), Ok(()))
        });

        let info = DevInfo {
            kafka_bootstrap: front_door
                .as_ref()
                .map(|f| f.bootstrap().to_owned())
                .unwrap_or_default(),
            grpc_addr: grpc_addr.to_string(),
            metrics_addr: metrics_addr.to_string(),
        };
        write_dev_json(dir, &info)?;
        info!(grpc = %info.grpc_addr, kafka = %info.kafka_bootstrap, metrics = %info.metrics_addr, "waymark dev ready");
        Ok(Self {
            info,
            log,
            store,
            shutdown,
            tasks,
            front_door,
        })
    }

    /// Runs until `stop` completes or a task fails, then shuts down.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(stop);
        let failure = tokio::select! {
            _ = &mut stop => None,
            Some(done) = self.tasks.join_next() => Some(match done {
                Ok((task, Ok(()))) => anyhow!("{task} stopped unexpectedly"),
                Ok((task, Err(e))) => anyhow!("{task} failed: {e:#}"),
                Err(e) => anyhow!("a task panicked: {e}"),
            }),
        };
        if let Some(e) = &failure {
            error!("{e:#}; shutting down");
        }
        self.stop().await?;
        failure.map_or(Ok(()), Err)
    }

    /// Stops polling, drains, flushes, commits and closes, within
    /// [`DRAIN_TIMEOUT`].
    pub async fn stop(mut self) -> anyhow::Result<()> {
        info!("shutting down");
        if let Some(door) = self.front_door.take() {
            // Stop the door first so what it took is bridged before the
            // processors stop.
            tokio::task::spawn_blocking(move || door.stop()).await?;
        }
        self.shutdown.cancel();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(done) = self.tasks.join_next().await {
                if let Ok((task, Err(e))) = done {
                    warn!(%task, error = %e, "task ended with an error during shutdown");
                }
            }
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
            return Err(anyhow!("shutdown did not finish within {DRAIN_TIMEOUT:?}"));
        }
        info!("stopped");
        Ok(())
    }
}

fn write_dev_json(dir: &Path, info: &DevInfo) -> anyhow::Result<()> {
    let path = dir.join("dev.json");
    let tmp = dir.join("dev.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
