//! The strict parser: walks a `marked-yaml` node tree (which keeps the
//! position of every node) and collects every error instead of stopping at
//! the first one, as `serde` would.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode};
use marked_yaml::{LoadError as YamlError, LoaderOptions, Node, Span};

use crate::duration::{parse_duration, parse_retention, Retention};
use crate::error::{TopologyError, TopologyErrorKind as Kind, TopologyErrors};
use crate::model::{
    ParamKind, ParamValue, ProcessorDecl, ProcessorSpec, TopicRole, TopicSpec, Topics, Topology,
    COMMON_PROCESSOR_FIELDS, DEFAULT_DEDUPE_WINDOW,
};

const ROOT_FIELDS: &[&str] = &["topics", "processors"];
const TOPICS_FIELDS: &[&str] = &["inputs", "events", "dlq"];
const TOPIC_FIELDS: &[&str] = &["name", "partitions", "retention", "compaction"];

/// Kafka's limit on topic name length.
const MAX_TOPIC_NAME_LEN: usize = 249;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    line: usize,
    column: usize,
}

impl Loc {
    const START: Loc = Loc { line: 1, column: 1 };

    fn of_span(span: &Span, fallback: Loc) -> Loc {
        span.start().map_or(fallback, |m| Loc {
            line: m.line(),
            column: m.column(),
        })
    }

    /// Where a value is. An empty value (`key:` with nothing after it) has
    /// no position of its own (the parser puts it at the next token), so it
    /// is reported at its key, `key_at`.
    fn of_value(node: &Node, key_at: Loc) -> Loc {
        match node {
            Node::Scalar(s) if s.may_coerce() && s.as_str().is_empty() => key_at,
            _ => Loc::of_span(node.span(), key_at),
        }
    }

    fn of_marker(marker: &marked_yaml::Marker) -> Loc {
        Loc {
            line: marker.line(),
            column: marker.column(),
        }
    }
}

/// Collects errors for one file.
struct Ctx<'a> {
    origin: &'a str,
    errors: Vec<TopologyError>,
}

impl Ctx<'_> {
    fn error(&mut self, at: Loc, kind: Kind) {
        self.errors.push(TopologyError {
            file: self.origin.to_owned(),
            line: at.line,
            column: at.column,
            kind,
        });
    }
}

/// A mapping being read: its path, where it is (the key that owns it), and
/// its entries with their key positions.
struct Fields<'n> {
    path: String,
    at: Loc,
    entries: Vec<(&'n MarkedScalarNode, &'n Node)>,
}

