//! A batch on a store that several processes write at once (CQL with
//! several members of the identity group): every row change is a
//! compare-and-set, and what each input record resolved to is decided once.
//!
//! # How
//! 1. **The partition's resolutions.** For each input partition of the
//!    batch the handler reads the [`Resolutions`] row: the persons the
//!    latest batch of that partition resolved its records to. A record it
//!    covers is resolved to that person again, without touching any row,
//!    so a batch applied again (after a crash, by a member that took the
//!    partition over, or by a zombie that lost it) appends exactly the
//!    outputs it appended before, which the folds then drop as duplicates
//!    by their source position. A row that starts after the batch means
//!    another member has applied the partition past it:
//!    [`HandleError::Fenced`].
//! 2. **Transitions by compare-and-set.** Each other record is resolved
//!    with [`resolve`] against the identity rows as read; each identity row
//!    it writes is a compare-and-set against the row it read (a lightweight
//!    transaction on CQL). If another member changed the row meanwhile, the
//!    rows of the event are read again and the event resolved again; the
//!    rows its record already moved say so ([`IdentityRow::written_by`]),
//!    so nothing moves twice.
//! 3. **Person rows are merged.** Before a row moves to its next version,
//!    and after it moved, the person-row changes of its transition are
//!    merged into the person rows ([`PersonLinks::apply`]) by
//!    compare-and-set loops. Merges commute and repeat harmlessly, so a
//!    crash between an identity row and its person rows is completed by
//!    whoever reads the row next (at the latest the record's redelivery).
//! 4. **Decided.** Finally the batch's resolutions replace the partition's
//!    row, by compare-and-set against the row read in step 1. Only then
//!    does the runner append the outputs; if another member wrote the row
//!    meanwhile, the batch fails (transient) and its retry starts at 1.
//!
//! The cost is a compare-and-set per batch and partition, one per
//! identity row moved (first sightings and links) and one per person row
//! changed; looking an identity up costs a read as on a single writer.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use waymark_core::{Event, Identity};
use waymark_runtime::handler::{BatchOutput, HandleError};
use waymark_runtime::row::{decode_row, encode_row};
use waymark_runtime::{ProjectionStore, Record, StoreError};

use crate::handler::IdentityHandler;
use crate::{person_changes, resolve, IdentityRow, IdentityView, MemoryView, PersonChange, Stamp};

/// How often one event is resolved again after its rows changed under it,
/// or one person row merged again, before the batch fails (transient).
const MAX_ATTEMPTS: usize = 64;

/// A row of the resolutions table (key: the input partition, in decimal):
/// the persons the latest batch of the partition resolved its records to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resolutions {
    /// The first offset of the batch.
    pub from: u64,
    /// The last offset of the batch.
    pub to: u64,
    /// The person of each resolved record, by offset, ascending; records of
    /// the range without one were rejected.
    pub persons: Vec<(u64, Uuid)>,
}

impl Resolutions {
    /// Whether `offset` was resolved by this batch, and if so to whom
    /// (`Some(None)`: it was rejected).
    pub fn covered(&self, offset: u64) -> Option<Option<Uuid>> {
        if offset < self.from || offset > self.to {
            return None;
        }
        Some(
            self.persons
                .binary_search_by_key(&offset, |(o, _)| *o)
                .ok()
                .map(|i| self.persons[i].1),
        )
    }
}

type Loaded = Option<(Vec<u8>, IdentityRow)>;

/// The identity rows an event is resolved against, with its writes on top.
struct EventView<'a> {
    rows: &'a HashMap<Identity, Loaded>,
    writes: Vec<(Identity, IdentityRow)>,
}

impl IdentityView for EventView<'_> {
    fn identity(&self, id: &Identity) -> Option<IdentityRow> {
        if let Some((_, row)) = self.writes.iter().rev().find(|(w, _)| w == id) {
            return Some(row.clone());
        }
        self.rows
            .get(id)
            .and_then(|r| r.as_ref().map(|(_, row)| row.clone()))
    }

    fn set_identity(&mut self, id: &Identity, row: IdentityRow) {
        self.writes.push((id.clone(), row));
    }
}

