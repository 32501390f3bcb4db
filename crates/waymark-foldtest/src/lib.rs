//! Test support shared by the processors' tests: the golden fixture runner,
//! an event generator and the fold laws (house style: "applying twice equals
//! once, replay equals live").
//!
//! Generic over [`Fold`]; each test brings its own `EventData` strategy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use serde_json::Value;
use uuid::Uuid;
use waymark_core::{ApplyOutcome, Event, EventData, Fold, Identity, Position, Tracked};

/// The dedupe window of the fixtures and laws (the contract default).
pub const WINDOW: Duration = Duration::days(7);

/// The person every generated event belongs to.
pub const PERSON: Uuid = Uuid::from_u128(0x1111_1111_1111_1111_1111_1111_1111_1111);

/// `2026-01-01T00:00:00Z` plus `millis`.
pub fn time_at(millis: i64) -> DateTime<Utc> {
    let base: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().expect("valid time");
    base + Duration::milliseconds(millis)
}

/// The fixture cases of a crate: every directory under
/// `<manifest_dir>/tests/fixtures` (pass `env!("CARGO_MANIFEST_DIR")`).
pub fn fixture_cases(manifest_dir: &str) -> Vec<PathBuf> {
    let root = Path::new(manifest_dir).join("tests/fixtures");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

/// Reads `events.jsonl` of a case: canonical events, one per line.
///
/// Asserts every line is canonical (re-encoding gives the same bytes), so a
/// fixture cannot silently rely on something `Event::to_json` never writes.
pub fn read_events(case: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(case.join("events.jsonl")).expect("events.jsonl");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let event = Event::from_json(line.as_bytes())
                .unwrap_or_else(|e| panic!("{}: line {}: {e}", case.display(), i + 1));
            assert_eq!(
                String::from_utf8(event.to_json()).expect("utf-8"),
                line,
                "{}: line {} is not canonical",
                case.display(),
                i + 1
            );
            event
        })
        .collect()
}

/// Runs a fixture case through [`Tracked::apply`] (partition 0, offset =
/// line index, 7-day window), one record per person, and returns the actual
/// and the expected state per person as JSON.
pub fn run_fixture<F: Fold>(fold: &F, case: &Path) -> (Value, Value) {
    let mut persons: BTreeMap<Uuid, Tracked<F::State>> = BTreeMap::new();
    for (offset, event) in read_events(case).iter().enumerate() {
        let person = event.person_id.expect("fixture events carry a person_id");
        persons.entry(person).or_default().apply(
            fold,
            event,
            Position::new(0, offset as u64),
            WINDOW,
        );
    }
    let actual = Value::Object(
        persons
            .into_iter()
            .map(|(p, t)| {
                let state = serde_json::to_value(&t.state).expect("state serializes");
                (p.to_string(), state)
            })
            .collect(),
    );
    let expected = std::fs::read_to_string(case.join("expected.json")).expect("expected.json");
    let expected: Value = serde_json::from_str(&expected).expect("expected.json is json");
    (actual, expected)
}

/// The rows a fixture case leaves in the store, as the runtime encodes
/// them (postcard of [`Tracked`]), by person.
pub fn stored_rows<F: Fold>(fold: &F, case: &Path) -> BTreeMap<Uuid, Vec<u8>> {
    let mut persons: BTreeMap<Uuid, Tracked<F::State>> = BTreeMap::new();
    for (offset, event) in read_events(case).iter().enumerate() {
        let person = event.person_id.expect("fixture events carry a person_id");
        persons.entry(person).or_default().apply(
            fold,
            event,
            Position::new(0, offset as u64),
            WINDOW,
        );
    }
    persons
        .into_iter()
        .map(|(p, t)| (p, postcard::to_stdvec(&t).expect("rows encode")))
        .collect()
}

/// Checks the stored bytes of a fixture case against its golden
/// `stored.hex` (`<person> <hex>` per line): the encoding of stored state
/// must not change under a projection version, or rows already stored can
/// no longer be read. With `WAYMARK_BLESS=1` the file is (re)written.
pub fn assert_stored_encoding<F: Fold>(fold: &F, case: &Path) {
    let rows = stored_rows(fold, case);
    let text: String = rows
        .iter()
        .map(|(p, bytes)| {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("{p} {hex}\n")
        })
        .collect();
    let path = case.join("stored.hex");
    if std::env::var("WAYMARK_BLESS").as_deref() == Ok("1") {
        std::fs::write(&path, &text).expect("write stored.hex");
        return;
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        golden == text,
        "{}: the stored encoding of this processor's state changed (or stored.hex is \
         missing). Rows stored by the current projection version could no longer be read: \
         bump the processor's projection_version in topology.yaml so its projections are \
         rebuilt from the log, then regenerate the golden files with WAYMARK_BLESS=1 \
         cargo test.\n--- golden\n{golden}--- now\n{text}",
        path.display()
    );
}

