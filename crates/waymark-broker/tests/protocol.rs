//! The broker at the protocol level: refusals with Kafka's own codes,
//! idempotent sequences across a restart, header bytes round-tripping, and
//! each limit. Requests are hand-made with `kafka-protocol`, so that they
//! can be wrong in ways ordinary clients never are.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{open_log, setup, stored, Raw, EVENTS, INPUTS};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiVersionsRequest, ApiVersionsResponse, FetchRequest, InitProducerIdRequest, ProduceRequest,
    TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::io::AsyncWriteExt;
use waymark_broker::records::{decode_batches, encode_batch, Limits};
use waymark_broker::{Broker, BrokerConfig};
use waymark_embedded::StoredRecord;

const PRODUCE_V: i16 = 9;
const FETCH_V: i16 = 12;

fn record(value: &str) -> StoredRecord {
    StoredRecord {
        timestamp_ms: 0,
        key: Some(b"k".to_vec()),
        value: Some(value.as_bytes().to_vec()),
        headers: Vec::new(),
    }
}

fn plain_batch(records: &[StoredRecord]) -> Bytes {
    let mut buf = BytesMut::new();
    encode_batch(&mut buf, 0, records);
    buf.freeze()
}

/// A batch from an idempotent producer, encoded by `kafka-protocol`.
fn idempotent_batch(pid: i64, epoch: i16, seq: i32, n: usize, transactional: bool) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: pid,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: seq + i as i32,
            timestamp: 0,
            key: Some(Bytes::from_static(b"key")),
            value: Some(Bytes::from(format!("seq {}", seq + i as i32))),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    buf.freeze()
}

fn produce(topic: &str, partition: i32, records: Bytes, acks: i16) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(records))])])
}

/// Produces and returns (error code, base offset) of the one partition.
async fn produce_one(raw: &mut Raw, topic: &str, partition: i32, records: Bytes) -> (i16, i64) {
    let r = raw
        .call(&produce(topic, partition, records, -1), PRODUCE_V)
        .await;
    let p = &r.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

fn fetch(topic: &str, partition: i32, offset: i64, max_wait_ms: i32) -> FetchRequest {
    FetchRequest::default()
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(64 << 20)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_owned())))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(partition)
                .with_fetch_offset(offset)
                .with_partition_max_bytes(64 << 20)])])
}

#[tokio::test]
async fn an_unknown_api_versions_version_gets_the_kip_511_answer() {
    let s = setup(|_| {}).await;
    let mut raw = Raw::connect(s.broker.addr()).await;
    // ApiVersions v99: key 18, version 99, correlation 7, client id "x".
    let mut frame = Vec::new();
    let body: Vec<u8> = [18i16.to_be_bytes(), 99i16.to_be_bytes()]
        .concat()
        .into_iter()
        .chain(7i32.to_be_bytes())
        .chain(1i16.to_be_bytes())
        .chain(*b"x")
        .chain([0u8])
        .collect();
    frame.extend_from_slice(&(body.len() as i32).to_be_bytes());
    frame.extend_from_slice(&body);
    raw.stream.write_all(&frame).await.unwrap();
    let mut resp = raw.read_frame().await.expect("an answer, not a close");
    let correlation = i32::from_be_bytes([resp[0], resp[1], resp[2], resp[3]]);
    assert_eq!(correlation, 7);
    let _ = resp.split_to(4);
    let v0 = ApiVersionsResponse::decode(&mut resp, 0).unwrap();
    assert_eq!(v0.error_code, ResponseError::UnsupportedVersion.code());
    assert!(v0
        .api_keys
        .iter()
        .any(|k| k.api_key == 0 && k.max_version >= 3));

    // The client then picks a version it shares and goes on.
    let v3 = raw.call(&ApiVersionsRequest::default(), 3).await;
    assert_eq!(v3.error_code, 0);
    let fetch = v3.api_keys.iter().find(|k| k.api_key == 1).unwrap();
    assert_eq!((fetch.min_version, fetch.max_version), (4, 12));
}