impl<'n> Fields<'n> {
    /// Reads `map`, reporting every key that is not in `allowed`.
    fn new(
        ctx: &mut Ctx<'_>,
        map: &'n MarkedMappingNode,
        path: String,
        at: Loc,
        allowed: &[&'static str],
    ) -> Self {
        let entries: Vec<_> = map.iter().collect();
        for (key, _) in &entries {
            if !allowed.contains(&key.as_str()) {
                ctx.error(
                    Loc::of_span(key.span(), at),
                    Kind::UnknownField {
                        field: join(&path, key.as_str()),
                        expected: allowed.to_vec(),
                    },
                );
            }
        }
        Fields { path, at, entries }
    }

    /// The path of a field of this mapping.
    fn field(&self, name: &str) -> String {
        join(&self.path, name)
    }

    /// A field, with the position of its key.
    fn optional(&self, name: &str) -> Option<(Loc, &'n Node)> {
        self.entries
            .iter()
            .find(|(key, _)| key.as_str() == name)
            .map(|(key, value)| (Loc::of_span(key.span(), self.at), *value))
    }

    /// A field that must be present; reports it missing otherwise.
    fn required(&self, ctx: &mut Ctx<'_>, name: &str) -> Option<(Loc, &'n Node)> {
        let found = self.optional(name);
        if found.is_none() {
            ctx.error(
                self.at,
                Kind::MissingField {
                    field: self.field(name),
                },
            );
        }
        found
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// Parses `text`, naming it `origin` in errors.
pub(crate) fn parse(
    text: &str,
    origin: &str,
    known_processors: &[ProcessorDecl],
) -> Result<Topology, TopologyErrors> {
    let mut ctx = Ctx {
        origin,
        errors: Vec::new(),
    };
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true)
        .toplevel_mapping();
    let root = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(root) => root,
        Err(e) => {
            let (at, kind) = yaml_error(e);
            ctx.error(at, kind);
            return Err(TopologyErrors::new(ctx.errors));
        }
    };
    let topology = read_root(&mut ctx, &root, known_processors);
    match topology {
        Some(topology) if ctx.errors.is_empty() => Ok(topology),
        _ => {
            debug_assert!(!ctx.errors.is_empty(), "no topology and no error");
            Err(TopologyErrors::new(ctx.errors))
        }
    }
}

fn yaml_error(error: YamlError) -> (Loc, Kind) {
    let yaml = |marker: &marked_yaml::Marker, reason: &str| {
        (
            Loc::of_marker(marker),
            Kind::Yaml {
                reason: reason.to_owned(),
            },
        )
    };
    match error {
        YamlError::TopLevelMustBeMapping(m) | YamlError::TopLevelMustBeSequence(m) => {
            yaml(&m, "the top level must be a mapping")
        }
        YamlError::UnexpectedAnchor(m) => yaml(&m, "anchors and aliases are not supported"),
        YamlError::MappingKeyMustBeScalar(m) => yaml(&m, "mapping keys must be scalars"),
        YamlError::UnexpectedTag(m) => yaml(&m, "tags are not supported"),
        YamlError::ScanError(m, e) => yaml(&m, e.info()),
        YamlError::DuplicateKey(inner) => {
            let first = Loc::of_span(inner.prev_key.span(), Loc::START);
            (
                Loc::of_span(inner.key.span(), Loc::START),
                Kind::DuplicateKey {
                    key: inner.key.as_str().to_owned(),
                    first_line: first.line,
                    first_column: first.column,
                },
            )
        }
    }
}

fn read_root(ctx: &mut Ctx<'_>, root: &Node, known: &[ProcessorDecl]) -> Option<Topology> {
    // The loader guarantees a mapping at the top level.
    let map = expect_mapping(ctx, root, "topology", Loc::START)?;
    let fields = Fields::new(ctx, map, String::new(), Loc::START, ROOT_FIELDS);

    let topics = match fields.required(ctx, "topics") {
        Some((at, node)) => read_topics(ctx, node, at),
        None => TopicsRead::default(),
    };
    let processors = fields
        .required(ctx, "processors")
        .and_then(|(at, node)| read_processors(ctx, node, at, known, &topics));

    Some(Topology {
        topics: topics.topics?,
        processors: processors?,
    })
}

/// The `topics:` section as far as it could be read.
#[derive(Default)]
struct TopicsRead {
    topics: Option<Topics>,
    /// The declared topic names, or `None` when some name could not be
    /// read (then references to topics cannot be checked).
    names: Option<Vec<String>>,
}

fn read_topics(ctx: &mut Ctx<'_>, node: &Node, at: Loc) -> TopicsRead {
    let Some(map) = expect_mapping(ctx, node, "topics", at) else {
        return TopicsRead::default();
    };
    let fields = Fields::new(ctx, map, "topics".to_owned(), at, TOPICS_FIELDS);

    let mut specs = Vec::with_capacity(TopicRole::ALL.len());
    let mut names: Vec<String> = Vec::new();
    let mut names_complete = true;
    // name -> path of its first use, to report duplicates
    let mut seen: HashMap<String, String> = HashMap::new();
    for role in TopicRole::ALL {
        let read = fields
            .required(ctx, role.as_str())
            .map(|(at, node)| read_topic(ctx, node, fields.field(role.as_str()), at));
        let (name, spec) = match read {
            Some(TopicRead { name, spec }) => (name, spec),
            None => (None, None),
        };
        match name {
            Some((name_at, name)) => {
                let field = join(&fields.field(role.as_str()), "name");
                if let Some(first) = seen.get(&name) {
                    ctx.error(
                        name_at,
                        Kind::DuplicateTopicName {
                            field,
                            name,
                            first: first.clone(),
                        },
                    );
                } else {
                    seen.insert(name.clone(), field);
                    names.push(name);
                }
            }
            None => names_complete = false,
        }
        specs.push(spec);
    }

    let mut specs = specs.into_iter();
    let topics = match (specs.next(), specs.next(), specs.next()) {
        (Some(Some(inputs)), Some(Some(events)), Some(Some(dlq))) => Some(Topics {
            inputs,
            events,
            dlq,
        }),
        _ => None,
    };
    TopicsRead {
        topics,
        names: names_complete.then_some(names),
    }
}

/// One topic as far as it could be read: its name (with position) even when
/// another field is wrong, so that references can still be checked.
struct TopicRead {
    name: Option<(Loc, String)>,
    spec: Option<TopicSpec>,
}

fn read_topic(ctx: &mut Ctx<'_>, node: &Node, path: String, at: Loc) -> TopicRead {
    let Some(map) = expect_mapping(ctx, node, &path, at) else {
        return TopicRead {
            name: None,
            spec: None,
        };
    };
    let fields = Fields::new(ctx, map, path, at, TOPIC_FIELDS);

    let name = fields.required(ctx, "name").and_then(|(at, node)| {
        let field = fields.field("name");
        let name = expect_string(ctx, node, &field, at)?;
        let name_at = Loc::of_value(node, at);
        match topic_name_problem(name) {
            Some(reason) => {
                ctx.error(
                    name_at,
                    Kind::InvalidTopicName {
                        field,
                        name: name.to_owned(),
                        reason,
                    },
                );
                None
            }
            None => Some((name_at, name.to_owned())),
        }
    });
    let partitions = fields
        .required(ctx, "partitions")
        .and_then(|(at, node)| expect_positive_u32(ctx, node, &fields.field("partitions"), at));
    let retention = fields
        .required(ctx, "retention")
        .and_then(|(at, node)| expect_retention(ctx, node, &fields.field("retention"), at));
    let compaction = match fields.optional("compaction") {
        Some((at, node)) => expect_bool(ctx, node, &fields.field("compaction"), at),
        None => Some(false),
    };

    let spec = match (&name, partitions, retention, compaction) {
        (Some((_, name)), Some(partitions), Some(retention), Some(compaction)) => Some(TopicSpec {
            name: name.clone(),
            partitions,
            retention,
            compaction,
        }),
        _ => None,
    };
    TopicRead { name, spec }
}

/// Why Kafka would refuse this topic name, if it would.
fn topic_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name == "." || name == ".." {
        Some("must not be `.` or `..`")
    } else if name.len() > MAX_TOPIC_NAME_LEN {
        Some("must be at most 249 characters")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some("may contain only ascii letters, digits, `.`, `_` and `-`")
    } else {
        None
    }
}

