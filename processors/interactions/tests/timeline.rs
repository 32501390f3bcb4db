//! The stored timeline against the fold that specifies it: the same items
//! whatever the chunk size, batch cuts, redeliveries, upserts, retention
//! and byte budget; rows within their bounds; pages as the fold pages; and
//! an append that writes a few small rows, at the budget.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use waymark_core::{ContentType, Event, EventData, Identity, InteractionKind, Position, Tracked};
use waymark_foldtest as common;
use waymark_interactions::timeline::{self, Chunk, Head, DEFAULT_CHUNK_BYTES};
use waymark_interactions::{InteractionItem, InteractionsFold, InteractionsState, STATE_ENCODING};
use waymark_runtime::memory::MemoryStore;
use waymark_runtime::row::decode_row;
use waymark_runtime::ProjectionStore;

const DAY: i64 = 86_400_000;
const PERSON: &str = "11111111-1111-1111-1111-111111111111";

fn arb_data() -> impl Strategy<Value = EventData> + Clone {
    prop_oneof![
        4 => (proptest::option::of("[a-z]{0,60}")).prop_map(|content| {
            EventData::InteractionRecorded {
                kind: InteractionKind::Message,
                content_type: ContentType::Text,
                content,
                channel: None,
                direction: None,
            }
        }),
        1 => Just(EventData::JourneyCompleted { journey_id: "j".into() }),
    ]
}

