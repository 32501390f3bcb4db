//! Validation of raw events against the JSON Schemas in `schemas/`, and
//! upcasting to the latest version of each event type.
//!
//! Producers write events as JSON envelopes (contract §2) whose `data` is
//! described per type and version (contract §3). [`Validator::decode`] turns
//! the raw bytes of one record into a typed [`waymark_core::Event`] at the
//! latest version of its type, or into a [`waymark_core::Rejection`] whose
//! kind is the `waymark.error` dead-letter header of contract §5.
//!
//! # Layout
//!
//! - `schemas/envelope.v1.json`: the envelope (`id`, `type`, `version`,
//!   `time`, `source`, `person_id`, `data`).
//! - `schemas/<type>.v<version>.json`: the `data` object of one type at one
//!   version, e.g. `schemas/learning.lesson_completed.v2.json`.
//! - `schemas/samples/<type>.v<version>/{valid,invalid}/*.json`: sample
//!   events (whole envelopes) for each schema, checked by this crate's tests.
//!
//! The schema files are embedded into the binary with `include_str!`, so the
//! files in `schemas/` are the single source of truth: editing one changes
//! what every binary built from this tree accepts. [`schema_files`] lists them
//! for documentation and tools.
//!
//! # Guarantees
//!
//! - Every schema is compiled once, in [`Validator::new`]; a [`Validator`] is
//!   `Send + Sync` and meant to be shared (e.g. in an `Arc`).
//! - [`Validator::decode`] never panics on input. It classifies a bad record
//!   by the first check it fails, in this order: size
//!   ([`RejectKind::TooLarge`], more than [`MAX_EVENT_BYTES`]), UTF-8 and JSON
//!   syntax ([`RejectKind::MalformedJson`]), the envelope schema
//!   ([`RejectKind::InvalidEnvelope`]), the type ([`RejectKind::UnknownType`]),
//!   the version ([`RejectKind::UnsupportedVersion`]), then the `data` schema
//!   of that type and version plus the rules JSON Schema cannot express
//!   ([`RejectKind::InvalidData`]).
//! - Rejection messages are lowercase, name the JSON pointer of the offending
//!   value (e.g. `/data/stage: "" is shorter than 1 character`), report at
//!   most the first [`MAX_REPORTED_ERRORS`] violations and quote input values
//!   shortened, so a message stays small whatever the input.
//! - `data` is validated against the schema of its own version, then
//!   [`upcast`] to the latest version; the returned event is always at the
//!   latest version and its `time` is in UTC.
//! - Unknown top-level fields, and unknown fields inside `data` and `source`,
//!   are accepted and ignored (they are not carried into the typed event).
//!   A `null` is not an absent field: `"stage": null` breaks the schema.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{Draft, ValidationError};
use serde_json::{Map, Value};
use uuid::Uuid;
use waymark_core::{Event, EventData, EventType, Identity, RejectKind, Rejection};

/// The largest record accepted, in bytes (contract §2: at most 1 MiB).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// How many schema violations a rejection message lists; the rest are counted.
pub const MAX_REPORTED_ERRORS: usize = 3;

/// File name of the envelope schema in `schemas/`.
const ENVELOPE_FILE: &str = "envelope.v1.json";

/// The pattern the schemas use for "no control characters" (Unicode `Cc`).
const NO_CONTROL_CHARS: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";

/// Longest rendering of an input value inside a message, in characters.
const MAX_SHOWN_CHARS: usize = 64;

/// Every schema file, embedded from the repository's `schemas/` folder.
static SCHEMA_FILES: &[(&str, &str)] = &[
    (
        "envelope.v1.json",
        include_str!("../../../schemas/envelope.v1.json"),
    ),
    (
        "identity.linked.v1.json",
        include_str!("../../../schemas/identity.linked.v1.json"),
    ),
    (
        "interaction.recorded.v1.json",
        include_str!("../../../schemas/interaction.recorded.v1.json"),
    ),
    (
        "journey.started.v1.json",
        include_str!("../../../schemas/journey.started.v1.json"),
    ),
    (
        "journey.stage_entered.v1.json",
        include_str!("../../../schemas/journey.stage_entered.v1.json"),
    ),
    (
        "journey.completed.v1.json",
        include_str!("../../../schemas/journey.completed.v1.json"),
    ),
    (
        "learning.lesson_completed.v1.json",
        include_str!("../../../schemas/learning.lesson_completed.v1.json"),
    ),
    (
        "learning.lesson_completed.v2.json",
        include_str!("../../../schemas/learning.lesson_completed.v2.json"),
    ),
    (
        "learning.quiz_answered.v1.json",
        include_str!("../../../schemas/learning.quiz_answered.v1.json"),
    ),
];

