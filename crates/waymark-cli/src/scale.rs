//! `waymark run` and `waymark serve`: the same processors and services on
//! Apache Kafka and ScyllaDB/Cassandra, scaled out as consumer-group
//! members (run any number of `waymark run` processes per processor; Kafka
//! splits the partitions between them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use waymark_cql::{CqlConfig, CqlStore};
use waymark_kafka::{KafkaConfig, KafkaLog};
use waymark_runtime::{Log, ProjectionStore};
use waymark_schemas::Validator;
use waymark_topology::Topology;

use crate::platform::{self, Tasks};

/// How long shutdown may take to drain, flush and commit.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the engines are.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// librdkafka properties passed through (TLS, SASL, tuning).
    pub kafka_properties: Vec<(String, String)>,
    /// CQL contact points, `host:port`.
    pub cql_nodes: Vec<String>,
    /// CQL role to log in as.
    pub cql_username: Option<String>,
    /// Its password.
    pub cql_password: Option<waymark_cql::Secret>,
    /// TLS to the CQL nodes.
    pub cql_tls: Option<waymark_cql::CqlTls>,
    /// Keyspace of the projections.
    pub keyspace: String,
    /// The CQL replication map of the keyspace when Waymark creates it.
    pub cql_replication: String,
    /// Prefix of consumer group names (`<prefix>.<processor>.v<version>`).
    pub group_prefix: String,
    /// Bytes of rows each fold runner caches across batches (0: none).
    pub row_cache_bytes: usize,
    /// The topology.
    pub topology: Topology,
    /// Prometheus listen address (an ephemeral port if busy).
    pub metrics_addr: SocketAddr,
    /// Who may scrape it, and over what.
    pub metrics_security: crate::metrics_http::MetricsSecurity,
}

/// How long the first contact with Kafka may take before start-up goes on
/// retrying in the background (a refusal is reported at once).
const KAFKA_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Reads librdkafka properties from a file: `KEY=VALUE` per line, blank
/// lines and `#` comments ignored (Java properties files of this shape, as
/// Kafka's own tools take with `--command-config`).
///
/// # Errors
/// When the file cannot be read, or a line is not `KEY=VALUE` (its number
/// is given; its value never is).
pub fn read_properties(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut properties = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                properties.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            _ => anyhow::bail!("{} line {}: not KEY=VALUE", path.display(), n + 1),
        }
    }
    Ok(properties)
}

/// Parses `KEY=VALUE`.
pub fn parse_property(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if k.trim().is_empty() {
        return Err(format!("{text:?} has an empty key"));
    }
    Ok((k.trim().to_owned(), v.to_owned()))
}

struct Engines {
    log: Arc<dyn Log>,
    store: Arc<dyn ProjectionStore>,
    validator: Arc<Validator>,
}

