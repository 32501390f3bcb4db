//! How a person's interactions are stored: sub-keyed, in chunks of a
//! bounded size, so that an append writes a few small rows and never the
//! whole list, and no row grows without bound.
//!
//! # Layout of `interactions_vN`
//! | key | row |
//! |---|---|
//! | `<person>` | [`Tracked`]`<`[`Head`]`>`: latest event time, the chunks in list order with their bounds and sizes, plus the position and the ids that make appends exactly-once |
//! | `<person>/c/<chunk id, 12 digits>` | [`Chunk`]: consecutive items in list order (newest first) |
//! | `<person>/i/<event id>` | [`IdEntry`]: the time of the stored item with that id (ids are unique in the list) |
//!
//! Every row starts with the log position that last changed it, so
//! `verify` can tell rows live processing moved past its snapshot.
//!
//! # Bounds
//! - An item that would take a chunk past `chunk_bytes`
//!   ([`InteractionItem::stored_bytes`]) at either of its ends starts a new
//!   chunk (so appending the newest interaction writes one new small row
//!   once the newest chunk is full); inside a chunk it is inserted and the
//!   chunk split in two. A chunk row holds at most `chunk_bytes` plus one
//!   item (an item is at most one event, 1 MiB).
//! - A person's items count at most `max_bytes`: the oldest are dropped
//!   beyond it, as [`InteractionsFold`] specifies. So the head holds at most
//!   `max_bytes / (chunk_bytes / 2)` chunk entries of a bounded size.
//!
//! # Guarantees
//! The items stored are exactly [`InteractionsFold`]'s items for the same
//! events (the property test `tests/timeline.rs` checks it against the
//! fold, with splits, retention, budget evictions, upserts, batch cuts and
//! redeliveries), and the rows are a pure function of the applied events:
//! chunk ids are allocated from a counter in the head, splits and drops
//! happen item by item, so a replay writes the same bytes (which `verify`
//! compares).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use waymark_core::{ApplyOutcome, Event, Fold, Position, Tracked};
use waymark_runtime::handler::{decode_events, BatchOutput, Decoded, HandleError, Handler};
use waymark_runtime::row::{decode_row, encode_row};
use waymark_runtime::{ProjectionStore, Record, RowWrite, StoreError};

use crate::{horizon, Cursor, InteractionItem, InteractionsFold};

/// The default chunk budget: 64 KiB.
pub const DEFAULT_CHUNK_BYTES: u64 = 64 << 10;

/// The position of an item in list order: newest time first, then id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemKey {
    /// The event time.
    pub time: DateTime<Utc>,
    /// The event id.
    pub id: String,
}

impl ItemKey {
    fn of(item: &InteractionItem) -> Self {
        Self {
            time: item.time,
            id: item.id.clone(),
        }
    }

    /// List order: `Less` when `self` comes first (it is newer).
    fn list_cmp(&self, other: &ItemKey) -> Ordering {
        other
            .time
            .cmp(&self.time)
            .then_with(|| self.id.cmp(&other.id))
    }
}

/// One chunk as the head knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Its id (its row is `<person>/c/<id>`).
    pub id: u64,
    /// Its oldest item (its last in list order).
    pub oldest: ItemKey,
    /// Items in it.
    pub count: u32,
    /// What its items count ([`InteractionItem::stored_bytes`]).
    pub bytes: u64,
}

/// The head row of a person's interactions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The max event time of every event applied to the person (every
    /// type); the retention horizon is measured back from it.
    pub latest_time: Option<DateTime<Utc>>,
    /// The id the next new chunk gets.
    pub next_chunk: u64,
    /// What all items count.
    pub bytes: u64,
    /// The chunks, in list order (the first holds the newest items).
    pub chunks: Vec<ChunkMeta>,
}

impl Head {
    /// The index of the chunk an item at `key` belongs in: the first whose
    /// oldest item is not before it in list order (the last chunk for a
    /// key older than every item; `None` without chunks).
    fn chunk_for(&self, key: &ItemKey) -> Option<usize> {
        if self.chunks.is_empty() {
            return None;
        }
        let i = self
            .chunks
            .partition_point(|c| c.oldest.list_cmp(key) == Ordering::Less);
        Some(i.min(self.chunks.len() - 1))
    }