/// Events of [`PERSON`] with data from `data`, ids from `ids` and event
/// times within `span_millis` of [`time_at`]`(0)`, in arbitrary order.
pub fn arb_events(
    data: impl Strategy<Value = EventData> + Clone,
    ids: impl Strategy<Value = String> + Clone,
    span_millis: i64,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Event>> {
    let event = (ids, 0..span_millis, data).prop_map(|(id, millis, data)| Event {
        id,
        time: time_at(millis),
        source: Some(Identity::new("web", "1")),
        person_id: Some(PERSON),
        data,
    });
    proptest::collection::vec(event, len)
}

/// Events with distinct ids (`u0`, `u1`, ...), otherwise like [`arb_events`].
pub fn arb_unique_events(
    data: impl Strategy<Value = EventData> + Clone,
    span_millis: i64,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Event>> {
    arb_events(data, Just(String::new()), span_millis, len).prop_map(|mut events| {
        for (i, e) in events.iter_mut().enumerate() {
            e.id = format!("u{i}");
        }
        events
    })
}

/// One live pass: every event at partition 0, offset = index.
pub fn live<F: Fold>(fold: &F, events: &[Event]) -> Tracked<F::State> {
    let mut tracked = Tracked::default();
    for (offset, event) in events.iter().enumerate() {
        tracked.apply(fold, event, Position::new(0, offset as u64), WINDOW);
    }
    tracked
}

/// Law: redelivering a record (same position, after a crash or rebalance)
/// changes nothing. `again[i]` says whether record `i` is delivered twice.
pub fn check_redelivery<F: Fold>(fold: &F, events: &[Event], again: &[bool]) {
    let mut tracked = Tracked::default();
    for (offset, event) in events.iter().enumerate() {
        let position = Position::new(0, offset as u64);
        tracked.apply(fold, event, position, WINDOW);
        if again.get(offset).copied().unwrap_or(false) {
            let before = tracked.clone();
            let outcome = tracked.apply(fold, event, position, WINDOW);
            assert_eq!(outcome, ApplyOutcome::Redelivered);
            assert_eq!(tracked, before, "redelivery changed the record");
        }
    }
    assert_eq!(tracked, live(fold, events));
}

/// Law: a duplicate id within the window is applied once. `copies` are
/// `(source, after)` pairs: a copy of `events[source]` is appended to the log
/// right after `events[max(source, after)]`. The caller keeps every event
/// time within the window of every other, so each copy is a duplicate.
pub fn check_duplicates<F: Fold>(fold: &F, events: &[Event], copies: &[(usize, usize)]) {
    if events.is_empty() {
        return;
    }
    let mut after: BTreeMap<usize, Vec<&Event>> = BTreeMap::new();
    for &(source, at) in copies {
        let source = source % events.len();
        let at = source.max(at % events.len());
        after.entry(at).or_default().push(&events[source]);
    }
    let mut with_copies = Vec::new();
    for (i, e) in events.iter().enumerate() {
        with_copies.push((e, false));
        for copy in after.get(&i).into_iter().flatten() {
            with_copies.push((copy, true));
        }
    }
    let mut tracked = Tracked::default();
    for (offset, (event, is_copy)) in with_copies.iter().enumerate() {
        let outcome = tracked.apply(fold, event, Position::new(0, offset as u64), WINDOW);
        if *is_copy {
            assert_eq!(outcome, ApplyOutcome::Duplicate, "copy of {}", event.id);
        }
    }
    let once = live(fold, events);
    assert_eq!(tracked.state, once.state);
    assert_eq!(tracked.latest_time, once.latest_time);
    assert_eq!(tracked.seen, once.seen);
}

/// Law: replaying the log in chunks, with the record stored (postcard) and
/// loaded between chunks as the runtime does, equals one live pass. `cuts`
/// are chunk boundaries (taken modulo the log length).
pub fn check_chunked_replay<F: Fold>(fold: &F, events: &[Event], cuts: &[usize]) {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (events.len() + 1)).collect();
    bounds.push(0);
    bounds.push(events.len());
    bounds.sort_unstable();
    bounds.dedup();
    let mut tracked: Tracked<F::State> = Tracked::default();
    for w in bounds.windows(2) {
        let bytes = postcard::to_allocvec(&tracked).expect("record serializes");
        tracked = postcard::from_bytes(&bytes).expect("record deserializes");
        for (offset, event) in events.iter().enumerate().take(w[1]).skip(w[0]) {
            tracked.apply(fold, event, Position::new(0, offset as u64), WINDOW);
        }
    }
    let bytes = postcard::to_allocvec(&tracked).expect("record serializes");
    let stored: Tracked<F::State> = postcard::from_bytes(&bytes).expect("record deserializes");
    assert_eq!(stored, tracked, "postcard round trip is lossless");
    assert_eq!(tracked, live(fold, events));
}
