//! The identity handler on a store that several processes write at once
//! (`MemoryStore::shared`, the path it takes on CQL): members applying
//! different partitions concurrently, with every store call a point where
//! the other member runs, end with the tables a sequential fold gives;
//! a batch applied again resolves every record as before; a member that
//! lost its partition is fenced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;
use waymark_core::Identity;
use waymark_identity::{
    IdentityHandler, IdentityRow, IdentityTables, PersonLinks, Resolutions, STATE_ENCODING,
};
use waymark_runtime::handler::{HandleError, Handler};
use waymark_runtime::memory::MemoryStore;
use waymark_runtime::row::decode_row;
use waymark_runtime::{ProjectionStore, Record, StoreError, WriteBatch};
use waymark_schemas::Validator;

fn tables() -> IdentityTables {
    IdentityTables {
        links: "identity_v1_links".into(),
        persons: "identity_v1_persons".into(),
        resolutions: "identity_v1_resolutions".into(),
        encoding: STATE_ENCODING,
    }
}

fn handler() -> IdentityHandler {
    IdentityHandler::new(
        Arc::new(Validator::new().unwrap()),
        tables(),
        "waymark.events",
    )
}

/// A store in front of a shared [`MemoryStore`] that yields to the other
/// tasks before every call, a pseudo-random number of times, so that the
/// members' calls interleave.
struct Interleaved {
    inner: MemoryStore,
    seed: AtomicU64,
}