/// Every schema file as `(file name, contents)`, e.g.
/// `("journey.started.v1.json", "{ ... }")`: the envelope first, then one
/// file per event type and version.
///
/// These are the files of the repository's `schemas/` folder, embedded at
/// build time; docs and tools can serve or write them out unchanged.
pub fn schema_files() -> &'static [(&'static str, &'static str)] {
    SCHEMA_FILES
}

/// The embedded schemas are broken: a bug in `schemas/`, never bad input.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A schema file is not JSON.
    #[error("schema {file} is not valid json: {source}")]
    Json {
        /// The file in `schemas/`.
        file: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A schema file is JSON but not a valid JSON Schema 2020-12.
    #[error("schema {file} does not compile: {message}")]
    Compile {
        /// The file in `schemas/`.
        file: &'static str,
        /// Why it does not compile.
        message: String,
    },
    /// A file name is not `<type>.v<version>.json` for a type and version the
    /// code knows (every version must be upcastable to the latest).
    #[error("schema file name {file} is not <type>.v<version>.json for a known type and version")]
    UnexpectedFile {
        /// The file in `schemas/`.
        file: &'static str,
    },
    /// A version of a type has no schema file.
    #[error("no schema for {event_type} version {version}")]
    Missing {
        /// The event type.
        event_type: EventType,
        /// The version without a schema.
        version: u32,
    },
}

/// Validates raw events and decodes them into typed events at their latest
/// version.
///
/// Build one with [`Validator::new`] and share it (it is `Send + Sync`);
/// building compiles every schema of `schemas/`.
#[derive(Debug)]
pub struct Validator {
    envelope: jsonschema::Validator,
    data: BTreeMap<(EventType, u32), jsonschema::Validator>,
}

impl Validator {
    /// Compiles the envelope schema and every data schema.
    ///
    /// Fails only if the embedded schemas are broken, which the crate's tests
    /// rule out for every schema in the tree.
    pub fn new() -> Result<Self, SchemaError> {
        let mut envelope = None;
        let mut data = BTreeMap::new();
        for &(file, text) in SCHEMA_FILES {
            let compiled = compile(file, text)?;
            if file == ENVELOPE_FILE {
                envelope = Some(compiled);
                continue;
            }
            let (event_type, version) =
                parse_file_name(file).ok_or(SchemaError::UnexpectedFile { file })?;
            if version > event_type.latest_version() {
                return Err(SchemaError::UnexpectedFile { file });
            }
            data.insert((event_type, version), compiled);
        }
        let envelope = envelope.ok_or(SchemaError::UnexpectedFile {
            file: ENVELOPE_FILE,
        })?;
        for event_type in EventType::ALL {
            for version in 1..=event_type.latest_version() {
                if !data.contains_key(&(event_type, version)) {
                    return Err(SchemaError::Missing {
                        event_type,
                        version,
                    });
                }
            }
        }
        Ok(Self { envelope, data })
    }

    /// The versions of `event_type` this validator accepts, ascending.
    pub fn versions(&self, event_type: EventType) -> Vec<u32> {
        self.data
            .keys()
            .filter(|(t, _)| *t == event_type)
            .map(|&(_, v)| v)
            .collect()
    }

