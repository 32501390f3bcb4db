//! Every schema in `schemas/` against its samples in
//! `schemas/samples/<type>.v<version>/{valid,invalid}/*.json`.

// Test helpers outside #[test] functions unwrap too; a panic is a test failure.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use waymark_core::RejectKind;
use waymark_schemas::{schema_files, Validator};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// Compiles a schema file straight from disk, independently of the crate.
fn compile_from_disk(file: &str) -> jsonschema::Validator {
    let text = fs::read_to_string(schemas_dir().join(file)).unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema)
        .unwrap()
}

#[test]
fn embedded_schemas_are_the_files_in_the_schemas_folder() {
    let on_disk: Vec<(String, String)> = json_files(&schemas_dir())
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    let mut embedded: Vec<(String, String)> = schema_files()
        .iter()
        .map(|(n, c)| (n.to_string(), c.to_string()))
        .collect();
    embedded.sort();
    assert_eq!(embedded, on_disk);
    assert_eq!(schema_files()[0].0, "envelope.v1.json");
}

#[test]
fn every_schema_is_2020_12_with_id_title_and_description() {
    for (file, text) in schema_files() {
        let schema: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{file}"
        );
        assert!(
            jsonschema::meta::is_valid(&schema),
            "{file} is not a valid schema"
        );
        let id = schema["$id"].as_str().unwrap_or_default();
        assert!(id.ends_with(&format!("/{file}")), "{file}: $id {id}");
        for key in ["title", "description"] {
            let value = schema[key].as_str().unwrap_or_default();
            assert!(!value.is_empty(), "{file} has no {key}");
        }
        assert_eq!(schema["type"], "object", "{file}");
        assert!(
            schema.get("additionalProperties").is_none(),
            "{file}: unknown fields are allowed"
        );
    }
}

#[test]
fn every_schema_has_valid_and_invalid_samples() {
    let validator = Validator::new().unwrap();
    let mut checked = 0;
    for (file, _) in schema_files() {
        let name = file.strip_suffix(".json").unwrap();
        let dir = schemas_dir().join("samples").join(name);
        let is_envelope = name == "envelope.v1";
        let schema = compile_from_disk(file);
        let (type_name, version) = name.rsplit_once(".v").unwrap();
        let version: u64 = version.parse().unwrap();

        let valid = json_files(&dir.join("valid"));
        assert!(!valid.is_empty(), "{name} has no valid samples");
        for path in valid {
            let bytes = fs::read(&path).unwrap();
            let raw: Value = serde_json::from_slice(&bytes).unwrap();
            let event = validator
                .decode(&bytes)
                .unwrap_or_else(|r| panic!("{}: rejected: {r}", path.display()));
            if is_envelope {
                assert!(schema.is_valid(&raw), "{}", path.display());
            } else {
                assert_eq!(event.event_type().as_str(), type_name, "{}", path.display());
                assert_eq!(
                    raw.get("version").and_then(Value::as_u64).unwrap_or(1),
                    version,
                    "{}",
                    path.display()
                );
                assert!(schema.is_valid(&raw["data"]), "{}", path.display());
            }
            checked += 1;
        }

        let invalid = json_files(&dir.join("invalid"));
        assert!(!invalid.is_empty(), "{name} has no invalid samples");
        for path in invalid {
            let bytes = fs::read(&path).unwrap();
            let raw: Value = serde_json::from_slice(&bytes).unwrap();
            let rejection = validator
                .decode(&bytes)
                .expect_err(&format!("{}: accepted", path.display()));
            let message = &rejection.message;
            assert!(
                message.starts_with('/') || message.starts_with("the event"),
                "{}: {message}",
                path.display()
            );
            assert!(!message.ends_with('.'), "{}: {message}", path.display());
            if is_envelope {
                assert_eq!(
                    rejection.kind,
                    RejectKind::InvalidEnvelope,
                    "{}: {rejection}",
                    path.display()
                );
                assert!(!schema.is_valid(&raw), "{}", path.display());
            } else {
                assert_eq!(
                    rejection.kind,
                    RejectKind::InvalidData,
                    "{}: {rejection}",
                    path.display()
                );
                assert!(
                    message.starts_with("/data"),
                    "{}: {message}",
                    path.display()
                );
                assert_eq!(raw["type"], type_name, "{}", path.display());
                assert_eq!(
                    raw.get("version").and_then(Value::as_u64).unwrap_or(1),
                    version,
                    "{}",
                    path.display()
                );
                // The schema file itself rejects it, not only the Rust code.
                assert!(!schema.is_valid(&raw["data"]), "{}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} samples");
}
