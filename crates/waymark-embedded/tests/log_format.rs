//! The log's record format: a log written in format 1 (by a Waymark before
//! the Kafka-protocol broker) is migrated on open, and a stored record that
//! does not decode is handed out as corrupt (a dead letter for processors),
//! never an error that stops a reader.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use redb::{Database, TableDefinition};
use waymark_embedded::{EmbeddedLog, CORRUPT_HEADER};
use waymark_runtime::{Log, OutRecord, TopicConfig};

const TOPICS: TableDefinition<'static, &str, u32> = TableDefinition::new("_topics");
const PARTITION: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("t#0");

/// Format 1: `ts i64 | key_len u32 | key | n u32 | (u16 len | name | u32 len | value)* | value`.
fn v1(ts: i64, key: &[u8], headers: &[(&[u8], &[u8])], value: &[u8]) -> Vec<u8> {
    let mut out = ts.to_le_bytes().to_vec();
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (n, v) in headers {
        out.extend_from_slice(&(n.len() as u16).to_le_bytes());
        out.extend_from_slice(n);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out.extend_from_slice(value);
    out
}

#[tokio::test]
async fn a_format_1_log_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(TOPICS).unwrap().insert("t", 1).unwrap();
        {
            let mut t = txn.open_table(PARTITION).unwrap();
            t.insert(0, v1(5, b"k0", &[(b"h", b"1")], b"zero").as_slice())
                .unwrap();
            t.insert(1, v1(6, b"k1", &[], b"one").as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let log = EmbeddedLog::open(&path).unwrap();
    let records = log.read("t", 0, 0, 10).await.unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].value.as_deref(), Some(&b"zero"[..]));
    assert_eq!(records[0].headers, vec![("h".to_owned(), b"1".to_vec())]);
    assert_eq!(records[0].timestamp_ms, 5);
    assert_eq!(records[1].key.as_deref(), Some(&b"k1"[..]));
    // New appends follow on, and a second open does not migrate again.
    log.produce(vec![OutRecord::keyed("t", "k2", b"two".to_vec())])
        .await
        .unwrap();
    log.close();
    drop(log);
    let log = EmbeddedLog::open(&path).unwrap();
    let values: Vec<_> = log
        .read("t", 0, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.value.unwrap())
        .collect();
    assert_eq!(
        values,
        vec![b"zero".to_vec(), b"one".to_vec(), b"two".to_vec()]
    );
}

#[tokio::test]
async fn a_record_that_does_not_decode_is_handed_out_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let log = EmbeddedLog::open(&path).unwrap();
    log.ensure_topics(&[TopicConfig {
        name: "t".into(),
        partitions: 1,
        retention: None,
        compaction: false,
    }])
    .await
    .unwrap();
    for v in ["a", "b", "c"] {
        log.produce(vec![OutRecord::keyed("t", "k", v.as_bytes().to_vec())])
            .await
            .unwrap();
    }
    log.close();
    drop(log);
    {
        // Damage the middle record as a bad disk (or a bug) might.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(PARTITION)
            .unwrap()
            .insert(1, &[1u8, 2, 3][..])
            .unwrap();
        txn.commit().unwrap();
    }
    let log = EmbeddedLog::open(&path).unwrap();
    let records = log.read("t", 0, 0, 10).await.unwrap();
    assert_eq!(records.len(), 3, "the reader goes on past it");
    assert_eq!(records[1].offset, 1);
    assert!(records[1].header(CORRUPT_HEADER).is_some());
    assert_eq!(records[1].value.as_deref(), Some(&[1u8, 2, 3][..]));
    assert_eq!(records[2].value.as_deref(), Some(&b"c"[..]));
    let stored = log.read_stored("t", 0, 0, usize::MAX).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert!(stored[1]
        .1
        .headers
        .iter()
        .any(|(n, _)| n == CORRUPT_HEADER.as_bytes()));
}
