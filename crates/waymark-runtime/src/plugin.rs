//! Processor plugins: what a processor crate provides so the rest of
//! Waymark can run it without naming it.
//!
//! A processor crate implements [`ProcessorFactory`] once: its name, the
//! topics it reads and writes (by role), its own parameters (its section of
//! `topology.yaml`), the tables it declares (with what a row's key is and
//! which log position a row reflects) and how to build its [`Handler`] for
//! one projection version. The binary lists the factories in one
//! [`Registry`]; topology validation, table creation, the controller,
//! `verify`, metrics and the query side all take processor names and
//! tables from it. `docs/extending.md` walks through adding one.
//!
//! # Table names
//! Version `N` of processor `p` stores table spec `suffix` in
//! [`table_name`]`(p, N, suffix)`: `p_vN` for the empty suffix (the main
//! table of a fold), `p_vN_suffix` otherwise (e.g. `identity_v1_links`).
//! Nothing else builds table names.
//!
//! # Sub-keyed tables
//! A processor may store several rows per key of its input (a person's
//! history, one row per event; a person's interactions in chunks): their keys are
//! `<head key>/<sub key>`, next to the head row `<head key>`, whose
//! position moves with every change of its sub rows. `verify` relies on
//! it: a sub row that live processing deleted after verify's snapshot is
//! recognized by its head having moved on.

use std::fmt;
use std::sync::Arc;

use waymark_core::{Fold, Position};
use waymark_schemas::Validator;
use waymark_topology::{ParamSpec, ProcessorDecl, ProcessorSpec, TopicRole, Topology};

use crate::handler::{Handler, ProjectionHandler};

/// The log position a stored row reflects, read from its key and value
/// bytes (after the row header of [`crate::row`]; `None` when the row
/// records none, e.g. identity links).
pub type RowPosition = fn(key: &str, row: &[u8]) -> Option<Position>;

/// One table a processor declares.
#[derive(Clone, Copy)]
pub struct TableSpec {
    /// The name's suffix after `<processor>_v<N>`; empty for a fold's main
    /// table.
    pub suffix: &'static str,
    /// What a row's key is, in words (e.g. "person id").
    pub key: &'static str,
    /// The log position a row reflects. `verify` uses it to tell a row that
    /// live processing moved past its snapshot from a wrong one.
    pub position: RowPosition,
    /// Whether its rows are a fold of the log that `verify` recomputes and
    /// compares; `false` for the processor's own bookkeeping, which depends
    /// on how the log was applied (e.g. identity's resolutions).
    pub verified: bool,
}

impl fmt::Debug for TableSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableSpec")
            .field("suffix", &self.suffix)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TableSpec {
    /// A table of [`waymark_core::Tracked`] rows, which start with the
    /// position they reflect (every fold's table).
    pub const fn tracked(suffix: &'static str, key: &'static str) -> Self {
        Self {
            suffix,
            key,
            position: tracked_position,
            verified: true,
        }
    }

    /// A table whose rows record no log position.
    pub const fn unpositioned(suffix: &'static str, key: &'static str) -> Self {
        Self {
            suffix,
            key,
            position: no_position,
            verified: true,
        }
    }

    /// A table of the processor's bookkeeping: not a fold of the log, so
    /// `verify` does not compare it (it is still versioned and dropped with
    /// its version).
    pub const fn bookkeeping(suffix: &'static str, key: &'static str) -> Self {
        Self {
            suffix,
            key,
            position: no_position,
            verified: false,
        }
    }

    /// This table's name in version `version` of `processor`.
    pub fn name(&self, processor: &str, version: u32) -> String {
        table_name(processor, version, self.suffix)
    }
}

/// The name of table `suffix` of version `version` of `processor` (see the
/// module docs).
pub fn table_name(processor: &str, version: u32, suffix: &str) -> String {
    if suffix.is_empty() {
        format!("{processor}_v{version}")
    } else {
        format!("{processor}_v{version}_{suffix}")
    }
}

/// The position at the start of the value of a
/// [`waymark_core::Tracked`] row.
pub fn tracked_position(_key: &str, row: &[u8]) -> Option<Position> {
    let (position, _): (Option<Position>, _) = postcard::take_from_bytes(row).ok()?;
    position
}

fn no_position(_key: &str, _row: &[u8]) -> Option<Position> {
    None
}