    /// Items stored.
    pub fn count(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.count)).sum()
    }
}

/// A chunk row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The position of the event that last changed it.
    pub position: Option<Position>,
    /// Its items, in list order.
    pub items: Vec<InteractionItem>,
}

/// An id row: where the stored item with that event id is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdEntry {
    /// The position of the event that stored it.
    pub position: Option<Position>,
    /// The item's event time.
    pub time: DateTime<Utc>,
}

/// The key of chunk `id` of `person`.
pub fn chunk_key(person: &str, id: u64) -> String {
    format!("{person}/c/{id:012}")
}

/// The key of the id row of event `id` of `person`.
pub fn id_key(person: &str, id: &str) -> String {
    format!("{person}/i/{id}")
}

/// Updates a head's latest time: the [`Fold`] the head's [`Tracked`]
/// applies, so duplicates and redeliveries are filtered as in every fold.
struct Latest;

impl Fold for Latest {
    type State = Head;
    fn apply(&self, head: &mut Head, event: &Event) {
        if head.latest_time.is_none_or(|t| event.time > t) {
            head.latest_time = Some(event.time);
        }
    }
}

/// The limits of a person's stored interactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Interactions older than this before the latest event are dropped.
    pub retention: Duration,
    /// A chunk counting more is split.
    pub chunk_bytes: u64,
    /// A person's items count at most this.
    pub max_bytes: u64,
}

impl Limits {
    /// The limits `fold` specifies, with chunks of `chunk_bytes`.
    pub fn of(fold: &InteractionsFold, chunk_bytes: u64) -> Self {
        Self {
            retention: fold.retention(),
            chunk_bytes: chunk_bytes.max(1),
            max_bytes: fold.max_bytes(),
        }
    }
}

/// The rows of one person loaded and changed by one batch.
struct Person<'a> {
    key: String,
    table: &'a str,
    encoding: u32,
    head: Tracked<Head>,
    chunks: HashMap<u64, Chunk>,
    dirty: BTreeSet<u64>,
    removed: BTreeSet<u64>,
    ids: HashMap<String, Option<IdEntry>>,
    dirty_ids: BTreeSet<String>,
    changed: bool,
}

impl<'a> Person<'a> {
    async fn chunk(
        &mut self,
        store: &dyn ProjectionStore,
        id: u64,
    ) -> Result<&mut Chunk, StoreError> {
        if !self.chunks.contains_key(&id) {
            let key = chunk_key(&self.key, id);
            let chunk = match store.get(self.table, &key).await? {
                Some(bytes) => decode_row(self.encoding, self.table, &key, &bytes)?,
                None => Chunk::default(),
            };
            self.chunks.insert(id, chunk);
        }
        Ok(self.chunks.entry(id).or_default())
    }

    async fn id_entry(
        &mut self,
        store: &dyn ProjectionStore,
        id: &str,
    ) -> Result<Option<IdEntry>, StoreError> {
        if let Some(entry) = self.ids.get(id) {
            return Ok(entry.clone());
        }
        let key = id_key(&self.key, id);
        let entry: Option<IdEntry> = match store.get(self.table, &key).await? {
            Some(bytes) => Some(decode_row(self.encoding, self.table, &key, &bytes)?),
            None => None,
        };
        self.ids.insert(id.to_owned(), entry.clone());
        Ok(entry)
    }

    fn set_id(&mut self, id: &str, entry: Option<IdEntry>) {
        self.ids.insert(id.to_owned(), entry);
        self.dirty_ids.insert(id.to_owned());
    }

    /// Recomputes the head's entry of chunk `index` from the chunk.
    fn refresh(&mut self, index: usize, position: Position) {
        let id = self.head.state.chunks[index].id;
        let Some(chunk) = self.chunks.get_mut(&id) else {
            return;
        };
        chunk.position = Some(position);
        self.dirty.insert(id);
        match chunk.items.last() {
            Some(last) => {
                let meta = &mut self.head.state.chunks[index];
                meta.oldest = ItemKey::of(last);
                meta.count = u32::try_from(chunk.items.len()).unwrap_or(u32::MAX);
                meta.bytes = chunk.items.iter().map(InteractionItem::stored_bytes).sum();
            }
            None => {
                self.head.state.chunks.remove(index);
                self.chunks.remove(&id);
                self.dirty.remove(&id);
                self.removed.insert(id);
            }
        }
        self.head.state.bytes = self.head.state.chunks.iter().map(|c| c.bytes).sum();
    }

