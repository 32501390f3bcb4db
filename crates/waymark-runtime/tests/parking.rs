//! Permanent failures never wedge a runner: a fold's failing person is
//! parked in order while everyone else flows, an operator's retry applies
//! the parked records in their original order, a skip dead-letters the
//! failing one, a handler whose rows are shared dead-letters the failing
//! record, and a fault of every record is retried, not blamed on records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use waymark_core::{Event, EventData, Fold, Tracked};
use waymark_runtime::dead_letter::{DeadLetter, HEADER_ERROR};
use waymark_runtime::memory::MemoryStore;
use waymark_runtime::memory_log::MemoryLog;
use waymark_runtime::park::{self, ParkAction};
use waymark_runtime::row::decode_row;
use waymark_runtime::{
    BatchOutput, HandleError, Handler, Log, OutRecord, ProjectionHandler, ProjectionStore, Record,
    RowWrite, Runner, RunnerConfig, StoreError, TopicConfig, WriteBatch,
};

const INPUT: &str = "events";
const OUT: &str = "out";
const DLQ: &str = "dlq";
const TABLE: &str = "ids_v1";

/// Keeps every event id, in the order applied.
struct Ids;

impl Fold for Ids {
    type State = Vec<String>;
    fn apply(&self, state: &mut Vec<String>, event: &Event) {
        state.push(event.id.clone());
    }
}

fn person(i: u128) -> String {
    Uuid::from_u128(i + 1).to_string()
}

fn event(id: &str, who: u128) -> OutRecord {
    let event = Event {
        id: id.into(),
        time: "2026-01-01T00:00:00Z".parse().unwrap(),
        source: None,
        person_id: Some(Uuid::from_u128(who + 1)),
        data: EventData::JourneyCompleted {
            journey_id: "j".into(),
        },
    };
    OutRecord::keyed(INPUT, person(who), event.to_json())
}

async fn setup() -> (MemoryLog, MemoryStore) {
    let log = MemoryLog::new();
    let topics = [(INPUT, 3), (OUT, 1), (DLQ, 1)].map(|(name, partitions)| TopicConfig {
        name: name.into(),
        partitions,
        retention: None,
        compaction: false,
    });
    log.ensure_topics(&topics).await.unwrap();
    let store = MemoryStore::new();
    store.ensure_tables(&[TABLE.to_owned()]).await.unwrap();
    (log, store)
}

fn config(consumer: &str) -> RunnerConfig {
    let mut config = RunnerConfig::new(consumer, INPUT, DLQ);
    config.backoff_min = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(5);
    config
}

fn fold_runner(log: &MemoryLog, store: &MemoryStore) -> Runner {
    let handler = Arc::new(ProjectionHandler::new(
        "ids",
        TABLE,
        1,
        Ids,
        chrono::Duration::days(7),
    ));
    Runner::new(
        Arc::new(log.clone()),
        Arc::new(store.clone()),
        handler,
        config("ids.v1"),
    )
}

/// Waits until `consumer` has stored positions at the end of every input
/// partition.
async fn caught_up(log: &MemoryLog, store: &MemoryStore, consumer: &str) {
    for _ in 0..4_000 {
        let stored = store.positions(consumer, INPUT).await.unwrap();
        let mut done = true;
        for p in 0..3 {
            let (_, high) = log.watermarks(INPUT, p).await.unwrap();
            done &= stored.get(&p).copied().unwrap_or(0) >= high;
        }
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{consumer} never caught up");
}

/// Waits until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..4_000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never: {what}");
}

fn states(store: &MemoryStore) -> BTreeMap<String, Result<Vec<String>, String>> {
    store
        .rows(TABLE)
        .into_iter()
        .map(|(k, v)| {
            let row = decode_row::<Tracked<Vec<String>>>(1, TABLE, &k, &v)
                .map(|t| t.state)
                .map_err(|e| e.to_string());
            (k, row)
        })
        .collect()
}

async fn parked(store: &MemoryStore) -> Vec<park::ParkedKey> {
    park::list(store, &park::parked_table("ids", 1), None, 100)
        .await
        .unwrap()
        .0
}

