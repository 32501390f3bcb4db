//! `waymark dev`: the whole platform in one process on the embedded log and
//! store, plus a Kafka-protocol broker served on that same durable log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use waymark_broker::{Broker, BrokerConfig};
use waymark_embedded::{EmbeddedLog, EmbeddedStore};
use waymark_runtime::{Log, ProjectionStore};
use waymark_schemas::Validator;
use waymark_server::KafkaEndpointStatus;
use waymark_topology::Topology;

use crate::platform;
use crate::registry::registry;

/// How often the embedded log's retention runs.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

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
    /// Where to serve the Kafka protocol; `None`: not at all.
    pub kafka_addr: Option<SocketAddr>,
    /// Limits of the Kafka endpoint.
    pub kafka_limits: KafkaLimits,
    /// The `host:port` the Kafka endpoint tells clients to connect to;
    /// `None`: the address each connection arrived on.
    pub kafka_advertised: Option<(String, u16)>,
    /// TLS and authentication of the gRPC port (`Security::open()` on
    /// loopback by default).
    pub grpc_security: waymark_server::Security,
    /// TLS of the Kafka endpoint (plaintext when `None`).
    pub kafka_tls: Option<waymark_tls::ServerTls>,
    /// SASL of the Kafka endpoint (anyone may connect when `None`).
    pub kafka_sasl: Option<waymark_broker::SaslConfig>,
    /// Who may scrape the metrics endpoint, and over what.
    pub metrics_security: crate::metrics_http::MetricsSecurity,
}

/// Limits of the Kafka endpoint (`waymark dev --kafka-*`); the defaults are
/// [`BrokerConfig::new`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Requests of one connection handled at once.
    pub max_in_flight: usize,
    /// Largest request frame, in bytes.
    pub max_request_bytes: usize,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
}

impl Default for KafkaLimits {
    fn default() -> Self {
        let c = BrokerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            max_connections: c.max_connections,
            max_in_flight: c.max_in_flight,
            max_request_bytes: c.max_request_bytes,
            idle_timeout: c.idle_timeout,
        }
    }
}

impl KafkaLimits {
    fn config(&self, addr: SocketAddr, writable: &str) -> BrokerConfig {
        let mut c = BrokerConfig::new(addr).writable(writable);
        c.max_connections = self.max_connections;
        c.max_in_flight = self.max_in_flight;
        c.max_request_bytes = self.max_request_bytes;
        c.idle_timeout = self.idle_timeout;
        c
    }
}

