//! Group membership of the embedded log: a consumer is a member of its
//! group from `subscribe` until it is dropped, which is what a projection
//! drop waits for (`Log::group_members`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use waymark_embedded::EmbeddedLog;
use waymark_runtime::{Log, TopicConfig};

#[tokio::test]
async fn members_join_on_subscribe_and_leave_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log.redb")).unwrap();
    log.ensure_topics(&[TopicConfig {
        name: "t".into(),
        partitions: 2,
        retention: None,
        compaction: false,
    }])
    .await
    .unwrap();
    assert_eq!(log.group_members("g").await.unwrap(), 0);
    let a = log.subscribe("g", "t").await.unwrap();
    let b = log.subscribe("g", "t").await.unwrap();
    let other = log.subscribe("h", "t").await.unwrap();
    assert_eq!(log.group_members("g").await.unwrap(), 2);
    assert_eq!(log.group_members("h").await.unwrap(), 1);
    drop(a);
    assert_eq!(log.group_members("g").await.unwrap(), 1);
    drop(b);
    drop(other);
    assert_eq!(log.group_members("g").await.unwrap(), 0);
    assert_eq!(log.group_members("h").await.unwrap(), 0);
}
