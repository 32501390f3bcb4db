//! The identity processor: resolves each event of `waymark.inputs` to a
//! person and owns the identity links (contract §2 "Default person id", §4
//! "Identity"). Its output, the same event with `person_id` set, is what the
//! runtime writes to `waymark.events`, keyed by that person.
//!
//! Unlike the projection processors this is not a [`Fold`](waymark_core::Fold)
//! over one person's state: resolving an event reads and writes rows of
//! several keys (the source identity, the linked identity, two persons), and
//! those keys are not owned by one input partition. It works on two tables:
//!
//! | table | key | row |
//! |---|---|---|
//! | links | [`Identity::key`] (`<platform>:<platform_id>`) | [`IdentityRow`] |
//! | persons | person uuid | [`PersonLinks`] |
//!
//! # Layout
//! - [`resolve`]: the rules, applied to one event, against an
//!   [`IdentityView`] of the identity rows. It returns the identity rows it
//!   wrote; what they mean for the person rows is [`person_changes`].
//! - [`MemoryView`]: an in-memory view over `HashMap`s that also keeps the
//!   person rows: the whole state in tests, or the runtime's per-batch
//!   overlay on a store with one writer.
//! - `handler.rs`: the processor as a plugin ([`IdentityProcessor`]) and
//!   its batch handler ([`IdentityHandler`]).
//! - `shared.rs`: how a batch is applied when several processes write the
//!   tables at once (a CQL store with several members).
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
//! `q`, whose `merged_into` tells readers where it went. When several links
//! moved identities away from `q`, `merged_into` is the person of the one
//! with the latest [`Stamp`] (event time, then input partition and offset).
//!
//! # Rows that several writers can share
//! Every change of an identity row is a *transition* to a new
//! [`IdentityRow::version`] (1 when first written, then + 1 per move), and
//! the row says what the transition was: the person before it
//! ([`IdentityRow::previous`]), the input record that made it
//! ([`IdentityRow::stamp`]), and per input partition the highest offset
//! that ever moved it ([`IdentityRow::sources`]).
//!
//! A person row is not read, changed and written back by the rules: it is
//! the merge of the [`PersonChange`]s of every transition
//! ([`person_changes`]). For each identity it keeps the membership of the
//! highest version it has seen ([`Member`]), and for `merged_into` the merge
//! with the latest stamp ([`Merge`]). Merging is commutative, associative
//! and idempotent, so person rows need no ordering between writers, survive
//! any redelivery and can be completed by anyone who reads the transition.
//!
//! An identity row only changes by a compare-and-set against the version
//! read, so transitions of one identity are totally ordered; a record whose
//! partition and offset are already in [`IdentityRow::sources`] moved the
//! row before (a redelivery) and does not move it again, which makes every
//! transition happen once, whoever applies the record.
//!
//! # Guarantees
//! Pure and synchronous: no IO, no clock, no randomness; default person ids
//! are deterministic (UUIDv5), so a replay of `waymark.inputs` from offset 0
//! into empty tables reproduces the same person ids and links. Resolving an
//! event again right after it was resolved (a redelivery) gives the same
//! person and changes no row. Events are resolved in log order; a link only
//! affects events resolved after it.

mod handler;
mod shared;

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use handler::{
    IdentityHandler, IdentityProcessor, IdentityTables, LINKS, NAME, PERSONS, RESOLUTIONS,
    STATE_ENCODING,
};
use serde::{Deserialize, Serialize};
pub use shared::Resolutions;
use uuid::Uuid;
use waymark_core::{Event, EventData, Identity, RejectKind, Rejection};

/// Where and when an input record is: the order of [`Merge`]s, and the
/// record a transition came from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Stamp {
    /// The event time, in microseconds since the epoch.
    pub time_micros: i64,
    /// The partition of the input topic.
    pub partition: u32,
    /// The offset in that partition.
    pub offset: u64,
}

impl Stamp {
    /// The stamp of `event` read at `partition`/`offset`.
    pub fn of(event: &Event, partition: u32, offset: u64) -> Self {
        Self {
            time_micros: event.time.timestamp_micros(),
            partition,
            offset,
        }
    }
}

