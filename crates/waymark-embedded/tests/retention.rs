//! Time-based retention of the embedded log: old records go, offsets never
//! restart, and the low watermark follows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use waymark_embedded::EmbeddedLog;
use waymark_runtime::{Log, OutRecord, TopicConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_records_but_never_reuses_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let log = EmbeddedLog::open(&path).unwrap();
    let topic = TopicConfig {
        name: "t".into(),
        partitions: 2,
        retention: Some(Duration::from_secs(1)),
        compaction: false,
    };
    log.ensure_topics(std::slice::from_ref(&topic))
        .await
        .unwrap();
    let records = (0..10)
        .map(|i| OutRecord {
            topic: "t".into(),
            partition: Some(i % 2),
            key: None,
            value: format!("v{i}").into_bytes(),
            headers: vec![],
        })
        .collect();
    log.produce(records).await.unwrap();

    let none = BTreeMap::new();
    // Nothing is old enough yet.
    assert_eq!(
        log.apply_retention("t", Duration::from_secs(3600), &none)
            .unwrap(),
        0
    );
    // Let the records age past a tiny retention.
    tokio::time::sleep(Duration::from_millis(20)).await;
    // What a reader has not applied is kept, however old: partition 0 is
    // read up to offset 2 (records 0 and 1 go), partition 1 not at all.
    let unread: BTreeMap<u32, u64> = [(0, 2), (1, 0)].into();
    let deleted = log
        .apply_retention("t", Duration::from_millis(1), &unread)
        .unwrap();
    assert_eq!(deleted, 2);
    assert_eq!(log.watermarks("t", 0).await.unwrap(), (2, 5));
    assert_eq!(log.watermarks("t", 1).await.unwrap(), (0, 5));
    let deleted = log
        .apply_retention("t", Duration::from_millis(1), &none)
        .unwrap();
    assert_eq!(
        deleted, 6,
        "then all but the newest record of each partition"
    );
    for p in 0..2 {
        assert_eq!(log.watermarks("t", p).await.unwrap(), (4, 5));
        let left = log.read("t", p, 0, 100).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].offset, 4);
    }

    // After a restart offsets continue where they were.
    log.close();
    drop(log);
    let log = EmbeddedLog::open(&path).unwrap();
    assert_eq!(log.watermarks("t", 0).await.unwrap(), (4, 5));
    let appended = log
        .produce(vec![OutRecord {
            topic: "t".into(),
            partition: Some(0),
            key: None,
            value: b"next".to_vec(),
            headers: vec![],
        }])
        .await
        .unwrap();
    assert_eq!(appended[0].offset, 5);
}