/// Why a processor's handler could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The name is not in the registry.
    #[error("unknown processor {name:?}; known processors: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The registry's names, comma-separated.
        known: String,
    },
    /// The topology has no entry for it.
    #[error("processor {0:?} is not configured in the topology")]
    NotConfigured(String),
    /// The topology's entry does not fit the processor.
    #[error("processor {processor}: {reason}")]
    Invalid {
        /// The processor.
        processor: String,
        /// What does not fit.
        reason: String,
    },
}

/// What a factory builds a handler from: one projection version of one
/// processor as the topology configures it.
pub struct BuildContext<'a> {
    name: &'static str,
    version: u32,
    encoding: u32,
    spec: &'a ProcessorSpec,
    topology: &'a Topology,
    validator: &'a Arc<Validator>,
}

impl<'a> BuildContext<'a> {
    /// The processor's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The state encoding its rows are written with
    /// ([`ProcessorFactory::state_encoding`]).
    pub fn encoding(&self) -> u32 {
        self.encoding
    }

    /// The projection version being built.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The processor's entry in `topology.yaml` (its parameters are in
    /// [`ProcessorSpec::params`]).
    pub fn spec(&self) -> &'a ProcessorSpec {
        self.spec
    }

    /// The schema validator of raw input (for processors reading the
    /// inputs topic).
    pub fn validator(&self) -> &'a Arc<Validator> {
        self.validator
    }

    /// The name of this version's table `suffix`.
    pub fn table(&self, suffix: &str) -> String {
        table_name(self.name, self.version, suffix)
    }

    /// The dedupe window, as the folds measure it.
    pub fn dedupe_window(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.spec.dedupe_window).unwrap_or(chrono::Duration::MAX)
    }

    /// The topic of `role` this processor writes, as its `outputs` in the
    /// topology list it.
    pub fn output(&self, role: TopicRole) -> Result<String, BuildError> {
        let name = &self.topology.topics.get(role).name;
        if self.spec.outputs.iter().any(|o| o == name) {
            Ok(name.clone())
        } else {
            Err(BuildError::Invalid {
                processor: self.name.to_owned(),
                reason: format!("its outputs must list the {role} topic {name}"),
            })
        }
    }

    /// A handler running `fold` over this version's main table.
    pub fn fold<F: Fold>(&self, fold: F) -> Arc<dyn Handler> {
        Arc::new(ProjectionHandler::new(
            self.name,
            self.table(""),
            self.encoding,
            fold,
            self.dedupe_window(),
        ))
    }
}

/// A processor as a plugin: everything Waymark needs to know to configure,
/// run, verify and drop it.
pub trait ProcessorFactory: Send + Sync + 'static {
    /// Its name: its key in `topology.yaml`, its metrics label, its tables'
    /// prefix.
    fn name(&self) -> &'static str;

    /// The role of the topic it reads (its `inputs`). Folds read the events.
    fn input(&self) -> TopicRole {
        TopicRole::Events
    }

    /// The roles of the topics it writes (its `outputs`). Every processor
    /// writes dead letters.
    fn outputs(&self) -> &'static [TopicRole] {
        &[TopicRole::Dlq]
    }

    /// Its own parameters in `topology.yaml`, beyond the common fields.
    fn params(&self) -> &'static [ParamSpec] {
        &[]
    }

    /// The tables every version of it writes.
    fn tables(&self) -> &'static [TableSpec];

    /// The encoding of its stored rows (see [`crate::row`]): a number its
    /// crate raises whenever the stored shape of any of its rows changes
    /// (a field added, removed, reordered or retyped), so that versions
    /// stored in the old shape are detected instead of misread. Its golden
    /// stored-bytes test fails until it is raised.
    fn state_encoding(&self) -> u32;

    /// Builds the handler of one projection version.
    fn build(&self, ctx: &BuildContext<'_>) -> Result<Arc<dyn Handler>, BuildError>;
}

/// Every processor the binary has, in order (the inputs' processor first).
#[derive(Clone)]
pub struct Registry {
    factories: Vec<Arc<dyn ProcessorFactory>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Registry {
    /// A registry of `factories`, in the order given (listing and metrics
    /// follow it).
    ///
    /// # Panics
    /// When two factories have one name: a programming error of the
    /// binary's registry, caught by its tests.
    pub fn new(factories: Vec<Arc<dyn ProcessorFactory>>) -> Self {
        for (i, f) in factories.iter().enumerate() {
            assert!(
                factories[..i].iter().all(|g| g.name() != f.name()),
                "processor {} registered twice",
                f.name()
            );
        }
        Self { factories }
    }

    /// Adds a factory (tests and embedders extending the built-in set).
    pub fn with(mut self, factory: Arc<dyn ProcessorFactory>) -> Self {
        self.factories.push(factory);
        Self::new(self.factories)
    }

    /// The names, in registry order.
    pub fn names(&self) -> Vec<&'static str> {
        self.factories.iter().map(|f| f.name()).collect()
    }

