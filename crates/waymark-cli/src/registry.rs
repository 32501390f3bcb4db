//! The processor registry: one explicit table of name → handler factory.

use std::sync::Arc;

use waymark_interactions::InteractionsFold;
use waymark_journey::JourneyFold;
use waymark_learning::LearningFold;
use waymark_person::PersonFold;
use waymark_runtime::history::{history_table, WithHistory};
use waymark_runtime::identity::IdentityTables;
use waymark_runtime::{Handler, IdentityHandler, ProjectionHandler};
use waymark_schemas::Validator;
use waymark_topology::{ProcessorSpec, Topology};

/// Every processor Waymark knows, in topology order.
pub const PROCESSORS: &[&str] = &["identity", "person", "interactions", "journey", "learning"];

/// Why a handler could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The name is not in [`PROCESSORS`].
    #[error("unknown processor {name:?}; known processors: {}", PROCESSORS.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// The topology has no entry for it.
    #[error("processor {0:?} is not configured in the topology")]
    NotConfigured(String),
}

/// The table a fold processor writes for its projection version.
pub fn projection_table(processor: &str, version: u32) -> String {
    format!("{processor}_v{version}")
}

fn window(spec: &ProcessorSpec) -> chrono::Duration {
    chrono::Duration::from_std(spec.dedupe_window).unwrap_or(chrono::Duration::MAX)
}

/// Every store table of projection version `version` of processor `name`.
pub fn tables(name: &str, version: u32) -> Vec<String> {
    match name {
        "identity" => {
            let t = IdentityTables::for_version(version);
            vec![t.links, t.persons]
        }
        "person" => vec![projection_table(name, version), history_table(version)],
        _ => vec![projection_table(name, version)],
    }
}

/// Builds the handler of projection version `v` of processor `name` as
/// configured in `topology`.
pub fn handler(
    name: &str,
    v: u32,
    topology: &Topology,
    validator: &Arc<Validator>,
) -> Result<Arc<dyn Handler>, RegistryError> {
    let spec = topology
        .processor(name)
        .ok_or_else(|| RegistryError::NotConfigured(name.to_owned()))?;
    let table = projection_table(name, v);
    Ok(match name {
        "identity" => Arc::new(IdentityHandler::new(
            validator.clone(),
            IdentityTables::for_version(v),
            topology.topics.events.name.clone(),
        )),
        // The person processor also keeps each person's event history.
        "person" => Arc::new(WithHistory::new(
            Arc::new(ProjectionHandler::new(
                name,
                table,
                PersonFold,
                window(spec),
            )),
            history_table(v),
            window(spec),
        )),
        "interactions" => {
            let retention = chrono::Duration::from_std(spec.retention_or_default())
                .unwrap_or(chrono::Duration::MAX);
            Arc::new(ProjectionHandler::new(
                name,
                table,
                InteractionsFold::new(retention),
                window(spec),
            ))
        }
        "journey" => Arc::new(ProjectionHandler::new(
            name,
            table,
            JourneyFold,
            window(spec),
        )),
        "learning" => Arc::new(ProjectionHandler::new(
            name,
            table,
            LearningFold,
            window(spec),
        )),
        other => {
            return Err(RegistryError::Unknown {
                name: other.to_owned(),
            })
        }
    })
}
