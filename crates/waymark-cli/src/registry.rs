//! The processor registry: one explicit table of name → handler factory.

use std::sync::Arc;

use waymark_interactions::InteractionsFold;
use waymark_journey::JourneyFold;
use waymark_learning::LearningFold;
use waymark_person::PersonFold;
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

/// Builds the handler of processor `name` as configured in `topology`.
pub fn handler(
    name: &str,
    topology: &Topology,
    validator: &Arc<Validator>,
) -> Result<Arc<dyn Handler>, RegistryError> {
    let spec = topology
        .processor(name)
        .ok_or_else(|| RegistryError::NotConfigured(name.to_owned()))?;
    let v = spec.projection_version;
    let table = projection_table(name, v);
    Ok(match name {
        "identity" => Arc::new(IdentityHandler::new(
            validator.clone(),
            IdentityTables::for_version(v),
            topology.topics.events.name.clone(),
        )),
        "person" => Arc::new(ProjectionHandler::new(
            name,
            table,
            PersonFold,
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
