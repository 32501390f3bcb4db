//! Assembly shared by every way of running Waymark (`dev`, `run`, `serve`):
//! the same processors, runtime and services over any log and store.

use std::sync::Arc;

use anyhow::anyhow;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use waymark_runtime::identity::IdentityTables;
use waymark_runtime::{Log, ProjectionStore, Runner, RunnerConfig, TopicConfig};
use waymark_schemas::Validator;
use waymark_server::{
    AdminService, IngestService, ProjectionTables, Projections, QueryService, Services,
};
use waymark_topology::Topology;

use crate::registry::{self, PROCESSORS};

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

/// The tables queries read: the active projection version of each processor.
pub fn projection_tables(topology: &Topology) -> ProjectionTables {
    let version = |name: &str| topology.processor(name).map_or(1, |p| p.projection_version);
    ProjectionTables {
        identity: IdentityTables::for_version(version("identity")),
        person: registry::projection_table("person", version("person")),
        interactions: registry::projection_table("interactions", version("interactions")),
        journey: registry::projection_table("journey", version("journey")),
        learning: registry::projection_table("learning", version("learning")),
    }
}

/// Creates every table queries read, so they answer `NOT_FOUND` rather
/// than fail before the first write.
pub async fn ensure_query_tables(
    store: &dyn ProjectionStore,
    topology: &Topology,
) -> anyhow::Result<()> {
    let t = projection_tables(topology);
    store
        .ensure_tables(&[
            t.identity.links,
            t.identity.persons,
            t.person,
            t.interactions,
            t.journey,
            t.learning,
        ])
        .await?;
    Ok(())
}

/// Checks processor names given on the command line.
pub fn select_processors(names: &[String], topology: &Topology) -> anyhow::Result<Vec<String>> {
    if names.is_empty() {
        return Ok(PROCESSORS
            .iter()
            .filter(|n| topology.processor(n).is_some())
            .map(|n| (*n).to_owned())
            .collect());
    }
    for name in names {
        if !PROCESSORS.contains(&name.as_str()) {
            return Err(anyhow!(
                "unknown processor {name:?}; known processors: {}",
                PROCESSORS.join(", ")
            ));
        }
    }
    Ok(names.to_vec())
}

/// Starts one runner per processor in `names`, as named tasks.
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
) -> anyhow::Result<()> {
    for name in names {
        let spec = topology
            .processor(name)
            .ok_or_else(|| anyhow!("processor {name} is not configured in the topology"))?;
        let handler = registry::handler(name, topology, validator)?;
        store.ensure_tables(&handler.tables()).await?;
        let input = spec
            .inputs
            .first()
            .ok_or_else(|| anyhow!("processor {name} has no input topic"))?;
        let config = RunnerConfig::new(
            format!("{name}.v{}", spec.projection_version),
            input.clone(),
            topology.topics.dlq.name.clone(),
        )
        .with_group_prefix(group_prefix);
        let runner = Runner::new(log.clone(), store.clone(), handler, config);
        let token = shutdown.clone();
        let task = format!("processor {name}");
        tasks.spawn(async move { (task, runner.run(token).await.map_err(anyhow::Error::from)) });
    }
    Ok(())
}

/// The gRPC services over `log` and `store`.
pub fn services(
    log: &Arc<dyn Log>,
    store: &Arc<dyn ProjectionStore>,
    topology: &Topology,
    validator: &Arc<Validator>,
) -> Services {
    Services {
        query: QueryService::new(Projections::new(store.clone(), projection_tables(topology))),
        ingest: IngestService::new(
            log.clone(),
            validator.clone(),
            topology.topics.inputs.name.clone(),
        ),
        admin: AdminService::new(log.clone(), topology.topics.dlq.name.clone()),
    }
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
