//! Writes the seed corpora of the fuzz targets that take binary input
//! (`fuzz/corpus/{log_codec,kafka_request,kafka_records}/`): requests and
//! record batches as real clients send them, stored records as the
//! embedded log writes them. The text targets' seeds are the schema
//! samples and `topology.yaml`.
//!
//! `cargo run -p waymark-fuzz --example seeds`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiVersionsRequest, FetchRequest, FindCoordinatorRequest, HeartbeatRequest, JoinGroupRequest,
    ListOffsetsRequest, MetadataRequest, OffsetCommitRequest, ProduceRequest, RequestHeader,
    TopicName,
};
use kafka_protocol::protocol::{Encodable, Request, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use waymark_broker::records::encode_batch;
use waymark_embedded::StoredRecord;

fn frame<R: Request + Encodable>(req: &R, version: i16) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("seed")));
    let mut body = BytesMut::new();
    header
        .encode(&mut body, R::header_version(version))
        .unwrap();
    req.encode(&mut body, version).unwrap();
    body.to_vec()
}

fn records(n: usize) -> Vec<StoredRecord> {
    (0..n)
        .map(|i| StoredRecord {
            timestamp_ms: 1_700_000_000_000 + i as i64,
            key: (i % 3 != 0).then(|| format!("web:{i}").into_bytes()),
            value: (i % 5 != 4).then(|| format!("{{\"id\":\"e{i}\"}}").into_bytes()),
            headers: (0..i % 3)
                .map(|h| {
                    (
                        format!("h{h}").into_bytes(),
                        (h != 1).then(|| b"v".to_vec()),
                    )
                })
                .collect(),
        })
        .collect()
}

fn kp_batch(compression: Compression, n: usize) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: 1000,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: i as i32,
            timestamp: 0,
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::from("x".repeat(40))),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    buf.freeze()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");

    let log = corpus.join("log_codec");
    for (i, r) in records(6).iter().enumerate() {
        write(
            &log,
            &format!("record-{i}"),
            &waymark_embedded::format::encode_stored(r.timestamp_ms, r),
        );
    }

    let batches = corpus.join("kafka_records");
    let mut plain = BytesMut::new();
    encode_batch(&mut plain, 0, &records(5));
    write(&batches, "plain", &plain);
    for (name, c) in [
        ("none", Compression::None),
        ("gzip", Compression::Gzip),
        ("snappy", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        write(&batches, &format!("idempotent-{name}"), &kp_batch(c, 4));
    }

    let requests = corpus.join("kafka_request");
    let topic = || TopicName(StrBytes::from_static_str("waymark.inputs"));
    write(
        &requests,
        "api-versions-v3",
        &frame(
            &ApiVersionsRequest::default()
                .with_client_software_name(StrBytes::from_static_str("seed"))
                .with_client_software_version(StrBytes::from_static_str("1")),
            3,
        ),
    );
    write(
        &requests,
        "metadata-v12",
        &frame(&MetadataRequest::default(), 12),
    );
    write(
        &requests,
        "metadata-v1",
        &frame(&MetadataRequest::default(), 1),
    );
    let produce = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(topic())
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(kp_batch(Compression::None, 3)))])]);
    write(&requests, "produce-v9", &frame(&produce, 9));
    write(&requests, "produce-v3", &frame(&produce, 3));
    let fetch = FetchRequest::default()
        .with_max_wait_ms(100)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(topic())
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(0)
                .with_partition_max_bytes(1 << 20)])]);
    write(&requests, "fetch-v12", &frame(&fetch, 12));
    write(
        &requests,
        "list-offsets-v7",
        &frame(&ListOffsetsRequest::default(), 7),
    );
    write(
        &requests,
        "find-coordinator-v4",
        &frame(
            &FindCoordinatorRequest::default()
                .with_coordinator_keys(vec![StrBytes::from_static_str("g")]),
            4,
        ),
    );
    write(
        &requests,
        "join-group-v9",
        &frame(
            &JoinGroupRequest::default()
                .with_group_id(kafka_protocol::messages::GroupId(
                    StrBytes::from_static_str("g"),
                ))
                .with_protocol_type(StrBytes::from_static_str("consumer")),
            9,
        ),
    );
    write(
        &requests,
        "heartbeat-v4",
        &frame(&HeartbeatRequest::default(), 4),
    );
    write(
        &requests,
        "offset-commit-v8",
        &frame(&OffsetCommitRequest::default(), 8),
    );
    println!("seeds written under {}", corpus.display());
}
