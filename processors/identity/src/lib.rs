//! The identity processor: resolves each event of `waymark.inputs` to a
//! person and owns the identity links (contract §2 "Default person id", §4
//! "Identity"). Its output, the same event with `person_id` set, is what the
//! runtime writes to `waymark.events`, keyed by that person.
//!
//! Unlike the projection processors this is not a [`Fold`](waymark_core::Fold)
//! over one person's state: resolving an event reads and writes rows of
//! several keys (the source identity, the linked identity, two persons). It
//! works against an [`IdentityView`] of two tables:
//!
//! | table | key | row |
//! |---|---|---|
//! | identities | [`Identity::key`] (`<platform>:<platform_id>`) | [`IdentityRow`] |
//! | persons | person uuid | [`PersonLinks`] |
//!
//! # Layout
//! - [`resolve`]: the rules, applied to one event.
//! - [`IdentityView`]: what [`resolve`] reads and writes.
//! - [`MemoryView`]: an in-memory view over `HashMap`s: the whole state in
//!   tests, or the runtime's per-batch overlay (load rows, resolve the
//!   batch, [`MemoryView::take_changes`], write them with the batch's
//!   offsets).
//! - [`needed_identities`], [`needed_persons`]: what the runtime must load
//!   into the overlay before a batch.
//! - `handler.rs`: the processor as a plugin ([`IdentityProcessor`]) and
//!   its batch handler ([`IdentityHandler`]), which does exactly that.
//!
//! # Rules
//! 1. If `event.person_id` is set, resolution is skipped: the person is that
//!    id and the source identity (if any) is not recorded.
//! 2. Otherwise the person is the source identity's person. The first time
//!    an identity is seen it gets its default person
//!    ([`Identity::default_person_id`]), the identity is recorded as
//!    belonging to it and added to that person's `identities`.
//! 3. `identity.linked` with data identity `T`: unless `T` already belongs
//!    to the person, `T` is re-pointed to the person and added to the
//!    person's `identities`; if `T` belonged to another person `q`, `T` is
//!    removed from `q`'s `identities` and `q.merged_into` is set to the
//!    person. `q`'s projections stay where they are (its past state).
//! 4. Finally `event.person_id` is set to the person.
//!
//! Only the linked identity moves: other identities of `q` keep resolving to
//! `q`, whose `merged_into` tells readers where it went.
//!
//! # Preloading (closing the view over a batch)
//! [`resolve`] never asks for a row that was not loaded when, before a
//! batch, the runtime loads into the [`MemoryView`]:
//! 1. the identity rows of [`needed_identities`] of every event in the batch
//!    (absent rows simply stay absent), then
//! 2. the person rows of [`needed_persons`] of every event, given those
//!    identity rows: the persons the loaded identities point to, the default
//!    persons of those identities, and the events' own `person_id`s.
//!
//! Every other row [`resolve`] touches during the batch was written earlier
//! in the same batch, so it is in the overlay. A row missing from the view
//! reads as "unknown" (no person, or a person without links), so a row that
//! exists in the store but was not loaded would be overwritten: load first.
//!
//! # Guarantees
//! Pure and synchronous: no IO, no clock, no randomness; default person ids
//! are deterministic (UUIDv5), so a replay of `waymark.inputs` from offset 0
//! into empty tables reproduces the same person ids and links. Resolving an
//! event again right after it was resolved (a redelivery) gives the same
//! person and changes no row. Events are resolved in log order; a link only
//! affects events resolved after it.

mod handler;

use std::collections::{BTreeSet, HashMap};

pub use handler::{
    IdentityHandler, IdentityProcessor, IdentityTables, LINKS, NAME, PERSONS, STATE_ENCODING,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use waymark_core::{Event, EventData, Identity, RejectKind, Rejection};

/// A row of the identities table (key: [`Identity::key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IdentityRow {
    /// The person the identity resolves to.
    pub person_id: Uuid,
}

/// A row of the persons table (key: the person uuid): the identity side of
/// a person (contract §4 "Person": `identities`, `merged_into`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PersonLinks {
    /// Every identity that resolves to this person, sorted by platform then
    /// platform id.
    pub identities: BTreeSet<Identity>,
    /// The person this one was merged into by an `identity.linked`, if any.
    pub merged_into: Option<Uuid>,
}

