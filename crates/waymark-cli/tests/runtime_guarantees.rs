//! The processing guarantees of `waymark-runtime`, proven on the embedded
//! log and store: per-key ordering, exactly-once effects over at-least-once
//! delivery (store outages, crashes between output and state), dead
//! letters, replay-from-offset-0 equals live, and the row cache of remote
//! stores changing no result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::event;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use waymark_cli::registry::{self, registry};
use waymark_core::{default_person_id, Tracked};
use waymark_embedded::{EmbeddedLog, EmbeddedStore};
use waymark_journey::JourneysState;
use waymark_person::PersonState;
use waymark_runtime::row::decode_row;
use waymark_runtime::{
    Handler, Log, OutRecord, ProjectionStore, Runner, RunnerConfig, StoreError, TopicConfig,
    WriteBatch,
};
use waymark_schemas::Validator;
use waymark_topology::Topology;

const INPUTS: &str = "waymark.inputs";
const EVENTS: &str = "waymark.events";
const DLQ: &str = "waymark.dlq";

struct Platform {
    log: EmbeddedLog,
    store: EmbeddedStore,
    topology: Topology,
    validator: Arc<Validator>,
    _dir: tempfile::TempDir,
}

async fn platform() -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log.redb")).unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
    let topics = [(INPUTS, 1), (EVENTS, 4), (DLQ, 1)].map(|(name, partitions)| TopicConfig {
        name: name.into(),
        partitions,
        retention: None,
        compaction: false,
    });
    log.ensure_topics(&topics).await.unwrap();
    Platform {
        log,
        store,
        topology: registry::default_topology().unwrap(),
        validator: Arc::new(Validator::new().unwrap()),
        _dir: dir,
    }
}

impl Platform {
    fn handler(&self, name: &str) -> Arc<dyn Handler> {
        registry()
            .handler(name, 1, &self.topology, &self.validator)
            .unwrap()
    }

    /// Starts a runner for `name` with consumer id `consumer` on `store`.
    async fn run(
        &self,
        name: &str,
        consumer: &str,
        store: Arc<dyn ProjectionStore>,
        token: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let handler = self.handler(name);
        store.ensure_tables(&handler.tables()).await.unwrap();
        let input = if name == "identity" { INPUTS } else { EVENTS };
        let mut config = RunnerConfig::new(consumer, input, DLQ);
        config.max_batch = 7; // many small batches
        config.backoff_min = Duration::from_millis(5);
        config.backoff_max = Duration::from_millis(20);
        let runner = Runner::new(Arc::new(self.log.clone()), store, handler, config);
        let token = token.clone();
        tokio::spawn(async move { runner.run(token).await.unwrap() })
    }

    async fn publish(&self, events: &[String]) {
        let records = events
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(e).unwrap_or(json!({}));
                let key = format!(
                    "{}:{}",
                    v["source"]["platform"].as_str().unwrap_or(""),
                    v["source"]["platform_id"].as_str().unwrap_or("")
                );
                OutRecord::keyed(INPUTS, key, e.as_bytes().to_vec())
            })
            .collect();
        self.log.produce(records).await.unwrap();
    }

    /// Waits until `consumer` has applied everything of `topic`.
    async fn caught_up(&self, consumer: &str, topic: &str) {
        let partitions = self.log.partitions(topic).await.unwrap();
        common::eventually(&format!("{consumer} caught up on {topic}"), || async {
            let stored = self.store.positions(consumer, topic).await.ok()?;
            for p in 0..partitions {
                let (_, high) = self.log.watermarks(topic, p).await.ok()?;
                if stored.get(&p).copied().unwrap_or(0) < high {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    async fn state<S: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        person: uuid::Uuid,
    ) -> Option<S> {
        let key = person.to_string();
        let bytes = self.store.get(table, &key).await.unwrap()?;
        // The table's processor: `<name>_v<N>`.
        let processor = table.split("_v").next().unwrap();
        let encoding = registry().encoding(processor).unwrap();
        Some(
            decode_row::<Tracked<S>>(encoding, table, &key, &bytes)
                .unwrap()
                .state,
        )
    }
}

/// A store that fails the first `failures` writes, as a store outage does,
/// counts the rows read from it, and asks runners for a row cache of
/// `cache_bytes` (as a remote store does).
struct FlakyStore {
    inner: EmbeddedStore,
    failures: AtomicUsize,
    reads: AtomicUsize,
    cache_bytes: usize,
}

impl FlakyStore {
    fn new(inner: EmbeddedStore, failures: usize, cache_bytes: usize) -> Self {
        Self {
            inner,
            failures: AtomicUsize::new(failures),
            reads: AtomicUsize::new(0),
            cache_bytes,
        }
    }
}

#[async_trait]
impl ProjectionStore for FlakyStore {
    async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        self.inner.ensure_tables(tables).await
    }
    async fn get_many(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.reads.fetch_add(keys.len(), Ordering::SeqCst);
        self.inner.get_many(table, keys).await
    }
    fn runner_cache_bytes(&self) -> usize {
        self.cache_bytes
    }
    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.write(batch).await
    }
    async fn compare_and_set(
        &self,
        table: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        self.inner
            .compare_and_set(table, key, expected, value)
            .await
    }
    async fn positions(
        &self,
        consumer: &str,
        topic: &str,
    ) -> Result<BTreeMap<u32, u64>, StoreError> {
        self.inner.positions(consumer, topic).await
    }
    async fn scan(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan(table, after, limit).await
    }
    async fn drop_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        self.inner.drop_tables(tables).await
    }
    async fn delete_positions(&self, consumer: &str, topic: &str) -> Result<(), StoreError> {
        self.inner.delete_positions(consumer, topic).await
    }
}

