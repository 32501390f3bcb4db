//! A batch torn where the CQL store can tear it, applied again, gives the
//! timeline a clean run gives.
//!
//! The CQL store writes a batch's rows of one head in one table (a
//! person's timeline head, chunk and id rows) as one single-partition
//! batch, which is atomic, and different heads independently (decision
//! 0009). So a crash in the middle of a write stores the rows of some
//! persons and not of others, and no position. The store here keeps, like
//! CQL's `USING TIMESTAMP`, the write with the highest order of each row,
//! whatever the order of arrival. The second test shows what the grouping
//! prevents: torn one row at a time, the same replays list items twice or
//! lose them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;

use chrono::Duration;
use waymark_core::{ContentType, Event, EventData, Identity, InteractionKind, Position, Tracked};
use waymark_foldtest as common;
use waymark_interactions::{InteractionsFold, InteractionsState};
use waymark_runtime::memory::MemoryStore;
use waymark_runtime::{Handler, ProjectionStore, Record, RowWrite, WriteBatch};

const PERSONS: [&str; 3] = [
    "11111111-1111-1111-1111-111111111111",
    "22222222-2222-2222-2222-222222222222",
    "33333333-3333-3333-3333-333333333333",
];
const DAY: i64 = 86_400_000;
const EVENTS: usize = 90;

/// xorshift64*, seeded per case so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Interactions of three persons at random times (so items are inserted
/// inside chunks and chunks split), some ids sent again.
fn events(rng: &mut Rng) -> Vec<Event> {
    (0..EVENTS)
        .map(|i| {
            let person = PERSONS[rng.below(3) as usize];
            let id = if i > 10 && rng.below(8) == 0 {
                format!("e{}", rng.below(i as u64))
            } else {
                format!("e{i}")
            };
            Event {
                id,
                time: common::time_at(rng.below(20 * DAY as u64) as i64),
                source: Some(Identity::new("web", person)),
                person_id: Some(person.parse().unwrap()),
                data: EventData::InteractionRecorded {
                    kind: InteractionKind::Message,
                    content_type: ContentType::Text,
                    content: Some("x".repeat(rng.below(80) as usize)),
                    channel: None,
                    direction: None,
                },
            }
        })
        .collect()
}

/// The fold's state of `person` after `records`, through `Tracked` as the
/// runtime applies it.
fn model(fold: &InteractionsFold, events: &[Event], person: &str) -> Option<InteractionsState> {
    let mut tracked: Tracked<InteractionsState> = Tracked::default();
    let mut any = false;
    for (i, e) in events.iter().enumerate() {
        if e.person_id.map(|p| p.to_string()).as_deref() == Some(person) {
            tracked.apply(fold, e, Position::new(0, i as u64), common::WINDOW);
            any = true;
        }
    }
    any.then_some(tracked.state)
}

/// Handles `records` as one batch and writes the rows `keep` selects, each
/// only if its order is not below the order stored for the row.
async fn apply(
    handler: &impl Handler,
    store: &MemoryStore,
    orders: &mut HashMap<String, u64>,
    records: &[Record],
    keep: impl Fn(&RowWrite) -> bool,
) {
    let out = handler
        .handle(store, support::TOPIC, records)
        .await
        .unwrap();
    let mut kept = Vec::new();
    for row in out.rows.into_iter().filter(|r| keep(r)) {
        let order = row.order.unwrap_or(u64::MAX);
        let stored = orders.entry(row.key.clone()).or_insert(0);
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

/// The head a row belongs to (its key up to the first `/`).
fn head(row: &RowWrite) -> &str {
    row.key.split('/').next().unwrap_or_default()
}

/// Runs one case: a clean first batch, a torn second one (`keep` of its
/// rows written), then the records from the stored position on again in
/// other cuts. Returns the persons whose timeline differs from the fold's.
async fn case(seed: u64, keep: &dyn Fn(&RowWrite, &mut Rng) -> bool) -> Vec<String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let events = events(&mut rng);
    let records = support::records(&events);
    let fold = InteractionsFold::new(Duration::days(10));
    let handler = support::handler(&fold, 120 + rng.below(300));
    let store = MemoryStore::new();
    store
        .ensure_tables(&[support::TABLE.to_owned()])
        .await
        .unwrap();
    let mut orders = HashMap::new();
    let a = 5 + rng.below(25) as usize;
    let b = a + 5 + rng.below(40) as usize;
    let c = a + rng.below((EVENTS - a) as u64) as usize;
    apply(&handler, &store, &mut orders, &records[..a], |_| true).await;
    let torn = std::sync::Mutex::new(Rng(rng.next() | 1));
    apply(&handler, &store, &mut orders, &records[a..b], |row| {
        keep(row, &mut torn.lock().unwrap())
    })
    .await;
    // The restart reads from the last stored position (a).
    apply(&handler, &store, &mut orders, &records[a..c], |_| true).await;
    apply(&handler, &store, &mut orders, &records[c..], |_| true).await;
    let mut wrong = Vec::new();
    for person in PERSONS {
        if support::stored_state(&store, person).await != model(&fold, &events, person) {
            wrong.push(format!("seed {seed}: {person}"));
        }
    }
    wrong
}

#[tokio::test]
async fn a_batch_torn_between_persons_applied_again_gives_the_folds_timelines() {
    let mut wrong = Vec::new();
    for seed in 0..60 {
        // Every subset of persons whose rows were written: none, each
        // alone, all but one, all.
        for mask in 0..8u32 {
            let subset = move |row: &RowWrite, _: &mut Rng| {
                let i = PERSONS.iter().position(|p| *p == head(row));
                i.is_some_and(|i| mask & (1 << i) != 0)
            };
            wrong.extend(case(seed, &subset).await);
        }
    }
    assert!(wrong.is_empty(), "timelines not the fold's: {wrong:?}");
}

#[tokio::test]
async fn torn_one_row_at_a_time_the_same_replays_go_wrong() {
    // Any row alone, the way a store without per-head atomicity can tear.
    let by_row = |_: &RowWrite, rng: &mut Rng| rng.below(2) == 0;
    let mut wrong = Vec::new();
    for seed in 0..60 {
        wrong.extend(case(seed, &by_row).await);
    }
    assert!(
        !wrong.is_empty(),
        "tearing single rows should break some timeline: the test above would not see a fault"
    );
}
