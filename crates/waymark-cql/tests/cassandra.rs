//! `CqlStore` against a real Cassandra or ScyllaDB at `WAYMARK_CQL_NODES`
//! (comma-separated `host:port`, default `127.0.0.1:9042`; start one with
//! `scripts/dev-services up cassandra`). Each test has its own random
//! keyspace, dropped at the end.
//!
//! The cluster is found as every real-engine test finds it
//! (`waymark_testenv`): unreachable, it fails the tests under `CI=true` or
//! with `WAYMARK_CQL_NODES` set, and skips them with a visible `SKIPPED`
//! line otherwise.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context};
use waymark_cql::{CqlConfig, CqlStore};
use waymark_runtime::{PositionWrite, ProjectionStore, RowWrite, StoreError, WriteBatch};

/// The cluster's contact points, or `None` when the test is skipped (the
/// policy of `waymark_testenv`).
fn nodes() -> Option<Vec<String>> {
    let nodes = waymark_testenv::cassandra()?;
    Some(nodes.split(',').map(|n| n.trim().to_owned()).collect())
}

/// A keyspace name no other test run uses.
fn unique_keyspace(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u32(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("wm_{test}_{:012x}", h.finish() & 0xffff_ffff_ffff)
}

fn config(nodes: &[String], keyspace: &str) -> CqlConfig {
    CqlConfig {
        nodes: nodes.to_vec(),
        keyspace: keyspace.to_owned(),
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
        ..CqlConfig::default()
    }
}

/// Runs `body` with a store on a fresh keyspace, then drops the keyspace
/// (also when `body` failed) and returns `body`'s result.
async fn with_store<F, Fut>(test: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Vec<String>, CqlStore) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Some(nodes) = nodes() else {
        return Ok(());
    };
    let keyspace = unique_keyspace(test);
    let store = CqlStore::connect(config(&nodes, &keyspace))
        .await
        .with_context(|| format!("connecting to {nodes:?}"))?;
    let result = body(nodes.clone(), store).await;
    drop_keyspace(&nodes, &keyspace).await?;
    result
}

async fn drop_keyspace(nodes: &[String], keyspace: &str) -> anyhow::Result<()> {
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(nodes)
        .build()
        .await?;
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS \"{keyspace}\""), ())
        .await?;
    Ok(())
}

fn put(table: &str, key: &str, value: &[u8], order: Option<u64>) -> RowWrite {
    RowWrite {
        table: table.to_owned(),
        key: key.to_owned(),
        value: Some(value.to_vec()),
        order,
    }
}

fn delete(table: &str, key: &str, order: Option<u64>) -> RowWrite {
    RowWrite {
        table: table.to_owned(),
        key: key.to_owned(),
        value: None,
        order,
    }
}

fn rows(rows: Vec<RowWrite>) -> WriteBatch {
    WriteBatch {
        rows,
        positions: Vec::new(),
    }
}

fn position(consumer: &str, topic: &str, partition: u32, next_offset: u64) -> PositionWrite {
    PositionWrite {
        consumer: consumer.to_owned(),
        topic: topic.to_owned(),
        partition,
        next_offset,
    }
}

