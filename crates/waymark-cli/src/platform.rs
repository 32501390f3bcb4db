//! Assembly shared by every way of running Waymark (`dev`, `run`, `serve`):
//! the same processors, runtime and services over any log and store.

use std::sync::Arc;

use anyhow::anyhow;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use waymark_runtime::{Log, ProjectionStore, TopicConfig};
use waymark_schemas::Validator;
use waymark_server::{AdminService, IngestService, Projections, QueryService, Services};
use waymark_topology::Topology;

use waymark_control::{Controller, ControllerHandle, PlatformOperator};

use crate::registry::registry;

/// Named tasks of a process; if one ends, the process shuts down.
pub type Tasks = JoinSet<(String, anyhow::Result<()>)>;

/// The topics of `topology`, as a log creates them.
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

/// Checks processor names given on the command line.
pub fn select_processors(names: &[String], topology: &Topology) -> anyhow::Result<Vec<String>> {
    let registry = registry();
    if names.is_empty() {
        return Ok(registry
            .configured(topology)
            .into_iter()
            .map(str::to_owned)
            .collect());
    }
    for name in names {
        if !registry.contains(name) {
            return Err(anyhow!(
                "unknown processor {name:?}; known processors: {}",
                registry.names().join(", ")
            ));
        }
    }
    Ok(names.to_vec())
}

/// Starts the [`Controller`] of processors `names` as a named task: it
/// runs every version of their projections the catalog asks for. Returns
/// once the first versions are running.
#[allow(clippy::too_many_arguments)]
pub async fn spawn_processors(
    tasks: &mut Tasks,
    log: &Arc<dyn Log>,
    store: &Arc<dyn ProjectionStore>,
    topology: &Topology,
    validator: &Arc<Validator>,
    names: &[String],
    group_prefix: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<ControllerHandle> {
    for name in names {
        if topology.processor(name).is_none() {
            return Err(anyhow!(
                "processor {name} is not configured in the topology"
            ));
        }
    }
    let (mut controller, handle) = Controller::new(
        registry().clone(),
        log.clone(),
        store.clone(),
        topology.clone(),
        validator.clone(),
        names.to_vec(),
        group_prefix,
    );
    controller.start().await?;
    let token = shutdown.clone();
    tasks.spawn(async move { ("processors".to_owned(), controller.run(token).await) });
    Ok(handle)
}

/// The gRPC services over `log` and `store`. Queries read the active
/// projection versions (tracked from the catalog by a task added to
/// `tasks`); `controller` is this process's controller, if it runs
/// processors; `group_prefix` is the prefix of the runners' consumer
/// groups (what `Admin.DropVersion` waits to empty).
#[allow(clippy::too_many_arguments)]
pub async fn services(
    tasks: &mut Tasks,
    log: &Arc<dyn Log>,
    store: &Arc<dyn ProjectionStore>,
    topology: &Topology,
    validator: &Arc<Validator>,
    controller: Option<ControllerHandle>,
    group_prefix: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Services> {
    let registry = registry();
    let projections = Projections::new(
        store.clone(),
        waymark_control::configured_versions(registry, topology),
    );
    // Read the catalog before serving, so the first query already reads
    // the active versions; create their tables so queries answer NOT_FOUND
    // rather than fail before the first write.
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match waymark_control::refresh(&projections, registry, topology).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading the projection catalog failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
    let active = projections.active();
    let tables: Vec<String> = registry
        .configured(topology)
        .into_iter()
        .flat_map(|name| registry.tables(name, active.get(name)))
        .collect();
    store.ensure_tables(&tables).await?;
    let (p, topo, token) = (projections.clone(), topology.clone(), shutdown.clone());
    let r = registry.clone();
    tasks.spawn(async move {
        waymark_control::track_active(p, r, topo, token).await;
        ("projection tracker".to_owned(), Ok(()))
    });
    let operator = Arc::new(
        PlatformOperator::new(
            registry.clone(),
            log.clone(),
            store.clone(),
            topology.clone(),
            validator.clone(),
            projections.clone(),
            controller,
        )
        .with_group_prefix(group_prefix),
    );
    let (sampler, token) = (operator.clone(), shutdown.clone());
    tasks.spawn(async move {
        sampler.sample_until(token).await;
        ("progress sampler".to_owned(), Ok(()))
    });
    Ok(Services {
        query: QueryService::new(projections),
        ingest: IngestService::new(
            log.clone(),
            validator.clone(),
            topology.topics.inputs.name.clone(),
        ),
        admin: AdminService::new(log.clone(), topology.topics.dlq.name.clone())
            .with_operator(operator),
    })
}

/// Waits until `stop` resolves or a task ends, then cancels `shutdown` and
/// drains the tasks within `timeout`. A task that ended first is an error.
pub async fn supervise(
    tasks: &mut Tasks,
    stop: impl std::future::Future<Output = ()>,
    shutdown: &CancellationToken,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let failure = tokio::select! {
        _ = &mut stop => None,
        Some(done) = tasks.join_next() => Some(match done {
            Ok((task, Ok(()))) => anyhow!("{task} stopped unexpectedly"),
            Ok((task, Err(e))) => anyhow!("{task} failed: {e:#}"),
            Err(e) => anyhow!("a task panicked: {e}"),
        }),
    };
    if let Some(e) = &failure {
        tracing::error!("{e:#}; shutting down");
    }
    shutdown.cancel();
    drain(tasks, timeout).await?;
    failure.map_or(Ok(()), Err)
}

/// Waits for every task to end, within `timeout`.
pub async fn drain(tasks: &mut Tasks, timeout: std::time::Duration) -> anyhow::Result<()> {
    let drained = tokio::time::timeout(timeout, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok((task, Err(e))) = done {
                tracing::warn!(%task, error = %e, "task ended with an error during shutdown");
            }
        }
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
        return Err(anyhow!("shutdown did not finish within {timeout:?}"));
    }
    Ok(())
}
