//! The processor registry: every processor this binary runs, one line
//! each (see `docs/extending.md`). Everything else — topology validation,
//! tables, the controller, verify, metrics, the query side — takes
//! processor names and tables from it.

use std::sync::{Arc, OnceLock};

use waymark_runtime::plugin::Registry;

/// Every processor of the binary, the inputs' processor first.
pub fn builtin() -> Registry {
    Registry::new(vec![
        Arc::new(waymark_identity::IdentityProcessor),
        Arc::new(waymark_person::PersonProcessor),
        Arc::new(waymark_interactions::InteractionsProcessor),
        Arc::new(waymark_journey::JourneyProcessor),
        Arc::new(waymark_learning::LearningProcessor),
    ])
}

/// The [`builtin`] registry, built once.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(builtin)
}

/// The topology of the repository's `topology.yaml` for the [`builtin`]
/// processors.
pub fn default_topology() -> anyhow::Result<waymark_topology::Topology> {
    waymark_topology::Topology::default_for(&registry().declarations())
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Reads the topology at `path` for the [`builtin`] processors.
pub fn load_topology(path: &std::path::Path) -> anyhow::Result<waymark_topology::Topology> {
    waymark_topology::load(path, &registry().declarations()).map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_processors_and_their_tables() {
        let r = builtin();
        assert_eq!(
            r.names(),
            ["identity", "person", "interactions", "journey", "learning"]
        );
        assert_eq!(
            r.tables("identity", 2),
            ["identity_v2_links", "identity_v2_persons"]
        );
        assert_eq!(r.tables("person", 1), ["person_v1", "person_v1_history"]);
        assert_eq!(r.tables("journey", 3), ["journey_v3"]);
        let topology = default_topology().unwrap();
        assert_eq!(r.configured(&topology), r.names());
        assert_eq!(
            r.input_topic("identity", &topology).unwrap(),
            "waymark.inputs"
        );
        assert_eq!(
            r.input_topic("learning", &topology).unwrap(),
            "waymark.events"
        );
    }
}
