//! What a deployment's life asks of the controller, on the in-memory log
//! and store:
//! - a projection version stored in another state encoding than the
//!   running build's (see `waymark_runtime::row`) is detected at start-up
//!   with the instruction to raise `projection_version`, and, once raised,
//!   replaced by the new version at once, rebuilt from the log in the new
//!   encoding, with queries answering UNAVAILABLE until it has caught up
//!   and every dead letter written exactly once across the two builds;
//! - a topic whose partition count changed is refused at start-up;
//! - retention keeps what a running version has not applied.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use waymark_control::Controller;
use waymark_core::{Event, EventData, Fold, Tracked};
use waymark_runtime::catalog;
use waymark_runtime::memory::MemoryStore;
use waymark_runtime::memory_log::MemoryLog;
use waymark_runtime::plugin::{BuildContext, BuildError, ProcessorFactory, Registry, TableSpec};
use waymark_runtime::row::decode_row;
use waymark_runtime::{Handler, Log, OutRecord, StoreError, TopicConfig};
use waymark_schemas::Validator;
use waymark_server::Projections;
use waymark_topology::{ProcessorDecl, TopicRole, Topology};

const EVENTS: &str = "waymark.events";
const DLQ: &str = "waymark.dlq";

/// Counts a person's events.
struct Count;

impl Fold for Count {
    type State = u64;
    fn apply(&self, state: &mut u64, _: &Event) {
        *state += 1;
    }
}

/// The `count` processor of one build: `encoding` is its state encoding.
struct CountProcessor {
    encoding: u32,
}

impl ProcessorFactory for CountProcessor {
    fn name(&self) -> &'static str {
        "count"
    }

    fn tables(&self) -> &'static [TableSpec] {
        const TABLES: &[TableSpec] = &[TableSpec::tracked("", "person id")];
        TABLES
    }

    fn state_encoding(&self) -> u32 {
        self.encoding
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Arc<dyn Handler>, BuildError> {
        Ok(ctx.fold(Count))
    }
}

fn registry(encoding: u32) -> Registry {
    Registry::new(vec![Arc::new(CountProcessor { encoding })])
}

fn topology(version: u32) -> Topology {
    let text = format!(
        "topics:
  inputs: {{name: waymark.inputs, partitions: 1, retention: 7d}}
  events: {{name: {EVENTS}, partitions: 2, retention: forever}}
  dlq: {{name: {DLQ}, partitions: 1, retention: 30d}}
processors:
  count:
    inputs: [{EVENTS}]
    outputs: [{DLQ}]
    projection_version: {version}
"
    );
    let decls = [ProcessorDecl {
        name: "count",
        input: Some(TopicRole::Events),
        outputs: Some(&[TopicRole::Dlq]),
        params: &[],
    }];
    waymark_topology::parse(&text, &decls).unwrap()
}

fn person(i: u128) -> Uuid {
    Uuid::from_u128(i + 1)
}

/// Events `first..first + n` of each of persons 0..3, then one record that
/// is no event (a dead letter).
async fn publish(log: &MemoryLog, first: usize, n: usize) {
    let mut records = Vec::new();
    for i in first..first + n {
        for p in 0..3 {
            let event = Event {
                id: format!("e{i}-{p}"),
                time: "2026-01-01T00:00:00Z".parse().unwrap(),
                source: None,
                person_id: Some(person(p)),
                data: EventData::JourneyCompleted {
                    journey_id: "j".into(),
                },
            };
            records.push(OutRecord::keyed(
                EVENTS,
                person(p).to_string(),
                event.to_json(),
            ));
        }
    }
    records.push(OutRecord::keyed(EVENTS, "bad", b"not json".to_vec()));
    log.produce(records).await.unwrap();
}

/// A memory log with the events (2 partitions) and dead-letter topics, and
/// an empty memory store.
async fn engines() -> (MemoryLog, MemoryStore) {
    let log = MemoryLog::new();
    let topics = [(EVENTS, 2), (DLQ, 1)].map(|(name, partitions)| TopicConfig {
        name: name.into(),
        partitions,
        retention: None,
        compaction: false,
    });
    log.ensure_topics(&topics).await.unwrap();
    (log, MemoryStore::new())
}

fn controller(log: &MemoryLog, store: &MemoryStore, encoding: u32, version: u32) -> Controller {
    Controller::new(
        registry(encoding),
        Arc::new(log.clone()),
        Arc::new(store.clone()),
        topology(version),
        Arc::new(Validator::new().unwrap()),
        vec!["count".into()],
        "test",
    )
    .0
}

type Check = Pin<Box<dyn Future<Output = bool> + Send>>;

