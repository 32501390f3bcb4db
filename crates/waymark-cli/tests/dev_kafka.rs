//! `waymark dev`'s Kafka endpoint keeps a Kafka broker's promise with a
//! stock librdkafka producer: every acknowledged record is durable and
//! appended exactly once — through a burst, a `kill -9` right after the last
//! acknowledgement, a `kill -9` in the middle of a stream the producer goes
//! on with after the restart, and a SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::kafka::{idempotent_producer, ids, produce_all, read_all};
use common::{assert_counts, free_port, metrics_text, spawn_dev, start_dev, terminate, workload};

const INPUTS: &str = "waymark.inputs";

/// `(key, value)` of each event, keyed as contract §1 says.
fn keyed(events: &[String]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(e).unwrap();
            let key = format!(
                "{}:{}",
                v["source"]["platform"].as_str().unwrap(),
                v["source"]["platform_id"].as_str().unwrap()
            );
            (key, e.clone())
        })
        .collect()
}

/// Every id once, and each key's ids in the order they were produced.
fn assert_exactly_once_in_order(
    records: &[(i32, i64, Vec<u8>, Vec<u8>)],
    sent: &[(String, String)],
) {
    let got = ids(records);
    let distinct: BTreeSet<&String> = got.iter().collect();
    assert_eq!(got.len(), sent.len(), "records in the log");
    assert_eq!(distinct.len(), sent.len(), "each record exactly once");
    let position: BTreeMap<String, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, (_, v))| {
            let v: serde_json::Value = serde_json::from_str(v).unwrap();
            (v["id"].as_str().unwrap().to_owned(), i)
        })
        .collect();
    let mut last: BTreeMap<&[u8], usize> = BTreeMap::new();
    for ((_, _, key, _), id) in records.iter().zip(&got) {
        let at = position[id];
        if let Some(before) = last.insert(key.as_slice(), at) {
            assert!(before < at, "per-key order: {id} came after a later record");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_250k_idempotent_records_is_applied_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let (events, expected) = workload("b", 250_000, 2_500);
    let records = Arc::new(keyed(&events));
    let bootstrap = dev.info.kafka_bootstrap.clone();
    let sent = records.clone();
    let acked = tokio::task::spawn_blocking(move || {
        let (producer, acks) = idempotent_producer(&bootstrap);
        produce_all(&producer, INPUTS, &sent);
        assert!(acks.failed.lock().unwrap().is_empty(), "{:?}", acks.failed);
        acks.acked.load(Ordering::Relaxed)
    })
    .await
    .unwrap();
    assert_eq!(acked, 250_000);

    let stored = dev.log.read_stored(INPUTS, 0, 0, usize::MAX).await.unwrap();
    let as_records: Vec<_> = stored
        .into_iter()
        .map(|(o, r)| {
            (
                0,
                o as i64,
                r.key.unwrap_or_default(),
                r.value.unwrap_or_default(),
            )
        })
        .collect();
    assert_exactly_once_in_order(&as_records, &records);
    // And applied: every person's count is exactly its events.
    assert_counts(&dev.info.grpc_addr, &expected).await;
    dev.stop().await.unwrap();
}

fn gone(dir: &Path) -> bool {
    !dir.join("dev.json").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_acks_and_mid_stream_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let (events, expected) = workload("k9", 30_000, 300);
    let records = Arc::new(keyed(&events));

    let (mut child, _) = spawn_dev(dir.path(), &addr);
    let (producer, acks) = idempotent_producer(&addr);
    let producer = Arc::new(producer);
    // 1. Everything acknowledged, then kill -9 at once.
    {
        let (p, r) = (producer.clone(), records.clone());
        tokio::task::spawn_blocking(move || produce_all(&p, INPUTS, &r[..10_000]))
            .await
            .unwrap();
    }
    assert_eq!(acks.acked.load(Ordering::Relaxed), 10_000);
    child.kill().unwrap();
    child.wait().unwrap();

    // 2. The same producer goes on; the broker is killed in the middle of
    // its stream and restarted on the same port, and the producer retries
    // what was in flight.
    let (mut child, _) = spawn_dev(dir.path(), &addr);
    let stream = {
        let (p, r) = (producer.clone(), records.clone());
        tokio::task::spawn_blocking(move || produce_all(&p, INPUTS, &r[10_000..]))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while acks.acked.load(Ordering::Relaxed) < 15_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream makes progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, info) = spawn_dev(dir.path(), &addr);
    stream.await.unwrap();
    assert!(acks.failed.lock().unwrap().is_empty(), "{:?}", acks.failed);
    assert_eq!(acks.acked.load(Ordering::Relaxed), 30_000);

    let back = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || read_all(&addr, INPUTS, 30_000))
            .await
            .unwrap()
    };
    assert_exactly_once_in_order(&back, &records);
    assert_counts(&info.grpc_addr, &expected).await;
    terminate(&mut child);
    assert!(gone(dir.path()), "dev.json is removed on a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_last_ack_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let (events, _) = workload("st", 10_000, 100);
    let records = Arc::new(keyed(&events));
    let (mut child, _) = spawn_dev(dir.path(), &addr);
    {
        let (addr, r) = (addr.clone(), records.clone());
        tokio::task::spawn_blocking(move || {
            let (p, acks) = idempotent_producer(&addr);
            produce_all(&p, INPUTS, &r);
            assert_eq!(acks.acked.load(Ordering::Relaxed), 10_000);
        })
        .await
        .unwrap();
    }
    terminate(&mut child);
    assert!(gone(dir.path()), "dev.json is removed on a clean stop");
    let (mut child, _) = spawn_dev(dir.path(), &addr);
    let back = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || read_all(&addr, INPUTS, 10_000))
            .await
            .unwrap()
    };
    assert_exactly_once_in_order(&back, &records);
    terminate(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_kafka_port_is_a_clear_error_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args([
            "dev",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--kafka-addr", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kafka-addr") && err.contains(&port.to_string()),
        "{err}"
    );
    assert!(gone(dir.path()), "nothing started, no dev.json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_records_are_dead_letters_or_refused_and_nothing_else_is_lost() {
    use rdkafka::config::ClientConfig;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use waymark_proto::v1 as pb;

    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &dev.info.kafka_bootstrap)
        .set("enable.idempotence", "true")
        // Let the broker decide what is too large.
        .set("message.max.bytes", "10000000")
        .create()
        .unwrap();
    let send = |value: Vec<u8>| {
        let p = producer.clone();
        async move {
            p.send(
                FutureRecord::to(INPUTS).key("web:big").payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        }
    };
    // 3 MiB: accepted by the topic (4 MiB), over the 1 MiB event limit.
    send(vec![b' '; 3 << 20]).await.unwrap();
    // 5 MiB: over the topic's limit.
    match send(vec![b' '; 5 << 20]).await {
        Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {}
        other => panic!("expected MESSAGE_TOO_LARGE, got {other:?}"),
    }
    let (events, expected) = workload("big", 30, 3);
    for (_, v) in keyed(&events) {
        send(v.into_bytes()).await.unwrap();
    }
    assert_counts(&dev.info.grpc_addr, &expected).await;
    let mut admin = common::clients(&dev.info.grpc_addr).await.admin;
    let dead = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            page_size: 10,
            page_token: String::new(),
            newest_first: false,
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error, "too_large");

    let status = admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .kafka_endpoint
        .unwrap();
    assert_eq!(status.records_in, 31);
    assert!(
        status.last_refusal.starts_with("MESSAGE_TOO_LARGE"),
        "{status:?}"
    );
    // The operator sees the same in the metrics.
    let metrics = metrics_text(&dev.info.metrics_addr).await;
    assert!(
        metrics.contains("waymark_kafka_refusals_total{code=\"MESSAGE_TOO_LARGE\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("waymark_kafka_records_in_total{topic=\"waymark.inputs\"}"));
    assert!(metrics.contains("waymark_kafka_request_duration_seconds"));
    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_close_their_connection_and_nothing_else() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut child, _) = spawn_dev(dir.path(), &addr);
    // Each frame: api key, version, correlation id, client id "x", then a
    // body claiming an array of 2^31 - 1 elements (or plain noise).
    let frame = |api: i16, version: i16, rest: &[u8]| {
        let mut body = Vec::new();
        body.extend_from_slice(&api.to_be_bytes());
        body.extend_from_slice(&version.to_be_bytes());
        body.extend_from_slice(&1i32.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.push(b'x');
        body.extend_from_slice(rest);
        let mut out = (body.len() as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    };
    let huge = i32::MAX.to_be_bytes();
    let cases = [
        frame(3, 1, &huge), // Metadata
        frame(
            0,
            3,
            &[
                &(-1i16).to_be_bytes()[..],
                &1i16.to_be_bytes(),
                &1000i32.to_be_bytes(),
                &huge,
            ]
            .concat(),
        ), // Produce
        frame(
            1,
            4,
            &[&(-1i32).to_be_bytes()[..], &[0; 12], &[0], &huge].concat(),
        ), // Fetch
        frame(12, 0, &[0xff; 40]), // Heartbeat noise
        frame(999, 0, &[]), // unknown API key
    ];
    for bytes in cases {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "the connection is closed");
    }
    // Still serving: a real producer and consumer go on.
    let (events, _) = workload("gb", 100, 10);
    let records = keyed(&events);
    let back = tokio::task::spawn_blocking(move || {
        let (p, acks) = idempotent_producer(&addr);
        produce_all(&p, INPUTS, &records);
        assert_eq!(acks.acked.load(Ordering::Relaxed), 100);
        read_all(&addr, INPUTS, 100)
    })
    .await
    .unwrap();
    assert_eq!(back.len(), 100);
    terminate(&mut child);
}