impl Interleaved {
    async fn pause(&self) {
        let mut x = self.seed.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::SeqCst);
        x ^= x >> 31;
        for _ in 0..(x % 4) {
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl ProjectionStore for Interleaved {
    async fn ensure_tables(&self, tables: &[String]) -> Result<(), StoreError> {
        self.inner.ensure_tables(tables).await
    }
    async fn get_many(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.pause().await;
        self.inner.get_many(table, keys).await
    }
    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.pause().await;
        self.inner.write(batch).await
    }
    async fn compare_and_set(
        &self,
        table: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        self.pause().await;
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
    fn written_by_several_processes(&self) -> bool {
        self.inner.written_by_several_processes()
    }
}

async fn store(seed: u64) -> Arc<Interleaved> {
    let inner = MemoryStore::shared();
    let t = tables();
    inner
        .ensure_tables(&[t.links, t.persons, t.resolutions])
        .await
        .unwrap();
    Arc::new(Interleaved {
        inner,
        seed: AtomicU64::new(seed),
    })
}

fn input(partition: u32, offset: u64, n: u64, source: &str, link: Option<&str>) -> Record {
    let (platform, id) = source.split_once(':').unwrap();
    let value = match link {
        Some(to) => {
            let (lp, lid) = to.split_once(':').unwrap();
            format!(
                r#"{{"id":"e{n}","type":"identity.linked","version":1,"time":"2026-02-01T00:00:{:02}Z","source":{{"platform":"{platform}","platform_id":"{id}"}},"data":{{"platform":"{lp}","platform_id":"{lid}"}}}}"#,
                n % 60
            )
        }
        None => format!(
            r#"{{"id":"e{n}","type":"journey.started","version":1,"time":"2026-02-01T00:00:{:02}Z","source":{{"platform":"{platform}","platform_id":"{id}"}},"data":{{"journey_id":"j"}}}}"#,
            n % 60
        ),
    };
    Record {
        partition,
        offset,
        key: Some(source.as_bytes().to_vec()),
        value: Some(value.into_bytes()),
        headers: Vec::new(),
        timestamp_ms: 0,
    }
}

fn id(s: &str) -> Identity {
    let (p, i) = s.split_once(':').unwrap();
    Identity::new(p, i)
}

fn persons_of(out: &waymark_runtime::handler::BatchOutput) -> Vec<String> {
    out.produce
        .iter()
        .map(|(_, r)| String::from_utf8(r.key.clone().unwrap_or_default()).unwrap())
        .collect()
}

/// Partition `p`'s log: its own sources `s<p>-<k>`, which are never linked;
/// each link target `t<j>` is linked by exactly one source, and is also
/// seen as a source itself on another partition, before or after.
fn logs(partitions: u32, per_partition: u64, targets: u64) -> Vec<Vec<Record>> {
    let mut logs: Vec<Vec<Record>> = (0..partitions).map(|_| Vec::new()).collect();
    let mut n = 0;
    for k in 0..per_partition {
        for p in 0..partitions {
            n += 1;
            let offset = logs[p as usize].len() as u64;
            let j = k * u64::from(partitions) + u64::from(p);
            let record = if j < targets && k % 2 == 0 {
                // a link of t<j> by one of this partition's sources
                input(
                    p,
                    offset,
                    n,
                    &format!("web:s{p}-{}", k % 3),
                    Some(&format!("tg:t{j}")),
                )
            } else if k % 2 == 1 && (j / 2) < targets {
                // t<j'> seen as a source, on another partition than its linker
                let t = (j + 1) % targets;
                input(p, offset, n, &format!("tg:t{t}"), None)
            } else {
                input(p, offset, n, &format!("web:s{p}-{}", k % 3), None)
            };
            logs[p as usize].push(record);
        }
    }
    logs
}

async fn decode<T: serde::de::DeserializeOwned>(
    store: &MemoryStore,
    table: &str,
) -> BTreeMap<String, T> {
    store
        .rows(table)
        .into_iter()
        .map(|(k, v)| {
            let row = decode_row(STATE_ENCODING, table, &k, &v).unwrap();
            (k, row)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_racing_on_shared_rows_end_as_a_sequential_fold() {
    for seed in 0..20u64 {
        let store = store(seed).await;
        let logs = logs(3, 24, 30);
        // Who links each target, per the logs.
        let mut linker: BTreeMap<String, Identity> = BTreeMap::new();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for log in &logs {
            for r in log {
                let e = waymark_core::Event::from_json(r.value.as_deref().unwrap()).unwrap();
                seen.extend(e.source.iter().map(Identity::key));
                if let waymark_core::EventData::IdentityLinked(t) = &e.data {
                    seen.insert(t.key());
                }
                if let waymark_core::EventData::IdentityLinked(t) = &e.data {
                    assert!(linker.insert(t.key(), e.source.clone().unwrap()).is_none());
                }
            }
        }
        // One member per partition, in batches of 1..4 records.
        let mut members = Vec::new();
        for log in logs {
            let store = store.clone();
            members.push(tokio::spawn(async move {
                let h = handler();
                let mut at = 0;
                let mut size = 1;
                while at < log.len() {
                    let end = (at + size).min(log.len());
                    let out = h
                        .handle(store.as_ref(), "waymark.inputs", &log[at..end])
                        .await
                        .unwrap();
                    // What the runner writes after the outputs (nothing on
                    // this path: every row was written by compare-and-set).
                    store
                        .write(WriteBatch {
                            rows: out.rows,
                            positions: Vec::new(),
                        })
                        .await
                        .unwrap();
                    at = end;
                    size = size % 4 + 1;
                }
            }));
        }
        for m in members {
            m.await.unwrap();
        }

        let t = tables();
        let identities: BTreeMap<String, IdentityRow> = decode(&store.inner, &t.links).await;
        let persons: BTreeMap<String, PersonLinks> = decode(&store.inner, &t.persons).await;
        assert_eq!(
            identities.keys().cloned().collect::<BTreeSet<_>>(),
            seen,
            "seed {seed}: every identity has a row"
        );
        assert!(linker.len() >= 10, "the logs link enough targets");
        // Sources never move: each resolves to its default person, which
        // holds it and every target it linked.
        let mut expected: BTreeMap<Uuid, BTreeSet<Identity>> = BTreeMap::new();
        for (key, row) in &identities {
            let identity = id(key);
            let owner = match linker.get(key) {
                Some(source) => source.default_person_id(),
                None => identity.default_person_id(),
            };
            assert_eq!(
                row.person_id, owner,
                "seed {seed}: {key} resolves to its linker"
            );
            expected.entry(owner).or_default().insert(identity);
        }
        for (key, links) in &persons {
            let person: Uuid = key.parse().unwrap();
            let shown: BTreeSet<Identity> = links.identities().cloned().collect();
            let want = expected.remove(&person).unwrap_or_default();
            assert_eq!(shown, want, "seed {seed}: identities of {person}");
            if want.is_empty() {
                // a target's default person, seen before its link: merged
                // into the linker's person
                let merged = links.merged_into().expect("merged");
                let target = linker
                    .iter()
                    .find(|(t, _)| id(t).default_person_id() == person)
                    .map(|(_, s)| s.default_person_id());
                assert_eq!(Some(merged), target, "seed {seed}: merged_into of {person}");
            } else {
                assert_eq!(
                    links.merged_into(),
                    None,
                    "seed {seed}: {person} was not merged"
                );
            }
        }
        assert!(
            expected.is_empty(),
            "seed {seed}: persons without a row: {expected:?}"
        );
    }
}

#[tokio::test]
async fn a_batch_applied_again_resolves_as_before_even_after_its_rows_moved() {
    let store = store(7).await;
    let a = handler();
    let first = [input(0, 0, 1, "tg:x", None), input(0, 1, 2, "tg:x", None)];
    let out = a
        .handle(store.as_ref(), "waymark.inputs", &first)
        .await
        .unwrap();
    let before = persons_of(&out);
    assert_eq!(before[0], id("tg:x").default_person_id().to_string());
    // Another partition links tg:x elsewhere before the batch is committed.
    let b = handler();
    b.handle(
        store.as_ref(),
        "waymark.inputs",
        &[input(1, 0, 3, "web:y", Some("tg:x"))],
    )
    .await
    .unwrap();
    // The crash: the same batch again, and a larger one from the same start.
    let again = a
        .handle(store.as_ref(), "waymark.inputs", &first)
        .await
        .unwrap();
    assert_eq!(persons_of(&again), before);
    let larger = [
        first[0].clone(),
        first[1].clone(),
        input(0, 2, 4, "tg:x", None),
    ];
    let out = a
        .handle(store.as_ref(), "waymark.inputs", &larger)
        .await
        .unwrap();
    let persons = persons_of(&out);
    assert_eq!(persons[..2], before[..]);
    assert_eq!(persons[2], id("web:y").default_person_id().to_string());
    let row = store
        .inner
        .get(&tables().resolutions, "0")
        .await
        .unwrap()
        .unwrap();
    let row: Resolutions = decode_row(STATE_ENCODING, "r", "0", &row).unwrap();
    assert_eq!((row.from, row.to, row.persons.len()), (0, 2, 3));
}

#[tokio::test]
async fn a_member_that_lost_its_partition_is_fenced() {
    let store = store(3).await;
    let zombie = handler();
    let owner = handler();
    let batch = [input(0, 0, 1, "tg:x", None), input(0, 1, 2, "tg:z", None)];
    zombie
        .handle(store.as_ref(), "waymark.inputs", &batch)
        .await
        .unwrap();
    // The new owner applies the same batch, commits it, and goes on.
    owner
        .handle(store.as_ref(), "waymark.inputs", &batch)
        .await
        .unwrap();
    owner
        .handle(
            store.as_ref(),
            "waymark.inputs",
            &[input(0, 2, 3, "web:y", Some("tg:x"))],
        )
        .await
        .unwrap();
    // The zombie wakes up and tries its batch once more.
    match zombie
        .handle(store.as_ref(), "waymark.inputs", &batch)
        .await
    {
        Err(HandleError::Fenced { partition, offset }) => assert_eq!((partition, offset), (0, 0)),
        other => panic!("expected fenced, got {:?}", other.map(|o| persons_of(&o))),
    }
}