/// The rows [`resolve`] reads and writes.
///
/// Reads of rows that do not exist return `None`; writes replace the row.
pub trait IdentityView {
    /// The person `id` resolves to, if it was seen before.
    fn identity(&self, id: &Identity) -> Option<Uuid>;
    /// Points `id` to `person`.
    fn set_identity(&mut self, id: &Identity, person: Uuid);
    /// The links of `person`, if it has a row.
    fn person(&self, person: Uuid) -> Option<PersonLinks>;
    /// Replaces the links of `person`.
    fn put_person(&mut self, person: Uuid, links: PersonLinks);
}

/// An [`IdentityView`] over `HashMap`s that remembers which rows changed.
///
/// Rows put in with [`MemoryView::load_identity`] / [`MemoryView::load_person`]
/// are not changes; rows written through [`IdentityView`] are, until
/// [`MemoryView::take_changes`] hands them out.
#[derive(Debug, Clone, Default)]
pub struct MemoryView {
    identities: HashMap<Identity, Uuid>,
    persons: HashMap<Uuid, PersonLinks>,
    changed_identities: BTreeSet<Identity>,
    changed_persons: BTreeSet<Uuid>,
}

/// The rows a batch changed, as [`MemoryView::take_changes`] returns them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityChanges {
    /// Changed identity rows, sorted by identity (store key: [`Identity::key`]).
    pub identities: Vec<(Identity, IdentityRow)>,
    /// Changed person rows, sorted by person id.
    pub persons: Vec<(Uuid, PersonLinks)>,
}

impl IdentityChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.persons.is_empty()
    }
}

impl MemoryView {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a stored identity row (not a change).
    pub fn load_identity(&mut self, id: Identity, row: IdentityRow) {
        self.identities.insert(id, row.person_id);
    }

    /// Loads a stored person row (not a change).
    pub fn load_person(&mut self, person: Uuid, links: PersonLinks) {
        self.persons.insert(person, links);
    }

    /// The rows written since the last call, with their current values.
    /// The view keeps its rows, so it can go on serving as a cache.
    pub fn take_changes(&mut self) -> IdentityChanges {
        let identities = std::mem::take(&mut self.changed_identities)
            .into_iter()
            .filter_map(|id| {
                let person_id = *self.identities.get(&id)?;
                Some((id, IdentityRow { person_id }))
            })
            .collect();
        let persons = std::mem::take(&mut self.changed_persons)
            .into_iter()
            .filter_map(|p| Some((p, self.persons.get(&p)?.clone())))
            .collect();
        IdentityChanges {
            identities,
            persons,
        }
    }
}

impl IdentityView for MemoryView {
    fn identity(&self, id: &Identity) -> Option<Uuid> {
        self.identities.get(id).copied()
    }

    fn set_identity(&mut self, id: &Identity, person: Uuid) {
        self.identities.insert(id.clone(), person);
        self.changed_identities.insert(id.clone());
    }

    fn person(&self, person: Uuid) -> Option<PersonLinks> {
        self.persons.get(&person).cloned()
    }

    fn put_person(&mut self, person: Uuid, links: PersonLinks) {
        self.persons.insert(person, links);
        self.changed_persons.insert(person);
    }
}

/// The identity rows [`resolve`] may read for `event`: its source when it
/// has no `person_id`, and the linked identity of an `identity.linked`.
pub fn needed_identities(event: &Event) -> Vec<Identity> {
    let mut ids = Vec::with_capacity(2);
    if event.person_id.is_none() {
        ids.extend(event.source.iter().cloned());
    }
    if let EventData::IdentityLinked(linked) = &event.data {
        if !ids.contains(linked) {
            ids.push(linked.clone());
        }
    }
    ids
}

/// The person rows [`resolve`] may read for `event`, given `stored`, the
/// stored person of an identity (the rows loaded for
/// [`needed_identities`]): the event's `person_id`, and for each needed
/// identity its stored person and its default person.
pub fn needed_persons(event: &Event, stored: impl Fn(&Identity) -> Option<Uuid>) -> Vec<Uuid> {
    let mut persons: Vec<Uuid> = event.person_id.into_iter().collect();
    for id in needed_identities(event) {
        persons.extend(stored(&id));
        persons.push(id.default_person_id());
    }
    persons.sort_unstable();
    persons.dedup();
    persons
}