#[tokio::test]
async fn every_refusal_has_its_code_and_the_connection_goes_on() {
    let s = setup(|c| {
        c.topics.get_mut(INPUTS).unwrap().max_message_bytes = 64 * 1024;
    })
    .await;
    let mut raw = Raw::connect(s.broker.addr()).await;
    let good = plain_batch(&[record("good")]);

    let mut crc = good.to_vec();
    let last = crc.len() - 1;
    crc[last] ^= 0x55;
    let mut magic = good.to_vec();
    magic[16] = 1;
    let truncated = good.slice(..good.len() - 3);
    let big = plain_batch(&[record(&"x".repeat(100 * 1024))]);
    let cases: Vec<(&str, &str, Bytes, ResponseError)> = vec![
        (
            "bad CRC",
            INPUTS,
            Bytes::from(crc),
            ResponseError::CorruptMessage,
        ),
        (
            "bad framing",
            INPUTS,
            truncated,
            ResponseError::CorruptMessage,
        ),
        (
            "old magic",
            INPUTS,
            Bytes::from(magic),
            ResponseError::UnsupportedForMessageFormat,
        ),
        ("too large", INPUTS, big, ResponseError::MessageTooLarge),
        (
            "unknown topic",
            "waymark.input",
            good.clone(),
            ResponseError::UnknownTopicOrPartition,
        ),
        (
            "processors' topic",
            EVENTS,
            good.clone(),
            ResponseError::TopicAuthorizationFailed,
        ),
        (
            "transactional batch",
            INPUTS,
            idempotent_batch(1, 0, 0, 1, true),
            ResponseError::InvalidRecord,
        ),
    ];
    for (what, topic, batch, expected) in cases {
        let (code, _) = produce_one(&mut raw, topic, 0, batch).await;
        assert_eq!(code, expected.code(), "{what}");
        // Good traffic on the same connection is unaffected.
        let (code, _) = produce_one(&mut raw, INPUTS, 0, good.clone()).await;
        assert_eq!(code, 0, "a good batch after {what}");
    }
    let (code, _) = produce_one(&mut raw, INPUTS, 7, good.clone()).await;
    assert_eq!(code, ResponseError::UnknownTopicOrPartition.code());
    let bad_acks = raw
        .call(&produce(INPUTS, 0, good.clone(), 2), PRODUCE_V)
        .await;
    assert_eq!(
        bad_acks.responses[0].partition_responses[0].error_code,
        ResponseError::InvalidRequiredAcks.code()
    );
    let txn = raw
        .call(
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(StrBytes::from_static_str("t1").into())),
            4,
        )
        .await;
    assert_eq!(
        txn.error_code,
        ResponseError::TransactionalIdAuthorizationFailed.code()
    );

    // Exactly the good batches were appended, nothing else.
    let records = stored(&s.log, INPUTS, 0).await;
    assert_eq!(records.len(), 7);
    assert!(records
        .iter()
        .all(|r| r.value.as_deref() == Some(&b"good"[..])));
    assert!(stored(&s.log, EVENTS, 0).await.is_empty());
    let status = s.broker.status().get();
    assert_eq!(status.records_in, 7);
    assert!(status.refusals >= 10, "{status:?}");
}