/// The offset of person `who`'s first record.
fn first_offset(log: &MemoryLog, who: u128) -> u64 {
    let key = person(who).into_bytes();
    log.records(INPUT)
        .into_iter()
        .filter(|r| r.key.as_ref() == Some(&key))
        .map(|r| r.offset)
        .min()
        .unwrap()
}

/// The ids of person `who`'s events among `events`, in log order.
fn ids_of(events: &[(String, u128)], who: u128) -> Vec<String> {
    events
        .iter()
        .filter(|(_, w)| *w == who)
        .map(|(id, _)| id.clone())
        .collect()
}

#[tokio::test]
async fn a_person_whose_state_is_unreadable_is_parked_in_order_while_everyone_else_flows() {
    let (log, store) = setup().await;
    // Person 1's stored row cannot be read: a row header and no value.
    let corrupt = vec![waymark_runtime::row::ROW_MAGIC, 1];
    store
        .write(WriteBatch {
            rows: vec![RowWrite {
                table: TABLE.into(),
                key: person(1),
                value: Some(corrupt.clone()),
                order: None,
            }],
            positions: Vec::new(),
        })
        .await
        .unwrap();
    let mut events: Vec<(String, u128)> = (0..40).map(|i| (format!("e{i}"), i % 4)).collect();
    log.produce(events.iter().map(|(id, w)| event(id, *w)).collect())
        .await
        .unwrap();

    let token = CancellationToken::new();
    let task = tokio::spawn(fold_runner(&log, &store).run(token.clone()));
    caught_up(&log, &store, "ids.v1").await;

    // Everyone else is applied, in order; person 1 is untouched.
    let got = states(&store);
    for who in [0, 2, 3] {
        assert_eq!(got[&person(who)], Ok(ids_of(&events, who)), "person {who}");
    }
    assert_eq!(
        store
            .rows(TABLE)
            .into_iter()
            .find(|(k, _)| *k == person(1))
            .unwrap()
            .1,
        corrupt
    );
    let keys = parked(&store).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].key, person(1).into_bytes());
    assert_eq!(keys[0].count(), 10);
    assert!(keys[0].reason.contains("corrupt row"), "{}", keys[0].reason);
    assert_eq!(
        keys[0].offset,
        first_offset(&log, 1),
        "the first of its records failed"
    );

    // Later records of the parked person are parked behind it.
    let more: Vec<(String, u128)> = (40..44).map(|i| (format!("e{i}"), 1)).collect();
    log.produce(more.iter().map(|(id, w)| event(id, *w)).collect())
        .await
        .unwrap();
    events.extend(more);
    caught_up(&log, &store, "ids.v1").await;
    assert_eq!(parked(&store).await[0].count(), 14);

    // A retry before the fix fails again and says so.
    let table = park::parked_table("ids", 1);
    let key = person(1).into_bytes();
    assert!(park::request(&store, &table, &key, ParkAction::Retry)
        .await
        .unwrap()
        .is_some());
    eventually("the retry failed", || async {
        parked(&store).await[0].retries == 1
    })
    .await;
    let keys = parked(&store).await;
    assert_eq!(keys[0].count(), 14);
    assert!(keys[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("corrupt row"));
    assert!(park::pending(&store, &table, &key).await.unwrap().is_none());

    // The operator mends the row; a retry applies every parked record in
    // its original order, and new records flow again.
    store
        .write(WriteBatch {
            rows: vec![RowWrite {
                table: TABLE.into(),
                key: person(1),
                value: None,
                order: None,
            }],
            positions: Vec::new(),
        })
        .await
        .unwrap();
    park::request(&store, &table, &key, ParkAction::Retry)
        .await
        .unwrap();
    eventually("the key was resumed", || async {
        parked(&store).await.is_empty()
    })
    .await;
    let after: Vec<(String, u128)> = (44..48).map(|i| (format!("e{i}"), 1)).collect();
    log.produce(after.iter().map(|(id, w)| event(id, *w)).collect())
        .await
        .unwrap();
    events.extend(after);
    caught_up(&log, &store, "ids.v1").await;
    eventually("person 1 applied in order", || async {
        states(&store)[&person(1)] == Ok(ids_of(&events, 1))
    })
    .await;
    assert!(
        store.rows(&table).is_empty(),
        "nothing is left in the parked table"
    );
    assert!(log.records(DLQ).is_empty(), "nothing was dead-lettered");

    // A restarted runner changes nothing.
    token.cancel();
    task.await.unwrap().unwrap();
    let before = states(&store);
    let token = CancellationToken::new();
    let task = tokio::spawn(fold_runner(&log, &store).run(token.clone()));
    caught_up(&log, &store, "ids.v1").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    token.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(states(&store), before);
}

