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
use waymark_runtime::row::{decode_row, encode_row};

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

/// Folds a fixture case through [`Tracked::apply`] (partition 0, offset =
/// line index, 7-day window), one record per person.
fn fold_case<F: Fold>(fold: &F, case: &Path) -> BTreeMap<Uuid, Tracked<F::State>> {
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
}

/// Runs a fixture case (see `fold_case`) and returns the actual and the
/// expected state per person as JSON.
pub fn run_fixture<F: Fold>(fold: &F, case: &Path) -> (Value, Value) {
    let actual = Value::Object(
        fold_case(fold, case)
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
/// them ([`waymark_runtime::row::encode_row`] of [`Tracked`], state
/// encoding `encoding`), by person.
pub fn stored_rows<F: Fold>(fold: &F, encoding: u32, case: &Path) -> BTreeMap<Uuid, Vec<u8>> {
    fold_case(fold, case)
        .into_iter()
        .map(|(p, t)| (p, encode_row(encoding, &t)))
        .collect()
}

/// FNV-1a, 64 bits: a stable fingerprint of a fixture's events.
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A golden `stored.hex`: the state encoding and the fingerprint of the
/// events it was made with, then `<person> <hex>` per line.
#[derive(Debug, PartialEq, Eq)]
struct Golden {
    encoding: Option<u32>,
    events: Option<u64>,
    rows: String,
}

impl Golden {
    fn parse(text: &str) -> Self {
        let mut golden = Golden {
            encoding: None,
            events: None,
            rows: String::new(),
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("state_encoding ") {
                golden.encoding = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("events ") {
                golden.events = u64::from_str_radix(v.trim(), 16).ok();
            } else {
                golden.rows.push_str(line);
                golden.rows.push('\n');
            }
        }
        golden
    }

    fn render(&self) -> String {
        format!(
            "state_encoding {}\nevents {:016x}\n{}",
            self.encoding.unwrap_or_default(),
            self.events.unwrap_or_default(),
            self.rows
        )
    }
}

/// Checks the stored bytes of a fixture case against its golden
/// `stored.hex`: rows already stored must stay readable, so the stored
/// shape of a processor's state may change only together with its state
/// encoding ([`waymark_runtime::row`]), and then it needs a new
/// `projection_version` too.
///
/// With `WAYMARK_BLESS=1` the file is (re)written, except when the bytes
/// changed while both the fixture's events and `encoding` stayed the same:
/// that is a changed state type whose encoding was not raised, and
/// blessing it would hide exactly what this test exists to catch.
pub fn assert_stored_encoding<F: Fold>(fold: &F, encoding: u32, case: &Path) {
    let rows: BTreeMap<String, Vec<u8>> = stored_rows(fold, encoding, case)
        .into_iter()
        .map(|(p, bytes)| (p.to_string(), bytes))
        .collect();
    assert_golden_rows(encoding, case, &rows);
}

/// [`assert_stored_encoding`] for the rows a processor with its own
/// handler (sub-keyed state) stores for a case: `rows` by key, written with
/// state encoding `encoding`.
pub fn assert_golden_rows(encoding: u32, case: &Path, rows: &BTreeMap<String, Vec<u8>>) {
    let rows: String = rows
        .iter()
        .map(|(key, bytes)| {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("{key} {hex}\n")
        })
        .collect();
    let events = std::fs::read(case.join("events.jsonl")).expect("events.jsonl");
    let now = Golden {
        encoding: Some(encoding),
        events: Some(fingerprint(&events)),
        rows,
    };
    let path = case.join("stored.hex");
    let golden = std::fs::read_to_string(&path)
        .ok()
        .map(|t| Golden::parse(&t));
    if golden.as_ref() == Some(&now) {
        return;
    }
    let unraised = golden
        .as_ref()
        .is_some_and(|g| g.encoding == now.encoding && g.events == now.events);
    let bless = std::env::var("WAYMARK_BLESS").as_deref() == Ok("1");
    assert!(
        !unraised,
        "{}: the stored shape of this processor's state changed, but its state encoding is \
         still {encoding}. Rows stored by the current projection version could no longer be \
         read: raise STATE_ENCODING in the processor's crate, raise its projection_version in \
         topology.yaml (the new version is rebuilt from the log), then regenerate the golden \
         files with WAYMARK_BLESS=1 cargo test.\n--- golden\n{}--- now\n{}",
        path.display(),
        golden.map(|g| g.rows).unwrap_or_default(),
        now.rows
    );
    if bless {
        std::fs::write(&path, now.render()).expect("write stored.hex");
        return;
    }
    panic!(
        "{}: stored.hex is missing or was made from other events or another state encoding; \
         regenerate it with WAYMARK_BLESS=1 cargo test (a new state encoding also needs a new \
         projection_version in topology.yaml)",
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

/// Law: replaying the log in chunks, with the record stored and loaded
/// between chunks as the runtime does ([`waymark_runtime::row`]), equals one live pass. `cuts`
/// are chunk boundaries (taken modulo the log length).
pub fn check_chunked_replay<F: Fold>(fold: &F, events: &[Event], cuts: &[usize]) {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (events.len() + 1)).collect();
    bounds.push(0);
    bounds.push(events.len());
    bounds.sort_unstable();
    bounds.dedup();
    let mut tracked: Tracked<F::State> = Tracked::default();
    for w in bounds.windows(2) {
        let bytes = encode_row(1, &tracked);
        tracked = decode_row(1, "t", "k", &bytes).expect("record deserializes");
        for (offset, event) in events.iter().enumerate().take(w[1]).skip(w[0]) {
            tracked.apply(fold, event, Position::new(0, offset as u64), WINDOW);
        }
    }
    let bytes = encode_row(1, &tracked);
    let stored: Tracked<F::State> = decode_row(1, "t", "k", &bytes).expect("record deserializes");
    assert_eq!(stored, tracked, "the stored round trip is lossless");
    assert_eq!(tracked, live(fold, events));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts events.
    struct Count;
    impl Fold for Count {
        type State = u64;
        fn apply(&self, state: &mut u64, _: &Event) {
            *state += 1;
        }
    }

    /// Counts events into another shape of state: what a changed type is.
    struct Wider;
    impl Fold for Wider {
        type State = (u64, bool);
        fn apply(&self, state: &mut (u64, bool), _: &Event) {
            state.0 += 1;
        }
    }

    fn case() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "waymark-foldtest-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let event = Event {
            id: "e1".into(),
            time: time_at(0),
            source: Some(Identity::new("web", "1")),
            person_id: Some(PERSON),
            data: EventData::JourneyStarted {
                journey_id: "j".into(),
                stage: None,
            },
        };
        let mut line = event.to_json();
        line.push(b'\n');
        std::fs::write(dir.join("events.jsonl"), line).unwrap();
        let _ = std::fs::remove_file(dir.join("stored.hex"));
        dir
    }

    fn bless(f: impl FnOnce()) {
        // Tests of this module run one at a time under this lock.
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("WAYMARK_BLESS", "1");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        std::env::remove_var("WAYMARK_BLESS");
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn a_changed_state_type_is_refused_until_its_encoding_is_raised() {
        let case = case();
        bless(|| assert_stored_encoding(&Count, 1, &case));
        assert_stored_encoding(&Count, 1, &case);
        // The type changed, the encoding did not: even blessing refuses.
        let refused = std::panic::catch_unwind(|| {
            bless(|| assert_stored_encoding(&Wider, 1, &case));
        });
        let message = refused
            .err()
            .and_then(|p| p.downcast_ref::<String>().cloned())
            .expect("refused with a message");
        assert!(message.contains("still 1"), "{message}");
        assert!(message.contains("projection_version"), "{message}");
        // Raised: a stale golden fails, blessing accepts it.
        assert!(std::panic::catch_unwind(|| assert_stored_encoding(&Wider, 2, &case)).is_err());
        bless(|| assert_stored_encoding(&Wider, 2, &case));
        assert_stored_encoding(&Wider, 2, &case);
        std::fs::remove_dir_all(&case).unwrap();
    }
}