/// A row of the links table (key: [`Identity::key`]): the person an
/// identity resolves to, and the transition that made it so.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IdentityRow {
    /// The person the identity resolves to.
    pub person_id: Uuid,
    /// 1 when the row was first written, + 1 with every move.
    pub version: u64,
    /// The person it resolved to before this version, if any.
    pub previous: Option<Uuid>,
    /// The input record that wrote this version.
    pub stamp: Stamp,
    /// Per input partition, the highest offset that wrote the row.
    pub sources: BTreeMap<u32, u64>,
}

impl IdentityRow {
    /// The row after `at` points the identity to `person` (`from`: the row
    /// before, if any).
    pub fn moved(from: Option<&IdentityRow>, person: Uuid, at: Stamp) -> Self {
        let mut sources = from.map(|r| r.sources.clone()).unwrap_or_default();
        let offset = sources.entry(at.partition).or_insert(at.offset);
        *offset = (*offset).max(at.offset);
        Self {
            person_id: person,
            version: from.map_or(1, |r| r.version + 1),
            previous: from.map(|r| r.person_id),
            stamp: at,
            sources,
        }
    }

    /// Whether the record at `at` (or a later one of its partition) wrote
    /// this row.
    pub fn written_by(&self, at: Stamp) -> bool {
        self.sources
            .get(&at.partition)
            .is_some_and(|&offset| offset >= at.offset)
    }
}

/// One identity in a person row: whether it belongs to the person, as of
/// which version of its identity row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Member {
    /// Whether the identity resolves to the person.
    pub present: bool,
    /// The [`IdentityRow::version`] this says it of.
    pub version: u64,
}

/// The person a person was merged into, and by which link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merge {
    /// The person it was merged into.
    pub into: Uuid,
    /// The link's input record.
    pub stamp: Stamp,
}

/// A row of the persons table (key: the person uuid): the identity side of
/// a person (contract §4 "Person": `identities`, `merged_into`), as the
/// merge of [`PersonChange`]s.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PersonLinks {
    /// Every identity that ever belonged to the person, with its latest
    /// known membership.
    pub members: BTreeMap<Identity, Member>,
    /// The latest merge into another person, if any.
    pub merged: Option<Merge>,
}

impl PersonLinks {
    /// Every identity that resolves to this person, sorted by platform then
    /// platform id.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.members
            .iter()
            .filter(|(_, m)| m.present)
            .map(|(id, _)| id)
    }

    /// The person this one was merged into by an `identity.linked`, if any.
    pub fn merged_into(&self) -> Option<Uuid> {
        self.merged.map(|m| m.into)
    }

    /// Merges `change` into the row; returns whether anything changed.
    pub fn apply(&mut self, change: &PersonChange) -> bool {
        let mut changed = false;
        match self.members.get_mut(&change.identity) {
            Some(member) if member.version >= change.member.version => {}
            Some(member) => {
                *member = change.member;
                changed = true;
            }
            None => {
                self.members.insert(change.identity.clone(), change.member);
                changed = true;
            }
        }
        if let Some(merge) = change.merged {
            if self.merged.is_none_or(|m| m.stamp < merge.stamp) {
                self.merged = Some(merge);
                changed = true;
            }
        }
        changed
    }
}

/// What a transition of an identity row means for one person row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonChange {
    /// The person row it changes.
    pub person: Uuid,
    /// The identity.
    pub identity: Identity,
    /// Its membership in the person, as of the transition's version.
    pub member: Member,
    /// The merge it records, for the person the identity moved away from.
    pub merged: Option<Merge>,
}

/// The person-row changes of the transition that wrote `row` of `identity`
/// (its current version): the identity joins its person, and leaves the
/// previous one, which records the merge.
pub fn person_changes(identity: &Identity, row: &IdentityRow) -> Vec<PersonChange> {
    let mut changes = vec![PersonChange {
        person: row.person_id,
        identity: identity.clone(),
        member: Member {
            present: true,
            version: row.version,
        },
        merged: None,
    }];
    if let Some(previous) = row.previous.filter(|p| *p != row.person_id) {
        changes.push(PersonChange {
            person: previous,
            identity: identity.clone(),
            member: Member {
                present: false,
                version: row.version,
            },
            merged: Some(Merge {
                into: row.person_id,
                stamp: row.stamp,
            }),
        });
    }
    changes
}

/// The identity rows [`resolve`] reads and writes.
///
/// Reads of rows that do not exist return `None`; writes replace the row.
pub trait IdentityView {
    /// The row of `id`, if it was seen before.
    fn identity(&self, id: &Identity) -> Option<IdentityRow>;
    /// Replaces the row of `id`.
    fn set_identity(&mut self, id: &Identity, row: IdentityRow);
}