    /// The factory named `name`.
    pub fn get(&self, name: &str) -> Option<&dyn ProcessorFactory> {
        self.factories
            .iter()
            .find(|f| f.name() == name)
            .map(|f| f.as_ref())
    }

    /// Whether `name` is a processor of this registry.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The factory named `name`, or the error listing the known names.
    pub fn require(&self, name: &str) -> Result<&dyn ProcessorFactory, BuildError> {
        self.get(name).ok_or_else(|| BuildError::Unknown {
            name: name.to_owned(),
            known: self.names().join(", "),
        })
    }

    /// What the topology parser must know of each processor.
    pub fn declarations(&self) -> Vec<ProcessorDecl> {
        self.factories
            .iter()
            .map(|f| ProcessorDecl {
                name: f.name(),
                input: Some(f.input()),
                outputs: Some(f.outputs()),
                params: f.params(),
            })
            .collect()
    }

    /// The processors `topology` configures, in registry order.
    pub fn configured<'a>(&'a self, topology: &'a Topology) -> Vec<&'static str> {
        self.names()
            .into_iter()
            .filter(|n| topology.processor(n).is_some())
            .collect()
    }

    /// Every table of version `version` of `name` (none for an unknown name).
    pub fn tables(&self, name: &str, version: u32) -> Vec<String> {
        self.get(name)
            .map(|f| f.tables().iter().map(|t| t.name(name, version)).collect())
            .unwrap_or_default()
    }

    /// The state encoding of `name`'s rows (none for an unknown name).
    pub fn encoding(&self, name: &str) -> Option<u32> {
        self.get(name).map(|f| f.state_encoding())
    }

    /// The spec of `table` of version `version` of `name`.
    pub fn table_spec(&self, name: &str, version: u32, table: &str) -> Option<TableSpec> {
        self.get(name)?
            .tables()
            .iter()
            .find(|t| t.name(name, version) == table)
            .copied()
    }

    /// Builds the handler of version `version` of `name` as `topology`
    /// configures it.
    pub fn handler(
        &self,
        name: &str,
        version: u32,
        topology: &Topology,
        validator: &Arc<Validator>,
    ) -> Result<Arc<dyn Handler>, BuildError> {
        let factory = self.require(name)?;
        let spec = topology
            .processor(name)
            .ok_or_else(|| BuildError::NotConfigured(name.to_owned()))?;
        factory.build(&BuildContext {
            name: factory.name(),
            version,
            encoding: factory.state_encoding(),
            spec,
            topology,
            validator,
        })
    }

    /// The topic version `name` reads, as the topology configures it.
    pub fn input_topic(&self, name: &str, topology: &Topology) -> Result<String, BuildError> {
        let factory = self.require(name)?;
        let spec = topology
            .processor(name)
            .ok_or_else(|| BuildError::NotConfigured(name.to_owned()))?;
        let expected = &topology.topics.get(factory.input()).name;
        match spec.inputs.as_slice() {
            [only] if only == expected => Ok(only.clone()),
            _ => Err(BuildError::Invalid {
                processor: name.to_owned(),
                reason: format!(
                    "its inputs must be [{expected}], the {} topic",
                    factory.input()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(table_name("journey", 2, ""), "journey_v2");
        assert_eq!(table_name("identity", 1, "links"), "identity_v1_links");
        let spec = TableSpec::tracked("history", "person id");
        assert_eq!(spec.name("person", 3), "person_v3_history");
    }

    #[test]
    fn tracked_rows_start_with_their_position() {
        let row = waymark_core::Tracked {
            position: Some(Position::new(2, 9)),
            state: 5u32,
            ..Default::default()
        };
        let bytes = crate::row::encode_row(1, &row);
        let (_, value) = crate::row::row_payload(&bytes).unwrap();
        assert_eq!(tracked_position("k", value), Some(Position::new(2, 9)));
        assert_eq!(tracked_position("k", &[]), None);
    }
}
