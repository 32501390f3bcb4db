//! Parser tests: a five-processor file (a copy of the repository's
//! `topology.yaml` as it was; the real file is checked against the real
//! registry in the binary's tests, so adding a processor changes nothing
//! here), every kind of mistake, all reported at once.

use std::time::Duration;

use super::*;

/// The five-processor file these tests read.
const FIXTURE: &str = include_str!("testdata/five-processors.yaml");

fn fixture() -> Topology {
    parse(FIXTURE, &decls(NAMES)).unwrap_or_else(|e| panic!("{e}"))
}

const NAMES: &[&str] = &["identity", "person", "interactions", "journey", "learning"];

const RETENTION: &[ParamSpec] = &[ParamSpec {
    name: "retention",
    kind: ParamKind::Duration,
}];

/// Declarations of `names`, as the binary's registry makes them:
/// `interactions` has a `retention`.
fn decls(names: &[&'static str]) -> Vec<ProcessorDecl> {
    names
        .iter()
        .map(|&name| ProcessorDecl {
            params: if name == "interactions" {
                RETENTION
            } else {
                &[]
            },
            ..ProcessorDecl::named(name)
        })
        .collect()
}
const DAY: u64 = 24 * 3_600;

fn days(n: u64) -> Duration {
    Duration::from_secs(n * DAY)
}

/// The displayed errors, one string per error.
fn messages(text: &str, known: &[&'static str]) -> Vec<String> {
    match parse(text, &decls(known)) {
        Ok(t) => panic!("expected errors, parsed {t:?}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn parses_a_five_processor_topology() {
    let topology = fixture();

    let t = &topology.topics;
    assert_eq!(t.inputs.name, "waymark.inputs");
    assert_eq!(t.inputs.partitions, 6);
    assert_eq!(t.inputs.retention, Retention::Duration(days(7)));
    assert!(!t.inputs.compaction);
    assert_eq!(t.events.name, "waymark.events");
    assert_eq!(t.events.partitions, 6);
    assert_eq!(t.events.retention, Retention::Forever);
    assert_eq!(t.dlq.name, "waymark.dlq");
    assert_eq!(t.dlq.partitions, 1);
    assert_eq!(t.dlq.retention, Retention::Duration(days(30)));

    let names: Vec<_> = topology.processors.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["identity", "interactions", "journey", "learning", "person"]
    );
    let identity = topology.processor("identity").unwrap();
    assert_eq!(identity.inputs, ["waymark.inputs"]);
    assert_eq!(identity.outputs, ["waymark.events", "waymark.dlq"]);
    for name in ["person", "interactions", "journey", "learning"] {
        let p = topology.processor(name).unwrap();
        assert_eq!(p.inputs, ["waymark.events"], "{name}");
        assert_eq!(p.outputs, ["waymark.dlq"], "{name}");
    }
    for (name, p) in &topology.processors {
        assert_eq!(p.projection_version, 1, "{name}");
        assert_eq!(p.dedupe_window, days(7), "{name}");
        let expected = (name == "interactions").then(|| days(365));
        assert_eq!(p.duration_param("retention"), expected, "{name}");
    }

    assert_eq!(topology.topic("waymark.dlq"), Some(&t.dlq));
    assert_eq!(topology.topic("nope"), None);
    assert_eq!(topology.processor("nope"), None);
    let consumers: Vec<_> = topology.consumers_of("waymark.events").collect();
    assert_eq!(consumers, ["interactions", "journey", "learning", "person"]);
}

#[test]
fn loads_a_file_from_disk() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata/five-processors.yaml");
    let from_disk = load(&path, &decls(NAMES)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(from_disk, fixture());
}

#[test]
fn reports_every_mistake_with_its_location() {
    let text = "\
topics:
  inputs:
    name: waymark.inputs
    partitions: 0
    retention: 7x
    compaction: \"no\"
  events:
    name: waymark.events
    partitons: 6
    retention: forever
  dlq:
    name: waymark.dlq
    partitions: \"1\"
    retention: 30d
processors:
  identity:
    inputs: [waymark.inputs]
    outputs: [waymark.events, waymark.dlqq]
    projection_version: 1
    dedupe_window: forever
  person:
    inputs: [waymark.events, waymark.events]
    outputs: [waymark.dlq]
    projection_version: 0
    retention: 30d
  interactions:
    inputs: []
    outputs: waymark.dlq
    projection_version: one
    retention: 365d
  journey:
    outputs: [waymark.dlq]
    projection_version: 1
  billing:
    inputs: [waymark.events]
    outputs: [waymark.dlq]
    projection_version: 1
    colour: blue
";
    let expected = [
        "topology.yaml:4:17: `topics.inputs.partitions` must be at least 1, found 0",
        "topology.yaml:5:16: invalid duration `7x` for `topics.inputs.retention`: unknown unit `x`, expected one of ms, s, m, h, d, w",
        "topology.yaml:6:17: `topics.inputs.compaction` must be `true` or `false`, found the quoted string `no`",
        "topology.yaml:7:3: missing field `topics.events.partitions`",
        "topology.yaml:9:5: unknown field `topics.events.partitons`, expected one of: name, partitions, retention, compaction",
        "topology.yaml:13:17: `topics.dlq.partitions` must be a whole number, found the quoted string `1`",
        "topology.yaml:15:1: missing processor `learning` in `processors`",
        "topology.yaml:18:31: unknown topic `waymark.dlqq` in `processors.identity.outputs`, declared topics: waymark.inputs, waymark.events, waymark.dlq",
        "topology.yaml:20:20: invalid duration `forever` for `processors.identity.dedupe_window`: `forever` is not allowed here, expected a finite duration such as `7d`",
        "topology.yaml:22:30: topic `waymark.events` is listed more than once in `processors.person.inputs`",
        "topology.yaml:24:25: `processors.person.projection_version` must be at least 1, found 0",
        "topology.yaml:25:5: `processors.person.retention` is not supported, only these processors have a retention: interactions",
        "topology.yaml:27:13: `processors.interactions.inputs` must list at least one topic",
        "topology.yaml:28:14: `processors.interactions.outputs` must be a list of topic names, found `waymark.dlq`",
        "topology.yaml:29:25: `processors.interactions.projection_version` must be a whole number, found `one`",
        "topology.yaml:31:3: missing field `processors.journey.inputs`",
        "topology.yaml:34:3: unknown processor `billing`, known processors: identity, person, interactions, journey, learning",
        "topology.yaml:38:5: unknown field `processors.billing.colour`, expected one of: inputs, outputs, projection_version, dedupe_window, retention",
    ];
    let got = messages(text, NAMES);
    assert_eq!(got, expected, "got:\n{}", got.join("\n"));

    // One error per line when displayed as a whole.
    let errors = parse(text, &decls(NAMES)).unwrap_err();
    assert_eq!(errors.len(), expected.len());
    assert_eq!(errors.to_string(), expected.join("\n"));
    let first = &errors.as_slice()[0];
    assert_eq!((first.line, first.column), (4, 17));
    assert!(matches!(
        first.kind,
        TopologyErrorKind::TooSmall { min: 1, .. }
    ));
}

#[test]
fn two_topics_with_one_name_are_reported_and_references_still_checked() {
    let text = "\
topics:
  inputs: { name: waymark.inputs, partitions: 1, retention: 1d }
  events: { name: waymark.events, partitions: 1, retention: forever }
  dlq:    { name: waymark.events, partitions: 1, retention: 1d }
processors:
  person: { inputs: [waymark.events], outputs: [waymark.dlq], projection_version: 1 }
";
    assert_eq!(
        messages(text, &["person"]),
        [
            "topology.yaml:4:19: topic name `waymark.events` of `topics.dlq.name` is already used by `topics.events.name`",
            "topology.yaml:6:49: unknown topic `waymark.dlq` in `processors.person.outputs`, declared topics: waymark.inputs, waymark.events",
        ]
    );
}

#[test]
fn error_messages_are_lowercase_without_trailing_period() {
    let texts = [
        "topics: 3\nprocessors: [a]\nextra: 1\n",
        "topics:\n  inputs: [a\n",
        "a: !!str b\n",
        "topics: {}\nprocessors: {x: {retention: 0d, dedupe_window: 1y}}\n",
    ];
    for msg in texts.iter().flat_map(|t| messages(t, NAMES)) {
        let message = msg.splitn(4, ':').nth(3).unwrap().trim_start();
        assert!(!message.ends_with('.'), "{msg}");
        assert!(!message.starts_with(char::is_uppercase), "{msg}");
    }
}

#[test]
fn wrong_shapes_at_the_top() {
    let text = "topics: 3\nprocessors: [a]\nextra: 1\n";
    assert_eq!(
        messages(text, NAMES),
        [
            "topology.yaml:1:9: `topics` must be a mapping, found `3`",
            "topology.yaml:2:13: `processors` must be a mapping, found a list",
            "topology.yaml:3:1: unknown field `extra`, expected one of: topics, processors",
        ]
    );
    assert_eq!(
        messages("", NAMES),
        [
            "topology.yaml:1:1: missing field `topics`",
            "topology.yaml:1:1: missing field `processors`",
        ]
    );
}

#[test]
fn accepts_flow_style_and_applies_defaults() {
    let text = "\
topics:
  inputs: { name: in, partitions: 3, retention: 12h }
  events: { name: ev, partitions: 3, retention: forever, compaction: true }
  dlq:    { name: dead, partitions: 1, retention: 2w }
processors:
  identity:     { inputs: [in], outputs: [ev, dead], projection_version: 2 }
  interactions: { inputs: [ev], outputs: [], projection_version: 1 }
";
    let t = parse(text, &decls(&["identity", "interactions"])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.topics.inputs.retention,
        Retention::Duration(Duration::from_secs(12 * 3_600))
    );
    assert!(!t.topics.inputs.compaction);
    assert!(t.topics.events.compaction);
    assert_eq!(t.topics.dlq.retention, Retention::Duration(days(14)));
    let identity = t.processor("identity").unwrap();
    assert_eq!(identity.projection_version, 2);
    assert_eq!(identity.dedupe_window, DEFAULT_DEDUPE_WINDOW);
    let interactions = t.processor("interactions").unwrap();
    assert!(interactions.outputs.is_empty());
    assert_eq!(interactions.duration_param("retention"), None);
    assert!(interactions.params.is_empty());
}

#[test]
fn flow_style_errors_have_locations_too() {
    let text = "\
topics:
  inputs: { name: in, partitions: -2, retention: 12h }
  events: { name: 'bad name', partitions: 99999999999, retention: forever }
  dlq:    { name: dead, partitions: 1, retention: 2w, compaction: 1 }
processors:
  identity: { inputs: [in, ~], outputs: [ev], projection_version: 1 }
";
    assert_eq!(
        messages(text, &["identity"]),
        [
            "topology.yaml:2:35: `topics.inputs.partitions` must be at least 1, found -2",
            "topology.yaml:3:19: invalid topic name `bad name` for `topics.events.name`: may contain only ascii letters, digits, `.`, `_` and `-`",
            "topology.yaml:3:43: `topics.events.partitions` must be at most 4294967295, found 99999999999",
            "topology.yaml:4:67: `topics.dlq.compaction` must be `true` or `false`, found `1`",
            "topology.yaml:6:28: `processors.identity.inputs` must be a string, found nothing",
        ]
    );
}

#[test]
fn unknown_processor_lists_the_known_ones_and_missing_ones_are_reported() {
    let text = FIXTURE.replace("  learning:\n", "  learnings:\n");
    let got = messages(
        &text,
        &[
            "identity",
            "person",
            "interactions",
            "journey",
            "learning",
            "audit",
        ],
    );
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().any(|m| m.ends_with(
        "unknown processor `learnings`, known processors: identity, person, interactions, journey, learning, audit"
    )), "{got:?}");
    assert!(got
        .iter()
        .any(|m| m.ends_with("missing processor `learning` in `processors`")));
    assert!(got
        .iter()
        .any(|m| m.ends_with("missing processor `audit` in `processors`")));

    // With no processor known, `interactions.retention` is no one's
    // parameter either.
    let got = messages(&text, &[]);
    assert!(
        got.iter()
            .filter(|m| !m.contains("unknown field `processors.interactions.retention`"))
            .all(|m| m.contains("known processors: (none)")),
        "{got:?}"
    );
}

#[test]
fn declared_wiring_is_enforced() {
    const FOLD: ProcessorDecl = ProcessorDecl {
        input: Some(TopicRole::Events),
        outputs: Some(&[TopicRole::Dlq]),
        ..ProcessorDecl::named("journey")
    };
    const IDENTITY: ProcessorDecl = ProcessorDecl {
        input: Some(TopicRole::Inputs),
        outputs: Some(&[TopicRole::Events, TopicRole::Dlq]),
        ..ProcessorDecl::named("identity")
    };
    let text = "\
topics:
  inputs: { name: in, partitions: 1, retention: 1d }
  events: { name: ev, partitions: 1, retention: forever }
  dlq:    { name: dead, partitions: 1, retention: 1d }
processors:
  identity: { inputs: [in], outputs: [dead, ev], projection_version: 1 }
  journey:  { inputs: [ev], outputs: [dead], projection_version: 1 }
";
    let t = parse(text, &[IDENTITY, FOLD]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.processor("identity").unwrap().outputs, ["dead", "ev"]);

    let wrong = text
        .replace("journey:  { inputs: [ev]", "journey:  { inputs: [in]")
        .replace("outputs: [dead, ev]", "outputs: [dead]");
    let errors: Vec<String> = parse(&wrong, &[IDENTITY, FOLD])
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "topology.yaml:6:38: `processors.identity.outputs` must be [ev, dead]: identity writes exactly these topics",
            "topology.yaml:7:23: `processors.journey.inputs` must be [ev]: journey reads the events topic",
        ]
    );
}