/// What [`resolve`] decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The event's person.
    pub person: Uuid,
    /// The identities whose rows it wrote, in order.
    pub moved: Vec<Identity>,
    /// The identities it read whose rows this record wrote before (a
    /// redelivery): their current transition may still have to be carried
    /// into the person rows.
    pub written_before: Vec<Identity>,
}

/// An [`IdentityView`] over `HashMap`s that also keeps person rows,
/// applying each transition's [`person_changes`] to them, and remembers
/// what changed.
///
/// Rows put in with [`MemoryView::load_identity`] / [`MemoryView::load_person`]
/// are not changes; rows written through [`IdentityView`] are, until
/// [`MemoryView::take_changes`] hands them out. A person row that was not
/// loaded starts empty, so load the person rows a batch changes before
/// taking its changes to a store, or merge the changes instead
/// ([`IdentityChanges::person_changes`]).
#[derive(Debug, Clone, Default)]
pub struct MemoryView {
    identities: HashMap<Identity, IdentityRow>,
    persons: HashMap<Uuid, PersonLinks>,
    changed_identities: BTreeSet<Identity>,
    person_changes: Vec<PersonChange>,
}

/// The rows a batch changed, as [`MemoryView::take_changes`] returns them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityChanges {
    /// Changed identity rows, sorted by identity (store key: [`Identity::key`]).
    pub identities: Vec<(Identity, IdentityRow)>,
    /// The person-row changes of those transitions, in order.
    pub person_changes: Vec<PersonChange>,
}

impl IdentityChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.person_changes.is_empty()
    }

    /// The person rows the changes touch, sorted.
    pub fn persons(&self) -> BTreeSet<Uuid> {
        self.person_changes.iter().map(|c| c.person).collect()
    }
}

impl MemoryView {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a stored identity row (not a change).
    pub fn load_identity(&mut self, id: Identity, row: IdentityRow) {
        self.identities.insert(id, row);
    }

    /// Loads a stored person row (not a change).
    pub fn load_person(&mut self, person: Uuid, links: PersonLinks) {
        self.persons.insert(person, links);
    }

    /// The person row of `person`, with every change applied, if it has one.
    pub fn person(&self, person: Uuid) -> Option<&PersonLinks> {
        self.persons.get(&person)
    }

    /// The person `id` resolves to, if it was seen.
    pub fn person_of(&self, id: &Identity) -> Option<Uuid> {
        self.identities.get(id).map(|r| r.person_id)
    }

    /// The rows written since the last call, with their current values.
    /// The view keeps its rows, so it can go on serving as a cache.
    pub fn take_changes(&mut self) -> IdentityChanges {
        let identities = std::mem::take(&mut self.changed_identities)
            .into_iter()
            .filter_map(|id| {
                let row = self.identities.get(&id)?.clone();
                Some((id, row))
            })
            .collect();
        IdentityChanges {
            identities,
            person_changes: std::mem::take(&mut self.person_changes),
        }
    }
}

impl IdentityView for MemoryView {
    fn identity(&self, id: &Identity) -> Option<IdentityRow> {
        self.identities.get(id).cloned()
    }