#[tokio::test]
async fn idempotent_retries_append_once_across_a_restart_and_gaps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path()).await;
    let config = BrokerConfig::new("127.0.0.1:0".parse().unwrap()).writable(INPUTS);
    let broker = Broker::start(log.clone(), config.clone()).await.unwrap();
    let mut raw = Raw::connect(broker.addr()).await;
    let init = raw
        .call(
            &InitProducerIdRequest::default().with_transactional_id(None),
            4,
        )
        .await;
    assert_eq!(init.error_code, 0);
    let pid = init.producer_id.0;
    let second = raw
        .call(
            &InitProducerIdRequest::default().with_transactional_id(None),
            4,
        )
        .await;
    assert_ne!(second.producer_id.0, pid, "producer ids are never reused");

    assert_eq!(
        produce_one(&mut raw, INPUTS, 1, idempotent_batch(pid, 0, 0, 3, false)).await,
        (0, 0)
    );
    // A retry of the same batch: the original offset, nothing appended.
    assert_eq!(
        produce_one(&mut raw, INPUTS, 1, idempotent_batch(pid, 0, 0, 3, false)).await,
        (0, 0)
    );
    assert_eq!(
        produce_one(&mut raw, INPUTS, 1, idempotent_batch(pid, 0, 3, 2, false)).await,
        (0, 3)
    );
    let (code, _) = produce_one(&mut raw, INPUTS, 1, idempotent_batch(pid, 0, 9, 1, false)).await;
    assert_eq!(code, ResponseError::OutOfOrderSequenceNumber.code());
    assert_eq!(stored(&log, INPUTS, 1).await.len(), 5);

    // Restart: the sequence state was written with the records.
    drop(raw);
    broker.stop().await;
    log.close();
    drop(log);
    let log = open_log(dir.path()).await;
    let broker = Broker::start(log.clone(), config).await.unwrap();
    let mut raw = Raw::connect(broker.addr()).await;
    assert_eq!(
        produce_one(&mut raw, INPUTS, 1, idempotent_batch(pid, 0, 3, 2, false)).await,
        (0, 3)
    );
    assert_eq!(
        produce_one(&mut raw, INPUTS, 1, idempotent_batch(pid, 0, 5, 1, false)).await,
        (0, 5)
    );
    // A newer epoch starts over at 0 and fences the old one.
    assert_eq!(
        produce_one(&mut raw, INPUTS, 1, idempotent_batch(pid, 1, 0, 1, false)).await,
        (0, 6)
    );
    let (code, _) = produce_one(&mut raw, INPUTS, 1, idempotent_batch(pid, 0, 6, 1, false)).await;
    assert_eq!(code, ResponseError::InvalidProducerEpoch.code());
    let values: Vec<String> = stored(&log, INPUTS, 1)
        .await
        .into_iter()
        .map(|r| String::from_utf8(r.value.unwrap()).unwrap())
        .collect();
    assert_eq!(
        values,
        ["seq 0", "seq 1", "seq 2", "seq 3", "seq 4", "seq 5", "seq 0"]
    );
}

#[tokio::test]
async fn header_names_and_values_of_any_bytes_and_length_round_trip() {
    let s = setup(|_| {}).await;
    let mut raw = Raw::connect(s.broker.addr()).await;
    let sent = StoredRecord {
        timestamp_ms: 0,
        key: None,
        value: None,
        headers: vec![
            (vec![b'n'; 70_000], Some(b"long name".to_vec())),
            (vec![0xff, 0xfe, 0x00], Some(vec![0x80])),
            (b"dup".to_vec(), Some(b"1".to_vec())),
            (b"dup".to_vec(), Some(b"2".to_vec())),
            (b"null".to_vec(), None),
        ],
    };
    let (code, offset) = produce_one(
        &mut raw,
        INPUTS,
        0,
        plain_batch(&[sent.clone(), record("after")]),
    )
    .await;
    assert_eq!((code, offset), (0, 0));
    let r = raw.call(&fetch(INPUTS, 0, 0, 100), FETCH_V).await;
    let p = &r.responses[0].partitions[0];
    assert_eq!(p.error_code, 0);
    assert_eq!(p.high_watermark, 2);
    let limits = Limits {
        max_message_bytes: 1 << 20,
        max_decompressed_bytes: 1 << 20,
    };
    let batches = decode_batches(p.records.clone().unwrap(), limits).unwrap();
    let got: Vec<StoredRecord> = batches.into_iter().flat_map(|b| b.records).collect();
    assert_eq!(got, vec![sent, record("after")]);
}