    /// Removes the item at `key`, if stored.
    async fn remove(
        &mut self,
        store: &dyn ProjectionStore,
        key: &ItemKey,
        position: Position,
    ) -> Result<(), StoreError> {
        let Some(index) = self.head.state.chunk_for(key) else {
            return Ok(());
        };
        let id = self.head.state.chunks[index].id;
        let chunk = self.chunk(store, id).await?;
        if let Some(at) = chunk
            .items
            .iter()
            .position(|it| it.id == key.id && it.time == key.time)
        {
            chunk.items.remove(at);
            self.refresh(index, position);
        }
        Ok(())
    }

    /// Inserts `item` in list order, splitting its chunk when it grows
    /// past the budget.
    async fn insert(
        &mut self,
        store: &dyn ProjectionStore,
        item: InteractionItem,
        position: Position,
        limits: &Limits,
    ) -> Result<(), StoreError> {
        let key = ItemKey::of(&item);
        let index = match self.head.state.chunk_for(&key) {
            Some(index) => index,
            None => {
                let id = self.head.state.next_chunk;
                self.head.state.next_chunk += 1;
                self.chunks.insert(id, Chunk::default());
                self.head.state.chunks.push(ChunkMeta {
                    id,
                    oldest: key.clone(),
                    count: 0,
                    bytes: 0,
                });
                0
            }
        };
        let (id, bytes) = {
            let meta = &self.head.state.chunks[index];
            (meta.id, meta.bytes)
        };
        let full = bytes + item.stored_bytes() > limits.chunk_bytes;
        let chunk = self.chunk(store, id).await?;
        let at = chunk
            .items
            .partition_point(|it| it.order(item.time, &item.id) == Ordering::Less);
        let len = chunk.items.len();
        if full && len > 0 && (at == 0 || at == len) {
            // At an end of a full chunk (an append of the newest item, most
            // often): a new chunk of its own, rewriting nothing else.
            let new_id = self.head.state.next_chunk;
            self.head.state.next_chunk += 1;
            let new_index = if at == 0 { index } else { index + 1 };
            self.head.state.chunks.insert(
                new_index,
                ChunkMeta {
                    id: new_id,
                    oldest: key,
                    count: 0,
                    bytes: 0,
                },
            );
            self.chunks.insert(
                new_id,
                Chunk {
                    position: None,
                    items: vec![item],
                },
            );
            self.refresh(new_index, position);
            return Ok(());
        }
        if let Some(chunk) = self.chunks.get_mut(&id) {
            chunk.items.insert(at, item);
        }
        self.refresh(index, position);
        if self.head.state.chunks[index].bytes > limits.chunk_bytes {
            self.split(index, position);
        }
        Ok(())
    }

    /// Splits the (loaded) chunk `index` in two halves of about equal
    /// bytes; the older half becomes a new chunk right after it.
    fn split(&mut self, index: usize, position: Position) {
        let id = self.head.state.chunks[index].id;
        let Some(chunk) = self.chunks.get_mut(&id) else {
            return;
        };
        if chunk.items.len() < 2 {
            return;
        }
        let total: u64 = chunk.items.iter().map(InteractionItem::stored_bytes).sum();
        let mut prefix = 0;
        let mut at = chunk.items.len() - 1;
        for (i, item) in chunk.items.iter().enumerate() {
            prefix += item.stored_bytes();
            if prefix * 2 >= total {
                at = (i + 1).min(chunk.items.len() - 1);
                break;
            }
        }
        let older = chunk.items.split_off(at);
        let new_id = self.head.state.next_chunk;
        self.head.state.next_chunk += 1;
        let oldest = older.last().map(ItemKey::of);
        self.chunks.insert(
            new_id,
            Chunk {
                position: Some(position),
                items: older,
            },
        );
        if let Some(oldest) = oldest {
            self.head.state.chunks.insert(
                index + 1,
                ChunkMeta {
                    id: new_id,
                    oldest,
                    count: 0,
                    bytes: 0,
                },
            );
        }
        self.refresh(index, position);
        self.refresh(index + 1, position);
    }