    fn set_identity(&mut self, id: &Identity, row: IdentityRow) {
        for change in person_changes(id, &row) {
            self.persons
                .entry(change.person)
                .or_default()
                .apply(&change);
            self.person_changes.push(change);
        }
        self.identities.insert(id.clone(), row);
        self.changed_identities.insert(id.clone());
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

/// Resolves `event`, the input record at `at`, to its person through
/// `view` (see the crate docs for the rules) and sets `event.person_id`.
///
/// # Errors
/// An event with neither `person_id` nor `source` breaks contract §2 and
/// cannot be resolved: [`RejectKind::InvalidEnvelope`], and nothing changes.
/// Validated input never has that shape.
pub fn resolve(
    view: &mut impl IdentityView,
    event: &mut Event,
    at: Stamp,
) -> Result<Resolved, Rejection> {
    let mut moved = Vec::new();
    let mut written_before = Vec::new();
    let person = match (event.person_id, &event.source) {
        (Some(person), _) => person,
        (None, Some(source)) => match view.identity(source) {
            Some(row) => {
                if row.written_by(at) {
                    written_before.push(source.clone());
                }
                row.person_id
            }
            None => {
                let person = source.default_person_id();
                view.set_identity(source, IdentityRow::moved(None, person, at));
                moved.push(source.clone());
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
        if !moved.contains(linked) {
            let row = view.identity(linked);
            match &row {
                Some(row) if row.written_by(at) => {
                    // This record moved it before (a redelivery); whatever
                    // moved it since came later.
                    if !written_before.contains(linked) {
                        written_before.push(linked.clone());
                    }
                }
                Some(row) if row.person_id == person => {}
                _ => {
                    view.set_identity(linked, IdentityRow::moved(row.as_ref(), person, at));
                    moved.push(linked.clone());
                }
            }
        }
    }

    event.person_id = Some(person);
    Ok(Resolved {
        person,
        moved,
        written_before,
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

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

    thread_local! {
        static OFFSET: Cell<u64> = const { Cell::new(0) };
    }

    /// Resolves `e` as the next record of partition 0.
    fn run(view: &mut MemoryView, e: Event) -> Uuid {
        let offset = OFFSET.with(|o| {
            o.set(o.get() + 1);
            o.get()
        });
        let mut e = e;
        let at = Stamp::of(&e, 0, offset);
        let resolved = resolve(view, &mut e, at).unwrap();
        assert_eq!(e.person_id, Some(resolved.person));
        resolved.person
    }

    /// A person row as contract §4 shows it: identities and merged_into.
    fn shown(view: &MemoryView, p: Uuid) -> Option<(Vec<Identity>, Option<Uuid>)> {
        view.person(p)
            .map(|l| (l.identities().cloned().collect(), l.merged_into()))
    }

    fn links(ids: &[&str], merged_into: Option<Uuid>) -> Option<(Vec<Identity>, Option<Uuid>)> {
        Some((ids.iter().map(|s| id(s)).collect(), merged_into))
    }

    #[test]
    fn first_sight_gets_the_default_person_and_is_recorded() {
        let mut view = MemoryView::new();
        let p = run(&mut view, event(Some("tg:1"), None, other()));
        assert_eq!(p, id("tg:1").default_person_id());
        let changes = view.take_changes();
        assert_eq!(changes.identities.len(), 1);
        let (identity, row) = &changes.identities[0];
        assert_eq!(identity, &id("tg:1"));
        assert_eq!((row.person_id, row.version, row.previous), (p, 1, None));
        assert_eq!(changes.persons(), BTreeSet::from([p]));
        assert_eq!(shown(&view, p), links(&["tg:1"], None));
    }

    #[test]
    fn a_known_identity_resolves_to_its_person_without_writes() {
        let mut view = MemoryView::new();
        let q = Uuid::from_u128(7);
        view.load_identity(id("tg:1"), IdentityRow::moved(None, q, Stamp::default()));
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
        assert_eq!(view.person_of(&id("web:a")), Some(p));
        assert_eq!(shown(&view, p), links(&["tg:1", "web:a"], None));
        assert_eq!(shown(&view, id("web:a").default_person_id()), None);
    }

    #[test]
    fn linking_another_persons_identity_moves_it_and_merges_that_person() {
        let mut view = MemoryView::new();
        let q = run(&mut view, event(Some("web:a"), None, other()));
        run(&mut view, event(Some("web:a"), None, link("email:x")));
        let p = run(&mut view, event(Some("tg:1"), None, link("web:a")));
        assert_ne!(p, q);
        assert_eq!(shown(&view, p), links(&["tg:1", "web:a"], None));
        assert_eq!(shown(&view, q), links(&["email:x"], Some(p)));
        // resolving either identity afterwards gives the source's person
        assert_eq!(run(&mut view, event(Some("web:a"), None, other())), p);
        assert_eq!(run(&mut view, event(Some("tg:1"), None, other())), p);
        // only the linked identity moved
        assert_eq!(run(&mut view, event(Some("email:x"), None, other())), q);
        let row = view.identity(&id("web:a")).unwrap();
        assert_eq!((row.version, row.previous), (2, Some(q)));
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
        assert_eq!(shown(&view, p), links(&["tg:1"], None));
    }

    #[test]
    fn a_link_with_a_given_person_id_links_to_that_person() {
        let mut view = MemoryView::new();
        let q = run(&mut view, event(Some("tg:1"), None, other()));
        let c = Uuid::from_u128(42);
        assert_eq!(run(&mut view, event(None, Some(c), link("tg:1"))), c);
        assert_eq!(view.person_of(&id("tg:1")), Some(c));
        assert_eq!(shown(&view, c), links(&["tg:1"], None));
        assert_eq!(shown(&view, q), links(&[], Some(c)));
    }

    #[test]
    fn first_sight_keeps_existing_links_of_the_default_person() {
        let mut view = MemoryView::new();
        let d = id("tg:1").default_person_id();
        let mut row = PersonLinks::default();
        row.apply(&PersonChange {
            person: d,
            identity: id("web:z"),
            member: Member {
                present: true,
                version: 1,
            },
            merged: None,
        });
        view.load_person(d, row);
        run(&mut view, event(Some("tg:1"), None, other()));
        assert_eq!(shown(&view, d), links(&["tg:1", "web:z"], None));
    }

    #[test]
    fn an_event_without_person_and_source_is_rejected_unchanged() {
        let mut view = MemoryView::new();
        let mut e = event(None, None, link("tg:1"));
        let err = resolve(&mut view, &mut e, Stamp::default()).unwrap_err();
        assert_eq!(err.kind, RejectKind::InvalidEnvelope);
        assert_eq!(e.person_id, None);
        assert!(view.take_changes().is_empty());
    }

    #[test]
    fn a_redelivered_link_does_not_move_the_identity_again() {
        let mut view = MemoryView::new();
        let p = run(&mut view, event(Some("tg:1"), None, other()));
        let mut e = event(Some("web:a"), None, link("tg:1"));
        let at = Stamp::of(&e, 3, 10);
        let q = resolve(&mut view, &mut e.clone(), at).unwrap().person;
        // Moved on by a later link of another partition...
        let mut back = event(Some("tg:2"), None, link("tg:1"));
        let at_back = Stamp::of(&back, 1, 5);
        resolve(&mut view, &mut back, at_back).unwrap();
        view.take_changes();
        // ...the first link, delivered again, leaves it there.
        let again = resolve(&mut view, &mut e, at).unwrap();
        assert_eq!(again.person, q);
        assert!(again.moved.is_empty());
        assert_eq!(again.written_before, vec![id("web:a"), id("tg:1")]);
        assert!(view.take_changes().is_empty());
        assert_ne!(view.person_of(&id("tg:1")), Some(p));
    }

    #[test]
    fn person_changes_merge_in_any_order_and_any_number_of_times() {
        let a = id("tg:1");
        let (p, q, r) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let v1 = IdentityRow::moved(None, p, Stamp::default());
        let v2 = IdentityRow::moved(
            Some(&v1),
            q,
            Stamp {
                offset: 1,
                ..Stamp::default()
            },
        );
        let v3 = IdentityRow::moved(
            Some(&v2),
            r,
            Stamp {
                offset: 2,
                ..Stamp::default()
            },
        );
        let changes: Vec<PersonChange> = [&v1, &v2, &v3]
            .into_iter()
            .flat_map(|row| person_changes(&a, row))
            .collect();
        let fold = |order: &[usize]| {
            let mut rows: BTreeMap<Uuid, PersonLinks> = BTreeMap::new();
            for &i in order {
                rows.entry(changes[i].person)
                    .or_default()
                    .apply(&changes[i]);
            }
            rows
        };
        let forward: Vec<usize> = (0..changes.len()).collect();
        let want = fold(&forward);
        assert_eq!(fold(&[4, 3, 2, 1, 0]), want);
        assert_eq!(fold(&[2, 0, 4, 4, 1, 3, 0]), want);
        let shown = |p: Uuid| {
            let l = &want[&p];
            (l.identities().cloned().collect::<Vec<_>>(), l.merged_into())
        };
        assert_eq!(shown(p), (vec![], Some(q)));
        assert_eq!(shown(q), (vec![], Some(r)));
        assert_eq!(shown(r), (vec![a], None));
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
    }

    #[test]
    fn loaded_rows_are_not_changes_and_changes_are_taken_once() {
        let mut view = MemoryView::new();
        view.load_identity(id("tg:1"), IdentityRow::default());
        view.load_person(Uuid::nil(), PersonLinks::default());
        assert!(view.take_changes().is_empty());
        view.set_identity(
            &id("tg:2"),
            IdentityRow::moved(None, Uuid::nil(), Stamp::default()),
        );
        assert_eq!(view.take_changes().identities.len(), 1);
        assert!(view.take_changes().is_empty());
        assert_eq!(view.person_of(&id("tg:2")), Some(Uuid::nil()));
    }
}