/// Applies a batch as the module docs say; `events` are the decoded records
/// by index, `out` holds the rejections of the others.
pub(crate) async fn handle(
    h: &IdentityHandler,
    store: &dyn ProjectionStore,
    records: &[Record],
    events: Vec<(usize, Event)>,
    mut out: BatchOutput,
) -> Result<BatchOutput, HandleError> {
    let table = &h.tables.resolutions;
    let encoding = h.tables.encoding;

    // 1. What each partition's latest batch decided.
    let mut ranges: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for r in records {
        let range = ranges.entry(r.partition).or_insert((r.offset, r.offset));
        range.0 = range.0.min(r.offset);
        range.1 = range.1.max(r.offset);
    }
    let keys: Vec<String> = ranges.keys().map(u32::to_string).collect();
    let stored = store.get_many(table, &keys).await?;
    let mut decided: BTreeMap<u32, (Option<Vec<u8>>, Option<Resolutions>)> = BTreeMap::new();
    for ((partition, (first, _)), (key, bytes)) in ranges.iter().zip(keys.iter().zip(stored)) {
        let resolutions = match &bytes {
            Some(bytes) => Some(decode_row::<Resolutions>(encoding, table, key, bytes)?),
            None => None,
        };
        if resolutions.as_ref().is_some_and(|r| r.from > *first) {
            return Err(HandleError::Fenced {
                partition: *partition,
                offset: *first,
            });
        }
        decided.insert(*partition, (bytes, resolutions));
    }
    let covered = |r: &Record| {
        decided
            .get(&r.partition)
            .and_then(|(_, d)| d.as_ref())
            .and_then(|d| d.covered(r.offset))
    };

    // 2. Resolve every record the rows do not cover.
    let mut rows: HashMap<Identity, Loaded> = HashMap::new();
    let uncovered: BTreeSet<Identity> = events
        .iter()
        .filter(|(i, _)| covered(&records[*i]).is_none())
        .flat_map(|(_, e)| crate::needed_identities(e))
        .collect();
    load(h, store, &mut rows, uncovered.into_iter().collect()).await?;

    let mut persons: BTreeMap<u32, Vec<(u64, Uuid)>> = BTreeMap::new();
    for (i, mut event) in events {
        let source = &records[i];
        let person = match covered(source) {
            Some(Some(person)) => {
                event.person_id = Some(person);
                Ok(person)
            }
            // Rejected before; rejected again, the same way.
            Some(None) => {
                resolve(&mut MemoryView::new(), &mut event, Stamp::default()).map(|r| r.person)
            }
            None => resolve_shared(h, store, &mut rows, &mut event, source).await?,
        };
        match person {
            Ok(person) => {
                persons
                    .entry(source.partition)
                    .or_default()
                    .push((source.offset, person));
                out.produce.push((i, h.output(source, person, &event)));
                out.stats.applied += 1;
            }
            Err(rejection) => out.rejected.push((i, rejection)),
        }
    }

    // 4. Decided: the batch's resolutions replace the partition's row.
    for (partition, (from, to)) in ranges {
        let bytes = decided.get(&partition).and_then(|(b, _)| b.as_ref());
        let mut resolved = persons.remove(&partition).unwrap_or_default();
        resolved.sort_unstable_by_key(|(o, _)| *o);
        let row = Resolutions {
            from,
            to,
            persons: resolved,
        };
        let value = encode_row(encoding, &row);
        if bytes.map(Vec::as_slice) == Some(value.as_slice()) {
            continue;
        }
        if !store
            .compare_and_set(
                table,
                &partition.to_string(),
                bytes.map(Vec::as_slice),
                &value,
            )
            .await?
        {
            return Err(HandleError::Store(StoreError::Unavailable(format!(
                "another member resolved partition {partition} of the identity input meanwhile; \
                 applying the batch again"
            ))));
        }
    }
    Ok(out)
}

/// Reads the identity rows of `ids` into `rows`.
async fn load(
    h: &IdentityHandler,
    store: &dyn ProjectionStore,
    rows: &mut HashMap<Identity, Loaded>,
    ids: Vec<Identity>,
) -> Result<(), HandleError> {
    let loaded = h.load_identities(store, &ids).await?;
    rows.extend(ids.into_iter().zip(loaded));
    Ok(())
}