#[test]
fn parameters_are_typed_and_belong_to_their_processor() {
    let text = FIXTURE.replace("    retention: 365d\n", "    retention: 12\n");
    assert_eq!(
        messages(&text, NAMES),
        ["topology.yaml:64:16: invalid duration `12` for `processors.interactions.retention`: missing unit, expected one of ms, s, m, h, d, w"]
    );
}

#[test]
fn yaml_syntax_errors_and_duplicate_keys_stop_early() {
    let got = messages("topics:\n  inputs: [a\nprocessors: {}\n", NAMES);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("topology.yaml:"), "{got:?}");
    assert!(got[0].contains(": invalid yaml: "), "{got:?}");

    let text = "topics:\n  inputs: {}\n  inputs: {}\nprocessors: {}\n";
    assert_eq!(
        messages(text, NAMES),
        ["topology.yaml:3:3: duplicate key `inputs`, first defined at 2:3"]
    );

    let got = messages("- a\n- b\n", NAMES);
    assert_eq!(
        got,
        ["topology.yaml:1:1: invalid yaml: the top level must be a mapping"]
    );

    let got = messages("topics: &a {}\nprocessors: *a\n", NAMES);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].contains("anchors and aliases are not supported"),
        "{got:?}"
    );
}

#[test]
fn load_names_the_file_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, "topics: {}\nprocessors: {}\nnope: 1\n").unwrap();
    let err = load(&path, &[]).unwrap_err();
    let LoadError::Invalid(errors) = &err else {
        panic!("expected invalid, got {err:?}");
    };
    let prefix = format!("{}:", path.display());
    assert_eq!(errors.len(), 4, "{errors}");
    assert!(
        errors.iter().all(|e| e.to_string().starts_with(&prefix)),
        "{errors}"
    );
    assert!(
        err.to_string().contains(":3:1: unknown field `nope`"),
        "{err}"
    );

    let missing = dir.path().join("absent.yaml");
    let err = load(&missing, &decls(NAMES)).unwrap_err();
    assert!(matches!(err, LoadError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("cannot read topology file"),
        "{err}"
    );
}

