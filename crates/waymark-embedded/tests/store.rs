//! The embedded projection store (fjall): batches of rows and positions
//! across tables, survival of close + reopen, scans in key order, drops,
//! and the import of a store written by an older Waymark (redb).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use waymark_embedded::EmbeddedStore;
use waymark_runtime::{PositionWrite, ProjectionStore, RowWrite, StoreError, WriteBatch};

fn row(table: &str, key: &str, value: Option<&str>) -> RowWrite {
    RowWrite {
        table: table.into(),
        key: key.into(),
        value: value.map(|v| v.as_bytes().to_vec()),
        order: None,
    }
}

fn position(partition: u32, next_offset: u64) -> PositionWrite {
    PositionWrite {
        consumer: "journey.v1".into(),
        topic: "waymark.events".into(),
        partition,
        next_offset,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_survive_reopen_and_scan_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = EmbeddedStore::open(&path).unwrap();
    store
        .ensure_tables(&["a_v1".into(), "b_v1".into()])
        .await
        .unwrap();
    // A durable batch, then a replayable one that deletes and overwrites.
    store
        .write(WriteBatch {
            rows: vec![
                row("a_v1", "k2", Some("two")),
                row("a_v1", "k1", Some("one")),
                row("b_v1", "k1", Some("b")),
            ],
            positions: vec![position(0, 10), position(1, 4)],
        })
        .await
        .unwrap();
    store
        .write_replayable(WriteBatch {
            rows: vec![row("a_v1", "k2", None), row("a_v1", "k3", Some("three"))],
            positions: vec![position(0, 12)],
        })
        .await
        .unwrap();
    store.close();
    assert!(matches!(
        store.get("a_v1", "k1").await,
        Err(StoreError::Unavailable(_))
    ));

    // Closing releases the directory and made the replayable batch durable.
    let store = EmbeddedStore::open(&path).unwrap();
    let got = store
        .get_many("a_v1", &["k1".into(), "k2".into(), "k3".into()])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![Some(b"one".to_vec()), None, Some(b"three".to_vec())]
    );
    let positions = store
        .positions("journey.v1", "waymark.events")
        .await
        .unwrap();
    assert_eq!(
        positions.into_iter().collect::<Vec<_>>(),
        vec![(0, 12), (1, 4)]
    );
    assert!(store
        .positions("journey.v2", "waymark.events")
        .await
        .unwrap()
        .is_empty());

    let all = store.scan("a_v1", None, 10).await.unwrap();
    let keys: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, vec!["k1", "k3"]);
    let after = store.scan("a_v1", Some("k1"), 10).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].0, "k3");
    assert!(store.stored_bytes("a_v1").await.unwrap().unwrap() > 0);

    // Unknown tables are reported as such, for reads and scans.
    assert!(matches!(
        store.get("missing_v1", "k").await,
        Err(StoreError::UnknownTable(_))
    ));
    assert!(matches!(
        store.scan("missing_v1", None, 1).await,
        Err(StoreError::UnknownTable(_))
    ));

    // Drop removes the table and its rows; positions go separately.
    store.drop_tables(&["a_v1".into()]).await.unwrap();
    assert_eq!(store.stored_bytes("a_v1").await.unwrap(), None);
    assert!(matches!(
        store.get("a_v1", "k1").await,
        Err(StoreError::UnknownTable(_))
    ));
    assert_eq!(store.get("b_v1", "k1").await.unwrap(), Some(b"b".to_vec()));
    store
        .delete_positions("journey.v1", "waymark.events")
        .await
        .unwrap();
    assert!(store
        .positions("journey.v1", "waymark.events")
        .await
        .unwrap()
        .is_empty());
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_a_store_written_by_an_older_waymark() {
    use redb::TableDefinition;
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("store.redb");
    {
        // The layout of the redb projection store: one table per projection
        // table (&str → bytes) and `_positions` (&str → u64).
        let db = redb::Database::create(&old).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn
                .open_table(TableDefinition::<&str, &[u8]>::new("journey_v1"))
                .unwrap();
            for i in 0..25_000u32 {
                t.insert(format!("p{i:05}").as_str(), format!("row{i}").as_bytes())
                    .unwrap();
            }
            let mut p = txn
                .open_table(TableDefinition::<&str, u64>::new("_positions"))
                .unwrap();
            p.insert("journey.v1\u{0}waymark.events\u{0}0000000003", 777)
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
    assert_eq!(store.import_redb(&old).unwrap(), 25_000);
    assert_eq!(
        store.get("journey_v1", "p12345").await.unwrap(),
        Some(b"row12345".to_vec())
    );
    let positions = store
        .positions("journey.v1", "waymark.events")
        .await
        .unwrap();
    assert_eq!(positions.get(&3), Some(&777));
    // Importing again changes nothing.
    assert_eq!(store.import_redb(&old).unwrap(), 25_000);
    let mut n = 0;
    let mut after: Option<String> = None;
    loop {
        let page = store
            .scan("journey_v1", after.as_deref(), 4096)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        n += page.len();
        after = page.last().map(|(k, _)| k.clone());
    }
    assert_eq!(n, 25_000);
    store.close();
}