    /// Drops the items older than `horizon` and, while the items count
    /// more than `max_bytes`, the oldest.
    async fn trim(
        &mut self,
        store: &dyn ProjectionStore,
        horizon: Option<DateTime<Utc>>,
        max_bytes: u64,
        position: Position,
    ) -> Result<(), StoreError> {
        loop {
            let Some(last) = self.head.state.chunks.len().checked_sub(1) else {
                return Ok(());
            };
            let meta = &self.head.state.chunks[last];
            let expired = horizon.is_some_and(|h| meta.oldest.time < h);
            let over = self.head.state.bytes > max_bytes;
            if !expired && !over {
                return Ok(());
            }
            let id = meta.id;
            let mut bytes = self.head.state.bytes;
            let chunk = self.chunk(store, id).await?;
            let mut dropped = Vec::new();
            while let Some(oldest) = chunk.items.last() {
                let expired = horizon.is_some_and(|h| oldest.time < h);
                if !expired && bytes <= max_bytes {
                    break;
                }
                bytes -= oldest.stored_bytes();
                if let Some(item) = chunk.items.pop() {
                    dropped.push(item.id);
                }
            }
            for id in dropped {
                self.set_id(&id, None);
            }
            self.refresh(last, position);
        }
    }

    /// Applies one decoded record.
    async fn apply(
        &mut self,
        store: &dyn ProjectionStore,
        decoded: &Decoded,
        window: Duration,
        limits: &Limits,
    ) -> Result<ApplyOutcome, StoreError> {
        let (event, position) = (&decoded.event, decoded.position);
        let outcome = decoded.apply_to(&mut self.head, &Latest, window);
        if outcome != ApplyOutcome::Applied {
            return Ok(outcome);
        }
        self.changed = true;
        let horizon = horizon(self.head.state.latest_time, limits.retention);
        if let Some(item) = InteractionItem::from_event(event) {
            if horizon.is_none_or(|h| item.time >= h) {
                if let Some(old) = self.id_entry(store, &item.id).await? {
                    let key = ItemKey {
                        time: old.time,
                        id: item.id.clone(),
                    };
                    self.remove(store, &key, position).await?;
                }
                let entry = IdEntry {
                    position: Some(position),
                    time: item.time,
                };
                let id = item.id.clone();
                self.insert(store, item, position, limits).await?;
                self.set_id(&id, Some(entry));
            }
        }
        self.trim(store, horizon, limits.max_bytes, position)
            .await?;
        Ok(outcome)
    }

    /// The row writes of what changed.
    fn rows(self) -> Vec<RowWrite> {
        let mut rows = Vec::new();
        if !self.changed {
            // Only redeliveries or duplicates: nothing changed but the
            // head's position, which must still move on.
            rows.push(RowWrite {
                table: self.table.to_owned(),
                order: self.head.position.map(|p| p.offset + 1),
                value: Some(encode_row(self.encoding, &self.head)),
                key: self.key,
            });
            return rows;
        }
        let order = self.head.position.map(|p| p.offset + 1);
        for id in &self.dirty {
            if let Some(chunk) = self.chunks.get(id) {
                rows.push(RowWrite {
                    table: self.table.to_owned(),
                    key: chunk_key(&self.key, *id),
                    value: Some(encode_row(self.encoding, chunk)),
                    order,
                });
            }
        }
        for id in &self.removed {
            rows.push(RowWrite {
                table: self.table.to_owned(),
                key: chunk_key(&self.key, *id),
                value: None,
                order,
            });
        }
        for id in &self.dirty_ids {
            let value = self
                .ids
                .get(id)
                .and_then(Option::as_ref)
                .map(|entry| encode_row(self.encoding, entry));
            rows.push(RowWrite {
                table: self.table.to_owned(),
                key: id_key(&self.key, id),
                value,
                order,
            });
        }
        rows.push(RowWrite {
            table: self.table.to_owned(),
            order,
            value: Some(encode_row(self.encoding, &self.head)),
            key: self.key,
        });
        rows
    }
}