fn read_processors(
    ctx: &mut Ctx<'_>,
    node: &Node,
    at: Loc,
    known: &[ProcessorDecl],
    topics: &TopicsRead,
) -> Option<BTreeMap<String, ProcessorSpec>> {
    let map = expect_mapping(ctx, node, "processors", at)?;
    // Every processor entry may name the common fields and any processor's
    // parameter; a parameter of another processor is reported as such.
    let mut allowed: Vec<&'static str> = COMMON_PROCESSOR_FIELDS.to_vec();
    for param in known.iter().flat_map(|d| d.params) {
        if !allowed.contains(&param.name) {
            allowed.push(param.name);
        }
    }
    let mut processors = BTreeMap::new();
    let mut complete = true;
    for (key, value) in map.iter() {
        let name = key.as_str();
        let key_at = Loc::of_span(key.span(), at);
        let decl = known.iter().find(|d| d.name == name);
        if decl.is_none() {
            ctx.error(
                key_at,
                Kind::UnknownProcessor {
                    name: name.to_owned(),
                    known: known.iter().map(|d| d.name.to_owned()).collect(),
                },
            );
        }
        // Read the body of an unknown processor too: its mistakes are
        // reported in the same run.
        let read = ProcessorRead {
            name,
            decl,
            known,
            allowed: &allowed,
        };
        match read_processor(ctx, value, &read, key_at, topics) {
            Some(spec) if decl.is_some() => {
                processors.insert(name.to_owned(), spec);
            }
            _ => complete = false,
        }
    }
    for decl in known {
        if map.get(decl.name).is_none() {
            ctx.error(
                at,
                Kind::MissingProcessor {
                    name: decl.name.to_owned(),
                },
            );
            complete = false;
        }
    }
    complete.then_some(processors)
}

