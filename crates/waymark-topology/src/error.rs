//! Errors of [`parse`](crate::parse) and [`load`](crate::load).

use std::fmt;
use std::path::PathBuf;

use crate::duration::DurationError;
use crate::model::TopicRole;

/// Every problem found in a topology file, in file order. Displayed one
/// error per line, each as `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", Lines(.errors))]
pub struct TopologyErrors {
    errors: Vec<TopologyError>,
}

impl TopologyErrors {
    pub(crate) fn new(mut errors: Vec<TopologyError>) -> Self {
        // Stable: errors at the same place keep the order they were found in.
        errors.sort_by_key(|e| (e.line, e.column));
        Self { errors }
    }

    /// The errors, in file order (line, then column).
    pub fn as_slice(&self) -> &[TopologyError] {
        &self.errors
    }

    /// An iterator over the errors, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, TopologyError> {
        self.errors.iter()
    }

    /// How many errors were found (never zero).
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Always `false`: a [`TopologyErrors`] holds at least one error.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

impl IntoIterator for TopologyErrors {
    type Item = TopologyError;
    type IntoIter = std::vec::IntoIter<TopologyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

impl<'a> IntoIterator for &'a TopologyErrors {
    type Item = &'a TopologyError;
    type IntoIter = std::slice::Iter<'a, TopologyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

/// Displays errors one per line.
struct Lines<'a>(&'a [TopologyError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// One problem in a topology file and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {kind}")]
#[non_exhaustive]
pub struct TopologyError {
    /// The file (its path, or a name such as `topology.yaml` for text).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub kind: TopologyErrorKind,
}

/// What is wrong at a [`TopologyError`]'s location. Field paths are dotted,
/// e.g. `processors.person.inputs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyErrorKind {
    /// The text is not valid YAML (or uses anchors, aliases or tags, which
    /// are not supported). No other error is reported with it.
    #[error("invalid yaml: {reason}")]
    Yaml {
        /// What the YAML parser said.
        reason: String,
    },
    /// The same key twice in one mapping. No other error is reported with it.
    #[error("duplicate key `{key}`, first defined at {first_line}:{first_column}")]
    DuplicateKey {
        /// The key.
        key: String,
        /// Line of the first definition.
        first_line: usize,
        /// Column of the first definition.
        first_column: usize,
    },
    /// A field that does not exist there (often a typo).
    #[error("unknown field `{field}`, expected one of: {}", .expected.join(", "))]
    UnknownField {
        /// The field's path.
        field: String,
        /// The fields allowed there.
        expected: Vec<&'static str>,
    },
    /// A required field is absent.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field's path.
        field: String,
    },
    /// A value of the wrong type.
    #[error("`{field}` must be {expected}, found {found}")]
    InvalidType {
        /// The field's path.
        field: String,
        /// What is expected, e.g. `a whole number`.
        expected: &'static str,
        /// What was found, e.g. `` `six` `` or `a list`.
        found: String,
    },
    /// A number below its minimum.
    #[error("`{field}` must be at least {min}, found {found}")]
    TooSmall {
        /// The field's path.
        field: String,
        /// The smallest value allowed.
        min: u64,
        /// The value as written.
        found: String,
    },
    /// A number above its maximum.
    #[error("`{field}` must be at most {max}, found {found}")]
    TooLarge {
        /// The field's path.
        field: String,
        /// The largest value allowed.
        max: u64,
        /// The value as written.
        found: String,
    },
    /// A string that is not a valid duration.
    #[error("invalid duration `{value}` for `{field}`: {reason}")]
    InvalidDuration {
        /// The field's path.
        field: String,
        /// The value as written.
        value: String,
        /// Why it is invalid.
        reason: DurationError,
    },
    /// A string that is not a valid byte size.
    #[error("invalid size `{value}` for `{field}`: {reason}")]
    InvalidSize {
        /// The field's path.
        field: String,
        /// The value as written.
        value: String,
        /// Why it is invalid.
        reason: crate::SizeError,
    },
    /// A topic name Kafka would not accept.
    #[error("invalid topic name `{name}` for `{field}`: {reason}")]
    InvalidTopicName {
        /// The field's path.
        field: String,
        /// The name as written.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// Two topic roles with the same name.
    #[error("topic name `{name}` of `{field}` is already used by `{first}`")]
    DuplicateTopicName {
        /// The path of the second use.
        field: String,
        /// The name.
        name: String,
        /// The path of the first use.
        first: String,
    },
    /// A processor input or output that is not one of the declared topics.
    #[error("unknown topic `{name}` in `{field}`, declared topics: {}", .declared.join(", "))]
    UnknownTopic {
        /// The list's path.
        field: String,
        /// The name as written.
        name: String,
        /// The names declared under `topics`.
        declared: Vec<String>,
    },
    /// The same topic twice in one input or output list.
    #[error("topic `{name}` is listed more than once in `{field}`")]
    DuplicateTopicReference {
        /// The list's path.
        field: String,
        /// The name.
        name: String,
    },
    /// A processor without inputs.
    #[error("`{field}` must list at least one topic")]
    NoInputs {
        /// The list's path.
        field: String,
    },
    /// A processor the binary does not know.
    #[error("unknown processor `{name}`, known processors: {}", known_list(.known))]
    UnknownProcessor {
        /// The name as written.
        name: String,
        /// The processors the binary knows.
        known: Vec<String>,
    },
    /// A processor the binary knows but the file does not configure.
    #[error("missing processor `{name}` in `processors`")]
    MissingProcessor {
        /// The processor's name.
        name: String,
    },
    /// A parameter of some processors (e.g. `retention`) on one that does
    /// not have it.
    #[error("`{field}` is not supported, only these processors have a {param}: {}", .supported.join(", "))]
    ParamNotSupported {
        /// The field's path.
        field: String,
        /// The parameter's name.
        param: String,
        /// The processors that do have it.
        supported: Vec<&'static str>,
    },
    /// A processor's `inputs` that are not the one topic it reads.
    #[error("`{field}` must be [{expected}]: {processor} reads the {role} topic")]
    WrongInputs {
        /// The list's path.
        field: String,
        /// The processor.
        processor: String,
        /// The topic it reads.
        expected: String,
        /// That topic's role.
        role: TopicRole,
    },
    /// A processor's `outputs` that are not the topics it writes.
    #[error("`{field}` must be [{}]: {processor} writes exactly these topics", .expected.join(", "))]
    WrongOutputs {
        /// The list's path.
        field: String,
        /// The processor.
        processor: String,
        /// The topics it writes.
        expected: Vec<String>,
    },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "(none)".to_owned()
    } else {
        known.join(", ")
    }
}

/// Why [`load`](crate::load) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read topology file `{}`", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid topology.
    #[error(transparent)]
    Invalid(#[from] TopologyErrors),
}