/// Runs `controller` until `done` holds (at most 30 s), then stops it.
async fn run_until(controller: Controller, mut done: impl FnMut() -> Check) {
    let token = CancellationToken::new();
    let task = tokio::spawn(controller.run(token.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Whether `version` of count has applied everything on the events topic.
fn caught_up(log: &MemoryLog, store: &MemoryStore, version: u32) -> impl FnMut() -> Check {
    let (log, store) = (log.clone(), store.clone());
    move || {
        let (log, store) = (log.clone(), store.clone());
        Box::pin(async move {
            let p = catalog::progress(&store, &log, EVENTS, "count", version)
                .await
                .unwrap();
            p.lag() == 0
        })
    }
}

/// Whether the active version of count is no longer catching up.
fn not_catching_up(store: &MemoryStore) -> impl FnMut() -> Check {
    let store = store.clone();
    move || {
        let store = store.clone();
        Box::pin(async move {
            let entry = catalog::load(&store, "count").await.unwrap().unwrap();
            !entry.active_catching_up()
        })
    }
}

fn counts(store: &MemoryStore, table: &str, encoding: u32) -> Vec<u64> {
    let mut rows = store.rows(table);
    rows.sort();
    rows.iter()
        .map(|(k, v)| {
            decode_row::<Tracked<u64>>(encoding, table, k, v)
                .unwrap()
                .state
        })
        .collect()
}

#[tokio::test]
async fn a_version_of_another_state_encoding_is_detected_and_rebuilt_once_raised() {
    let (log, store) = engines().await;

    // Build A (state encoding 1) runs version 1 over the first records.
    publish(&log, 0, 5).await;
    let mut a = controller(&log, &store, 1, 1);
    a.start().await.unwrap();
    run_until(a, caught_up(&log, &store, 1)).await;
    assert_eq!(counts(&store, "count_v1", 1), vec![5, 5, 5]);
    assert_eq!(log.records(DLQ).len(), 1);

    // More records arrive while nothing runs.
    publish(&log, 5, 2).await;

    // Build B (state encoding 2) with the same topology refuses to start,
    // saying what to do.
    let mut b = controller(&log, &store, 2, 1);
    let refused = b.start().await.unwrap_err().to_string();
    assert!(refused.contains("state encoding 1"), "{refused}");
    assert!(refused.contains("state encoding 2"), "{refused}");
    assert!(
        refused.contains("processors.count.projection_version") && refused.contains("to 2"),
        "{refused}"
    );
    // A row of version 1 read by build B is an encoding error, not a value.
    let (key, bytes) = store.rows("count_v1").remove(0);
    assert!(matches!(
        decode_row::<Tracked<u64>>(2, "count_v1", &key, &bytes),
        Err(StoreError::Encoding {
            found: Some(1),
            expected: 2,
            ..
        })
    ));

    // Raised to version 2: version 2 replaces version 1 at once, and
    // queries answer UNAVAILABLE until it has caught up.
    let mut b = controller(&log, &store, 2, 2);
    b.start().await.unwrap();
    let entry = catalog::load(&store, "count").await.unwrap().unwrap();
    assert_eq!((entry.active, entry.previous), (2, Some(1)));
    assert!(entry.active_catching_up());
    assert_eq!(entry.encoding(2), Some(2));
    let projections = Projections::new(
        Arc::new(store.clone()),
        waymark_control::configured_versions(&registry(2), &topology(2)),
    );
    waymark_control::refresh(&projections, &registry(2), &topology(2))
        .await
        .unwrap();
    let unavailable = projections
        .state::<u64>("count", person(0))
        .await
        .unwrap_err();
    assert!(
        matches!(unavailable, StoreError::Unavailable(_)),
        "{unavailable}"
    );

    run_until(b, not_catching_up(&store)).await;
    assert_eq!(counts(&store, "count_v2", 2), vec![7, 7, 7]);
    waymark_control::refresh(&projections, &registry(2), &topology(2))
        .await
        .unwrap();
    assert_eq!(
        projections.state::<u64>("count", person(0)).await.unwrap(),
        Some(7)
    );
    // Each of the two bad records has exactly one dead letter: the first
    // from version 1, the second (which version 1 never read) from
    // version 2.
    let dead = log.records(DLQ);
    assert_eq!(dead.len(), 2, "{dead:?}");
    // Version 1 has handed off: it can be dropped.
    let entry = catalog::load(&store, "count").await.unwrap().unwrap();
    assert!(catalog::handed_off(&store, &log, EVENTS, &entry)
        .await
        .unwrap());
}

/// A topic's partition count is recorded on the first start; a start that
/// finds it changed is refused, naming the topic, both counts and the
/// remedy. A topic created beforehand with another count than the
/// topology's is what the deployment runs with.
#[tokio::test]
async fn a_changed_partition_count_is_refused_at_start_up() {
    use waymark_control::partitions::{check, PartitionsError};
    let store = MemoryStore::new();
    let topics = |events: u32| {
        [(EVENTS, events), (DLQ, 1)].map(|(name, partitions)| TopicConfig {
            name: name.into(),
            partitions,
            retention: None,
            compaction: false,
        })
    };
    let first = MemoryLog::new();
    first.ensure_topics(&topics(3)).await.unwrap();
    // Configured with 2, created beforehand with 3: runs with 3.
    check(&store, &first, &topics(2)).await.unwrap();
    check(&store, &first, &topics(3)).await.unwrap();

    let repartitioned = MemoryLog::new();
    repartitioned.ensure_topics(&topics(6)).await.unwrap();
    let refused = check(&store, &repartitioned, &topics(6)).await.unwrap_err();
    assert!(matches!(refused, PartitionsError::Changed(_)));
    let text = refused.to_string();
    assert!(
        text.contains("waymark.events has 6 partitions")
            && text.contains("built on 3")
            && text.contains("Restore the recorded partition count"),
        "{text}"
    );
    assert!(!text.contains("waymark.dlq"), "{text}");
}

/// Retention keeps what a running version has not applied: per partition
/// the smallest position of the active, building and previous versions of
/// every processor reading the topic; 0 before any version ran; nothing
/// for a topic no processor reads.
#[tokio::test]
async fn the_unapplied_floor_is_the_slowest_reader() {
    let (log, store) = engines().await;
    let floor = |store: MemoryStore, log: MemoryLog| async move {
        waymark_control::unapplied_floor(&store, &log, &registry(1), &topology(1), EVENTS)
            .await
            .unwrap()
    };
    assert_eq!(
        floor(store.clone(), log.clone()).await,
        [(0, 0), (1, 0)].into()
    );
    assert!(
        waymark_control::unapplied_floor(&store, &log, &registry(1), &topology(1), DLQ)
            .await
            .unwrap()
            .is_empty()
    );

    publish(&log, 0, 5).await;
    let mut a = controller(&log, &store, 1, 1);
    a.start().await.unwrap();
    run_until(a, caught_up(&log, &store, 1)).await;
    let high: BTreeMap<u32, u64> = {
        let mut h = BTreeMap::new();
        for p in 0..2 {
            h.insert(p, log.watermarks(EVENTS, p).await.unwrap().1);
        }
        h
    };
    assert_eq!(floor(store.clone(), log.clone()).await, high);
    // A rebuild from offset 0 holds retention back to 0 again.
    catalog::update(&store, "count", catalog::Configured::new(1, 1), |e| {
        e.start_rebuild(None, false, 1, chrono::Utc::now())
    })
    .await
    .unwrap();
    assert_eq!(
        floor(store.clone(), log.clone()).await,
        [(0, 0), (1, 0)].into()
    );
}

/// `waymark_projection_state` follows the catalog: the live version, a
/// rebuild while it builds, then the switch, and nothing once dropped.
#[tokio::test]
async fn the_projection_state_metric_follows_the_catalog() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use waymark_control::controller::PROJECTION_STATE;
    use waymark_runtime::catalog::Configured;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // One-threaded test runtime: the controller records here.
    let _local = metrics::set_default_local_recorder(&recorder);
    let states = || -> BTreeMap<(String, String), f64> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == PROJECTION_STATE)
            .filter_map(|(k, _, _, v)| {
                let label = |name: &str| {
                    k.key()
                        .labels()
                        .find(|l| l.key() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap()
                };
                match v {
                    DebugValue::Gauge(g) => {
                        Some(((label("version"), label("state")), g.into_inner()))
                    }
                    _ => None,
                }
            })
            .filter(|(_, v)| *v > 0.0)
            .collect()
    };
    let (log, store) = engines().await;
    let configured = Configured::new(1, 1);

    let mut c = controller(&log, &store, 1, 1);
    c.start().await.unwrap();
    let live_1 = (("1".to_owned(), "live".to_owned()), 1.0);
    assert_eq!(states(), BTreeMap::from([live_1.clone()]));

    catalog::update(&store, "count", configured, |e| {
        e.start_rebuild(Some(2), false, 1, chrono::Utc::now())
    })
    .await
    .unwrap();
    c.reconcile("count").await.unwrap();
    assert_eq!(
        states(),
        BTreeMap::from([live_1, (("2".to_owned(), "building".to_owned()), 1.0)])
    );

    catalog::update(&store, "count", configured, |e| {
        e.switch(2, chrono::Utc::now())
    })
    .await
    .unwrap();
    c.reconcile("count").await.unwrap();
    assert_eq!(
        states(),
        BTreeMap::from([
            (("1".to_owned(), "retired".to_owned()), 1.0),
            (("2".to_owned(), "live".to_owned()), 1.0)
        ])
    );

    catalog::update(&store, "count", configured, |e| e.drop_version(1, true))
        .await
        .unwrap();
    c.reconcile("count").await.unwrap();
    assert_eq!(
        states(),
        BTreeMap::from([(("2".to_owned(), "live".to_owned()), 1.0)])
    );
    drop(c);
}