/// What [`read_processor`] needs to know about the entry it reads.
struct ProcessorRead<'a> {
    name: &'a str,
    /// Its declaration, `None` for an unknown processor.
    decl: Option<&'a ProcessorDecl>,
    known: &'a [ProcessorDecl],
    /// The fields any processor entry may have.
    allowed: &'a [&'static str],
}

fn read_processor(
    ctx: &mut Ctx<'_>,
    node: &Node,
    read: &ProcessorRead<'_>,
    at: Loc,
    topics: &TopicsRead,
) -> Option<ProcessorSpec> {
    let name = read.name;
    let path = join("processors", name);
    let map = expect_mapping(ctx, node, &path, at)?;
    let fields = Fields::new(ctx, map, path, at, read.allowed);

    let inputs = fields.required(ctx, "inputs").and_then(|(at, node)| {
        let field = fields.field("inputs");
        let list = read_topic_list(ctx, node, &field, at, topics)?;
        if list.is_empty() {
            ctx.error(Loc::of_value(node, at), Kind::NoInputs { field });
            return None;
        }
        Some(list)
    });
    let outputs = fields
        .required(ctx, "outputs")
        .and_then(|(at, node)| read_topic_list(ctx, node, &fields.field("outputs"), at, topics));
    let projection_version = fields
        .required(ctx, "projection_version")
        .and_then(|(at, node)| {
            expect_positive_u32(ctx, node, &fields.field("projection_version"), at)
        });
    let dedupe_window = match fields.optional("dedupe_window") {
        Some((at, node)) => expect_duration(ctx, node, &fields.field("dedupe_window"), at),
        None => Some(DEFAULT_DEDUPE_WINDOW),
    };
    let mut params = Some(BTreeMap::new());
    for param in read.allowed[COMMON_PROCESSOR_FIELDS.len()..].iter() {
        let Some((key_at, node)) = fields.optional(param) else {
            continue;
        };
        let field = fields.field(param);
        let own = read
            .decl
            .and_then(|d| d.params.iter().find(|p| p.name == *param));
        let value = match own {
            Some(spec) => match spec.kind {
                ParamKind::Duration => {
                    expect_duration(ctx, node, &field, key_at).map(ParamValue::Duration)
                }
                ParamKind::Bytes => expect_size(ctx, node, &field, key_at).map(ParamValue::Bytes),
            },
            // An unknown processor's parameters are not checked further.
            None if read.decl.is_none() => None,
            None => {
                ctx.error(
                    key_at,
                    Kind::ParamNotSupported {
                        field,
                        param: (*param).to_owned(),
                        supported: read
                            .known
                            .iter()
                            .filter(|d| d.params.iter().any(|p| p.name == *param))
                            .map(|d| d.name)
                            .collect(),
                    },
                );
                None
            }
        };
        match (value, params.as_mut()) {
            (Some(value), Some(params)) => {
                params.insert((*param).to_owned(), value);
            }
            _ => params = None,
        }
    }
    if let Some(decl) = read.decl {
        check_wiring(
            ctx,
            decl,
            &fields,
            inputs.as_deref(),
            outputs.as_deref(),
            topics,
        );
    }

    Some(ProcessorSpec {
        inputs: inputs?,
        outputs: outputs?,
        projection_version: projection_version?,
        dedupe_window: dedupe_window?,
        params: params?,
    })
}

