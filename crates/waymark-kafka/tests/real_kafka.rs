//! `KafkaLog` against a real Kafka broker (`scripts/dev-services up kafka`).
//!
//! The broker is found as every real-engine test finds it
//! (`waymark_testenv`): `WAYMARK_KAFKA_BOOTSTRAP`, else `127.0.0.1:9092`;
//! unreachable, it fails the tests under `CI=true` or with the variable
//! set, and skips them with a visible `SKIPPED` line otherwise. Every test uses its own random topic and group names and
//! deletes its topics at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{keyed, positions, spawn_member, unique, wait_for, Ledger, GROUP_PROPERTIES, WAIT};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use waymark_kafka::{KafkaConfig, KafkaLog};
use waymark_runtime::{partition_for, Log, LogError, TopicConfig};

/// The broker to test against, or `None` to skip (the policy of
/// `waymark_testenv`).
fn bootstrap() -> Option<String> {
    waymark_testenv::kafka()
}

/// A log on the test broker; panics when the broker cannot be reached.
async fn kafka() -> Option<(String, KafkaLog)> {
    let bootstrap = bootstrap()?;
    let mut config = KafkaConfig::new(&bootstrap);
    for (k, v) in GROUP_PROPERTIES {
        config = config.property(*k, *v);
    }
    let log = KafkaLog::new(config).expect("kafka log");
    match log.partitions(&unique("waymark-probe")).await {
        Ok(_) | Err(LogError::UnknownTopic(_)) => Some((bootstrap, log)),
        Err(e) => panic!("kafka at {bootstrap} is unreachable: {e}"),
    }
}

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client")
}

/// Best-effort cleanup.
async fn delete_topics(bootstrap: &str, topics: &[&str]) {
    if let Err(e) = admin(bootstrap)
        .delete_topics(topics, &AdminOptions::new())
        .await
    {
        eprintln!("deleting {topics:?}: {e}");
    }
}