/// The fold's state after `events`, through `Tracked` as the runtime
/// applies it.
fn model(fold: &InteractionsFold, events: &[Event]) -> InteractionsState {
    let mut tracked: Tracked<InteractionsState> = Tracked::default();
    for (i, e) in events.iter().enumerate() {
        tracked.apply(fold, e, Position::new(0, i as u64), common::WINDOW);
    }
    tracked.state
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// Checks the rows of the store against their bounds and each other.
fn check_rows(store: &MemoryStore, chunk_bytes: u64, max_item: u64) -> Result<(), TestCaseError> {
    let rows = support::rows(store);
    let Some(head) = rows.get(PERSON) else {
        return Ok(());
    };
    let head: Tracked<Head> = decode_row(STATE_ENCODING, support::TABLE, PERSON, head).unwrap();
    let mut items = 0;
    for meta in &head.state.chunks {
        let key = timeline::chunk_key(PERSON, meta.id);
        let bytes = rows.get(&key);
        prop_assert!(bytes.is_some(), "chunk {key} of the head is stored");
        let chunk: Chunk =
            decode_row(STATE_ENCODING, support::TABLE, &key, bytes.unwrap()).unwrap();
        let counted: u64 = chunk.items.iter().map(InteractionItem::stored_bytes).sum();
        prop_assert_eq!(counted, meta.bytes);
        prop_assert_eq!(chunk.items.len(), meta.count as usize);
        prop_assert!(
            counted <= chunk_bytes + max_item || chunk.items.len() == 1,
            "chunk {} counts {} over a budget of {}",
            key,
            counted,
            chunk_bytes
        );
        items += chunk.items.len();
    }
    let chunks = rows.keys().filter(|k| k.contains("/c/")).count();
    prop_assert_eq!(chunks, head.state.chunks.len(), "no orphan chunk rows");
    let ids = rows.keys().filter(|k| k.contains("/i/")).count();
    prop_assert_eq!(ids, items, "one id row per stored item");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// The stored items are the fold's, whatever the chunking, batching
    /// and redelivery; every row within its bounds.
    #[test]
    fn the_timeline_stores_exactly_the_folds_items(
        events in common::arb_events(arb_data(), "e[0-9]{1,2}", 30 * DAY, 0..60),
        cuts in proptest::collection::vec(0..61usize, 0..8),
        redeliver in proptest::collection::vec(any::<bool>(), 9),
        chunk_bytes in 60..600u64,
        max_bytes in prop_oneof![Just(u64::MAX), 200..3000u64],
    ) {
        let fold = InteractionsFold::new(Duration::days(10)).with_max_bytes(max_bytes);
        let expected = model(&fold, &events);
        let records = support::records(&events);
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (events.len() + 1)).collect();
        bounds.extend([0, events.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        let store = MemoryStore::new();
        let handler = support::handler(&fold, chunk_bytes);
        let stored = runtime().block_on(async {
            for (i, w) in bounds.windows(2).enumerate() {
                let batch = &records[w[0]..w[1]];
                support::handle(&handler, &store, batch).await;
                if redeliver[i % redeliver.len()] {
                    // At-least-once: the batch arrives again.
                    support::handle(&handler, &store, batch).await;
                }
            }
            support::stored_state(&store, PERSON).await
        });
        let max_item = 48 + 2 + 60 + 4 + 1 + 3;
        check_rows(&store, chunk_bytes, max_item)?;
        match stored {
            Some(stored) => prop_assert_eq!(stored, expected),
            None => prop_assert!(events.is_empty()),
        }
    }

    /// Walking the stored pages gives the fold's pages.
    #[test]
    fn stored_pages_are_the_folds_pages(
        events in common::arb_events(arb_data(), "e[0-9]{1,2}", 10 * DAY, 1..50),
        since in proptest::option::of(0..10 * DAY),
        until in proptest::option::of(0..10 * DAY),
        limit in 1..7usize,
        chunk_bytes in 60..400u64,
    ) {
        let fold = InteractionsFold::default();
        let expected = model(&fold, &events);
        let store = MemoryStore::new();
        let handler = support::handler(&fold, chunk_bytes);
        let since = since.map(common::time_at);
        let until = until.map(common::time_at);
        runtime().block_on(async {
            support::handle(&handler, &store, &support::records(&events)).await;
            let mut cursor: Option<(DateTime<Utc>, String)> = None;
            loop {
                let after = cursor.as_ref().map(|(t, id)| (*t, id.as_str()));
                let (want, want_next) = expected.page(since, until, after, limit);
                let request = timeline::PageRequest { since, until, after, limit };
                let (got, got_next) = timeline::read_page(
                    &store, support::TABLE, STATE_ENCODING, PERSON, request,
                )
                .await
                .unwrap()
                .unwrap();
                let want: Vec<InteractionItem> = want.into_iter().cloned().collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(&got_next, &want_next);
                match got_next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            Ok(())
        })?;
    }
}

/// An interaction of 60 KiB of content at minute `i`.
fn large(i: i64) -> Event {
    Event {
        id: format!("big-{i:04}"),
        time: common::time_at(i * 60_000),
        source: Some(Identity::new("web", "1")),
        person_id: Some(PERSON.parse().unwrap()),
        data: EventData::InteractionRecorded {
            kind: InteractionKind::Message,
            content_type: ContentType::Text,
            content: Some("x".repeat(60 << 10)),
            channel: None,
            direction: None,
        },
    }
}

/// 600 interactions of 60 KiB (the measurement that made a 39 MB row)
/// with the default chunk size and a budget of 16 MiB: each append writes
/// a few rows of at most about one chunk, no row exceeds a chunk plus one
/// item, and the person keeps exactly the newest items that fit.
#[tokio::test]
async fn at_the_byte_budget_appends_stay_small_and_the_newest_items_are_kept() {
    let max_bytes: u64 = 16 << 20;
    let fold = InteractionsFold::default().with_max_bytes(max_bytes);
    let handler = support::handler(&fold, DEFAULT_CHUNK_BYTES);
    let store = MemoryStore::new();
    let events: Vec<Event> = (0..600).map(large).collect();
    let item_bytes = InteractionItem::from_event(&events[0])
        .unwrap()
        .stored_bytes();
    let mut largest_write = 0;
    for record in support::records(&events) {
        let rows = support::handle(&handler, &store, &[record]).await;
        assert!(rows.len() <= 5, "an append wrote {} rows", rows.len());
        let bytes: usize = rows.iter().map(|(_, b)| b).sum();
        largest_write = largest_write.max(bytes);
    }
    // An append rewrites its chunk (at most a chunk and one item), the head
    // and an id row, and deletes what the budget drops: never the history.
    let bound = 2 * (DEFAULT_CHUNK_BYTES + item_bytes) + 64 * 1024;
    assert!(
        (largest_write as u64) < bound,
        "largest append wrote {largest_write} bytes"
    );
    for (key, value) in support::rows(&store) {
        assert!(
            (value.len() as u64) <= DEFAULT_CHUNK_BYTES + item_bytes + 1024,
            "row {key} is {} bytes",
            value.len()
        );
    }
    let state = support::stored_state(&store, PERSON).await.unwrap();
    let fit = (max_bytes / item_bytes) as usize;
    assert_eq!(state.items.len(), fit);
    assert_eq!(state.items[0].id, "big-0599");
    assert_eq!(
        state.items.last().map(|i| i.id.clone()),
        Some(format!("big-{:04}", 600 - fit))
    );
    assert_eq!(state, model(&fold, &events));
    let stored: u64 = store
        .rows(support::TABLE)
        .iter()
        .map(|(_, v)| v.len() as u64)
        .sum();
    assert!(stored <= max_bytes + (1 << 20), "{stored} bytes stored");
}

/// A resend of a stored id (outside the dedupe window) replaces the item,
/// wherever it is stored, and out of retention leaves it.
#[tokio::test]
async fn a_resent_id_replaces_its_item_across_chunks() {
    let fold = InteractionsFold::new(Duration::days(30));
    let handler = support::handler(&fold, 120);
    let store = MemoryStore::new();
    let mut events: Vec<Event> = (0..20)
        .map(|i| {
            let mut e = large(i);
            e.data = EventData::InteractionRecorded {
                kind: InteractionKind::Message,
                content_type: ContentType::Text,
                content: Some(format!("first {i}")),
                channel: None,
                direction: None,
            };
            e
        })
        .collect();
    // Once the first copy has left the dedupe window, a resend is applied.
    let mut later = large(0);
    later.id = "later".into();
    later.time = common::time_at(9 * DAY);
    later.data = EventData::JourneyCompleted {
        journey_id: "j".into(),
    };
    events.push(later);
    let mut resend = events[3].clone();
    resend.time = common::time_at(10 * DAY);
    events.push(resend);
    support::handle(&handler, &store, &support::records(&events)).await;
    let state = support::stored_state(&store, PERSON).await.unwrap();
    assert_eq!(state, model(&fold, &events));
    assert_eq!(state.items.len(), 20);
    assert_eq!(state.items[0].id, "big-0003");
    let head: Tracked<Head> = decode_row(
        STATE_ENCODING,
        support::TABLE,
        PERSON,
        &store.get(support::TABLE, PERSON).await.unwrap().unwrap(),
    )
    .unwrap();
    assert!(head.state.chunks.len() > 3, "the items span chunks");
}