/// Checks that a processor's `inputs` and `outputs` are the topics of the
/// roles it declares (when the topics could be read).
fn check_wiring(
    ctx: &mut Ctx<'_>,
    decl: &ProcessorDecl,
    fields: &Fields<'_>,
    inputs: Option<&[String]>,
    outputs: Option<&[String]>,
    topics: &TopicsRead,
) {
    let Some(declared) = &topics.topics else {
        return;
    };
    if let (Some(role), Some(inputs), Some((at, node))) =
        (decl.input, inputs, fields.optional("inputs"))
    {
        let expected = &declared.get(role).name;
        if inputs != std::slice::from_ref(expected) {
            ctx.error(
                Loc::of_value(node, at),
                Kind::WrongInputs {
                    field: fields.field("inputs"),
                    processor: decl.name.to_owned(),
                    expected: expected.clone(),
                    role,
                },
            );
        }
    }
    if let (Some(roles), Some(outputs), Some((at, node))) =
        (decl.outputs, outputs, fields.optional("outputs"))
    {
        let expected: Vec<String> = roles
            .iter()
            .map(|r| declared.get(*r).name.clone())
            .collect();
        let same = outputs.len() == expected.len() && expected.iter().all(|e| outputs.contains(e));
        if !same {
            ctx.error(
                Loc::of_value(node, at),
                Kind::WrongOutputs {
                    field: fields.field("outputs"),
                    processor: decl.name.to_owned(),
                    expected,
                },
            );
        }
    }
}

/// A list of declared topic names, without repeats.
fn read_topic_list(
    ctx: &mut Ctx<'_>,
    node: &Node,
    field: &str,
    at: Loc,
    topics: &TopicsRead,
) -> Option<Vec<String>> {
    let seq = expect_list(ctx, node, field, at)?;
    let mut names: Vec<String> = Vec::with_capacity(seq.len());
    let mut ok = true;
    for item in seq.iter() {
        let Some(name) = expect_string(ctx, item, field, at) else {
            ok = false;
            continue;
        };
        let item_at = Loc::of_value(item, at);
        if names.iter().any(|n| n == name) {
            ctx.error(
                item_at,
                Kind::DuplicateTopicReference {
                    field: field.to_owned(),
                    name: name.to_owned(),
                },
            );
            ok = false;
            continue;
        }
        if let Some(declared) = &topics.names {
            if !declared.iter().any(|d| d == name) {
                ctx.error(
                    item_at,
                    Kind::UnknownTopic {
                        field: field.to_owned(),
                        name: name.to_owned(),
                        declared: declared.clone(),
                    },
                );
                ok = false;
            }
        }
        names.push(name.to_owned());
    }
    ok.then_some(names)
}

// ---- typed values ----------------------------------------------------------

/// How a node is described after "found" in a type error.
fn describe(node: &Node) -> String {
    match node {
        Node::Mapping(_) => "a mapping".to_owned(),
        Node::Sequence(_) => "a list".to_owned(),
        Node::Scalar(s) if is_null(s) => "nothing".to_owned(),
        Node::Scalar(s) if !s.may_coerce() && s.as_str().is_empty() => {
            "an empty quoted string".to_owned()
        }
        Node::Scalar(s) if !s.may_coerce() => format!("the quoted string `{}`", s.as_str()),
        Node::Scalar(s) => format!("`{}`", s.as_str()),
    }
}

/// A plain empty, `~` or `null` scalar: YAML's null.
fn is_null(s: &MarkedScalarNode) -> bool {
    s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
}

fn type_error(ctx: &mut Ctx<'_>, node: &Node, field: &str, at: Loc, expected: &'static str) {
    ctx.error(
        Loc::of_value(node, at),
        Kind::InvalidType {
            field: field.to_owned(),
            expected,
            found: describe(node),
        },
    );
}

