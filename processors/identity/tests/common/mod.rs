//! Test support shared by this crate's integration tests: fixture reading,
//! event generators, a runtime-like batch driver with a store, and a strict
//! view that fails on any read the documented preloading did not cover.
#![allow(dead_code, unreachable_pub)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde::Serialize;
use uuid::Uuid;
use waymark_core::{Event, EventData, Identity};
use waymark_identity::{
    needed_identities, resolve, IdentityChanges, IdentityRow, IdentityView, MemoryView,
    PersonLinks, Stamp,
};

/// The fixture cases of this crate: every directory under `tests/fixtures`.
pub fn fixture_cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

/// Reads `events.jsonl` of a case, asserting every line is canonical.
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

/// The tables as stored: postcard-encoded rows by store key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Store {
    /// identities table: `Identity::key()` -> `IdentityRow`.
    pub identities: BTreeMap<String, Vec<u8>>,
    /// persons table: person uuid -> `PersonLinks`.
    pub persons: BTreeMap<Uuid, Vec<u8>>,
}

/// An identity row as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShownIdentity {
    pub person_id: Uuid,
}

/// A person row as a reader sees it (contract §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShownPerson {
    pub identities: Vec<Identity>,
    pub merged_into: Option<Uuid>,
}

impl Store {
    pub fn identity(&self, id: &Identity) -> Option<IdentityRow> {
        let bytes = self.identities.get(&id.key())?;
        Some(postcard::from_bytes(bytes).expect("identity row decodes"))
    }

    pub fn person(&self, person: Uuid) -> Option<PersonLinks> {
        let bytes = self.persons.get(&person)?;
        Some(postcard::from_bytes(bytes).expect("person row decodes"))
    }

    /// Writes the changed identity rows and merges the person changes into
    /// the stored person rows.
    pub fn write(&mut self, changes: IdentityChanges) {
        for (id, row) in changes.identities {
            let bytes = postcard::to_allocvec(&row).expect("identity row encodes");
            self.identities.insert(id.key(), bytes);
        }
        for change in &changes.person_changes {
            let mut links = self.person(change.person).unwrap_or_default();
            links.apply(change);
            let bytes = postcard::to_allocvec(&links).expect("person row encodes");
            self.persons.insert(change.person, bytes);
        }
    }

    /// The decoded tables as readers see them.
    pub fn tables(&self) -> (BTreeMap<String, ShownIdentity>, BTreeMap<Uuid, ShownPerson>) {
        let identities = self
            .identities
            .iter()
            .map(|(k, v)| {
                let row: IdentityRow = postcard::from_bytes(v).expect("decodes");
                (
                    k.clone(),
                    ShownIdentity {
                        person_id: row.person_id,
                    },
                )
            })
            .collect();
        let persons = self
            .persons
            .iter()
            .map(|(k, v)| {
                let links: PersonLinks = postcard::from_bytes(v).expect("decodes");
                (*k, shown_person(&links))
            })
            .collect();
        (identities, persons)
    }
}

/// How a person row reads.
pub fn shown_person(links: &PersonLinks) -> ShownPerson {
    ShownPerson {
        identities: links.identities().cloned().collect(),
        merged_into: links.merged_into(),
    }
}

/// A [`MemoryView`] that panics on reading a row that was neither loaded
/// (present or known absent) nor written in this batch.
#[derive(Default)]
pub struct StrictView {
    pub inner: MemoryView,
    identities: RefCell<BTreeSet<Identity>>,
}

impl StrictView {
    /// Loads what the crate docs say the runtime must load for `events`.
    pub fn preload(store: &Store, events: &[Event]) -> Self {
        let view = StrictView::default();
        let mut inner = MemoryView::new();
        for e in events {
            for id in needed_identities(e) {
                if let Some(row) = store.identity(&id) {
                    inner.load_identity(id.clone(), row);
                }
                view.identities.borrow_mut().insert(id);
            }
        }
        StrictView { inner, ..view }
    }
}