#[tokio::test]
async fn fetch_answers_out_of_range_and_long_polls_until_data() {
    let s = setup(|_| {}).await;
    let mut raw = Raw::connect(s.broker.addr()).await;
    let r = raw.call(&fetch(INPUTS, 0, 5, 0), FETCH_V).await;
    assert_eq!(
        r.responses[0].partitions[0].error_code,
        ResponseError::OffsetOutOfRange.code()
    );
    // A long poll is answered as soon as a record arrives.
    let c = raw.send(&fetch(INPUTS, 0, 0, 10_000), FETCH_V).await;
    let mut other = Raw::connect(s.broker.addr()).await;
    assert_eq!(
        produce_one(&mut other, INPUTS, 0, plain_batch(&[record("r")]))
            .await
            .0,
        0
    );
    let r = raw.recv::<FetchRequest>(FETCH_V, c).await;
    assert_eq!(r.responses[0].partitions[0].high_watermark, 1);
    assert!(r.responses[0].partitions[0]
        .records
        .as_ref()
        .is_some_and(|b| !b.is_empty()));
}

#[tokio::test]
async fn an_oversize_request_frame_is_refused_before_it_is_read() {
    let s = setup(|c| c.max_request_bytes = 1024 * 1024).await;
    let mut raw = Raw::connect(s.broker.addr()).await;
    // Announce 512 MiB and send only a little: the broker must not wait for
    // (or allocate) the rest.
    raw.stream
        .write_all(&(512i32 * 1024 * 1024).to_be_bytes())
        .await
        .unwrap();
    raw.stream.write_all(&[0u8; 64]).await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(10)).await);
    // Everyone else is unaffected.
    let mut other = Raw::connect(s.broker.addr()).await;
    assert_eq!(
        other
            .call(&ApiVersionsRequest::default(), 3)
            .await
            .error_code,
        0
    );
    assert!(s.broker.status().get().refusals >= 1);
}

