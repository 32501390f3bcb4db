//! On a store that writes a batch's rows one by one (CQL), a crash can
//! store some rows of a batch and not others. Applying the records again,
//! in any cuts, must give the history a clean run gives: every event once,
//! in log order. The store here keeps, like CQL's `USING TIMESTAMP`, the
//! write with the highest order of each row, whatever the order of arrival,
//! and tears batches where the CQL store can (it writes sub rows, then
//! heads, then positions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use uuid::Uuid;
use waymark_core::{Event, EventData};
use waymark_person::history::{self, WithHistory};
use waymark_person::{PersonFold, STATE_ENCODING};
use waymark_runtime::memory::MemoryStore;
use waymark_runtime::{Handler, ProjectionHandler, ProjectionStore, Record, RowWrite, WriteBatch};

const MAIN: &str = "person_v1";
const HISTORY: &str = "person_v1_history";

fn handler() -> WithHistory<PersonFold> {
    let window = chrono::Duration::days(7);
    WithHistory::new(
        ProjectionHandler::new("person", MAIN, STATE_ENCODING, PersonFold, window),
        HISTORY,
        STATE_ENCODING,
        window,
    )
}

fn record(person: Uuid, offset: u64) -> Record {
    let event = Event {
        id: format!("e{offset}"),
        time: "2026-01-01T00:00:00Z".parse().unwrap(),
        source: None,
        person_id: Some(person),
        data: EventData::JourneyCompleted {
            journey_id: "j".into(),
        },
    };
    Record {
        partition: 0,
        offset,
        key: Some(person.to_string().into_bytes()),
        value: Some(event.to_json()),
        headers: Vec::new(),
        timestamp_ms: 0,
    }
}

/// Writes the rows `keep` selects, each only if its order is not below the
/// order stored for the row (CQL's last-write-wins by timestamp).
async fn write(
    store: &MemoryStore,
    orders: &mut HashMap<(String, String), u64>,
    rows: Vec<RowWrite>,
    keep: impl Fn(&RowWrite) -> bool,
) {
    let mut kept = Vec::new();
    for row in rows.into_iter().filter(|r| keep(r)) {
        let order = row.order.unwrap_or(u64::MAX);
        let stored = orders
            .entry((row.table.clone(), row.key.clone()))
            .or_insert(0);
        if order >= *stored {
            *stored = order;
            kept.push(row);
        }
    }
    store
        .write(WriteBatch {
            rows: kept,
            positions: Vec::new(),
        })
        .await
        .unwrap();
}

async fn apply(
    h: &WithHistory<PersonFold>,
    store: &MemoryStore,
    orders: &mut HashMap<(String, String), u64>,
    records: &[Record],
    keep: impl Fn(&RowWrite) -> bool,
) {
    let out = h.handle(store, "waymark.events", records).await.unwrap();
    write(store, orders, out.rows, keep).await;
}

#[tokio::test]
async fn a_torn_write_applied_again_leaves_no_duplicate() {
    let person = Uuid::from_u128(7);
    let records: Vec<Record> = (0..80).map(|o| record(person, o)).collect();
    // Torn at every point the CQL store can tear a batch (it writes sub
    // rows, then heads, then positions): some sub rows only; every sub row
    // and the fold's row but not the history head; every sub row and the
    // history head but not the fold's row. Then applied again in other
    // cuts.
    let tears: [fn(&RowWrite) -> bool; 3] = [
        |r| r.key.ends_with("000000000001"),
        |r| r.key.contains('/') || r.table == MAIN,
        |r| r.table == HISTORY,
    ];
    for keep in tears {
        let store = MemoryStore::new();
        store
            .ensure_tables(&[MAIN.to_owned(), HISTORY.to_owned()])
            .await
            .unwrap();
        let h = handler();
        let mut orders = HashMap::new();
        apply(&h, &store, &mut orders, &records[..10], |_| true).await;
        apply(&h, &store, &mut orders, &records[10..45], keep).await;
        // The restart reads from the last stored position (10).
        for (from, to) in [(10, 14), (14, 60), (60, 80)] {
            apply(&h, &store, &mut orders, &records[from..to], |_| true).await;
        }
        let (entries, count) = history::read_page(
            &store,
            HISTORY,
            STATE_ENCODING,
            &person.to_string(),
            0,
            1000,
        )
        .await
        .unwrap()
        .unwrap();
        let offsets: Vec<u64> = entries.iter().map(|e| e.offset).collect();
        assert_eq!(
            offsets,
            (0..80).collect::<Vec<u64>>(),
            "each event once, in order"
        );
        assert_eq!(count, 80);
    }
}
