//! `KafkaLog` against librdkafka's in-process mock cluster: produce, key
//! partitioning, group membership, seeks, commits, hand-over, random reads.
//!
//! The mock cluster is not `Send`: it stays on the test's own thread. It has
//! no admin API, so topics are created with `MockCluster::create_topic`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{keyed, positions, spawn_member, unique, wait_for, Ledger, GROUP_PROPERTIES, WAIT};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use waymark_kafka::{KafkaConfig, KafkaLog};
use waymark_runtime::{
    partition_for, ConsumerEvent, Log, LogConsumer, LogError, OutRecord, Record, TopicConfig,
};

fn cluster(topic: &str, partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(topic, partitions, 1)
        .expect("mock topic");
    cluster
}

fn log_for(
    cluster: &MockCluster<'static, DefaultProducerContext>,
    extra: &[(&str, &str)],
) -> KafkaLog {
    let mut config = KafkaConfig::new(cluster.bootstrap_servers());
    for (k, v) in GROUP_PROPERTIES.iter().chain(extra) {
        config = config.property(*k, *v);
    }
    KafkaLog::new(config).expect("kafka log")
}

/// Waits for the next event that is not an empty record batch.
async fn next_event(consumer: &mut Box<dyn LogConsumer>) -> ConsumerEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            match consumer.next(100).await {
                Ok(ConsumerEvent::Records(r)) if r.is_empty() => {}
                Ok(event) => return event,
                Err(e) => {
                    eprintln!("next failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await
    .expect("no consumer event in time")
}

/// Reads records until `done` says the collection is complete.
async fn collect_until(
    consumer: &mut Box<dyn LogConsumer>,
    out: &mut Vec<Record>,
    done: impl Fn(&[Record]) -> bool,
) {
    while !done(out) {
        match next_event(consumer).await {
            ConsumerEvent::Records(records) => out.extend(records),
            other => panic!("unexpected {other:?} while reading"),
        }
    }
}

fn offsets_of(records: &[Record], partition: u32) -> Vec<u64> {
    records
        .iter()
        .filter(|r| r.partition == partition)
        .map(|r| r.offset)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_partitions_by_key_with_dense_offsets_and_reads_back() {
    let topic = unique("produce");
    let cluster = cluster(&topic, 4);
    let log = log_for(&cluster, &[]);

    // Topics made by the mock are found; the mock's missing admin API is not needed.
    log.ensure_topics(&[TopicConfig {
        name: topic.clone(),
        partitions: 4,
        retention: None,
        compaction: false,
    }])
    .await
    .expect("ensure existing topic");
    assert_eq!(log.partitions(&topic).await.expect("partitions"), 4);

    let mut records = keyed(&topic, "v", 60);
    for i in 0..5 {
        records.push(OutRecord {
            topic: topic.clone(),
            partition: Some(2),
            key: Some(b"user-0".to_vec()),
            value: format!("explicit-{i}").into_bytes(),
            headers: vec![("h".into(), vec![i as u8])],
        });
    }
    records.push(OutRecord {
        topic: topic.clone(),
        partition: None,
        key: None,
        value: b"keyless".to_vec(),
        headers: Vec::new(),
    });
    let appended = log.produce(records.clone()).await.expect("produce");
    assert_eq!(appended.len(), records.len());

    let mut per_partition: BTreeMap<u32, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    for (record, at) in records.iter().zip(&appended) {
        match (record.partition, &record.key) {
            (Some(p), _) => assert_eq!(at.partition, p),
            (None, Some(key)) => assert_eq!(at.partition, partition_for(key, 4), "key {key:?}"),
            (None, None) => assert!(at.partition < 4),
        }
        per_partition
            .entry(at.partition)
            .or_default()
            .push((at.offset, record.value.clone()));
    }
    for (p, written) in &per_partition {
        // Dense and in input order within each partition.
        let offsets: Vec<u64> = written.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (0..written.len() as u64).collect::<Vec<_>>(),
            "partition {p}"
        );
        assert_eq!(
            log.watermarks(&topic, *p).await.expect("watermarks"),
            (0, written.len() as u64)
        );
        let read = log.read(&topic, *p, 0, 1000).await.expect("read all");
        let values: Vec<(u64, Vec<u8>)> = read
            .iter()
            .map(|r| (r.offset, r.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(&values, written, "partition {p} reads back");
    }
    // Headers survive.
    let explicit = log.read(&topic, 2, 0, 1000).await.expect("read");
    let tagged: Vec<&Record> = explicit
        .iter()
        .filter(|r| r.header("h").is_some())
        .collect();
    assert_eq!(tagged.len(), 5);
    assert_eq!(tagged[3].header("h"), Some(&[3u8][..]));

    // A second produce continues the offsets.
    let more = log
        .produce(vec![OutRecord {
            topic: topic.clone(),
            partition: Some(2),
            key: None,
            value: b"later".to_vec(),
            headers: Vec::new(),
        }])
        .await
        .expect("produce again");
    assert_eq!(more[0].offset, per_partition[&2].len() as u64);

    assert!(matches!(
        log.produce(keyed("no-such-topic", "x", 1)).await,
        Err(LogError::UnknownTopic(_))
    ));
    assert!(matches!(
        log.produce(vec![OutRecord {
            topic: topic.clone(),
            partition: Some(9),
            key: None,
            value: Vec::new(),
            headers: Vec::new(),
        }])
        .await,
        Err(LogError::UnknownPartition { partition: 9, .. })
    ));
    assert!(matches!(
        log.watermarks(&topic, 4).await,
        Err(LogError::UnknownPartition { partition: 4, .. })
    ));
    assert!(matches!(
        log.partitions("no-such-topic").await,
        Err(LogError::UnknownTopic(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_is_random_access() {
    let topic = unique("read");
    let cluster = cluster(&topic, 2);
    let log = log_for(&cluster, &[]);
    let records: Vec<OutRecord> = (0..20)
        .map(|i| OutRecord {
            topic: topic.clone(),
            partition: Some(1),
            key: None,
            value: format!("r{i}").into_bytes(),
            headers: Vec::new(),
        })
        .collect();
    log.produce(records).await.expect("produce");

    let middle = log.read(&topic, 1, 7, 3).await.expect("read middle");
    assert_eq!(
        middle.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
    assert_eq!(middle[0].value.as_deref(), Some(&b"r7"[..]));
    assert!(middle[0].timestamp_ms > 0);

    let tail = log.read(&topic, 1, 18, 100).await.expect("read tail");
    assert_eq!(
        tail.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![18, 19]
    );
    assert!(log
        .read(&topic, 1, 20, 10)
        .await
        .expect("read at end")
        .is_empty());
    assert!(log
        .read(&topic, 0, 0, 10)
        .await
        .expect("read empty")
        .is_empty());
    assert!(matches!(
        log.read(&topic, 2, 0, 10).await,
        Err(LogError::UnknownPartition { partition: 2, .. })
    ));
    assert_eq!(
        log.watermarks(&topic, 1).await.expect("watermarks"),
        (0, 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_gets_assigned_then_every_record_in_partition_order() {
    let topic = unique("order");
    let group = unique("group");
    let cluster = cluster(&topic, 3);
    let log = log_for(&cluster, &[]);
    let appended = log.produce(keyed(&topic, "v", 90)).await.expect("produce");
    let mut consumer = log.subscribe(&group, &topic).await.expect("subscribe");

    let ConsumerEvent::Assigned(mut partitions) = next_event(&mut consumer).await else {
        panic!("the first event must be the assignment");
    };
    partitions.sort_unstable();
    assert_eq!(partitions, vec![0, 1, 2]);
    for p in &partitions {
        consumer.seek(*p, 0).await.expect("seek");
    }
    let mut got = Vec::new();
    collect_until(&mut consumer, &mut got, |r| r.len() >= 90).await;
    assert_eq!(positions_of(&got), positions(&appended));
    for p in 0..3 {
        let offsets = offsets_of(&got, p);
        assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
    }
    // Records produced while the member reads arrive too.
    log.produce(keyed(&topic, "w", 6))
        .await
        .expect("produce more");
    collect_until(&mut consumer, &mut got, |r| r.len() >= 96).await;
    let late: Vec<String> = got[90..]
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    let mut sorted = late.clone();
    sorted.sort();
    assert_eq!(sorted, (0..6).map(|i| format!("w-{i}")).collect::<Vec<_>>());
}

fn positions_of(records: &[Record]) -> BTreeSet<(u32, u64)> {
    records.iter().map(|r| (r.partition, r.offset)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_delivers_from_exactly_the_sought_offset() {
    let topic = unique("seek");
    let group = unique("group");
    let cluster = cluster(&topic, 2);
    let log = log_for(&cluster, &[]);
    for p in 0..2 {
        let records = (0..30)
            .map(|i| OutRecord {
                topic: topic.clone(),
                partition: Some(p),
                key: None,
                value: format!("{p}-{i}").into_bytes(),
                headers: Vec::new(),
            })
            .collect();
        log.produce(records).await.expect("produce");
    }
    let mut consumer = log.subscribe(&group, &topic).await.expect("subscribe");
    let ConsumerEvent::Assigned(partitions) = next_event(&mut consumer).await else {
        panic!("the first event must be the assignment");
    };
    assert_eq!(partitions.len(), 2);
    // Seeks right after the assignment: before any fetch has started.
    consumer.seek(0, 17).await.expect("seek 0");
    consumer.seek(1, 3).await.expect("seek 1");
    let mut got = Vec::new();
    collect_until(&mut consumer, &mut got, |r| {
        offsets_of(r, 0).last() == Some(&29) && offsets_of(r, 1).last() == Some(&29)
    })
    .await;
    assert_eq!(offsets_of(&got, 0), (17..30).collect::<Vec<_>>());
    assert_eq!(offsets_of(&got, 1), (3..30).collect::<Vec<_>>());
    let first = got
        .iter()
        .find(|r| r.partition == 0)
        .expect("a record of 0");
    assert_eq!(first.value.as_deref(), Some(&b"0-17"[..]));

    // Seeking a partition that is already fetching rewinds it exactly.
    consumer.seek(0, 5).await.expect("seek back");
    let mut again = Vec::new();
    collect_until(&mut consumer, &mut again, |r| {
        offsets_of(r, 0).last() == Some(&29)
    })
    .await;
    assert_eq!(offsets_of(&again, 0), (5..30).collect::<Vec<_>>());
    assert!(offsets_of(&again, 1).is_empty());

    // Seeking a partition this member does not hold is refused.
    assert!(consumer.seek(7, 0).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_is_cancel_safe() {
    let topic = unique("cancel");
    let group = unique("group");
    let cluster = cluster(&topic, 2);
    let log = log_for(&cluster, &[]);
    let appended = log.produce(keyed(&topic, "v", 200)).await.expect("produce");
    let mut consumer = log.subscribe(&group, &topic).await.expect("subscribe");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut cancelled = 0;
    while got.len() < 200 {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        match tokio::time::timeout(Duration::from_millis(3), consumer.next(7)).await {
            Err(_) => cancelled += 1,
            Ok(Ok(ConsumerEvent::Assigned(partitions))) => {
                for p in partitions {
                    consumer.seek(p, 0).await.expect("seek");
                }
            }
            Ok(Ok(ConsumerEvent::Records(records))) => {
                assert!(records.len() <= 7);
                got.extend(records);
            }
            Ok(Ok(ConsumerEvent::Revoked(p))) => panic!("unexpected revoke of {p:?}"),
            Ok(Err(e)) => eprintln!("next failed: {e}"),
        }
    }
    assert!(cancelled > 0, "the test must cancel some calls");
    assert_eq!(got.len(), 200, "nothing delivered twice");
    assert_eq!(positions_of(&got), positions(&appended));
    for p in 0..2 {
        let offsets = offsets_of(&got, p);
        assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_resumes_from_stored_and_committed_offsets() {
    let topic = unique("resume");
    let group = unique("group");
    let cluster = cluster(&topic, 3);
    let log = log_for(&cluster, &[]);
    let ledger = Arc::new(Ledger::default());
    let mut produced = positions(&log.produce(keyed(&topic, "a", 30)).await.expect("produce"));

    let first = spawn_member(
        "first",
        log.subscribe(&group, &topic).await.expect("subscribe"),
        ledger.clone(),
    );
    wait_for("the first member to apply everything", WAIT, || {
        ledger.applied_count() == 30
    })
    .await;
    first.abort();
    let _ = first.await;

    // A new member of the group seeks to the stored positions: nothing twice.
    let second = spawn_member(
        "second",
        log.subscribe(&group, &topic).await.expect("subscribe"),
        ledger.clone(),
    );
    wait_for("the second member's assignment", WAIT, || {
        ledger.assigned_to("second").len() == 3
    })
    .await;
    produced.extend(positions(
        &log.produce(keyed(&topic, "b", 30)).await.expect("produce"),
    ));
    wait_for("the second member to apply the new records", WAIT, || {
        ledger.applied_count() == 60
    })
    .await;
    ledger.assert_exactly(&produced);
    second.abort();
    let _ = second.await;

    // A member that does not seek starts at the offsets committed to the group.
    let fresh = positions(&log.produce(keyed(&topic, "c", 12)).await.expect("produce"));
    let mut third = log.subscribe(&group, &topic).await.expect("subscribe");
    let ConsumerEvent::Assigned(partitions) = next_event(&mut third).await else {
        panic!("the first event must be the assignment");
    };
    assert_eq!(partitions.len(), 3);
    let mut got = Vec::new();
    collect_until(&mut third, &mut got, |r| r.len() >= fresh.len()).await;
    assert_eq!(positions_of(&got), fresh, "committed offsets were honoured");
}

async fn two_members_split_and_hand_over(extra: &[(&str, &str)]) {
    let topic = unique("handover");
    let group = unique("group");
    let cluster = cluster(&topic, 4);
    let log = log_for(&cluster, extra);
    let ledger = Arc::new(Ledger::default());
    let mut produced = positions(&log.produce(keyed(&topic, "a", 40)).await.expect("produce"));

    let a = spawn_member(
        "a",
        log.subscribe(&group, &topic).await.expect("subscribe"),
        ledger.clone(),
    );
    wait_for("a to hold every partition and apply all", WAIT, || {
        ledger.assigned_to("a").len() == 4 && ledger.applied_count() == 40
    })
    .await;

    let b = spawn_member(
        "b",
        log.subscribe(&group, &topic).await.expect("subscribe"),
        ledger.clone(),
    );
    wait_for("the group to split the partitions", WAIT, || {
        let (pa, pb) = (ledger.assigned_to("a"), ledger.assigned_to("b"));
        !pa.is_empty() && !pb.is_empty() && pa.is_disjoint(&pb) && pa.len() + pb.len() == 4
    })
    .await;
    produced.extend(positions(
        &log.produce(keyed(&topic, "b", 40)).await.expect("produce"),
    ));
    wait_for("both members to apply the new records", WAIT, || {
        ledger.applied_count() == 80
    })
    .await;
    let applied_by_b = ledger.assigned_to("b");
    assert!(!applied_by_b.is_empty());

    // A leaves: its partitions move to b, nothing is lost.
    a.abort();
    let _ = a.await;
    ledger.assigned.lock().unwrap().remove("a");
    wait_for("b to take over every partition", WAIT, || {
        ledger.assigned_to("b").len() == 4
    })
    .await;
    produced.extend(positions(
        &log.produce(keyed(&topic, "c", 40)).await.expect("produce"),
    ));
    wait_for("b to apply everything", WAIT, || {
        ledger.applied_count() == 120
    })
    .await;
    b.abort();
    let _ = b.await;
    ledger.assert_exactly(&produced);
    let history = ledger.history.lock().unwrap();
    eprintln!("assignment history: {history:?}");
    assert!(
        history
            .iter()
            .any(|(m, e)| m == "a" && e.starts_with("revoked")),
        "a was revoked when b joined: {history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_partitions_and_hand_over_eager() {
    two_members_split_and_hand_over(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_partitions_and_hand_over_cooperative() {
    two_members_split_and_hand_over(&[("partition.assignment.strategy", "cooperative-sticky")])
        .await;
}
