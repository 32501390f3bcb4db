//! `topology.yaml`: the topics, the processors and how they are wired,
//! parsed strictly.
//!
//! ```
//! use waymark_topology::{ParamKind, ParamSpec, ProcessorDecl};
//! // What the binary's processor registry declares (simplified): the
//! // names, and `interactions`' own parameters.
//! let mut known = ["identity", "person", "interactions", "journey", "learning"]
//!     .map(ProcessorDecl::named);
//! known[2].params = &[
//!     ParamSpec { name: "retention", kind: ParamKind::Duration },
//!     ParamSpec { name: "max_bytes", kind: ParamKind::Bytes },
//!     ParamSpec { name: "chunk_bytes", kind: ParamKind::Bytes },
//! ];
//! let topology = waymark_topology::Topology::default_for(&known)?;
//! assert_eq!(topology.topics.events.name, "waymark.events");
//! assert_eq!(topology.processor("identity").unwrap().inputs, ["waymark.inputs"]);
//! # Ok::<(), waymark_topology::TopologyErrors>(())
//! ```
//!
//! # Layout
//! - [`parse`] / [`load`] / [`Topology::default_for`]: the entry points;
//!   [`default_yaml`] is the repository's `topology.yaml`, built in.
//! - `model.rs`: the parsed data ([`Topology`], [`Topics`], [`TopicSpec`],
//!   [`ProcessorSpec`]), what a processor declares to the parser
//!   ([`ProcessorDecl`]: its wiring and its own parameters) and the one
//!   common default, [`DEFAULT_DEDUPE_WINDOW`].
//! - `parse.rs`: the parser. It walks a `marked-yaml` node tree, which keeps
//!   the line and column of every node, instead of deserializing with serde,
//!   so that it can report every mistake at once rather than the first.
//! - `duration.rs`: the duration syntax (`<n>ms|s|m|h|d|w`, `forever`);
//!   `size.rs`: the byte-size syntax (`<n>[B|KiB|MiB|GiB]`).
//! - `error.rs`: [`TopologyErrors`] (a parse) and [`LoadError`] (a load).
//!
//! # Guarantees
//! - Strict: an unknown field, a missing required field, a value of the
//!   wrong type (`"6"` is a string, not a number), a bad duration, a
//!   partition count or projection version below 1, a topic name Kafka
//!   would refuse, two topics with one name, a processor input or output
//!   that is not a declared topic, `inputs`/`outputs` other than the roles
//!   the processor declares it reads and writes, a parameter of another
//!   processor (e.g. `retention` on `journey`) or of the wrong type, an
//!   unknown processor (the message lists the known ones) and a known
//!   processor missing from the file are all errors. Duplicate YAML keys, anchors, aliases and tags are refused.
//! - Every error is reported in one [`TopologyErrors`], in file order, each
//!   as `file:line:column: message` (1-based, lowercase, no trailing
//!   period). Only a YAML syntax error or duplicate key stops the walk,
//!   since the tree after it cannot be trusted.
//! - Common defaults live in `model.rs` (`compaction` false,
//!   `dedupe_window` 7 days); a processor's own parameters have their
//!   defaults in the processor's crate (an unset one is absent from
//!   [`ProcessorSpec::params`]).
//! - No IO except [`load`], which reads one file.

mod duration;
mod error;
mod model;
mod parse;
mod size;

use std::path::Path;

pub use duration::{
    format_duration, parse_duration, parse_retention, DurationError, Retention, MAX_DURATION,
};
pub use error::{LoadError, TopologyError, TopologyErrorKind, TopologyErrors};
pub use model::{
    ParamKind, ParamSpec, ParamValue, ProcessorDecl, ProcessorSpec, TopicRole, TopicSpec, Topics,
    Topology, COMMON_PROCESSOR_FIELDS, DEFAULT_DEDUPE_WINDOW,
};
pub use size::{format_size, parse_size, SizeError};

/// The name used in error locations for text given to [`parse`].
pub const DEFAULT_ORIGIN: &str = "topology.yaml";

/// The name used in error locations for [`default_yaml`].
const BUILT_IN_ORIGIN: &str = "<built-in topology.yaml>";

/// The repository's `topology.yaml`, compiled into the binary: the topology
/// used when no file is given.
pub fn default_yaml() -> &'static str {
    include_str!("../../../topology.yaml")
}

/// Parses a topology from `text`, naming it [`DEFAULT_ORIGIN`] in errors.
///
/// `known_processors` are the processors the binary has (its processor
/// registry): each must be configured in the file, wired as it declares,
/// and the file may configure no other.
pub fn parse(text: &str, known_processors: &[ProcessorDecl]) -> Result<Topology, TopologyErrors> {
    parse_with_origin(text, DEFAULT_ORIGIN, known_processors)
}

/// Like [`parse`], naming the text `origin` (e.g. its path) in errors.
pub fn parse_with_origin(
    text: &str,
    origin: &str,
    known_processors: &[ProcessorDecl],
) -> Result<Topology, TopologyErrors> {
    parse::parse(text, origin, known_processors)
}

/// Reads and parses the topology file at `path`; errors name the path as
/// given.
pub fn load(path: &Path, known_processors: &[ProcessorDecl]) -> Result<Topology, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let origin = path.display().to_string();
    Ok(parse_with_origin(&text, &origin, known_processors)?)
}

impl Topology {
    /// Parses the built-in [`default_yaml`].
    pub fn default_for(known_processors: &[ProcessorDecl]) -> Result<Topology, TopologyErrors> {
        parse_with_origin(default_yaml(), BUILT_IN_ORIGIN, known_processors)
    }
}

#[cfg(test)]
mod tests;
