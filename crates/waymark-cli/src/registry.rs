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

    /// What every registered processor must satisfy; nothing here names a
    /// processor, so adding one changes no test.
    #[test]
    fn every_processor_is_configured_wired_and_owns_its_tables() {
        let r = builtin();
        let names = r.names();
        assert_eq!(
            names[0],
            waymark_identity::NAME,
            "the inputs' processor first"
        );
        // The repository's topology.yaml and the file on disk configure
        // exactly the registered processors, wired as they declare.
        let topology = default_topology().unwrap_or_else(|e| panic!("{e}"));
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../topology.yaml");
        assert_eq!(load_topology(&path).unwrap(), topology);
        assert_eq!(r.configured(&topology), names);
        let mut all_tables = std::collections::BTreeSet::new();
        for name in &names {
            let input = r.input_topic(name, &topology).unwrap();
            let handler = r
                .handler(
                    name,
                    7,
                    &topology,
                    &std::sync::Arc::new(waymark_schemas::Validator::new().unwrap()),
                )
                .unwrap();
            assert_eq!(handler.processor(), *name);
            // The handler writes exactly the declared tables, each named
            // `<name>_v<version>[_suffix]`, none shared.
            let declared = r.tables(name, 7);
            assert_eq!(handler.tables(), declared, "{name}");
            for table in &declared {
                assert!(table.starts_with(&format!("{name}_v7")), "{table}");
                assert!(all_tables.insert(table.clone()), "{table} twice");
            }
            assert!(!input.is_empty());
        }
    }

    #[test]
    fn the_repository_topology_wires_identity_then_the_folds() {
        let topology = default_topology().unwrap();
        let r = registry();
        assert_eq!(
            r.input_topic(waymark_identity::NAME, &topology).unwrap(),
            topology.topics.inputs.name
        );
        for name in r.names().into_iter().skip(1) {
            assert_eq!(
                r.input_topic(name, &topology).unwrap(),
                topology.topics.events.name,
                "{name}"
            );
        }
        // Today's tables keep their names (stored data depends on them).
        assert_eq!(
            r.tables("identity", 1),
            [
                "identity_v1_links",
                "identity_v1_persons",
                "identity_v1_resolutions"
            ]
        );
        assert_eq!(r.tables("person", 1), ["person_v1", "person_v1_history"]);
        assert_eq!(r.tables("interactions", 2), ["interactions_v2"]);
    }
}