impl IdentityView for StrictView {
    fn identity(&self, id: &Identity) -> Option<IdentityRow> {
        assert!(
            self.identities.borrow().contains(id),
            "read of identity {id} that was not preloaded"
        );
        self.inner.identity(id)
    }

    fn set_identity(&mut self, id: &Identity, row: IdentityRow) {
        self.identities.borrow_mut().insert(id.clone());
        self.inner.set_identity(id, row);
    }
}

/// The stamp of event `i` of a test log: partition 0, offset `i`.
pub fn stamp(events: &[Event], i: usize) -> Stamp {
    Stamp::of(&events[i], 0, i as u64)
}

/// Resolves `events` in batches as the runtime does: preload, resolve,
/// take the changes, write them to `store`. Returns the resolved persons.
pub fn run_batches(store: &mut Store, events: &[Event], cuts: &[usize]) -> Vec<Uuid> {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (events.len() + 1)).collect();
    bounds.push(0);
    bounds.push(events.len());
    bounds.sort_unstable();
    bounds.dedup();
    let mut persons = Vec::new();
    for w in bounds.windows(2) {
        let mut view = StrictView::preload(store, &events[w[0]..w[1]]);
        for i in w[0]..w[1] {
            let mut e = events[i].clone();
            let resolved = resolve(&mut view, &mut e, stamp(events, i)).expect("valid event");
            persons.push(resolved.person);
        }
        store.write(view.inner.take_changes());
    }
    persons
}

/// One live pass over a single view that holds everything.
pub fn live(events: &[Event]) -> (Vec<Uuid>, Store) {
    let mut view = MemoryView::new();
    let persons = (0..events.len())
        .map(|i| {
            resolve(&mut view, &mut events[i].clone(), stamp(events, i))
                .expect("valid event")
                .person
        })
        .collect();
    let mut store = Store::default();
    store.write(view.take_changes());
    (persons, store)
}

/// A small universe of identities, so that links and re-links collide.
pub fn arb_identity() -> impl Strategy<Value = Identity> + Clone {
    (prop_oneof![Just("tg"), Just("web")], 1..4u8)
        .prop_map(|(platform, n)| Identity::new(platform, n.to_string()))
}

/// Producer-given person ids: one that is also a default person, two not.
pub fn arb_person_id() -> impl Strategy<Value = Uuid> + Clone {
    prop_oneof![
        Just(Identity::new("tg", "1").default_person_id()),
        Just(Uuid::from_u128(0xC1)),
        Just(Uuid::from_u128(0xC2)),
    ]
}

/// Valid input events: a source, a person id or both; half of them links.
pub fn arb_event() -> impl Strategy<Value = Event> + Clone {
    let who = prop_oneof![
        4 => arb_identity().prop_map(|s| (Some(s), None)),
        1 => arb_person_id().prop_map(|p| (None, Some(p))),
        1 => (arb_identity(), arb_person_id()).prop_map(|(s, p)| (Some(s), Some(p))),
    ];
    let data = prop_oneof![
        arb_identity().prop_map(EventData::IdentityLinked),
        Just(EventData::JourneyCompleted {
            journey_id: "j".into()
        }),
    ];
    (who, data).prop_map(|((source, person_id), data)| Event {
        id: "e".into(),
        time: "2026-01-01T00:00:00Z".parse().expect("valid time"),
        source,
        person_id,
        data,
    })
}

/// Every identity row points to a person whose links contain it, and every
/// identity is in exactly one person's links.
pub fn check_invariants(store: &Store) {
    let (identities, persons) = store.tables();
    let mut owners: HashMap<Identity, Vec<Uuid>> = HashMap::new();
    for (p, links) in &persons {
        for id in &links.identities {
            owners.entry(id.clone()).or_default().push(*p);
        }
    }
    for (key, row) in &identities {
        let id = owners
            .keys()
            .find(|id| id.key() == *key)
            .unwrap_or_else(|| panic!("{key} is in no person's links"));
        assert_eq!(owners[id], vec![row.person_id], "owners of {key}");
    }
    assert_eq!(
        owners.len(),
        identities.len(),
        "links of unknown identities"
    );
}
