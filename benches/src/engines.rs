//! Where a run's scenarios execute. [`Engines`] is the embedded default (a
//! data directory per scenario) or real Apache Kafka + Cassandra (`--real`,
//! as `scripts/dev-services` runs them); [`Target`] is one scenario's empty
//! deployment on them, with its own topics, consumer groups and store
//! (keyspace); [`Platform`] is the product running on a target, assembled
//! exactly as `waymark dev` (embedded) or `waymark run` + `waymark serve`
//! (real engines) assemble it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use waymark_cli::dev::{Dev, DevOptions};
use waymark_cli::platform::{self, Tasks};
use waymark_cli::registry::registry;
use waymark_cql::{CqlConfig, CqlStore};
use waymark_embedded::{EmbeddedLog, EmbeddedStore};
use waymark_kafka::{KafkaConfig, KafkaLog};
use waymark_runtime::{Log, ProjectionStore, TopicConfig};
use waymark_schemas::Validator;
use waymark_topology::Topology;

use crate::common;
use crate::raw::{RawKafka, RawLog};

/// The engine name reported for the embedded default.
pub(crate) const EMBEDDED: &str = "embedded";
/// The engine name reported for real Kafka + Cassandra.
pub(crate) const REAL: &str = "kafka+cassandra";

/// What a set of scenarios runs on.
#[derive(Debug, Clone)]
pub(crate) enum Engines {
    /// The embedded log and store, under `work`.
    Embedded { work: PathBuf },
    /// Apache Kafka at `bootstrap` and Cassandra (or ScyllaDB) at `cql`.
    Real { bootstrap: String, cql: String },
}

impl Engines {
    /// Real engines from `WAYMARK_KAFKA_BOOTSTRAP` / `WAYMARK_CQL_NODES`,
    /// or the loopback addresses `scripts/dev-services` uses.
    pub(crate) fn real_from_env() -> Self {
        Engines::Real {
            bootstrap: std::env::var("WAYMARK_KAFKA_BOOTSTRAP")
                .unwrap_or_else(|_| "127.0.0.1:9092".into()),
            cql: std::env::var("WAYMARK_CQL_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into()),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Engines::Embedded { .. } => EMBEDDED,
            Engines::Real { .. } => REAL,
        }
    }

    /// A fresh, empty deployment for scenario `tag`: its topics created,
    /// its store empty.
    pub(crate) async fn target(&self, tag: &str) -> anyhow::Result<Target> {
        match self {
            Engines::Embedded { work } => {
                let dir = work.join(tag);
                common::fresh_dir(&dir)?;
                let topology = common::dev_topology()?;
                let log = EmbeddedLog::open(&dir.join("log.redb"))?;
                let store = EmbeddedStore::open(&dir.join("store"))?;
                log.ensure_topics(&platform::topic_configs(&topology))
                    .await?;
                Ok(Target {
                    engine: EMBEDDED,
                    topology,
                    log: Arc::new(log.clone()),
                    store: Arc::new(store.clone()),
                    raw: RawLog::Embedded(log.clone()),
                    prefix: String::new(),
                    backend: Backend::Embedded { dir, log, store },
                })
            }
            Engines::Real { bootstrap, cql } => {
                let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
                let id = format!("bench{}{tag}x{:x}", std::process::id(), nanos % 0xffff_ffff);
                // The shipped topology (6 inputs and 6 events partitions),
                // with topic names of this deployment only.
                let prefix = format!("{id}.");
                let yaml = waymark_topology::default_yaml().replace("waymark.", &prefix);
                let topology = waymark_topology::parse(&yaml, &registry().declarations())
                    .map_err(|e| anyhow!("bench topology: {e:?}"))?;
                let log = KafkaLog::new(KafkaConfig::new(bootstrap.clone()))
                    .map_err(|e| anyhow!("{e}"))?;
                log.ensure_topics(&platform::topic_configs(&topology))
                    .await
                    .with_context(|| format!("kafka at {bootstrap}"))?;
                let keyspace = id.to_lowercase();
                let store = CqlStore::connect(CqlConfig {
                    nodes: cql.split(',').map(str::to_owned).collect(),
                    keyspace: keyspace.clone(),
                    ..CqlConfig::default()
                })
                .await
                .map_err(|e| anyhow!("cassandra at {cql}: {e}"))?;
                Ok(Target {
                    engine: REAL,
                    topology,
                    log: Arc::new(log),
                    store: Arc::new(store),
                    raw: RawLog::Kafka(RawKafka::new(bootstrap)?),
                    prefix,
                    backend: Backend::Real {
                        bootstrap: bootstrap.clone(),
                        cql: cql.clone(),
                        keyspace,
                        group_prefix: id,
                    },
                })
            }
        }
    }
}

/// One scenario's deployment.
pub(crate) struct Target {
    pub(crate) engine: &'static str,
    pub(crate) topology: Topology,
    pub(crate) log: Arc<dyn Log>,
    pub(crate) store: Arc<dyn ProjectionStore>,
    pub(crate) raw: RawLog,
    /// Prefix of this deployment's topic names (empty on the embedded
    /// default, whose data directory is its own).
    prefix: String,
    backend: Backend,
}

enum Backend {
    Embedded {
        dir: PathBuf,
        log: EmbeddedLog,
        store: EmbeddedStore,
    },
    Real {
        bootstrap: String,
        cql: String,
        keyspace: String,
        group_prefix: String,
    },
}

impl Target {
    /// The CQL nodes and keyspace (real engines only).
    pub(crate) fn cql(&self) -> Option<(Vec<String>, String)> {
        match &self.backend {
            Backend::Real { cql, keyspace, .. } => Some((
                cql.split(',').map(str::to_owned).collect(),
                keyspace.clone(),
            )),
            Backend::Embedded { .. } => None,
        }
    }