/// Steps 2 and 3 for one event: its person, or why it is rejected.
async fn resolve_shared(
    h: &IdentityHandler,
    store: &dyn ProjectionStore,
    rows: &mut HashMap<Identity, Loaded>,
    event: &mut Event,
    source: &Record,
) -> Result<Result<Uuid, waymark_core::Rejection>, HandleError> {
    let at = Stamp::of(event, source.partition, source.offset);
    let needed = crate::needed_identities(event);
    let missing: Vec<Identity> = needed
        .iter()
        .filter(|id| !rows.contains_key(*id))
        .cloned()
        .collect();
    load(h, store, rows, missing).await?;
    'attempt: for _ in 0..MAX_ATTEMPTS {
        let mut attempt = event.clone();
        let mut view = EventView {
            rows,
            writes: Vec::new(),
        };
        let resolved = match resolve(&mut view, &mut attempt, at) {
            Ok(resolved) => resolved,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let writes = view.writes;
        // A redelivery: the transitions this record made may not have
        // reached the person rows yet.
        for id in &resolved.written_before {
            if let Some(Some((_, row))) = rows.get(id) {
                carry(h, store, id, row).await?;
            }
        }
        for (id, row) in writes {
            let old = rows.get(&id).cloned().flatten();
            if let Some((_, old_row)) = &old {
                // Its current transition reaches the person rows before
                // the next one exists.
                carry(h, store, &id, old_row).await?;
            }
            let value = encode_row(h.tables.encoding, &row);
            let expected = old.as_ref().map(|(bytes, _)| bytes.as_slice());
            if store
                .compare_and_set(&h.tables.links, &id.key(), expected, &value)
                .await?
            {
                carry(h, store, &id, &row).await?;
                rows.insert(id, Some((value, row)));
            } else {
                // Changed under us: read this event's rows again.
                load(h, store, rows, needed.clone()).await?;
                continue 'attempt;
            }
        }
        *event = attempt;
        return Ok(Ok(resolved.person));
    }
    Err(HandleError::Store(StoreError::Unavailable(format!(
        "the identity rows of record {}/{} kept changing; applying the batch again",
        source.partition, source.offset
    ))))
}

/// Merges the person-row changes of `row`'s transition into the person rows.
async fn carry(
    h: &IdentityHandler,
    store: &dyn ProjectionStore,
    id: &Identity,
    row: &IdentityRow,
) -> Result<(), HandleError> {
    for change in person_changes(id, row) {
        merge(h, store, &change).await?;
    }
    Ok(())
}

/// Merges `change` into its person row by compare-and-set.
async fn merge(
    h: &IdentityHandler,
    store: &dyn ProjectionStore,
    change: &PersonChange,
) -> Result<(), HandleError> {
    let key = change.person.to_string();
    for _ in 0..MAX_ATTEMPTS {
        let loaded = h
            .load_persons(store, std::slice::from_ref(&change.person))
            .await?
            .pop()
            .flatten();
        let (bytes, mut links) = match loaded {
            Some((bytes, links)) => (Some(bytes), links),
            None => (None, crate::PersonLinks::default()),
        };
        if !links.apply(change) {
            return Ok(());
        }
        let value = encode_row(h.tables.encoding, &links);
        if store
            .compare_and_set(&h.tables.persons, &key, bytes.as_deref(), &value)
            .await?
        {
            return Ok(());
        }
    }
    Err(HandleError::Store(StoreError::Unavailable(format!(
        "person row {key} kept changing; applying the batch again"
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolutions_cover_their_range_only() {
        let p = Uuid::from_u128(1);
        let r = Resolutions {
            from: 10,
            to: 14,
            persons: vec![(10, p), (12, p)],
        };
        assert_eq!(r.covered(9), None);
        assert_eq!(r.covered(10), Some(Some(p)));
        assert_eq!(r.covered(11), Some(None));
        assert_eq!(r.covered(14), Some(None));
        assert_eq!(r.covered(15), None);
    }
}