/// The addresses `waymark dev` writes to `DIR/dev.json` once ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DevInfo {
    /// Kafka bootstrap of the endpoint (empty when disabled).
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
    broker: Option<Broker>,
    dir: PathBuf,
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
        // Installed first, so that nothing started below records into the
        // void.
        crate::metrics_http::recorder();
        let dir = &options.data_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let log = EmbeddedLog::open(&dir.join("log.redb"))
            .map_err(|e| anyhow!("cannot open the embedded log in {}: {e}", dir.display()))?;
        let store = EmbeddedStore::open(&dir.join(STORE_DIR))
            .map_err(|e| anyhow!("cannot open the embedded store in {}: {e}", dir.display()))?;
        import_redb_store(dir, &store)?;
        // One inputs partition in dev: the identity processor then resolves
        // events in exactly the order they were published, across keys
        // (see docs/decisions/0002-dev-inputs-partition.md).
        let mut topology = options.topology.clone();
        topology.topics.inputs.partitions = 1;
        let topology = &topology;
        let topics = platform::topic_configs(topology);
        log.ensure_topics(&topics).await?;
        waymark_control::partitions::check(&store, &log, &topics).await?;
        // The listeners are bound before anything runs, so a busy port is
        // a clear error and nothing has started.
        let grpc = TcpListener::bind(options.grpc_addr)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", options.grpc_addr))?;
        let broker = match options.kafka_addr {
            Some(addr) => Some(
                Broker::start(log.clone(), {
                    let mut config = options
                        .kafka_limits
                        .config(addr, &topology.topics.inputs.name);
                    config.tls = options.kafka_tls.clone();
                    config.sasl = options.kafka_sasl.clone();
                    config.advertised = options.kafka_advertised.clone();
                    config
                })
                    .await
                    .context("cannot start the Kafka endpoint (choose another with --kafka-addr, or --no-kafka)")?,
            ),
            None => None,
        };
        let validator = Arc::new(Validator::new()?);
        let shared_log: Arc<dyn Log> = Arc::new(log.clone());
        let shared_store: Arc<dyn ProjectionStore> = Arc::new(store.clone());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let names = platform::select_processors(&[], topology)?;
        let controller = platform::spawn_processors(
            &mut tasks,
            &shared_log,
            &shared_store,
            topology,
            &validator,
            &names,
            "waymark",
            &shutdown,
        )
        .await?;

        let grpc_addr = grpc.local_addr()?;
        let mut services = platform::services(
            &mut tasks,
            &shared_log,
            &shared_store,
            topology,
            &validator,
            Some(controller),
            "waymark",
            &shutdown,
        )
        .await?;
        if let Some(broker) = &broker {
            let status = broker.status();
            services.admin = services.admin.with_kafka_endpoint(Arc::new(move || {
                let s = status.get();
                KafkaEndpointStatus {
                    bootstrap: s.bootstrap,
                    connections: s.connections,
                    records_in: s.records_in,
                    records_out: s.records_out,
                    refusals: s.refusals,
                    last_refusal: s.last_refusal,
                }
            }));
        }
        let token = shutdown.clone();
        let grpc_security = options.grpc_security.clone();
        let status = crate::status::StatusSources {
            admin: services.admin.clone(),
            query: services.query.clone(),
            auth: grpc_security.auth.clone(),
        };
        tasks.spawn(async move {
            let result = waymark_server::serve_with(grpc, services, grpc_security, token).await;
            (
                "grpc server".to_owned(),
                result.map_err(anyhow::Error::from),
            )
        });

        // Time-based retention of the embedded log, as Kafka does it.
        let retained: Vec<(String, Duration)> = topology
            .topics
            .iter()
            .filter_map(|(_, t)| t.retention.as_duration().map(|d| (t.name.clone(), d)))
            .collect();
        let (retention_log, token) = (log.clone(), shutdown.clone());
        let (retention_store, retention_topology) = (store.clone(), topology.clone());
        tasks.spawn(async move {
            loop {
                for (topic, age) in &retained {
                    // Never what a running version has not applied yet.
                    let floor = match waymark_control::unapplied_floor(
                        &retention_store,
                        &retention_log,
                        registry(),
                        &retention_topology,
                        topic,
                    )
                    .await
                    {
                        Ok(floor) => floor,
                        Err(e) => {
                            warn!(error = %e, %topic, "cannot tell what is applied; retention skipped");
                            continue;
                        }
                    };
                    let (log, topic, age) = (retention_log.clone(), topic.clone(), *age);
                    match tokio::task::spawn_blocking(move || {
                        log.apply_retention(&topic, age, &floor)
                    })
                    .await
                    {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => warn!(error = %e, "retention failed; retrying later"),
                        Err(e) => warn!(error = %e, "retention task failed"),
                    }
                }
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
                }
            }
            ("retention".to_owned(), Ok(()))
        });

        let metrics = bind_metrics(options.metrics_addr).await?;
        let metrics_addr = metrics.local_addr()?;
        let token = shutdown.clone();
        let metrics_security = options.metrics_security.clone();
        tasks.spawn(async move {
            crate::metrics_http::serve(metrics, metrics_security, Some(status), token).await;
            ("metrics".to_owned(), Ok(()))
        });

        let info = DevInfo {
            kafka_bootstrap: broker
                .as_ref()
                .map(|b| b.addr().to_string())
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
            broker,
            dir: dir.clone(),
        })
    }

    /// Runs until `stop` completes or a task fails, then shuts down.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let broker = self.broker.take();
        let stop = async move {
            stop.await;
            // Stop taking Kafka requests first; what was acknowledged is
            // already durable.
            if let Some(broker) = broker {
                broker.stop().await;
            }
        };
        let result =
            platform::supervise(&mut self.tasks, stop, &self.shutdown, DRAIN_TIMEOUT).await;
        // Release the data directory even if a client still holds a handle.
        let (log, store) = (self.log.clone(), self.store.clone());
        tokio::task::spawn_blocking(move || {
            log.close();
            store.close();
        })
        .await?;
        // The addresses are no longer served.
        let _ = std::fs::remove_file(self.dir.join(DEV_JSON));
        result
    }

    /// Stops polling, drains, flushes, commits and closes, within
    /// [`DRAIN_TIMEOUT`].
    pub async fn stop(self) -> anyhow::Result<()> {
        info!("shutting down");
        self.run_until(async {}).await?;
        info!("stopped");
        Ok(())
    }
}

/// The file `waymark dev` writes its addresses to, removed on a clean stop.
pub const DEV_JSON: &str = "dev.json";

/// The projection store's directory inside the data directory.
pub const STORE_DIR: &str = "store";

/// The projection store file of Waymark before the store moved to fjall
/// (decision 0001).
const OLD_STORE_FILE: &str = "store.redb";

/// Carries the projections of a data directory written by an older Waymark
/// (`store.redb`) over into the store, then renames the old file to
/// `store.redb.imported`. Interrupted, it runs again on the next start
/// (rows are copied as they are, so copying twice changes nothing).
fn import_redb_store(dir: &Path, store: &EmbeddedStore) -> anyhow::Result<()> {
    let old = dir.join(OLD_STORE_FILE);
    if !old.is_file() {
        return Ok(());
    }
    info!(path = %old.display(), "importing the projection store of an older Waymark");
    let rows = store.import_redb(&old).map_err(|e| {
        anyhow!(
            "cannot import the old projection store {}: {e}",
            old.display()
        )
    })?;
    let done = dir.join(format!("{OLD_STORE_FILE}.imported"));
    std::fs::rename(&old, &done)
        .with_context(|| format!("cannot rename {} after importing it", old.display()))?;
    info!(rows, kept = %done.display(), "old projection store imported");
    Ok(())
}

fn write_dev_json(dir: &Path, info: &DevInfo) -> anyhow::Result<()> {
    let path = dir.join(DEV_JSON);
    let tmp = dir.join("dev.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