/// Resolves `event` to its person through `view` (see the crate docs for
/// the rules), sets `event.person_id` and returns the person.
///
/// # Errors
/// An event with neither `person_id` nor `source` breaks contract §2 and
/// cannot be resolved: [`RejectKind::InvalidEnvelope`], and nothing changes.
/// Validated input never has that shape.
pub fn resolve(view: &mut impl IdentityView, event: &mut Event) -> Result<Uuid, Rejection> {
    let person = match (event.person_id, &event.source) {
        (Some(person), _) => person,
        (None, Some(source)) => match view.identity(source) {
            Some(person) => person,
            None => {
                let person = source.default_person_id();
                view.set_identity(source, person);
                add_identity(view, person, source);
                person
            }
        },
        (None, None) => {
            return Err(Rejection::new(
                RejectKind::InvalidEnvelope,
                "source is required unless person_id is set",
            ))
        }
    };

    if let EventData::IdentityLinked(linked) = &event.data {
        let previous = view.identity(linked);
        if previous != Some(person) {
            view.set_identity(linked, person);
            add_identity(view, person, linked);
            if let Some(previous) = previous {
                let mut links = view.person(previous).unwrap_or_default();
                links.identities.remove(linked);
                links.merged_into = Some(person);
                view.put_person(previous, links);
            }
        }
    }

    event.person_id = Some(person);
    Ok(person)
}