fn stages_workload(persons: usize, per_person: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..per_person {
        for p in 0..persons {
            // Event times deliberately out of order: log order must win.
            let second = (per_person - i) % 60;
            out.push(event(
                &format!("p{p}-e{i}"),
                "journey.stage_entered",
                &format!("2026-05-01T10:00:{second:02}Z"),
                ("web", &format!("p{p}")),
                json!({"journey_id": "j", "stage": format!("s{i}")}),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_person_order_is_log_order_across_many_batches() {
    let p = platform().await;
    let token = CancellationToken::new();
    let store: Arc<dyn ProjectionStore> = Arc::new(p.store.clone());
    let a = p
        .run("identity", "identity.v1", store.clone(), &token)
        .await;
    let b = p.run("journey", "journey.v1", store.clone(), &token).await;
    p.publish(&stages_workload(5, 40)).await;
    p.caught_up("identity.v1", INPUTS).await;
    p.caught_up("journey.v1", EVENTS).await;
    for person in 0..5 {
        let id = default_person_id("web", &format!("p{person}"));
        let s: JourneysState = p.state("journey_v1", id).await.unwrap();
        let expected: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        assert_eq!(s.journeys["j"].stages, expected);
    }
    token.cancel();
    a.await.unwrap();
    b.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_is_retried_and_applies_exactly_once() {
    let p = platform().await;
    let token = CancellationToken::new();
    let healthy: Arc<dyn ProjectionStore> = Arc::new(p.store.clone());
    let flaky: Arc<dyn ProjectionStore> = Arc::new(FlakyStore::new(p.store.clone(), 25, 0));
    let a = p
        .run("identity", "identity.v1", flaky.clone(), &token)
        .await;
    let b = p.run("person", "person.v1", flaky, &token).await;
    let mut events = stages_workload(3, 20);
    events.extend(stages_workload(3, 20)); // every event twice: duplicates
    p.publish(&events).await;
    p.caught_up("identity.v1", INPUTS).await;
    p.caught_up("person.v1", EVENTS).await;
    for person in 0..3 {
        let id = default_person_id("web", &format!("p{person}"));
        let s: PersonState = p.state("person_v1", id).await.unwrap();
        assert_eq!(s.event_count, 20, "person {person}");
    }
    token.cancel();
    a.await.unwrap();
    b.await.unwrap();
    drop(healthy);
}

/// The row cache a remote store asks for (`RowCache`): a fold reads each
/// row from the store once, across many batches, and ends in the same
/// state as without the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_cache_reads_each_row_once_and_changes_no_result() {
    let p = platform().await;
    let token = CancellationToken::new();
    let plain: Arc<dyn ProjectionStore> = Arc::new(p.store.clone());
    let cached = Arc::new(FlakyStore::new(p.store.clone(), 0, 1024 * 1024));
    let uncached = Arc::new(FlakyStore::new(p.store.clone(), 0, 0));
    let a = p.run("identity", "identity.v1", plain, &token).await;
    let b = p.run("journey", "journey.v1", cached.clone(), &token).await;
    let c = p.run("person", "person.v1", uncached.clone(), &token).await;
    let mut events = stages_workload(5, 40);
    events.extend(stages_workload(5, 40)); // every event twice: duplicates
    p.publish(&events).await;
    p.caught_up("identity.v1", INPUTS).await;
    p.caught_up("journey.v1", EVENTS).await;
    p.caught_up("person.v1", EVENTS).await;
    for person in 0..5 {
        let id = default_person_id("web", &format!("p{person}"));
        let s: JourneysState = p.state("journey_v1", id).await.unwrap();
        let expected: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        assert_eq!(s.journeys["j"].stages, expected, "person {person}");
    }
    // 400 records in batches of at most 7: the cached fold read each of
    // the 5 rows once; the uncached one read rows in every batch.
    assert_eq!(cached.reads.load(Ordering::SeqCst), 5);
    assert!(uncached.reads.load(Ordering::SeqCst) > 50);
    token.cancel();
    a.await.unwrap();
    b.await.unwrap();
    c.await.unwrap();
}

/// A failed store write drops the row cache (the store may hold part of
/// the batch), so outages under a cache still apply every event once; a
/// cache too small for one row evicts all the time and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_cache_survives_outages_and_eviction_exactly_once() {
    let p = platform().await;
    let token = CancellationToken::new();
    let plain: Arc<dyn ProjectionStore> = Arc::new(p.store.clone());
    let flaky = Arc::new(FlakyStore::new(p.store.clone(), 25, 1024 * 1024));
    let tiny = Arc::new(FlakyStore::new(p.store.clone(), 0, 1));
    let a = p.run("identity", "identity.v1", plain, &token).await;
    let b = p.run("person", "person.v1", flaky.clone(), &token).await;
    let c = p.run("journey", "journey.v1", tiny.clone(), &token).await;
    let mut events = stages_workload(3, 20);
    events.extend(stages_workload(3, 20));
    p.publish(&events).await;
    p.caught_up("identity.v1", INPUTS).await;
    p.caught_up("person.v1", EVENTS).await;
    p.caught_up("journey.v1", EVENTS).await;
    for person in 0..3 {
        let id = default_person_id("web", &format!("p{person}"));
        let s: PersonState = p.state("person_v1", id).await.unwrap();
        assert_eq!(s.event_count, 20, "person {person}");
        let j: JourneysState = p.state("journey_v1", id).await.unwrap();
        assert_eq!(j.journeys["j"].stages.len(), 20, "person {person}");
    }
    // Every failed write cleared the cache: rows were read again after it.
    assert!(flaky.reads.load(Ordering::SeqCst) > 3);
    assert!(tiny.reads.load(Ordering::SeqCst) > 3);
    token.cancel();
    a.await.unwrap();
    b.await.unwrap();
    c.await.unwrap();
}

/// `per_person` events of each of `persons`, ten days of event time apart:
/// further apart than the dedupe window, so event ids alone cannot tell a
/// record appended twice.
fn far_apart_workload(persons: usize, per_person: usize) -> Vec<String> {
    let start: chrono::DateTime<chrono::Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
    let mut out = Vec::new();
    for i in 0..per_person {
        for p in 0..persons {
            let time = start + chrono::Duration::days(10 * i as i64);
            out.push(event(
                &format!("p{p}-e{i}"),
                "journey.stage_entered",
                &time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ("web", &format!("p{p}")),
                json!({"journey_id": "j", "stage": format!("s{i}")}),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_output_before_state_applies_nothing_twice_whatever_the_event_time() {
    let p = platform().await;
    p.publish(&far_apart_workload(4, 10)).await;

    // First identity run: outputs are appended, but every state write fails
    // (the process "crashes" before its rows and positions are durable).
    let token = CancellationToken::new();
    let broken: Arc<dyn ProjectionStore> =
        Arc::new(FlakyStore::new(p.store.clone(), usize::MAX, 0));
    let crashed = p.run("identity", "identity.v1", broken, &token).await;
    common::eventually("first outputs appended", || async {
        let mut n = 0;
        for part in 0..4 {
            n += p.log.watermarks(EVENTS, part).await.ok()?.1;
        }
        (n > 0).then_some(())
    })
    .await;
    token.cancel();
    crashed.await.unwrap();
    assert!(p
        .store
        .positions("identity.v1", INPUTS)
        .await
        .unwrap()
        .is_empty());

    // Restart with a healthy store: the batch is redone, its outputs are
    // appended again (with their source positions), and the person
    // projection counts each event once, though its copies are 90 days of
    // event time apart.
    let token = CancellationToken::new();
    let store: Arc<dyn ProjectionStore> = Arc::new(p.store.clone());
    let a = p
        .run("identity", "identity.v1", store.clone(), &token)
        .await;
    let b = p.run("person", "person.v1", store, &token).await;
    p.caught_up("identity.v1", INPUTS).await;
    p.caught_up("person.v1", EVENTS).await;
    let mut forwarded = 0;
    for part in 0..4 {
        forwarded += p.log.watermarks(EVENTS, part).await.unwrap().1;
    }
    assert!(
        forwarded > 40,
        "the retried batch was forwarded again ({forwarded})"
    );
    for person in 0..4 {
        let id = default_person_id("web", &format!("p{person}"));
        let s: PersonState = p.state("person_v1", id).await.unwrap();
        assert_eq!(s.event_count, 10);
    }
    token.cancel();
    a.await.unwrap();
    b.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_become_dead_letters_and_processing_goes_on() {
    let p = platform().await;
    let token = CancellationToken::new();
    let store: Arc<dyn ProjectionStore> = Arc::new(p.store.clone());
    let a = p
        .run("identity", "identity.v1", store.clone(), &token)
        .await;
    let b = p.run("person", "person.v1", store, &token).await;
    let mut events = stages_workload(1, 3);
    events.insert(1, "{broken".into());
    p.publish(&events).await;
    // A record written straight to the resolved topic without a person.
    p.log
        .produce(vec![OutRecord::keyed(EVENTS, "x", b"{\"id\":1}".to_vec())])
        .await
        .unwrap();
    p.caught_up("identity.v1", INPUTS).await;
    p.caught_up("person.v1", EVENTS).await;
    let letters = p.log.read(DLQ, 0, 0, 10).await.unwrap();
    let kinds: Vec<(String, String)> = letters
        .iter()
        .map(|r| {
            let d = waymark_runtime::dead_letter::DeadLetter::from_record(r);
            (d.processor, d.error)
        })
        .collect();
    assert!(
        kinds.contains(&("identity".into(), "malformed_json".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("person".into(), "invalid_envelope".into())),
        "{kinds:?}"
    );
    let id = default_person_id("web", "p0");
    let s: PersonState = p.state("person_v1", id).await.unwrap();
    assert_eq!(s.event_count, 3);
    token.cancel();
    a.await.unwrap();
    b.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_offset_zero_equals_live_processing() {
    let p = platform().await;
    let token = CancellationToken::new();
    let store: Arc<dyn ProjectionStore> = Arc::new(p.store.clone());
    let mut live = Vec::new();
    for name in registry().names() {
        live.push(
            p.run(name, &format!("{name}.v1"), store.clone(), &token)
                .await,
        );
    }
    // Live: events trickle in while processors run.
    let all: Vec<String> = (0..120)
        .map(|i| {
            let who = format!("r{}", i % 6);
            let ty = [
                "interaction.recorded",
                "journey.started",
                "learning.lesson_completed",
                "identity.linked",
            ][i % 4];
            let data = match i % 4 {
                0 => json!({"kind": "message", "content_type": "text"}),
                1 => json!({"journey_id": format!("j{}", i % 3), "stage": "a"}),
                2 => {
                    json!({"course_id": "c", "lesson_id": format!("l{}", i % 5), "score": i % 100})
                }
                _ => json!({"platform": "email", "platform_id": format!("{who}@x")}),
            };
            event(
                &format!("ev{}", i % 100),
                ty,
                &format!("2026-06-01T00:{:02}:00Z", i % 60),
                ("chat", &who),
                data,
            )
        })
        .collect();
    for chunk in all.chunks(13) {
        p.publish(chunk).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for name in registry().names() {
        let topic = if name == "identity" { INPUTS } else { EVENTS };
        p.caught_up(&format!("{name}.v1"), topic).await;
    }
    token.cancel();
    for t in live {
        t.await.unwrap();
    }

    // Replay: fold processors from offset 0 of the resolved log into a fresh store.
    let dir = tempfile::tempdir().unwrap();
    let fresh = EmbeddedStore::open(&dir.path().join("replay")).unwrap();
    let replay_store: Arc<dyn ProjectionStore> = Arc::new(fresh.clone());
    let token = CancellationToken::new();
    let mut replay = Vec::new();
    for name in ["person", "interactions", "journey", "learning"] {
        replay.push(
            p.run(name, &format!("{name}.v1"), replay_store.clone(), &token)
                .await,
        );
    }
    for name in ["person", "interactions", "journey", "learning"] {
        let consumer = format!("{name}.v1");
        let partitions = p.log.partitions(EVENTS).await.unwrap();
        common::eventually("replay caught up", || async {
            let stored = fresh.positions(&consumer, EVENTS).await.ok()?;
            for part in 0..partitions {
                if stored.get(&part).copied().unwrap_or(0)
                    < p.log.watermarks(EVENTS, part).await.ok()?.1
                {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }
    token.cancel();
    for t in replay {
        t.await.unwrap();
    }
    let persons: Vec<uuid::Uuid> = (0..6)
        .map(|i| default_person_id("chat", &format!("r{i}")))
        .collect();
    for table in ["person_v1", "interactions_v1", "journey_v1", "learning_v1"] {
        for person in &persons {
            let key = person.to_string();
            let a = p.store.get(table, &key).await.unwrap();
            let b = fresh.get(table, &key).await.unwrap();
            assert!(a.is_some(), "{table} has {key}");
            assert_eq!(a, b, "{table}/{key}: replay differs from live");
        }
    }
}

/// The row cache holds only the runner's own tables: rows of any other
/// table read through it (the projection catalog, hand-off markers, which
/// other processes write) always come from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_cache_reads_other_tables_from_the_store() {
    use waymark_runtime::cache::RowCache;
    use waymark_runtime::RowWrite;
    let p = platform().await;
    let tables = vec!["journey_v1".to_owned(), "waymark_projections".to_owned()];
    p.store.ensure_tables(&tables).await.unwrap();
    let inner: Arc<dyn ProjectionStore> = Arc::new(p.store.clone());
    let cache = RowCache::new(inner, vec!["journey_v1".into()], 1024 * 1024);
    let write = |table: &str, value: &str| WriteBatch {
        rows: vec![RowWrite {
            table: table.into(),
            key: "k".into(),
            value: Some(value.as_bytes().to_vec()),
            order: None,
        }],
        positions: Vec::new(),
    };
    // Read once through the cache (absent), then written by someone else.
    assert_eq!(cache.get("journey_v1", "k").await.unwrap(), None);
    assert_eq!(cache.get("waymark_projections", "k").await.unwrap(), None);
    p.store.write(write("journey_v1", "theirs")).await.unwrap();
    p.store
        .write(write("waymark_projections", "theirs"))
        .await
        .unwrap();
    // The other table is read from the store; the own table from the cache
    // (only the owner of the partition writes it, see `RowCache`).
    assert_eq!(
        cache.get("waymark_projections", "k").await.unwrap(),
        Some(b"theirs".to_vec())
    );
    assert_eq!(cache.get("journey_v1", "k").await.unwrap(), None);
    // A write through the cache reaches the store and the cache.
    cache.write(write("journey_v1", "ours")).await.unwrap();
    assert_eq!(
        cache.get("journey_v1", "k").await.unwrap(),
        Some(b"ours".to_vec())
    );
    assert_eq!(
        p.store.get("journey_v1", "k").await.unwrap(),
        Some(b"ours".to_vec())
    );
    // Two reads of the own table hit, one missed; the catalog reads were
    // not the cache's.
    assert_eq!(cache.hits_misses(), (2, 1));
}