/// The interactions handler: applies `waymark.events` to the sub-keyed
/// layout above.
pub struct TimelineHandler {
    processor: String,
    table: String,
    encoding: u32,
    window: Duration,
    limits: Limits,
}

impl TimelineHandler {
    /// A handler storing into `table` (rows of state encoding `encoding`),
    /// deduplicating within `window`, within `limits`.
    pub fn new(
        processor: impl Into<String>,
        table: impl Into<String>,
        encoding: u32,
        window: Duration,
        limits: Limits,
    ) -> Self {
        Self {
            processor: processor.into(),
            table: table.into(),
            encoding,
            window,
            limits,
        }
    }
}

#[async_trait]
impl Handler for TimelineHandler {
    fn processor(&self) -> &str {
        &self.processor
    }

    fn tables(&self) -> Vec<String> {
        vec![self.table.clone()]
    }

    /// Every row's key starts with the person id.
    fn rows_follow_partitioning(&self) -> bool {
        true
    }

    async fn handle(
        &self,
        store: &dyn ProjectionStore,
        _topic: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError> {
        let mut out = BatchOutput::default();
        let mut by_person: BTreeMap<String, Vec<Decoded>> = BTreeMap::new();
        for decoded in decode_events(records, &mut out.rejected) {
            if let Some(person) = decoded.event.person_id {
                by_person
                    .entry(person.to_string())
                    .or_default()
                    .push(decoded);
            }
        }
        let keys: Vec<String> = by_person.keys().cloned().collect();
        let heads = store.get_many(&self.table, &keys).await?;
        let mut persons = Vec::with_capacity(by_person.len());
        for ((key, events), head) in by_person.into_iter().zip(heads) {
            let head = match head {
                Some(bytes) => decode_row(self.encoding, &self.table, &key, &bytes)?,
                None => Tracked::default(),
            };
            let person = Person {
                key,
                table: &self.table,
                encoding: self.encoding,
                head,
                chunks: HashMap::new(),
                dirty: BTreeSet::new(),
                removed: BTreeSet::new(),
                ids: HashMap::new(),
                dirty_ids: BTreeSet::new(),
                changed: false,
            };
            persons.push((person, events));
        }
        preload(store, &self.table, &mut persons).await?;
        for (mut person, events) in persons {
            for decoded in &events {
                match person
                    .apply(store, decoded, self.window, &self.limits)
                    .await?
                {
                    ApplyOutcome::Applied => out.stats.applied += 1,
                    ApplyOutcome::Duplicate => out.stats.duplicates += 1,
                    ApplyOutcome::Redelivered => out.stats.redelivered += 1,
                }
            }
            out.rows.extend(person.rows());
        }
        Ok(out)
    }
}

/// Reads, in two round trips for the whole batch, the id rows of the
/// batch's interactions and the chunks they go to as each head stands: what
/// nearly every batch needs (the rest is read on demand). One round trip
/// per person instead made a batch of 10 000 events over 6 000 persons
/// wait for 12 000 store reads one after the other.
async fn preload(
    store: &dyn ProjectionStore,
    table: &str,
    persons: &mut [(Person<'_>, Vec<Decoded>)],
) -> Result<(), StoreError> {
    let items: Vec<Vec<InteractionItem>> = persons
        .iter()
        .map(|(_, events)| {
            events
                .iter()
                .filter_map(|d| InteractionItem::from_event(&d.event))
                .collect()
        })
        .collect();
    // The id rows of every person's items.
    let ids: Vec<BTreeSet<String>> = items
        .iter()
        .map(|items| items.iter().map(|i| i.id.clone()).collect())
        .collect();
    let keys: Vec<String> = persons
        .iter()
        .zip(&ids)
        .flat_map(|((person, _), ids)| ids.iter().map(|id| id_key(&person.key, id)))
        .collect();
    let mut rows = store.get_many(table, &keys).await?.into_iter();
    let mut keys = keys.iter();
    let mut times: Vec<Vec<ItemKey>> = Vec::with_capacity(persons.len());
    for ((person, _), ids) in persons.iter_mut().zip(&ids) {
        let mut found = Vec::new();
        for id in ids {
            let (Some(key), Some(row)) = (keys.next(), rows.next()) else {
                break;
            };
            let entry: Option<IdEntry> = match row {
                Some(bytes) => Some(decode_row(person.encoding, table, key, &bytes)?),
                None => None,
            };
            if let Some(e) = &entry {
                found.push(ItemKey {
                    time: e.time,
                    id: id.clone(),
                });
            }
            person.ids.insert(id.clone(), entry);
        }
        times.push(found);
    }
    // The chunks those items go to, or are in.
    let chunks: Vec<BTreeSet<u64>> = persons
        .iter()
        .zip(items.iter().zip(times))
        .map(|((person, _), (items, times))| {
            items
                .iter()
                .map(ItemKey::of)
                .chain(times)
                .filter_map(|k| person.head.state.chunk_for(&k))
                .map(|i| person.head.state.chunks[i].id)
                .collect()
        })
        .collect();
    let keys: Vec<String> = persons
        .iter()
        .zip(&chunks)
        .flat_map(|((person, _), ids)| ids.iter().map(|id| chunk_key(&person.key, *id)))
        .collect();
    let mut rows = store.get_many(table, &keys).await?.into_iter();
    let mut keys = keys.iter();
    for ((person, _), ids) in persons.iter_mut().zip(&chunks) {
        for id in ids {
            let (Some(key), Some(row)) = (keys.next(), rows.next()) else {
                break;
            };
            let chunk = match row {
                Some(bytes) => decode_row(person.encoding, table, key, &bytes)?,
                None => Chunk::default(),
            };
            person.chunks.insert(*id, chunk);
        }
    }
    Ok(())
}

/// Which items a page holds, as [`crate::InteractionsState::page`] takes
/// them (see there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest<'a> {
    /// Items at or after this event time.
    pub since: Option<DateTime<Utc>>,
    /// Items before this event time.
    pub until: Option<DateTime<Utc>>,
    /// The cursor of the previous page.
    pub after: Option<(DateTime<Utc>, &'a str)>,
    /// At most this many items (0 is taken as 1).
    pub limit: usize,
}

/// One page of a person's interactions, as
/// [`crate::InteractionsState::page`] pages the same items, reading only
/// the chunks the page covers. `None` when the person has no interactions
/// row.
pub async fn read_page(
    store: &dyn ProjectionStore,
    table: &str,
    encoding: u32,
    person: &str,
    request: PageRequest<'_>,
) -> Result<Option<(Vec<InteractionItem>, Option<Cursor>)>, StoreError> {
    let PageRequest {
        since,
        until,
        after,
        limit,
    } = request;
    let Some(bytes) = store.get(table, person).await? else {
        return Ok(None);
    };
    let head: Tracked<Head> = decode_row(encoding, table, person, &bytes)?;
    let limit = limit.max(1);
    // An item is in the page's range when it is before `until` and after
    // the cursor; both hold from some point of the list on.
    let in_range = |time: DateTime<Utc>, id: &str| {
        until.is_none_or(|u| time < u)
            && after.is_none_or(|(t, i)| {
                let cursor = ItemKey {
                    time: t,
                    id: i.to_owned(),
                };
                cursor.list_cmp(&ItemKey {
                    time,
                    id: id.to_owned(),
                }) == Ordering::Less
            })
    };
    let first = head
        .state
        .chunks
        .partition_point(|c| !in_range(c.oldest.time, &c.oldest.id));
    let mut items: Vec<InteractionItem> = Vec::new();
    let mut more = false;
    'chunks: for metas in head.state.chunks[first..].chunks(4) {
        let keys: Vec<String> = metas.iter().map(|m| chunk_key(person, m.id)).collect();
        let rows = store.get_many(table, &keys).await?;
        for (key, row) in keys.iter().zip(rows) {
            let chunk: Chunk = match row {
                Some(bytes) => decode_row(encoding, table, key, &bytes)?,
                None => Chunk::default(),
            };
            for item in chunk.items {
                if !in_range(item.time, &item.id) {
                    continue;
                }
                if since.is_some_and(|s| item.time < s) {
                    break 'chunks;
                }
                if items.len() == limit {
                    more = true;
                    break 'chunks;
                }
                items.push(item);
            }
        }
    }
    let next = more
        .then(|| items.last().map(|l| (l.time, l.id.clone())))
        .flatten();
    Ok(Some((items, next)))
}
