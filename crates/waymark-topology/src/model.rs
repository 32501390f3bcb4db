//! The parsed topology: plain data, no IO.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::duration::{serialize_duration, Retention};

/// `dedupe_window` when a processor does not set it: 7 days (contract §4).
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3_600);

/// The fields every processor entry has; a processor's own parameters
/// ([`ProcessorDecl::params`]) come after them.
pub const COMMON_PROCESSOR_FIELDS: &[&str] =
    &["inputs", "outputs", "projection_version", "dedupe_window"];

/// What a processor known to the binary declares to the parser: its name,
/// how it must be wired and the parameters of its own (its section of
/// `topology.yaml` beyond [`COMMON_PROCESSOR_FIELDS`]). The binary's
/// processor registry builds one per processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessorDecl {
    /// The processor's name, its key under `processors:`.
    pub name: &'static str,
    /// The role of the one topic it reads, when it insists on one: its
    /// `inputs` must then be exactly that topic.
    pub input: Option<TopicRole>,
    /// The roles of the topics it writes, when it says: its `outputs` must
    /// then list exactly those topics.
    pub outputs: Option<&'static [TopicRole]>,
    /// Its own parameters.
    pub params: &'static [ParamSpec],
}

impl ProcessorDecl {
    /// A processor with no wiring constraints and no parameters.
    pub const fn named(name: &'static str) -> Self {
        Self {
            name,
            input: None,
            outputs: None,
            params: &[],
        }
    }
}

/// One parameter of a processor's own (see [`ProcessorDecl`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec {
    /// Its field name.
    pub name: &'static str,
    /// The type of its value.
    pub kind: ParamKind,
}

/// The type of a processor parameter's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParamKind {
    /// A duration such as `365d` (see [`crate::parse_duration`]).
    Duration,
    /// A byte size such as `256KiB` (see [`crate::parse_size`]).
    Bytes,
}

/// A processor parameter's value as read from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum ParamValue {
    /// A [`ParamKind::Duration`].
    Duration(#[serde(serialize_with = "serialize_duration")] Duration),
    /// A [`ParamKind::Bytes`].
    Bytes(#[serde(serialize_with = "crate::size::serialize_size")] u64),
}

/// The whole of `topology.yaml`: the topics and the processors wired to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// The three topics of contract §1, by role.
    pub topics: Topics,
    /// Every processor, by name (`identity`, `person`, …).
    pub processors: BTreeMap<String, ProcessorSpec>,
}

impl Topology {
    /// The topic with this Kafka name (e.g. `waymark.events`), if declared.
    pub fn topic(&self, name: &str) -> Option<&TopicSpec> {
        self.topics
            .iter()
            .map(|(_, spec)| spec)
            .find(|spec| spec.name == name)
    }

    /// The processor with this name (e.g. `journey`), if configured.
    pub fn processor(&self, name: &str) -> Option<&ProcessorSpec> {
        self.processors.get(name)
    }

    /// The names of the processors that consume the topic named `topic`, in
    /// name order.
    pub fn consumers_of<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.processors
            .iter()
            .filter(move |(_, spec)| spec.inputs.iter().any(|t| t == topic))
            .map(|(name, _)| name.as_str())
    }
}

/// The role of a topic (contract §1). The roles are fixed; the names are
/// configurable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicRole {
    /// Raw events from producers (`waymark.inputs` by default).
    Inputs,
    /// Resolved, valid events (`waymark.events` by default).
    Events,
    /// Dead letters (`waymark.dlq` by default).
    Dlq,
}

impl TopicRole {
    /// Every role, in file order.
    pub const ALL: [TopicRole; 3] = [TopicRole::Inputs, TopicRole::Events, TopicRole::Dlq];

    /// The key of the role under `topics:` (`inputs`, `events`, `dlq`).
    pub fn as_str(self) -> &'static str {
        match self {
            TopicRole::Inputs => "inputs",
            TopicRole::Events => "events",
            TopicRole::Dlq => "dlq",
        }
    }
}

impl fmt::Display for TopicRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `topics:` section: one topic per role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topics {
    /// Raw events from producers.
    pub inputs: TopicSpec,
    /// Events with `person_id` resolved; the log every projection folds.
    pub events: TopicSpec,
    /// Dead letters.
    pub dlq: TopicSpec,
}

impl Topics {
    /// The topic of a role.
    pub fn get(&self, role: TopicRole) -> &TopicSpec {
        match role {
            TopicRole::Inputs => &self.inputs,
            TopicRole::Events => &self.events,
            TopicRole::Dlq => &self.dlq,
        }
    }

    /// Every topic with its role, in file order.
    pub fn iter(&self) -> impl Iterator<Item = (TopicRole, &TopicSpec)> {
        TopicRole::ALL
            .into_iter()
            .map(|role| (role, self.get(role)))
    }
}

/// One topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicSpec {
    /// The Kafka topic name.
    pub name: String,
    /// Number of partitions, at least 1.
    pub partitions: u32,
    /// How long records are kept.
    pub retention: Retention,
    /// Whether the topic is log-compacted (default `false`).
    pub compaction: bool,
}

/// One processor: what it reads and writes, and its projection settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessorSpec {
    /// Names of the topics it consumes; at least one, each a declared topic.
    pub inputs: Vec<String>,
    /// Names of the topics it may produce to, each a declared topic.
    pub outputs: Vec<String>,
    /// Version of its projections, at least 1.
    pub projection_version: u32,
    /// Window of event time within which a repeated event id is ignored
    /// (default [`DEFAULT_DEDUPE_WINDOW`]).
    #[serde(serialize_with = "serialize_duration")]
    pub dedupe_window: Duration,
    /// The processor's own parameters set in the file (see
    /// [`ProcessorDecl::params`]), by name; a parameter the file does not
    /// set is absent and the processor applies its default.
    #[serde(flatten)]
    pub params: BTreeMap<String, ParamValue>,
}

impl ProcessorSpec {
    /// The duration parameter `name`, when the file sets it.
    pub fn duration_param(&self, name: &str) -> Option<Duration> {
        match self.params.get(name)? {
            ParamValue::Duration(d) => Some(*d),
            _ => None,
        }
    }

    /// The byte-size parameter `name`, when the file sets it.
    pub fn bytes_param(&self, name: &str) -> Option<u64> {
        match self.params.get(name)? {
            ParamValue::Bytes(b) => Some(*b),
            _ => None,
        }
    }
}