    /// Validates one raw record (a JSON envelope) and decodes it into a typed
    /// event, upcast to the latest version of its type.
    ///
    /// The checks run in the order of the crate's Guarantees; the first one
    /// that fails decides the [`RejectKind`].
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, Rejection> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(Rejection::new(
                RejectKind::TooLarge,
                format!(
                    "event is {} bytes, more than the limit of {MAX_EVENT_BYTES} bytes",
                    bytes.len()
                ),
            ));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Rejection::new(RejectKind::MalformedJson, format!("not utf-8: {e}")))?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Rejection::new(RejectKind::MalformedJson, format!("not json: {e}")))?;
        let Value::Object(mut envelope) = value else {
            return Err(Rejection::new(
                RejectKind::InvalidEnvelope,
                format!(
                    "the event must be a json object, not {}",
                    json_type_name(&value)
                ),
            ));
        };
        // Validate the envelope without its data: the envelope schema only
        // needs to know that `data` is an object, and this keeps a large
        // `data` from being walked twice.
        let data = envelope.remove("data");
        match &data {
            Some(Value::Object(_)) => {
                envelope.insert("data".to_owned(), Value::Object(Map::new()));
            }
            Some(other) => {
                envelope.insert("data".to_owned(), other.clone());
            }
            None => {}
        }
        let envelope = Value::Object(envelope);
        check(&self.envelope, &envelope, "", RejectKind::InvalidEnvelope)?;
        let Value::Object(mut envelope) = envelope else {
            return Err(invalid_envelope("the event must be a json object"));
        };
        let data = match data {
            Some(Value::Object(data)) => Value::Object(data),
            _ => return Err(invalid_envelope("/data: must be an object")),
        };

        let type_name = envelope
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_envelope("/type: must be a string"))?;
        let event_type: EventType = type_name.parse().map_err(|_| {
            Rejection::new(
                RejectKind::UnknownType,
                format!(
                    "/type: unknown event type {}; known types are {}",
                    show(&Value::String(type_name.to_owned())),
                    EventType::ALL.map(EventType::as_str).join(", ")
                ),
            )
        })?;
        let version = match envelope.get("version") {
            None => Some(1),
            Some(v) => version_number(v),
        };
        let schema = version.and_then(|v| self.data.get(&(event_type, v)).map(|s| (v, s)));
        let Some((version, schema)) = schema else {
            let shown = envelope.get("version").map(show).unwrap_or_default();
            let known: Vec<String> = self
                .versions(event_type)
                .iter()
                .map(u32::to_string)
                .collect();
            return Err(Rejection::new(
                RejectKind::UnsupportedVersion,
                format!(
                    "/version: {event_type} has no version {shown}; supported versions are {}",
                    known.join(", ")
                ),
            ));
        };
        check(schema, &data, "/data", RejectKind::InvalidData)?;
        let data = upcast(event_type, version, data);
        check_rules(event_type, &data)?;
        let data = EventData::from_json(event_type, &data.to_string())
            .map_err(|e| Rejection::new(RejectKind::InvalidData, format!("/data: {e}")))?;

        let id = match envelope.remove("id") {
            Some(Value::String(id)) => id,
            _ => return Err(invalid_envelope("/id: must be a string")),
        };
        let time = envelope
            .get("time")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_envelope("/time: must be a string"))
            .and_then(|t| {
                DateTime::parse_from_rfc3339(t)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        invalid_envelope(format!(
                            "/time: {} is not an rfc 3339 date-time: {e}",
                            show(&Value::String(t.to_owned()))
                        ))
                    })
            })?;
        let person_id = match envelope.get("person_id").and_then(Value::as_str) {
            None => None,
            Some(p) => Some(Uuid::parse_str(p).map_err(|e| {
                invalid_envelope(format!(
                    "/person_id: {} is not a uuid: {e}",
                    show(&Value::String(p.to_owned()))
                ))
            })?),
        };
        let source = match envelope.remove("source") {
            None => None,
            Some(s) => Some(
                serde_json::from_value::<Identity>(s)
                    .map_err(|e| invalid_envelope(format!("/source: {e}")))?,
            ),
        };
        Ok(Event {
            id,
            time,
            source,
            person_id,
            data,
        })
    }
}

/// Rewrites the `data` of `event_type`, valid at `version`, into the latest
/// version of that type; data already at the latest version is returned as is.
///
/// `learning.lesson_completed` v1 → v2: `score: s` becomes
/// `result: {points: s, max_points: 100}`; without a score there is no
/// result (a `result` field in v1 data is not part of v1 and is dropped).
/// Other fields are kept. Meant for data that passed its own version's
/// schema; anything else is returned with a best-effort rewrite.
pub fn upcast(event_type: EventType, version: u32, data: Value) -> Value {
    let mut data = data;
    let mut version = version.max(1);
    while version < event_type.latest_version() {
        data = upcast_step(event_type, version, data);
        version += 1;
    }
    data
}

