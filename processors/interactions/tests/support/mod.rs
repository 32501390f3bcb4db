//! Runs the interactions handler over an in-memory store, as the runtime
//! does, and reads back what it stored.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use chrono::Duration;
use waymark_core::Event;
use waymark_interactions::timeline::{self, Head, Limits, TimelineHandler};
use waymark_interactions::{InteractionsFold, InteractionsState, STATE_ENCODING};
use waymark_runtime::memory::MemoryStore;
use waymark_runtime::row::decode_row;
use waymark_runtime::{Handler, ProjectionStore, Record, WriteBatch};

pub(crate) const TABLE: &str = "interactions_v1";
pub(crate) const TOPIC: &str = "waymark.events";

/// The handler for `fold`'s limits with chunks of `chunk_bytes`.
pub(crate) fn handler(fold: &InteractionsFold, chunk_bytes: u64) -> TimelineHandler {
    TimelineHandler::new(
        "interactions",
        TABLE,
        STATE_ENCODING,
        Duration::days(7),
        Limits::of(fold, chunk_bytes),
    )
}

/// `events` as records of partition 0, offset = index.
pub(crate) fn records(events: &[Event]) -> Vec<Record> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| Record {
            partition: 0,
            offset: i as u64,
            key: e.person_id.map(|p| p.to_string().into_bytes()),
            value: Some(e.to_json()),
            headers: Vec::new(),
            timestamp_ms: 0,
        })
        .collect()
}

/// Handles `records` as one batch and writes its rows; returns the rows'
/// keys and sizes.
pub(crate) async fn handle(
    handler: &TimelineHandler,
    store: &MemoryStore,
    records: &[Record],
) -> Vec<(String, usize)> {
    store.ensure_tables(&[TABLE.to_owned()]).await.unwrap();
    let out = handler.handle(store, TOPIC, records).await.unwrap();
    let sizes = out
        .rows
        .iter()
        .map(|r| (r.key.clone(), r.value.as_ref().map_or(0, Vec::len)))
        .collect();
    store
        .write(WriteBatch {
            rows: out.rows,
            positions: Vec::new(),
        })
        .await
        .unwrap();
    sizes
}

/// What the store holds for `person`, as the fold's state.
pub(crate) async fn stored_state(store: &MemoryStore, person: &str) -> Option<InteractionsState> {
    store.ensure_tables(&[TABLE.to_owned()]).await.unwrap();
    let bytes = store.get(TABLE, person).await.unwrap()?;
    let head: waymark_core::Tracked<Head> =
        decode_row(STATE_ENCODING, TABLE, person, &bytes).unwrap();
    let (items, next) = timeline::read_page(
        store,
        TABLE,
        STATE_ENCODING,
        person,
        timeline::PageRequest {
            since: None,
            until: None,
            after: None,
            limit: usize::MAX,
        },
    )
    .await
    .unwrap()?;
    assert!(next.is_none());
    Some(InteractionsState {
        latest_time: head.state.latest_time,
        items,
    })
}

/// Every row of the table, by key.
pub(crate) fn rows(store: &MemoryStore) -> BTreeMap<String, Vec<u8>> {
    store.rows(TABLE).into_iter().collect()
}