async fn connect(
    options: &EngineOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Engines>> {
    let mut kafka = KafkaConfig::new(options.bootstrap.clone());
    for (k, v) in &options.kafka_properties {
        kafka = kafka.property(k.clone(), v.clone());
    }
    // A refused login or a failed TLS handshake is a configuration error:
    // say so now instead of retrying forever.
    let probe_config = kafka.clone();
    let probed = tokio::task::spawn_blocking(move || {
        waymark_kafka::probe(&probe_config, KAFKA_PROBE_TIMEOUT)
    })
    .await?;
    match probed {
        Ok(()) => {}
        Err(e @ waymark_kafka::KafkaLogError::Unreachable { .. }) => {
            warn!(error = %e, "kafka not reachable yet, retrying");
        }
        Err(e) => {
            return Err(anyhow!(
                "{e} (check sasl.username, sasl.password, sasl.mechanism, security.protocol and ssl.ca.location)"
            ))
        }
    }
    let log = KafkaLog::new(kafka).map_err(|e| anyhow!("{e}"))?;
    let cql = CqlConfig {
        nodes: options.cql_nodes.clone(),
        keyspace: options.keyspace.clone(),
        replication: options.cql_replication.clone(),
        row_cache_bytes: options.row_cache_bytes,
        username: options.cql_username.clone(),
        password: options.cql_password.clone(),
        tls: options.cql_tls.clone(),
        ..CqlConfig::default()
    };
    // The engines may still be starting: retry with backoff until shutdown.
    let mut delay = Duration::from_millis(200);
    let store = loop {
        match CqlStore::connect(cql.clone()).await {
            Ok(store) => break store,
            Err(e) if e.is_retryable() => {
                warn!(error = %e, "cql cluster not reachable yet, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(anyhow!("{e}")),
        }
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match log
            .ensure_topics(&platform::topic_configs(&options.topology))
            .await
        {
            Ok(()) => break,
            Err(e) => {
                warn!(error = %e, "kafka not reachable yet, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    waymark_control::partitions::check(&store, &log, &platform::topic_configs(&options.topology))
        .await?;
    let store: Arc<dyn ProjectionStore> = Arc::new(store);
    Ok(Some(Engines {
        log: Arc::new(log),
        store,
        validator: Arc::new(Validator::new()?),
    }))
}

async fn start_metrics(
    tasks: &mut Tasks,
    addr: SocketAddr,
    security: crate::metrics_http::MetricsSecurity,
    status: Option<crate::status::StatusSources>,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    crate::metrics_http::recorder();
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "metrics address busy, using an ephemeral port");
            TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?
        }
    };
    let bound = listener.local_addr()?;
    let token = shutdown.clone();
    tasks.spawn(async move {
        crate::metrics_http::serve(listener, security, status, token).await;
        ("metrics".to_owned(), Ok(()))
    });
    Ok(bound)
}

/// `waymark run [PROCESSOR...]`: runs processors until `stop`.
pub async fn run(
    options: EngineOptions,
    processors: &[String],
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let names = platform::select_processors(processors, &options.topology)?;
    let shutdown = CancellationToken::new();
    tokio::pin!(stop);
    let engines = tokio::select! {
        engines = connect(&options, &shutdown) => engines?,
        _ = &mut stop => return Ok(()),
    };
    let Some(engines) = engines else {
        return Ok(());
    };
    let mut tasks = Tasks::new();
    platform::spawn_processors(
        &mut tasks,
        &engines.log,
        &engines.store,
        &options.topology,
        &engines.validator,
        &names,
        &options.group_prefix,
        &shutdown,
    )
    .await?;
    let metrics = start_metrics(
        &mut tasks,
        options.metrics_addr,
        options.metrics_security.clone(),
        None,
        &shutdown,
    )
    .await?;
    println!(
        "waymark run: {} on kafka {} and cql {}",
        names.join(", "),
        options.bootstrap,
        options.cql_nodes.join(",")
    );
    println!("  metrics: http://{metrics}/metrics");
    info!(processors = %names.join(","), "waymark run ready");
    platform::supervise(&mut tasks, stop, &shutdown, DRAIN_TIMEOUT).await
}

/// `waymark serve`: serves Query, Ingest and Admin until `stop`.
///
/// With `health_addr`, `grpc.health.v1` alone is also served there,
/// plaintext and open ([`waymark_server::serve_health`]), for probes that
/// cannot use the secured port.
pub async fn serve(
    options: EngineOptions,
    grpc_addr: SocketAddr,
    health_addr: Option<SocketAddr>,
    security: waymark_server::Security,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind(grpc_addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {grpc_addr}"))?;
    let bound = listener.local_addr()?;
    let health = match health_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for gRPC health on {addr}"))?,
        ),
        None => None,
    };
    tokio::pin!(stop);
    let engines = tokio::select! {
        engines = connect(&options, &shutdown) => engines?,
        _ = &mut stop => return Ok(()),
    };
    let Some(engines) = engines else {
        return Ok(());
    };
    let mut tasks = Tasks::new();
    let services = platform::services(
        &mut tasks,
        &engines.log,
        &engines.store,
        &options.topology,
        &engines.validator,
        None,
        &options.group_prefix,
        &shutdown,
    )
    .await?;
    let status = crate::status::StatusSources {
        admin: services.admin.clone(),
        query: services.query.clone(),
        auth: security.auth.clone(),
    };
    if let Some(health) = health {
        let token = shutdown.clone();
        tasks.spawn(async move {
            let result = waymark_server::serve_health(health, token).await;
            (
                "grpc health".to_owned(),
                result.map_err(anyhow::Error::from),
            )
        });
    }
    let token = shutdown.clone();
    tasks.spawn(async move {
        let result = waymark_server::serve_with(listener, services, security, token).await;
        (
            "grpc server".to_owned(),
            result.map_err(anyhow::Error::from),
        )
    });
    let metrics = start_metrics(
        &mut tasks,
        options.metrics_addr,
        options.metrics_security.clone(),
        Some(status),
        &shutdown,
    )
    .await?;
    println!(
        "waymark serve: grpc {bound} on kafka {} and cql {}",
        options.bootstrap,
        options.cql_nodes.join(",")
    );
    println!("  metrics: http://{metrics}/metrics");
    println!("  status:  http://{metrics}/");
    info!(grpc = %bound, "waymark serve ready");
    platform::supervise(&mut tasks, stop, &shutdown, DRAIN_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_properties_file_is_key_value_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.properties");
        std::fs::write(
            &path,
            "# secure\nsecurity.protocol=SASL_SSL\n\nsasl.password = p=w\n",
        )
        .unwrap();
        assert_eq!(
            read_properties(&path).unwrap(),
            vec![
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
                ("sasl.password".to_owned(), "p=w".to_owned())
            ]
        );
        std::fs::write(&path, "ok=1\nsasl.password hunter2\n").unwrap();
        let e = read_properties(&path).unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn properties_parse() {
        assert_eq!(parse_property("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_property("nope").is_err());
        assert!(parse_property("=x").is_err());
    }
}