/// One step: `data` at `version` to `version + 1`.
fn upcast_step(event_type: EventType, version: u32, data: Value) -> Value {
    match (event_type, version, data) {
        (EventType::LessonCompleted, 1, Value::Object(mut data)) => {
            data.remove("result");
            if let Some(score) = data.remove("score") {
                let mut result = Map::new();
                result.insert("points".to_owned(), score);
                result.insert("max_points".to_owned(), Value::from(100));
                data.insert("result".to_owned(), Value::Object(result));
            }
            Value::Object(data)
        }
        (_, _, data) => data,
    }
}

/// The rules of contract §3 that JSON Schema cannot express, on data at the
/// latest version.
fn check_rules(event_type: EventType, data: &Value) -> Result<(), Rejection> {
    if event_type == EventType::LessonCompleted {
        let result = data.get("result");
        let points = result.and_then(|r| r.get("points")).and_then(Value::as_f64);
        let max = result
            .and_then(|r| r.get("max_points"))
            .and_then(Value::as_f64);
        if let (Some(points), Some(max)) = (points, max) {
            if points > max {
                return Err(Rejection::new(
                    RejectKind::InvalidData,
                    format!(
                        "/data/result/points: {} is greater than max_points ({})",
                        fmt_number(result.and_then(|r| r.get("points"))),
                        fmt_number(result.and_then(|r| r.get("max_points")))
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn fmt_number(v: Option<&Value>) -> String {
    v.map(Value::to_string).unwrap_or_default()
}

/// Compiles one embedded schema as JSON Schema 2020-12 with format
/// validation on (and unknown formats refused, so a typo cannot disable a
/// check).
fn compile(file: &'static str, text: &str) -> Result<jsonschema::Validator, SchemaError> {
    let schema: Value =
        serde_json::from_str(text).map_err(|source| SchemaError::Json { file, source })?;
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .build(&schema)
        .map_err(|e| SchemaError::Compile {
            file,
            message: e.to_string(),
        })
}

/// `journey.started.v1.json` → (`JourneyStarted`, 1).
fn parse_file_name(file: &str) -> Option<(EventType, u32)> {
    let stem = file.strip_suffix(".json")?;
    let (name, version) = stem.rsplit_once(".v")?;
    let event_type = name.parse().ok()?;
    let version = version.parse().ok().filter(|v| *v >= 1)?;
    Some((event_type, version))
}

/// `version` as a number, if it is a whole number that fits a `u32`
/// (`2` and `2.0` both are; the envelope schema has already checked `>= 1`).
fn version_number(v: &Value) -> Option<u32> {
    if let Some(n) = v.as_u64() {
        return u32::try_from(n).ok();
    }
    let f = v.as_f64()?;
    if f.fract() == 0.0 && f >= 0.0 && f <= f64::from(u32::MAX) {
        // A whole number in range, so the cast is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        return Some(f as u32);
    }
    None
}

fn invalid_envelope(message: impl Into<String>) -> Rejection {
    Rejection::new(RejectKind::InvalidEnvelope, message)
}

/// Validates `instance`; on failure, a rejection of `kind` listing the first
/// few violations with their paths (prefixed by `prefix`).
fn check(
    schema: &jsonschema::Validator,
    instance: &Value,
    prefix: &str,
    kind: RejectKind,
) -> Result<(), Rejection> {
    if schema.is_valid(instance) {
        return Ok(());
    }
    let mut messages = Vec::new();
    let mut total = 0usize;
    for error in schema.iter_errors(instance) {
        total += 1;
        if messages.len() < MAX_REPORTED_ERRORS {
            messages.push(describe(&error, prefix));
        }
    }
    if messages.is_empty() {
        // `is_valid` and `iter_errors` disagree; never accept on a disagreement.
        messages.push(format!(
            "{}: does not match its schema",
            if prefix.is_empty() { "/" } else { prefix }
        ));
    }
    let mut message = messages.join("; ");
    if total > messages.len() {
        let _ = write!(message, "; and {} more", total - messages.len());
    }
    Err(Rejection::new(kind, message))
}

/// One violation as `<json pointer>: <reason>`, lowercase.
fn describe(error: &ValidationError<'_>, prefix: &str) -> String {
    let mut path = format!("{prefix}{}", error.instance_path());
    let instance = error.instance();
    let shown = show(instance);
    let reason = match error.kind() {
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            path.push('/');
            path.push_str(&name.replace('~', "~0").replace('/', "~1"));
            if prefix.is_empty() && error.instance_path().as_str().is_empty() && name == "source" {
                "is required unless person_id is set".to_owned()
            } else {
                "is required".to_owned()
            }
        }
        ValidationErrorKind::Type {
            kind: TypeKind::Single(t),
        } => format!("{shown} is not of type {t}"),
        ValidationErrorKind::MinLength { limit } => {
            format!("{shown} is shorter than {limit} {}", plural(*limit))
        }
        ValidationErrorKind::MaxLength { limit } => {
            let len = instance.as_str().map(|s| s.chars().count()).unwrap_or(0);
            format!(
                "{shown} ({len} characters) is longer than {limit} {}",
                plural(*limit)
            )
        }
        ValidationErrorKind::Minimum { limit } => {
            format!("{shown} is less than the minimum of {limit}")
        }
        ValidationErrorKind::Maximum { limit } => {
            format!("{shown} is greater than the maximum of {limit}")
        }
        ValidationErrorKind::ExclusiveMinimum { limit } => {
            format!("{shown} is not greater than {limit}")
        }
        ValidationErrorKind::ExclusiveMaximum { limit } => {
            format!("{shown} is not less than {limit}")
        }
        ValidationErrorKind::Pattern { pattern } if pattern == NO_CONTROL_CHARS => {
            format!("{shown} contains a control character")
        }
        ValidationErrorKind::Pattern { pattern } => {
            format!("{shown} does not match {pattern}")
        }
        ValidationErrorKind::Format { format } => match format.as_str() {
            "date-time" => format!(
                "{shown} is not an rfc 3339 date-time with offset (e.g. \"2026-01-02T03:04:05Z\")"
            ),
            "uuid" => format!("{shown} is not a uuid"),
            other => format!("{shown} is not a valid {other}"),
        },
        ValidationErrorKind::Enum { options } => {
            let options: Vec<String> = options
                .as_array()
                .map(|o| o.iter().map(Value::to_string).collect())
                .unwrap_or_default();
            format!("{shown} is not one of {}", options.join(", "))
        }
        _ => {
            let text = lowercase_first(&error.to_string());
            truncate(&text, 4 * MAX_SHOWN_CHARS)
        }
    };
    if path.is_empty() {
        path.push('/');
    }
    format!("{path}: {reason}")
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        "character"
    } else {
        "characters"
    }
}

/// A JSON value as it appears in a message: its JSON text, shortened.
fn show(value: &Value) -> String {
    match value {
        Value::Object(_) => "an object".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        _ => truncate(&value.to_string(), MAX_SHOWN_CHARS),
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        None => String::new(),
        Some(first) => first.to_lowercase().chain(chars).collect(),
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validator_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Validator>();
    }

    #[test]
    fn file_names_parse() {
        assert_eq!(
            parse_file_name("learning.lesson_completed.v2.json"),
            Some((EventType::LessonCompleted, 2))
        );
        assert_eq!(parse_file_name("journey.started.v0.json"), None);
        assert_eq!(parse_file_name("nope.v1.json"), None);
        assert_eq!(parse_file_name("journey.started.json"), None);
    }

    #[test]
    fn versions_read_as_whole_numbers() {
        assert_eq!(version_number(&serde_json::json!(2)), Some(2));
        assert_eq!(version_number(&serde_json::json!(2.0)), Some(2));
        assert_eq!(version_number(&serde_json::json!(2.5)), None);
        assert_eq!(version_number(&serde_json::json!(1e30)), None);
        assert_eq!(version_number(&serde_json::json!(u64::MAX)), None);
    }

    #[test]
    fn shown_values_are_shortened() {
        let long = Value::String("x".repeat(500));
        let shown = show(&long);
        assert!(shown.chars().count() <= MAX_SHOWN_CHARS + 1, "{shown}");
        assert!(shown.ends_with('…'));
        assert_eq!(show(&serde_json::json!({"a": 1})), "an object");
        assert_eq!(truncate("héllo", 2), "hé…");
    }
}