fn topic(
    name: &str,
    partitions: u32,
    retention: Option<Duration>,
    compaction: bool,
) -> TopicConfig {
    TopicConfig {
        name: name.to_owned(),
        partitions,
        retention,
        compaction,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topics_creates_missing_topics_with_their_settings() {
    let Some((bootstrap, log)) = kafka().await else {
        return;
    };
    let events = unique("events");
    let state = unique("state");
    let topics = [
        topic(&events, 3, Some(Duration::from_secs(86_400)), false),
        topic(&state, 1, None, true),
    ];
    log.ensure_topics(&topics).await.expect("create topics");
    assert_eq!(log.partitions(&events).await.expect("partitions"), 3);
    assert_eq!(log.partitions(&state).await.expect("partitions"), 1);
    // Existing topics are left alone.
    log.ensure_topics(&topics).await.expect("ensure again");

    let specs = [
        ResourceSpecifier::Topic(&events),
        ResourceSpecifier::Topic(&state),
    ];
    let described = admin(&bootstrap)
        .describe_configs(&specs, &AdminOptions::new())
        .await
        .expect("describe configs");
    let value = |i: usize, name: &str| {
        let resource = described[i].as_ref().expect("topic config");
        resource
            .get(name)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(value(0, "retention.ms"), "86400000");
    assert_eq!(value(0, "cleanup.policy"), "delete");
    assert_eq!(value(1, "retention.ms"), "-1");
    assert_eq!(value(1, "cleanup.policy"), "compact");
    delete_topics(&bootstrap, &[&events, &state]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_consume_read_and_watermarks() {
    let Some((bootstrap, log)) = kafka().await else {
        return;
    };
    let name = unique("roundtrip");
    log.ensure_topics(&[topic(&name, 3, None, false)])
        .await
        .expect("create topic");
    let records = keyed(&name, "v", 60);
    let appended = log.produce(records.clone()).await.expect("produce");
    for (record, at) in records.iter().zip(&appended) {
        let key = record.key.as_deref().expect("keyed");
        assert_eq!(at.partition, partition_for(key, 3));
    }
    let mut highs = [0u64; 3];
    for at in &appended {
        // Dense offsets, in input order per partition.
        assert_eq!(at.offset, highs[at.partition as usize]);
        highs[at.partition as usize] += 1;
    }
    for (p, high) in highs.iter().enumerate() {
        assert_eq!(
            log.watermarks(&name, p as u32).await.expect("watermarks"),
            (0, *high)
        );
    }
    let busiest = (0..3).max_by_key(|p| highs[*p]).expect("a partition") as u32;
    let read = log.read(&name, busiest, 1, 2).await.expect("read");
    assert_eq!(
        read.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![1, 2]
    );

    let ledger = Arc::new(Ledger::default());
    let group = unique("group");
    let member = spawn_member(
        "m",
        log.subscribe(&group, &name).await.expect("subscribe"),
        ledger.clone(),
    );
    wait_for("every record applied", WAIT, || {
        ledger.applied_count() == 60
    })
    .await;
    // The member is in its group while it runs, and leaves when dropped.
    assert_eq!(log.group_members(&group).await.expect("members"), 1);
    member.abort();
    let _ = member.await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while log.group_members(&group).await.expect("members") > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped member never left {group}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ledger.assert_exactly(&positions(&appended));
    delete_topics(&bootstrap, &[&name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_partitions_and_hand_over() {
    let Some((bootstrap, log)) = kafka().await else {
        return;
    };
    let name = unique("handover");
    let group = unique("group");
    log.ensure_topics(&[topic(&name, 4, None, false)])
        .await
        .expect("create topic");
    let ledger = Arc::new(Ledger::default());
    let mut produced = positions(&log.produce(keyed(&name, "a", 40)).await.expect("produce"));
    let a = spawn_member(
        "a",
        log.subscribe(&group, &name).await.expect("subscribe"),
        ledger.clone(),
    );
    wait_for("a to apply everything", WAIT, || {
        ledger.applied_count() == 40
    })
    .await;
    let b = spawn_member(
        "b",
        log.subscribe(&group, &name).await.expect("subscribe"),
        ledger.clone(),
    );
    wait_for("the group to split the partitions", WAIT, || {
        let (pa, pb) = (ledger.assigned_to("a"), ledger.assigned_to("b"));
        !pa.is_empty() && !pb.is_empty() && pa.is_disjoint(&pb) && pa.len() + pb.len() == 4
    })
    .await;
    produced.extend(positions(
        &log.produce(keyed(&name, "b", 40)).await.expect("produce"),
    ));
    wait_for("the new records applied", WAIT, || {
        ledger.applied_count() == 80
    })
    .await;
    a.abort();
    let _ = a.await;
    ledger.assigned.lock().unwrap().remove("a");
    wait_for("b to take over", WAIT, || {
        ledger.assigned_to("b").len() == 4
    })
    .await;
    produced.extend(positions(
        &log.produce(keyed(&name, "c", 40)).await.expect("produce"),
    ));
    wait_for("b to apply everything", WAIT, || {
        ledger.applied_count() == 120
    })
    .await;
    b.abort();
    let _ = b.await;
    ledger.assert_exactly(&produced);
    delete_topics(&bootstrap, &[&name]).await;
}

/// A record larger than its topic's `max.message.bytes` is refused for
/// good (`LogError::TooLarge`, not retryable), naming it; the other records
/// of the call are appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_its_topic_is_a_permanent_refusal() {
    use rdkafka::admin::{NewTopic, TopicReplication};
    let Some((bootstrap, log)) = kafka().await else {
        return;
    };
    let name = unique("small");
    let new = NewTopic::new(&name, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "2000");
    admin(&bootstrap)
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topic");
    let deadline = tokio::time::Instant::now() + WAIT;
    while log.partitions(&name).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "topic never visible"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Incompressible bytes: the producer compresses batches.
    let noise = |n: usize| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect::<Vec<u8>>()
    };
    let records: Vec<waymark_runtime::OutRecord> = [100, 5_000, 100]
        .iter()
        .map(|n| waymark_runtime::OutRecord::keyed(name.as_str(), "k", noise(*n)))
        .collect();
    match log.produce(records).await {
        Err(e @ LogError::TooLarge { .. }) => {
            assert!(!e.is_retryable());
            let LogError::TooLarge { refused, .. } = e else {
                unreachable!()
            };
            assert_eq!(refused, [1]);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let (_, high) = log.watermarks(&name, 0).await.expect("watermarks");
    assert_eq!(high, 2, "the records that fit were appended");
    delete_topics(&bootstrap, &[&name]).await;
}