#[tokio::test]
async fn a_skip_dead_letters_the_failing_record_and_applies_the_rest() {
    let (log, store) = setup().await;
    let corrupt = vec![waymark_runtime::row::ROW_MAGIC, 1];
    store
        .write(WriteBatch {
            rows: vec![RowWrite {
                table: TABLE.into(),
                key: person(2),
                value: Some(corrupt),
                order: None,
            }],
            positions: Vec::new(),
        })
        .await
        .unwrap();
    let events: Vec<(String, u128)> = (0..12).map(|i| (format!("e{i}"), i % 3)).collect();
    log.produce(events.iter().map(|(id, w)| event(id, *w)).collect())
        .await
        .unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(fold_runner(&log, &store).run(token.clone()));
    caught_up(&log, &store, "ids.v1").await;
    assert_eq!(parked(&store).await[0].count(), 4);

    // Mended, then the failing record skipped: it becomes a dead letter of
    // kind processing_failed, and the other three are applied in order.
    store
        .write(WriteBatch {
            rows: vec![RowWrite {
                table: TABLE.into(),
                key: person(2),
                value: None,
                order: None,
            }],
            positions: Vec::new(),
        })
        .await
        .unwrap();
    let table = park::parked_table("ids", 1);
    park::request(&store, &table, person(2).as_bytes(), ParkAction::Skip)
        .await
        .unwrap();
    eventually("the key was resumed", || async {
        parked(&store).await.is_empty()
    })
    .await;
    let ids = ids_of(&events, 2);
    assert_eq!(states(&store)[&person(2)], Ok(ids[1..].to_vec()));
    let dead = log.records(DLQ);
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].header(HEADER_ERROR),
        Some(&b"processing_failed"[..])
    );
    let letter = DeadLetter::from_record(&dead[0]);
    assert_eq!(letter.offset as u64, first_offset(&log, 2), "{letter:?}");
    assert_eq!(letter.key, person(2).into_bytes());
    assert!(
        letter.message.contains("skipped by an operator"),
        "{}",
        letter.message
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Forwards every record to [`OUT`], and fails for good on a batch that
/// holds a `poison` record, or on every batch when `always`.
struct Picky {
    always: bool,
}

#[async_trait]
impl Handler for Picky {
    fn processor(&self) -> &str {
        "picky"
    }
    fn tables(&self) -> Vec<String> {
        Vec::new()
    }
    async fn handle(
        &self,
        _: &dyn ProjectionStore,
        _: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError> {
        if self.always
            || records
                .iter()
                .any(|r| r.value.as_deref() == Some(b"poison"))
        {
            return Err(HandleError::Store(StoreError::Corrupt {
                table: "links".into(),
                key: "k".into(),
                reason: "unreadable".into(),
            }));
        }
        let mut out = BatchOutput::default();
        for (i, r) in records.iter().enumerate() {
            let value = r.value.clone().unwrap_or_default();
            out.produce.push((i, OutRecord::keyed(OUT, "k", value)));
        }
        Ok(out)
    }
}

fn picky_runner(log: &MemoryLog, store: &MemoryStore, always: bool) -> Runner {
    Runner::new(
        Arc::new(log.clone()),
        Arc::new(store.clone()),
        Arc::new(Picky { always }),
        config("picky.v1"),
    )
}

#[tokio::test]
async fn a_handler_with_shared_rows_dead_letters_the_failing_record_and_goes_on() {
    let (log, store) = setup().await;
    let values: Vec<String> = (0..50)
        .map(|i| {
            if i == 17 {
                "poison".into()
            } else {
                format!("v{i}")
            }
        })
        .collect();
    log.produce(
        values
            .iter()
            .map(|v| OutRecord::keyed(INPUT, "one-key", v.clone().into_bytes()))
            .collect(),
    )
    .await
    .unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(picky_runner(&log, &store, false).run(token.clone()));
    caught_up(&log, &store, "picky.v1").await;
    token.cancel();
    task.await.unwrap().unwrap();

    let out: Vec<Vec<u8>> = log
        .records(OUT)
        .into_iter()
        .map(|r| r.value.unwrap())
        .collect();
    let expected: Vec<Vec<u8>> = values
        .iter()
        .filter(|v| *v != "poison")
        .map(|v| v.clone().into_bytes())
        .collect();
    assert_eq!(out, expected, "every other record forwarded once, in order");
    let dead = log.records(DLQ);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value.as_deref(), Some(&b"poison"[..]));
    assert_eq!(
        dead[0].header(HEADER_ERROR),
        Some(&b"processing_failed"[..])
    );
    assert!(store.rows(&park::parked_table("picky", 1)).is_empty());
}

#[tokio::test]
async fn a_fault_of_every_record_is_retried_not_blamed_on_records() {
    let (log, store) = setup().await;
    log.produce(
        (0..40)
            .map(|i| OutRecord::keyed(INPUT, format!("k{i}"), b"v".to_vec()))
            .collect(),
    )
    .await
    .unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(picky_runner(&log, &store, true).run(token.clone()));
    eventually("the partition is reported failing", || async {
        waymark_runtime::status::failing()
            .iter()
            .any(|f| f.processor == "picky" && f.retries >= 3)
    })
    .await;
    token.cancel();
    task.await.unwrap().unwrap();
    let dead = log.records(DLQ).len();
    assert!(
        dead <= park::MAX_ISOLATED_PER_BATCH * 3,
        "{dead} records blamed; at most {} per batch",
        park::MAX_ISOLATED_PER_BATCH
    );
    let stored: u64 = store
        .positions("picky.v1", INPUT)
        .await
        .unwrap()
        .values()
        .sum();
    assert!(stored < 40, "it did not skip past the failure: {stored}");
    let failing = waymark_runtime::status::failing();
    let f = failing.iter().find(|f| f.processor == "picky").unwrap();
    assert!(f.error.contains("unreadable"), "{f:?}");
}

#[tokio::test]
async fn a_consumer_that_never_recovers_is_replaced_and_nothing_is_applied_twice() {
    let (log, store) = setup().await;
    let events: Vec<(String, u128)> = (0..30).map(|i| (format!("e{i}"), i % 3)).collect();
    log.produce(events[..15].iter().map(|(id, w)| event(id, *w)).collect())
        .await
        .unwrap();
    let handler = Arc::new(ProjectionHandler::new(
        "ids",
        TABLE,
        1,
        Ids,
        chrono::Duration::days(7),
    ));
    let mut config = config("ids.v1");
    config.resubscribe_after = Duration::from_millis(30);
    let runner = Runner::new(
        Arc::new(log.clone()),
        Arc::new(store.clone()),
        handler,
        config,
    );
    let token = CancellationToken::new();
    let task = tokio::spawn(runner.run(token.clone()));
    caught_up(&log, &store, "ids.v1").await;
    let before = log.subscriptions();
    // The client breaks for good (as librdkafka's did after a broker was
    // stopped and killed); records keep coming.
    log.break_consumers();
    log.produce(events[15..].iter().map(|(id, w)| event(id, *w)).collect())
        .await
        .unwrap();
    caught_up(&log, &store, "ids.v1").await;
    assert!(log.subscriptions() > before, "the runner subscribed again");
    let got = states(&store);
    for who in 0..3 {
        assert_eq!(got[&person(who)], Ok(ids_of(&events, who)), "person {who}");
    }
    token.cancel();
    task.await.unwrap().unwrap();
}