    /// Starts the product on this deployment: every processor and the gRPC
    /// services, on 127.0.0.1 with an ephemeral port.
    pub(crate) async fn start(self) -> anyhow::Result<Platform> {
        self.start_only(&[]).await
    }

    /// [`Target::start`] with only the processors `names` (all when empty),
    /// as `waymark run --processors` selects them; real engines only (`waymark
    /// dev` always runs every processor).
    pub(crate) async fn start_only(self, names: &[String]) -> anyhow::Result<Platform> {
        waymark_cli::metrics_http::recorder();
        match self.backend {
            Backend::Embedded { .. } if !names.is_empty() => {
                Err(anyhow!("waymark dev runs every processor: no selection"))
            }
            Backend::Embedded { dir, log, store } => {
                // `waymark dev` opens the files itself.
                log.close();
                store.close();
                drop((log, store));
                let dev = Dev::start(DevOptions {
                    data_dir: dir,
                    grpc_addr: "127.0.0.1:0".parse()?,
                    metrics_addr: "127.0.0.1:0".parse()?,
                    topology: self.topology.clone(),
                    kafka_addr: None,
                    kafka_limits: Default::default(),
                    kafka_advertised: None,
                    grpc_security: waymark_server::Security::open(),
                    kafka_tls: None,
                    kafka_sasl: None,
                    metrics_security: Default::default(),
                })
                .await?;
                Ok(Platform {
                    engine: self.engine,
                    grpc_addr: dev.info.grpc_addr.clone(),
                    log: Arc::new(dev.log.clone()),
                    store: Arc::new(dev.store.clone()),
                    raw: RawLog::Embedded(dev.log.clone()),
                    topology: self.topology,
                    prefix: self.prefix,
                    running: Running::Dev(dev),
                })
            }
            Backend::Real {
                bootstrap,
                cql,
                keyspace,
                group_prefix,
            } => {
                // What `waymark run` (every processor) and `waymark serve`
                // assemble, in one process.
                let token = CancellationToken::new();
                let mut tasks = Tasks::new();
                let validator = Arc::new(Validator::new()?);
                let names = platform::select_processors(names, &self.topology)?;
                let controller = platform::spawn_processors(
                    &mut tasks,
                    &self.log,
                    &self.store,
                    &self.topology,
                    &validator,
                    &names,
                    &group_prefix,
                    &token,
                )
                .await?;
                let services = platform::services(
                    &mut tasks,
                    &self.log,
                    &self.store,
                    &self.topology,
                    &validator,
                    Some(controller),
                    &group_prefix,
                    &token,
                )
                .await?;
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let grpc_addr = listener.local_addr()?.to_string();
                let serving = token.clone();
                tasks.spawn(async move {
                    let result = waymark_server::serve(listener, services, serving).await;
                    (
                        "grpc server".to_owned(),
                        result.map_err(anyhow::Error::from),
                    )
                });
                Ok(Platform {
                    engine: self.engine,
                    grpc_addr,
                    log: self.log,
                    store: self.store,
                    raw: self.raw,
                    topology: self.topology,
                    prefix: self.prefix,
                    running: Running::Real {
                        tasks,
                        token,
                        cleanup: Cleanup {
                            bootstrap,
                            cql,
                            keyspace,
                        },
                    },
                })
            }
        }
    }