fn expect_mapping<'n>(
    ctx: &mut Ctx<'_>,
    node: &'n Node,
    field: &str,
    at: Loc,
) -> Option<&'n MarkedMappingNode> {
    let map = node.as_mapping();
    if map.is_none() {
        type_error(ctx, node, field, at, "a mapping");
    }
    map
}

fn expect_list<'n>(
    ctx: &mut Ctx<'_>,
    node: &'n Node,
    field: &str,
    at: Loc,
) -> Option<&'n MarkedSequenceNode> {
    let seq = node.as_sequence();
    if seq.is_none() {
        type_error(ctx, node, field, at, "a list of topic names");
    }
    seq
}

/// A string: any quoted scalar, or a plain one that is not null or a
/// boolean.
fn expect_string<'n>(ctx: &mut Ctx<'_>, node: &'n Node, field: &str, at: Loc) -> Option<&'n str> {
    match node.as_scalar() {
        Some(s) if !is_null(s) && s.as_bool().is_none() => Some(s.as_str()),
        _ => {
            type_error(ctx, node, field, at, "a string");
            None
        }
    }
}

fn expect_bool(ctx: &mut Ctx<'_>, node: &Node, field: &str, at: Loc) -> Option<bool> {
    let value = node.as_scalar().and_then(MarkedScalarNode::as_bool);
    if value.is_none() {
        type_error(ctx, node, field, at, "`true` or `false`");
    }
    value
}

/// A whole number from 1 to `u32::MAX`, written without quotes.
fn expect_positive_u32(ctx: &mut Ctx<'_>, node: &Node, field: &str, at: Loc) -> Option<u32> {
    let Some(value) = node.as_scalar().and_then(MarkedScalarNode::as_i128) else {
        type_error(ctx, node, field, at, "a whole number");
        return None;
    };
    let node_at = Loc::of_value(node, at);
    let found = value.to_string();
    if value < 1 {
        ctx.error(
            node_at,
            Kind::TooSmall {
                field: field.to_owned(),
                min: 1,
                found,
            },
        );
        return None;
    }
    match u32::try_from(value) {
        Ok(v) => Some(v),
        Err(_) => {
            ctx.error(
                node_at,
                Kind::TooLarge {
                    field: field.to_owned(),
                    max: u64::from(u32::MAX),
                    found,
                },
            );
            None
        }
    }
}

fn expect_duration(ctx: &mut Ctx<'_>, node: &Node, field: &str, at: Loc) -> Option<Duration> {
    expect_duration_text(ctx, node, field, at, parse_duration)
}

fn expect_size(ctx: &mut Ctx<'_>, node: &Node, field: &str, at: Loc) -> Option<u64> {
    let text = node
        .as_scalar()
        .filter(|s| !is_null(s))
        .map(|s| s.as_str().to_owned());
    let Some(text) = text else {
        type_error(ctx, node, field, at, "a size such as `256KiB`");
        return None;
    };
    match crate::parse_size(&text) {
        Ok(value) => Some(value),
        Err(reason) => {
            ctx.error(
                Loc::of_value(node, at),
                Kind::InvalidSize {
                    field: field.to_owned(),
                    value: text,
                    reason,
                },
            );
            None
        }
    }
}

fn expect_retention(ctx: &mut Ctx<'_>, node: &Node, field: &str, at: Loc) -> Option<Retention> {
    expect_duration_text(ctx, node, field, at, parse_retention)
}

fn expect_duration_text<T>(
    ctx: &mut Ctx<'_>,
    node: &Node,
    field: &str,
    at: Loc,
    parse: fn(&str) -> Result<T, crate::DurationError>,
) -> Option<T> {
    let Some(s) = node.as_scalar().filter(|s| !is_null(s)) else {
        type_error(ctx, node, field, at, "a duration such as `7d`");
        return None;
    };
    match parse(s.as_str()) {
        Ok(value) => Some(value),
        Err(reason) => {
            ctx.error(
                Loc::of_value(node, at),
                Kind::InvalidDuration {
                    field: field.to_owned(),
                    value: s.as_str().to_owned(),
                    reason,
                },
            );
            None
        }
    }
}