#[test]
fn serializes_with_readable_durations() {
    let topology = fixture();
    let json = serde_json::to_value(&topology).unwrap();
    assert_eq!(json["topics"]["events"]["retention"], "forever");
    assert_eq!(json["topics"]["dlq"]["retention"], "30d");
    assert_eq!(json["processors"]["interactions"]["retention"], "365d");
    assert_eq!(
        json["processors"]["person"]["retention"],
        serde_json::Value::Null
    );
    assert_eq!(json["processors"]["person"]["dedupe_window"], "7d");
}

#[test]
fn empty_values_are_reported_at_their_key() {
    let text = "\
topics:
  inputs:
    name:
    partitions:
    retention:
  events: {name: ev, partitions: '', retention: \"\"}
  dlq: {name: dead, partitions: 1, retention: 1d}
processors:
  identity:
    inputs:
    outputs: [ev]
    projection_version: 1
";
    assert_eq!(
        messages(text, &["identity"]),
        [
            "topology.yaml:3:5: `topics.inputs.name` must be a string, found nothing",
            "topology.yaml:4:5: `topics.inputs.partitions` must be a whole number, found nothing",
            "topology.yaml:5:5: `topics.inputs.retention` must be a duration such as `7d`, found nothing",
            "topology.yaml:6:34: `topics.events.partitions` must be a whole number, found an empty quoted string",
            "topology.yaml:6:49: invalid duration `` for `topics.events.retention`: expected a duration such as `7d`, found an empty string",
            "topology.yaml:10:5: `processors.identity.inputs` must be a list of topic names, found nothing",
        ]
    );
}

#[test]
fn size_params_are_typed() {
    const SIZES: &[ParamSpec] = &[ParamSpec {
        name: "chunk_bytes",
        kind: ParamKind::Bytes,
    }];
    let decls = [
        ProcessorDecl::named("identity"),
        ProcessorDecl {
            params: SIZES,
            ..ProcessorDecl::named("interactions")
        },
    ];
    let text = |value: &str| {
        format!(
            "\
topics:
  inputs: {{ name: in, partitions: 1, retention: 1d }}
  events: {{ name: ev, partitions: 1, retention: forever }}
  dlq:    {{ name: dead, partitions: 1, retention: 2w }}
processors:
  identity:     {{ inputs: [in], outputs: [ev, dead], projection_version: 1 }}
  interactions: {{ inputs: [ev], outputs: [dead], projection_version: 1, chunk_bytes: {value} }}
"
        )
    };
    let t = parse(&text("256KiB"), &decls).unwrap_or_else(|e| panic!("{e}"));
    let interactions = t.processor("interactions").unwrap();
    assert_eq!(interactions.bytes_param("chunk_bytes"), Some(256 * 1024));
    assert_eq!(interactions.duration_param("chunk_bytes"), None);
    let t = parse(&text("4096"), &decls).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.processor("interactions")
            .unwrap()
            .bytes_param("chunk_bytes"),
        Some(4096)
    );
    let errors = parse(&text("1MB"), &decls).unwrap_err().to_string();
    assert!(
        errors.contains(
            "invalid size `1MB` for `processors.interactions.chunk_bytes`: unknown unit `MB`"
        ),
        "{errors}"
    );
    let errors = parse(&text("0KiB"), &decls).unwrap_err().to_string();
    assert!(errors.contains("must be greater than zero"), "{errors}");
}