    /// Removes what this deployment created on shared engines (topics and
    /// keyspace); the embedded data directory goes with the work directory.
    pub(crate) async fn cleanup(self) -> anyhow::Result<()> {
        match self.backend {
            Backend::Embedded { log, store, .. } => {
                log.close();
                store.close();
                Ok(())
            }
            Backend::Real {
                bootstrap,
                cql,
                keyspace,
                ..
            } => {
                Cleanup {
                    bootstrap,
                    cql,
                    keyspace,
                }
                .run(&self.prefix)
                .await
            }
        }
    }
}

/// What a real-engine deployment leaves on the shared engines.
struct Cleanup {
    bootstrap: String,
    cql: String,
    keyspace: String,
}

impl Cleanup {
    /// Deletes every topic named `prefix*` and drops the keyspace.
    async fn run(self, prefix: &str) -> anyhow::Result<()> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        let consumer: BaseConsumer = config.create()?;
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        let topics: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .filter(|t| t.starts_with(prefix))
            .collect();
        if !topics.is_empty() {
            let admin: AdminClient<DefaultClientContext> = config.create()?;
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            admin.delete_topics(&names, &AdminOptions::new()).await?;
        }
        let session = scylla::client::session_builder::SessionBuilder::new()
            .known_nodes(self.cql.split(','))
            .build()
            .await?;
        session
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace), ())
            .await?;
        Ok(())
    }
}

/// The product running on a [`Target`].
pub(crate) struct Platform {
    pub(crate) engine: &'static str,
    pub(crate) grpc_addr: String,
    pub(crate) log: Arc<dyn Log>,
    pub(crate) store: Arc<dyn ProjectionStore>,
    pub(crate) raw: RawLog,
    pub(crate) topology: Topology,
    prefix: String,
    running: Running,
}

enum Running {
    Dev(Dev),
    Real {
        tasks: Tasks,
        token: CancellationToken,
        cleanup: Cleanup,
    },
}

impl Platform {
    /// The name of an extra topic of this deployment.
    pub(crate) fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The prefix of this deployment's topic names: anything named with it
    /// (a peer's application id and changelog topics) goes with the
    /// deployment's cleanup.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Creates an extra single-partition topic.
    pub(crate) async fn create_topic(&self, name: &str) -> anyhow::Result<()> {
        self.log
            .ensure_topics(&[TopicConfig {
                name: name.to_owned(),
                partitions: 1,
                retention: None,
                compaction: false,
            }])
            .await?;
        Ok(())
    }

    /// Whether processor `name` (version 1) has applied everything on
    /// `topic` so far.
    pub(crate) async fn caught_up(&self, name: &str, topic: &str) -> anyhow::Result<bool> {
        let highs = common::highs(self.log.as_ref(), topic).await?;
        self.reached(name, topic, &highs).await
    }

    /// Whether processor `name` (version 1) has stored positions at or past
    /// `highs` (one per partition of `topic`, read once by the caller).
    pub(crate) async fn reached(
        &self,
        name: &str,
        topic: &str,
        highs: &[u64],
    ) -> anyhow::Result<bool> {
        let stored = self.store.positions(&format!("{name}.v1"), topic).await?;
        Ok(highs
            .iter()
            .enumerate()
            .all(|(p, high)| stored.get(&(p as u32)).copied().unwrap_or(0) >= *high))
    }

    /// Stops the product (draining, as on SIGTERM) and removes what the
    /// deployment created on shared engines.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        match self.running {
            Running::Dev(dev) => dev.stop().await,
            Running::Real {
                mut tasks,
                token,
                cleanup,
            } => {
                token.cancel();
                platform::drain(&mut tasks, waymark_cli::scale::DRAIN_TIMEOUT).await?;
                cleanup.run(&self.prefix).await
            }
        }
    }
}
