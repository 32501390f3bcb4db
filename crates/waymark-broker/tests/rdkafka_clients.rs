//! The broker with librdkafka (through rdkafka) as the client: every
//! compression, idempotent and plain producers, consumers that assign
//! partitions themselves, and consumer groups that split partitions, hand
//! them over and resume from committed offsets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{setup, stored, EVENTS, INPUTS};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use waymark_embedded::{PartitionAppend, StoredRecord};

fn producer(bootstrap: &str, extra: &[(&str, &str)]) -> FutureProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000");
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create().unwrap()
}

fn consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap()
}

/// Polls `c` until `n` records arrived (or panics after a while).
fn poll_n(c: &BaseConsumer, n: usize) -> Vec<(i32, i64, Vec<u8>)> {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "got {} of {n}",
            out.len()
        );
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            out.push((
                m.partition(),
                m.offset(),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_round_trips_through_produce_and_fetch() {
    let s = setup(|_| {}).await;
    let mut expected = Vec::new();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let p = producer(
            &s.bootstrap(),
            &[("compression.codec", codec), ("linger.ms", "20")],
        );
        let sends: Vec<_> = (0..200)
            .map(|i| {
                let value = format!("{codec}-{i}-{}", "y".repeat(i % 50));
                expected.push(value.clone());
                let p = p.clone();
                async move {
                    p.send(
                        FutureRecord::to(INPUTS)
                            .partition(0)
                            .key("k")
                            .payload(&value)
                            .headers(OwnedHeaders::new().insert(Header {
                                key: "codec",
                                value: Some(codec),
                            })),
                        Duration::from_secs(10),
                    )
                    .await
                }
            })
            .collect();
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }
    let c = consumer(&s.bootstrap(), "unused");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(INPUTS, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let got = poll_n(&c, expected.len());
    let values: Vec<String> = got
        .iter()
        .map(|(_, _, v)| String::from_utf8(v.clone()).unwrap())
        .collect();
    assert_eq!(values, expected, "every record once, in order");
    let offsets: Vec<i64> = got.iter().map(|(_, o, _)| *o).collect();
    assert_eq!(offsets, (0..expected.len() as i64).collect::<Vec<_>>());
    // Headers came through too.
    let stored = stored(&s.log, INPUTS, 0).await;
    assert_eq!(
        stored[0].headers,
        vec![(b"codec".to_vec(), Some(b"none".to_vec()))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_reach_the_producer_as_kafka_errors() {
    let s = setup(|c| {
        c.topics.get_mut(INPUTS).unwrap().max_message_bytes = 100_000;
    })
    .await;
    let p = producer(
        &s.bootstrap(),
        &[
            ("message.max.bytes", "1000000"),
            ("message.timeout.ms", "10000"),
            // How long librdkafka waits for a topic the broker says is
            // unknown before failing its messages.
            ("topic.metadata.propagation.max.ms", "1000"),
        ],
    );
    let send = |topic: &'static str, size: usize| {
        let p = p.clone();
        async move {
            p.send(
                FutureRecord::to(topic).key("k").payload(&vec![b'v'; size]),
                Duration::from_secs(10),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        }
    };
    let code = |r: Result<(), KafkaError>| match r {
        Err(KafkaError::MessageProduction(code)) => code,
        other => panic!("expected a produce error, got {other:?}"),
    };
    assert_eq!(
        code(send(EVENTS, 10).await),
        RDKafkaErrorCode::TopicAuthorizationFailed
    );
    assert_eq!(
        code(send(INPUTS, 200_000).await),
        RDKafkaErrorCode::MessageSizeTooLarge
    );
    let unknown = code(send("waymark.input", 10).await);
    assert!(
        matches!(
            unknown,
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
        ),
        "{unknown:?}"
    );
    // And the same producer goes on.
    let r = send(INPUTS, 10).await;
    assert!(r.is_ok(), "{r:?} {:?}", s.broker.status().get());

    // Transactions are refused with a code, not left to time out.
    let t: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", s.bootstrap())
        .set("transactional.id", "t-1")
        .create()
        .unwrap();
    let err = tokio::task::spawn_blocking(move || t.init_transactions(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect_err("transactions are not supported");
    assert_ne!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::OperationTimedOut),
        "refused, not timed out: {err}"
    );
}

fn assigned(c: &BaseConsumer) -> BTreeSet<i32> {
    c.assignment()
        .unwrap()
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect()
}

/// Polls both members until their assignments satisfy `done`.
fn until(members: &[&BaseConsumer], what: &str, done: impl Fn(&[BTreeSet<i32>]) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        for m in members {
            let _ = m.poll(Duration::from_millis(50));
        }
        let now: Vec<_> = members.iter().map(|m| assigned(m)).collect();
        if done(&now) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: assignments {now:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_two_splits_the_partitions_and_hands_them_over() {
    let s = setup(|_| {}).await;
    // 40 records on each of the 4 partitions of waymark.events.
    let parts = (0..4)
        .map(|p| PartitionAppend {
            topic: EVENTS.into(),
            partition: p,
            records: (0..40)
                .map(|i| StoredRecord {
                    timestamp_ms: 0,
                    key: None,
                    value: Some(format!("{p}-{i}").into_bytes()),
                    headers: Vec::new(),
                })
                .collect(),
            producer: None,
        })
        .collect();
    s.log.append(parts).await.unwrap();
    let bootstrap = s.bootstrap();
    tokio::task::spawn_blocking(move || {
        let a = consumer(&bootstrap, "split");
        a.subscribe(&[EVENTS]).unwrap();
        until(&[&a], "the first member gets everything", |m| {
            m[0].len() == 4
        });
        let b = consumer(&bootstrap, "split");
        b.subscribe(&[EVENTS]).unwrap();
        until(&[&a, &b], "two members split 2/2", |m| {
            m[0].len() == 2 && m[1].len() == 2 && m[0].is_disjoint(&m[1])
        });
        // a consumes and commits what it has.
        let mut seen = BTreeSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while seen.len() < 80 {
            assert!(std::time::Instant::now() < deadline);
            let _ = b.poll(Duration::from_millis(10));
            if let Some(m) = a.poll(Duration::from_millis(50)) {
                let m = m.unwrap();
                seen.insert((m.partition(), m.offset()));
            }
        }
        a.commit_consumer_state(CommitMode::Sync).unwrap();
        let mine = assigned(&a);
        drop(a); // leaves the group
        until(&[&b], "the remaining member takes over all four", |m| {
            m[0].len() == 4
        });
        // b resumes a's partitions from a's commits: only b's own 80 and
        // nothing of a's.
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while got.len() < 80 {
            assert!(std::time::Instant::now() < deadline, "{}", got.len());
            if let Some(m) = b.poll(Duration::from_millis(50)) {
                let m = m.unwrap();
                got.push(m.partition());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        while let Some(m) = b.poll(Duration::from_millis(200)) {
            got.push(m.unwrap().partition());
        }
        assert_eq!(got.len(), 80, "nothing of the committed partitions again");
        assert!(got.iter().all(|p| !mine.contains(p)));
        // The group and its offsets are visible to admin tools.
        let groups = b
            .fetch_group_list(Some("split"), Duration::from_secs(10))
            .unwrap();
        let g = &groups.groups()[0];
        assert_eq!(g.state(), "Stable");
        assert_eq!(g.members().len(), 1);
    })
    .await
    .unwrap();
}