fn keys(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

#[tokio::test]
async fn schema_and_ensure_tables_are_idempotent() -> anyhow::Result<()> {
    with_store("schema", |nodes, store| async move {
        ensure!(
            store.schema_versions().await? == [1],
            "positions migration recorded once"
        );
        let tables = keys(&["journey_v1", "identity_v1_links", "identity_v1_persons"]);
        store.ensure_tables(&tables).await?;
        store.ensure_tables(&tables).await?;
        store
            .write(rows(vec![put("journey_v1", "p1", b"state", Some(1))]))
            .await?;

        // A second process on the same keyspace: migrations and tables are
        // already there, nothing is lost.
        let again = CqlStore::connect(config(&nodes, store.keyspace())).await?;
        ensure!(
            again.schema_versions().await? == [1],
            "no migration applied twice"
        );
        again.ensure_tables(&tables).await?;
        ensure!(
            again.get("journey_v1", "p1").await?.as_deref() == Some(&b"state"[..]),
            "rows survive a second ensure_tables"
        );

        // Names are validated before anything reaches CQL.
        for bad in [
            "Journey",
            "journey-v1",
            "x; DROP KEYSPACE y",
            "positions",
            "",
        ] {
            match store.ensure_tables(&keys(&[bad])).await {
                Err(StoreError::UnknownTable(msg)) => {
                    ensure!(msg.contains("invalid table name"), "{bad:?}: {msg}")
                }
                other => anyhow::bail!("{bad:?}: expected UnknownTable, got {other:?}"),
            }
        }
        // A valid name that was never created.
        match store.get_many("never_created_v1", &keys(&["k"])).await {
            Err(StoreError::UnknownTable(t)) => ensure!(t == "never_created_v1", "{t}"),
            other => anyhow::bail!("expected UnknownTable, got {other:?}"),
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn rows_round_trip_with_deletes_and_missing_keys() -> anyhow::Result<()> {
    with_store("rows", |_, store| async move {
        store
            .ensure_tables(&keys(&["journey_v1", "identity_v1_links"]))
            .await?;
        ensure!(
            store.get_many("journey_v1", &[]).await?.is_empty(),
            "no keys"
        );
        store
            .write(rows(vec![
                put("journey_v1", "a", b"A1", Some(10)),
                put("journey_v1", "b", b"B1", Some(11)),
                put("journey_v1", "c", b"", Some(12)),
                put("identity_v1_links", "email:x@example.com", b"L1", None),
            ]))
            .await?;
        let got = store
            .get_many("journey_v1", &keys(&["c", "missing", "a", "b", "a"]))
            .await?;
        ensure!(
            got == vec![
                Some(Vec::new()),
                None,
                Some(b"A1".to_vec()),
                Some(b"B1".to_vec()),
                Some(b"A1".to_vec()),
            ],
            "in key order, missing as None, empty value kept: {got:?}"
        );
        ensure!(
            store
                .get("identity_v1_links", "email:x@example.com")
                .await?
                .as_deref()
                == Some(&b"L1"[..]),
            "tables are separate"
        );
        ensure!(
            store.get("identity_v1_links", "a").await?.is_none(),
            "tables are separate"
        );

        // Deletes, ordered and not.
        store
            .write(rows(vec![
                delete("journey_v1", "a", Some(20)),
                put("journey_v1", "b", b"B2", Some(21)),
                delete("identity_v1_links", "email:x@example.com", None),
                delete("journey_v1", "never_written", Some(5)),
            ]))
            .await?;
        let got = store.get_many("journey_v1", &keys(&["a", "b"])).await?;
        ensure!(got == vec![None, Some(b"B2".to_vec())], "{got:?}");
        ensure!(
            store
                .get("identity_v1_links", "email:x@example.com")
                .await?
                .is_none(),
            "unordered delete"
        );

        // Unordered writes: the later batch wins, also when re-creating a
        // deleted row.
        store
            .write(rows(vec![put("identity_v1_links", "k", b"v1", None)]))
            .await?;
        store
            .write(rows(vec![put("identity_v1_links", "k", b"v2", None)]))
            .await?;
        store
            .write(rows(vec![put(
                "identity_v1_links",
                "email:x@example.com",
                b"L2",
                None,
            )]))
            .await?;
        let got = store
            .get_many("identity_v1_links", &keys(&["k", "email:x@example.com"]))
            .await?;
        ensure!(
            got == vec![Some(b"v2".to_vec()), Some(b"L2".to_vec())],
            "{got:?}"
        );

        // A row named twice in one batch: the later write wins.
        store
            .write(rows(vec![
                put("identity_v1_links", "twice", b"first", None),
                put("identity_v1_links", "twice", b"second", None),
            ]))
            .await?;
        ensure!(
            store.get("identity_v1_links", "twice").await?.as_deref() == Some(&b"second"[..]),
            "later write in a batch wins"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_late_write_with_a_smaller_order_loses() -> anyhow::Result<()> {
    with_store("order", |_, store| async move {
        store.ensure_tables(&keys(&["journey_v1"])).await?;
        store
            .write(rows(vec![put("journey_v1", "p", b"order 5", Some(5))]))
            .await?;
        // A late, redelivered write of an older state.
        store
            .write(rows(vec![put("journey_v1", "p", b"order 3", Some(3))]))
            .await?;
        ensure!(
            store.get("journey_v1", "p").await?.as_deref() == Some(&b"order 5"[..]),
            "order 3 must not overwrite order 5"
        );
        // A late delete loses too.
        store
            .write(rows(vec![delete("journey_v1", "p", Some(4))]))
            .await?;
        ensure!(
            store.get("journey_v1", "p").await?.as_deref() == Some(&b"order 5"[..]),
            "a delete at order 4 must not remove order 5"
        );
        // A newer delete wins, and an older write cannot bring the row back.
        store
            .write(rows(vec![delete("journey_v1", "p", Some(6))]))
            .await?;
        ensure!(
            store.get("journey_v1", "p").await?.is_none(),
            "deleted at 6"
        );
        store
            .write(rows(vec![put("journey_v1", "p", b"order 5", Some(5))]))
            .await?;
        ensure!(
            store.get("journey_v1", "p").await?.is_none(),
            "order 5 after delete at 6"
        );
        // A newer write brings it back.
        store
            .write(rows(vec![put("journey_v1", "p", b"order 7", Some(7))]))
            .await?;
        ensure!(
            store.get("journey_v1", "p").await?.as_deref() == Some(&b"order 7"[..]),
            "order 7"
        );
        // The same order again (a retried or replayed batch) changes nothing.
        store
            .write(rows(vec![put("journey_v1", "p", b"order 7", Some(7))]))
            .await?;
        ensure!(
            store.get("journey_v1", "p").await?.as_deref() == Some(&b"order 7"[..]),
            "replayed order 7"
        );
        Ok(())
    })
    .await
}

/// Fencing: a member that lost its partitions and writes an older position
/// late (paused past its session, stuck in an outage) cannot move it back.
#[tokio::test]
async fn a_late_smaller_position_never_moves_it_back() -> anyhow::Result<()> {
    with_store("fence", |_, store| async move {
        let write = |next: u64| {
            store.write(WriteBatch {
                rows: Vec::new(),
                positions: vec![position("journey.v1", "waymark.events", 0, next)],
            })
        };
        write(300).await?;
        write(200).await?; // the zombie
        let got = store.positions("journey.v1", "waymark.events").await?;
        ensure!(got == BTreeMap::from([(0, 300)]), "{got:?}");
        write(301).await?;
        let got = store.positions("journey.v1", "waymark.events").await?;
        ensure!(got == BTreeMap::from([(0, 301)]), "{got:?}");
        // A dropped version's positions go for good: a late write of its
        // zombie does not bring them back.
        store
            .delete_positions("journey.v1", "waymark.events")
            .await?;
        write(302).await?;
        let got = store.positions("journey.v1", "waymark.events").await?;
        ensure!(got.is_empty(), "{got:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn positions_round_trip_per_consumer_and_topic() -> anyhow::Result<()> {
    with_store("positions", |_, store| async move {
        ensure!(
            store
                .positions("journey.v1", "waymark.events")
                .await?
                .is_empty(),
            "no positions yet"
        );
        store
            .write(WriteBatch {
                rows: Vec::new(),
                positions: vec![
                    position("journey.v1", "waymark.events", 0, 10),
                    position("journey.v1", "waymark.events", 1, 20),
                    position("journey.v1", "waymark.events", 7, 1 << 40),
                    position("person.v1", "waymark.events", 0, 30),
                    position("journey.v1", "waymark.raw", 0, 40),
                ],
            })
            .await?;
        let got = store.positions("journey.v1", "waymark.events").await?;
        ensure!(
            got == BTreeMap::from([(0, 10), (1, 20), (7, 1 << 40)]),
            "{got:?}"
        );
        let got = store.positions("person.v1", "waymark.events").await?;
        ensure!(got == BTreeMap::from([(0, 30)]), "{got:?}");
        let got = store.positions("journey.v1", "waymark.raw").await?;
        ensure!(got == BTreeMap::from([(0, 40)]), "{got:?}");
        ensure!(
            store
                .positions("person.v1", "waymark.raw")
                .await?
                .is_empty(),
            "per consumer and topic"
        );

        // Positions move with rows, in the same batch.
        store.ensure_tables(&keys(&["journey_v1"])).await?;
        store
            .write(WriteBatch {
                rows: vec![put("journey_v1", "p", b"s", Some(15))],
                positions: vec![position("journey.v1", "waymark.events", 0, 15)],
            })
            .await?;
        let got = store.positions("journey.v1", "waymark.events").await?;
        ensure!(
            got.get(&0) == Some(&15) && got.get(&1) == Some(&20),
            "{got:?}"
        );

        // A batch whose row cannot be written stores no position.
        let failed = store
            .write(WriteBatch {
                rows: vec![put("never_created_v1", "p", b"s", Some(16))],
                positions: vec![position("journey.v1", "waymark.events", 0, 16)],
            })
            .await;
        ensure!(
            matches!(failed, Err(StoreError::UnknownTable(_))),
            "{failed:?}"
        );
        let got = store.positions("journey.v1", "waymark.events").await?;
        ensure!(
            got.get(&0) == Some(&15),
            "no position without its rows: {got:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_batch_of_2000_rows() -> anyhow::Result<()> {
    with_store("large", |_, store| async move {
        store.ensure_tables(&keys(&["journey_v1"])).await?;
        let n: u64 = 2000;
        let key = |i: u64| format!("person-{i:05}");
        let value = |i: u64, round: u64| format!("value {i} round {round}").into_bytes();
        let batch = WriteBatch {
            rows: (0..n)
                .map(|i| put("journey_v1", &key(i), &value(i, 1), Some(100 + i)))
                .collect(),
            positions: vec![position("journey.v1", "waymark.events", 0, 100 + n)],
        };
        store.write(batch).await?;
        // Read back in reverse key order, with every tenth key missing.
        let wanted: Vec<String> = (0..n)
            .rev()
            .map(|i| {
                if i % 10 == 0 {
                    format!("absent-{i}")
                } else {
                    key(i)
                }
            })
            .collect();
        let got = store.get_many("journey_v1", &wanted).await?;
        ensure!(got.len() == wanted.len(), "one result per key");
        for (i, got) in (0..n).rev().zip(&got) {
            let expected = (i % 10 != 0).then(|| value(i, 1));
            ensure!(*got == expected, "key {i}: {got:?}");
        }
        ensure!(
            store.positions("journey.v1", "waymark.events").await?
                == BTreeMap::from([(0, 100 + n)]),
            "position"
        );

        // The whole batch redelivered with older orders changes nothing;
        // with newer orders it replaces every row.
        let replay = |round: u64, base: u64| WriteBatch {
            rows: (0..n)
                .map(|i| put("journey_v1", &key(i), &value(i, round), Some(base + i)))
                .collect(),
            positions: Vec::new(),
        };
        store.write(replay(2, 50)).await?;
        store.write(replay(3, 10_000)).await?;
        let all: Vec<String> = (0..n).map(key).collect();
        let got = store.get_many("journey_v1", &all).await?;
        for (i, got) in (0..n).zip(&got) {
            ensure!(
                got.as_deref() == Some(value(i, 3).as_slice()),
                "key {i}: {got:?}"
            );
        }
        Ok(())
    })
    .await
}

/// Every row of `table`, through `scan` in pages of `page`.
async fn scan_all(
    store: &CqlStore,
    table: &str,
    page: usize,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut all = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let rows = store.scan(table, after.as_deref(), page).await?;
        ensure!(rows.len() <= page, "a page of {} over {page}", rows.len());
        let done = rows.len() < page;
        after = rows.last().map(|(k, _)| k.clone());
        for (k, v) in rows {
            ensure!(all.insert(k.clone(), v).is_none(), "{k} scanned twice");
        }
        if done {
            return Ok(all);
        }
    }
}

#[tokio::test]
async fn heads_and_sub_rows_share_a_partition_and_scan_in_pages() -> anyhow::Result<()> {
    with_store("partitioned", |nodes, store| async move {
        store.ensure_tables(&keys(&["interactions_v1"])).await?;
        // Heads, sub rows, a key ending in '/', and sub keys that sort
        // around each other; several heads in one batch.
        let mut expected = BTreeMap::new();
        let mut batch = Vec::new();
        for p in 0..7 {
            let head = format!("p{p}");
            for key in [
                head.clone(),
                format!("{head}/"),
                format!("{head}/c/000000000001"),
                format!("{head}/c/000000000002"),
                format!("{head}/i/e-{p}"),
            ] {
                let value = format!("{key} v1").into_bytes();
                batch.push(put("interactions_v1", &key, &value, Some(10)));
                expected.insert(key, value);
            }
        }
        store.write(rows(batch)).await?;
        for page in [1, 2, 3, 5, 100] {
            let all = scan_all(&store, "interactions_v1", page).await?;
            ensure!(all == expected, "page {page}: {all:?}");
        }
        ensure!(
            store.get("interactions_v1", "p3/").await?.as_deref() == Some(&b"p3/ v1"[..]),
            "a key ending in '/' is its own row"
        );

        // A head's deletes and puts in one batch; a late, older write of
        // the same rows loses.
        store
            .write(rows(vec![
                delete("interactions_v1", "p1/c/000000000001", Some(20)),
                put("interactions_v1", "p1/c/000000000003", b"new", Some(20)),
                put("interactions_v1", "p1", b"p1 v2", Some(20)),
            ]))
            .await?;
        store
            .write(rows(vec![
                put("interactions_v1", "p1/c/000000000001", b"late", Some(15)),
                put("interactions_v1", "p1", b"late", Some(15)),
            ]))
            .await?;
        let got = store
            .get_many(
                "interactions_v1",
                &keys(&["p1", "p1/c/000000000001", "p1/c/000000000003"]),
            )
            .await?;
        ensure!(
            got == vec![Some(b"p1 v2".to_vec()), None, Some(b"new".to_vec())],
            "{got:?}"
        );

        // Compare-and-set on a sub row.
        ensure!(
            store
                .compare_and_set("interactions_v1", "q/x", None, b"1")
                .await?,
            "absent: set"
        );
        ensure!(
            !store
                .compare_and_set("interactions_v1", "q/x", None, b"2")
                .await?,
            "present: not set"
        );
        ensure!(
            store
                .compare_and_set("interactions_v1", "q/x", Some(b"1"), b"2")
                .await?,
            "over the expected value: set"
        );
        ensure!(
            store.get("interactions_v1", "q/x").await?.as_deref() == Some(&b"2"[..]),
            "cas value"
        );

        // The table's CQL layout: one partition per head.
        let session = scylla::client::session_builder::SessionBuilder::new()
            .known_nodes(&nodes)
            .build()
            .await?;
        let result = session
            .query_unpaged(
                format!(
                    "SELECT head, sub FROM \"{}\".interactions_v1 WHERE head = 'p2'",
                    store.keyspace()
                ),
                (),
            )
            .await?
            .into_rows_result()?;
        let subs: Vec<String> = result
            .rows::<(String, String)>()?
            .map(|r| r.map(|(_, sub)| sub))
            .collect::<Result<_, _>>()?;
        ensure!(
            subs == ["", "/", "/c/000000000001", "/c/000000000002", "/i/e-2"],
            "{subs:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_table_of_the_older_layout_is_used_as_it_is() -> anyhow::Result<()> {
    with_store("older", |nodes, store| async move {
        // Created as an earlier Waymark did: every key its own partition.
        let session = scylla::client::session_builder::SessionBuilder::new()
            .known_nodes(&nodes)
            .build()
            .await?;
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE \"{}\".journey_v1 (key text PRIMARY KEY, value blob)",
                    store.keyspace()
                ),
                (),
            )
            .await?;
        session
            .query_unpaged(
                format!(
                    "INSERT INTO \"{}\".journey_v1 (key, value) VALUES ('old', 0x6f6c64)",
                    store.keyspace()
                ),
                (),
            )
            .await?;
        store.ensure_tables(&keys(&["journey_v1"])).await?;
        ensure!(
            store.get("journey_v1", "old").await?.as_deref() == Some(&b"old"[..]),
            "a row written before is read"
        );
        store
            .write(rows(vec![
                put("journey_v1", "p/c/1", b"sub", Some(3)),
                put("journey_v1", "p", b"head", Some(3)),
                delete("journey_v1", "old", Some(i64::MAX as u64)),
            ]))
            .await?;
        let all = scan_all(&store, "journey_v1", 1).await?;
        ensure!(
            all == BTreeMap::from([
                ("p".to_owned(), b"head".to_vec()),
                ("p/c/1".to_owned(), b"sub".to_vec()),
            ]),
            "{all:?}"
        );
        ensure!(
            store.compare_and_set("journey_v1", "k", None, b"1").await?,
            "compare-and-set"
        );
        Ok(())
    })
    .await
}