#[tokio::test]
async fn connections_over_the_cap_are_closed() {
    let s = setup(|c| c.max_connections = 2).await;
    let mut a = Raw::connect(s.broker.addr()).await;
    let mut b = Raw::connect(s.broker.addr()).await;
    assert_eq!(
        a.call(&ApiVersionsRequest::default(), 3).await.error_code,
        0
    );
    assert_eq!(
        b.call(&ApiVersionsRequest::default(), 3).await.error_code,
        0
    );
    let mut c = Raw::connect(s.broker.addr()).await;
    assert!(c.closed_within(Duration::from_secs(10)).await);
    drop(a);
    // The freed slot is taken by the next connection.
    let mut tries = 0;
    loop {
        let mut d = Raw::connect(s.broker.addr()).await;
        let c = d.send(&ApiVersionsRequest::default(), 3).await;
        if tokio::time::timeout(Duration::from_secs(2), d.read_frame())
            .await
            .ok()
            .flatten()
            .is_some()
        {
            let _ = c;
            break;
        }
        tries += 1;
        assert!(tries < 20, "a slot frees up once a connection closes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_connection_with_too_many_requests_in_flight_is_not_read_further() {
    for (limit, appended_while_polling) in [(1, false), (8, true)] {
        let s = setup(|c| c.max_in_flight = limit).await;
        let mut raw = Raw::connect(s.broker.addr()).await;
        // A long poll on an empty partition, then a produce behind it.
        let f = raw.send(&fetch(EVENTS, 0, 0, 1500), FETCH_V).await;
        let p = raw
            .send(
                &produce(INPUTS, 0, plain_batch(&[record("x")]), -1),
                PRODUCE_V,
            )
            .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (_, high) = s.log.offsets(INPUTS, 0).unwrap();
        assert_eq!(high == 1, appended_while_polling, "limit {limit}");
        // Both are answered, in order.
        raw.recv::<FetchRequest>(FETCH_V, f).await;
        let r = raw.recv::<ProduceRequest>(PRODUCE_V, p).await;
        assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
        assert_eq!(s.log.offsets(INPUTS, 0).unwrap().1, 1);
    }
}

#[tokio::test]
async fn idle_connections_are_closed_busy_ones_are_not() {
    let s = setup(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let mut idle = Raw::connect(s.broker.addr()).await;
    assert!(idle.closed_within(Duration::from_secs(10)).await);
    // A long poll longer than the idle timeout is answered.
    let mut busy = Raw::connect(s.broker.addr()).await;
    let r = busy.call(&fetch(INPUTS, 0, 0, 1200), FETCH_V).await;
    assert_eq!(r.responses[0].partitions[0].error_code, 0);
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_connections_take_no_thread_each() {
    let s = setup(|_| {}).await;
    let mut warm = Raw::connect(s.broker.addr()).await;
    warm.call(&ApiVersionsRequest::default(), 3).await;
    let before = threads();
    let mut open = Vec::new();
    for _ in 0..300 {
        let mut c = Raw::connect(s.broker.addr()).await;
        assert_eq!(
            c.call(&ApiVersionsRequest::default(), 3).await.error_code,
            0
        );
        open.push(c);
    }
    assert_eq!(s.broker.status().get().connections, 301);
    let after = threads();
    assert!(
        after <= before + 2,
        "{before} threads before, {after} with 300 connections"
    );
}

#[tokio::test]
async fn request_memory_is_bounded_across_connections() {
    let s = setup(|c| {
        c.max_request_bytes = 16 * 1024;
        c.max_queued_request_bytes = 16 * 1024;
    })
    .await;
    // A long poll holds a little of the request memory for 1.5 s...
    let mut a = Raw::connect(s.broker.addr()).await;
    let f = a.send(&fetch(EVENTS, 0, 0, 1500), FETCH_V).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a request needing nearly all of it waits, on another connection.
    let mut b = Raw::connect(s.broker.addr()).await;
    // A produce whose frame is 10 bytes short of the limit.
    let sized = |n: usize| produce(INPUTS, 0, plain_batch(&[record(&"z".repeat(n))]), -1);
    let n = 15_000 + (16 * 1024 - 10) - Raw::frame_len(&sized(15_000), PRODUCE_V);
    assert_eq!(Raw::frame_len(&sized(n), PRODUCE_V), 16 * 1024 - 10);
    let p = b.send(&sized(n), PRODUCE_V).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(s.log.offsets(INPUTS, 0).unwrap().1, 0, "waits for memory");
    a.recv::<FetchRequest>(FETCH_V, f).await;
    let r = b.recv::<ProduceRequest>(PRODUCE_V, p).await;
    assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
    assert_eq!(s.log.offsets(INPUTS, 0).unwrap().1, 1);
}

/// With an advertised address (a published container port, NAT), clients
/// are sent there after bootstrapping, as with Kafka's
/// `advertised.listeners`; without one, to the address they connected to.
#[tokio::test]
async fn metadata_and_coordinator_name_the_advertised_address() {
    use kafka_protocol::messages::{FindCoordinatorRequest, MetadataRequest};
    let plain = setup(|_| {}).await;
    let mut raw = Raw::connect(plain.broker.addr()).await;
    let md = raw
        .call(&MetadataRequest::default().with_topics(None), 12)
        .await;
    assert_eq!(md.brokers[0].host.as_str(), "127.0.0.1");
    assert_eq!(md.brokers[0].port, i32::from(plain.broker.addr().port()));

    let s = setup(|c| c.advertised = Some(("kafka.example.test".into(), 29092))).await;
    let mut raw = Raw::connect(s.broker.addr()).await;
    let md = raw
        .call(&MetadataRequest::default().with_topics(None), 12)
        .await;
    assert_eq!(md.brokers.len(), 1);
    assert_eq!(md.brokers[0].host.as_str(), "kafka.example.test");
    assert_eq!(md.brokers[0].port, 29092);
    let coordinator = raw
        .call(
            &FindCoordinatorRequest::default()
                .with_key(StrBytes::from_static_str("group"))
                .with_key_type(0),
            3,
        )
        .await;
    assert_eq!(coordinator.error_code, 0);
    assert_eq!(coordinator.host.as_str(), "kafka.example.test");
    assert_eq!(coordinator.port, 29092);
}