fn add_identity(view: &mut impl IdentityView, person: Uuid, id: &Identity) {
    let mut links = view.person(person).unwrap_or_default();
    if links.identities.insert(id.clone()) {
        view.put_person(person, links);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        let (platform, platform_id) = s.split_once(':').unwrap();
        Identity::new(platform, platform_id)
    }

    fn event(source: Option<&str>, person_id: Option<Uuid>, data: EventData) -> Event {
        Event {
            id: "e".into(),
            time: "2026-01-01T00:00:00Z".parse().unwrap(),
            source: source.map(id),
            person_id,
            data,
        }
    }

    fn other() -> EventData {
        EventData::JourneyCompleted {
            journey_id: "j".into(),
        }
    }

    fn link(to: &str) -> EventData {
        EventData::IdentityLinked(id(to))
    }

    fn run(view: &mut MemoryView, mut e: Event) -> Uuid {
        let person = resolve(view, &mut e).unwrap();
        assert_eq!(e.person_id, Some(person));
        person
    }

    fn links(ids: &[&str], merged_into: Option<Uuid>) -> PersonLinks {
        PersonLinks {
            identities: ids.iter().map(|s| id(s)).collect(),
            merged_into,
        }
    }

    #[test]
    fn first_sight_gets_the_default_person_and_is_recorded() {
        let mut view = MemoryView::new();
        let p = run(&mut view, event(Some("tg:1"), None, other()));
        assert_eq!(p, id("tg:1").default_person_id());
        assert_eq!(
            view.take_changes(),
            IdentityChanges {
                identities: vec![(id("tg:1"), IdentityRow { person_id: p })],
                persons: vec![(p, links(&["tg:1"], None))],
            }
        );
    }

    #[test]
    fn a_known_identity_resolves_to_its_person_without_writes() {
        let mut view = MemoryView::new();
        let q = Uuid::from_u128(7);
        view.load_identity(id("tg:1"), IdentityRow { person_id: q });
        view.load_person(q, links(&["tg:1"], None));
        assert_eq!(run(&mut view, event(Some("tg:1"), None, other())), q);
        assert!(view.take_changes().is_empty());
    }

    #[test]
    fn a_given_person_id_skips_resolution() {
        let mut view = MemoryView::new();
        let q = Uuid::from_u128(7);
        assert_eq!(run(&mut view, event(Some("tg:1"), Some(q), other())), q);
        assert_eq!(view.identity(&id("tg:1")), None);
        assert!(view.take_changes().is_empty());
    }

    #[test]
    fn linking_an_unseen_identity_adds_it_without_a_merge() {
        let mut view = MemoryView::new();
        let p = run(&mut view, event(Some("tg:1"), None, link("web:a")));
        assert_eq!(view.identity(&id("web:a")), Some(p));
        assert_eq!(view.person(p), Some(links(&["tg:1", "web:a"], None)));
        assert_eq!(view.person(id("web:a").default_person_id()), None);
    }

    #[test]
    fn linking_another_persons_identity_moves_it_and_merges_that_person() {
        let mut view = MemoryView::new();
        let q = run(&mut view, event(Some("web:a"), None, other()));
        run(&mut view, event(Some("web:a"), None, link("email:x")));
        let p = run(&mut view, event(Some("tg:1"), None, link("web:a")));
        assert_ne!(p, q);
        assert_eq!(view.person(p), Some(links(&["tg:1", "web:a"], None)));
        assert_eq!(view.person(q), Some(links(&["email:x"], Some(p))));
        // resolving either identity afterwards gives the source's person
        assert_eq!(run(&mut view, event(Some("web:a"), None, other())), p);
        assert_eq!(run(&mut view, event(Some("tg:1"), None, other())), p);
        // only the linked identity moved
        assert_eq!(run(&mut view, event(Some("email:x"), None, other())), q);
    }

    #[test]
    fn linking_an_identity_the_person_already_has_changes_nothing() {
        let mut view = MemoryView::new();
        run(&mut view, event(Some("tg:1"), None, link("web:a")));
        view.take_changes();
        run(&mut view, event(Some("tg:1"), None, link("web:a")));
        run(&mut view, event(Some("tg:1"), None, link("tg:1")));
        assert!(view.take_changes().is_empty());
    }

    #[test]
    fn a_self_link_on_first_sight_only_records_the_source() {
        let mut view = MemoryView::new();
        let p = run(&mut view, event(Some("tg:1"), None, link("tg:1")));
        assert_eq!(view.person(p), Some(links(&["tg:1"], None)));
    }

    #[test]
    fn a_link_with_a_given_person_id_links_to_that_person() {
        let mut view = MemoryView::new();
        let q = run(&mut view, event(Some("tg:1"), None, other()));
        let c = Uuid::from_u128(42);
        assert_eq!(run(&mut view, event(None, Some(c), link("tg:1"))), c);
        assert_eq!(view.identity(&id("tg:1")), Some(c));
        assert_eq!(view.person(c), Some(links(&["tg:1"], None)));
        assert_eq!(view.person(q), Some(links(&[], Some(c))));
    }

    #[test]
    fn first_sight_keeps_existing_links_of_the_default_person() {
        let mut view = MemoryView::new();
        let d = id("tg:1").default_person_id();
        view.load_person(d, links(&["web:z"], None));
        run(&mut view, event(Some("tg:1"), None, other()));
        assert_eq!(view.person(d), Some(links(&["tg:1", "web:z"], None)));
    }

    #[test]
    fn an_event_without_person_and_source_is_rejected_unchanged() {
        let mut view = MemoryView::new();
        let mut e = event(None, None, link("tg:1"));
        let err = resolve(&mut view, &mut e).unwrap_err();
        assert_eq!(err.kind, RejectKind::InvalidEnvelope);
        assert_eq!(e.person_id, None);
        assert!(view.take_changes().is_empty());
    }

    #[test]
    fn needed_rows() {
        let p = Uuid::from_u128(9);
        assert_eq!(
            needed_identities(&event(Some("tg:1"), None, other())),
            [id("tg:1")]
        );
        assert!(needed_identities(&event(Some("tg:1"), Some(p), other())).is_empty());
        assert_eq!(
            needed_identities(&event(Some("tg:1"), None, link("web:a"))),
            [id("tg:1"), id("web:a")]
        );
        assert_eq!(
            needed_identities(&event(Some("tg:1"), None, link("tg:1"))),
            [id("tg:1")]
        );
        assert_eq!(
            needed_identities(&event(Some("tg:1"), Some(p), link("web:a"))),
            [id("web:a")]
        );

        let e = event(Some("tg:1"), Some(p), link("web:a"));
        let q = Uuid::from_u128(3);
        let mut want = vec![p, q, id("web:a").default_person_id()];
        want.sort_unstable();
        assert_eq!(needed_persons(&e, |_| Some(q)), want);
    }

    #[test]
    fn loaded_rows_are_not_changes_and_changes_are_taken_once() {
        let mut view = MemoryView::new();
        view.load_identity(id("tg:1"), IdentityRow::default());
        view.load_person(Uuid::nil(), PersonLinks::default());
        assert!(view.take_changes().is_empty());
        view.set_identity(&id("tg:2"), Uuid::nil());
        assert_eq!(view.take_changes().identities.len(), 1);
        assert!(view.take_changes().is_empty());
        assert_eq!(view.identity(&id("tg:2")), Some(Uuid::nil()));
    }
}
