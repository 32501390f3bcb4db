//! `waymark publish`: validates JSON-lines events and publishes them
//! through `Ingest` (lossless, default) or straight to Kafka.

use std::time::Duration;

use anyhow::{anyhow, Context};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use waymark_core::Rejection;
use waymark_proto::v1 as pb;
use waymark_proto::v1::ingest_client::IngestClient;
use waymark_proto::v1::publish_result::Outcome;
use waymark_schemas::Validator;

use crate::connect::{connect, Endpoint};

/// Events per `Publish` call.
const CHUNK_EVENTS: usize = 500;
/// Bytes per `Publish` call, about.
const CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// Where events go.
#[derive(Debug, Clone)]
pub enum Target {
    /// The gRPC `Ingest` service.
    Grpc(Endpoint),
    /// A Kafka cluster's `waymark.inputs` (or another topic).
    Kafka {
        /// Bootstrap servers.
        bootstrap: String,
        /// Topic.
        topic: String,
        /// librdkafka properties (TLS, SASL), applied before the
        /// producer's guarantees (idempotence, `acks=all`).
        properties: Vec<(String, String)>,
    },
}

/// What happened to the input.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishReport {
    /// Events accepted.
    pub accepted: usize,
    /// Rejected lines: (1-based line number, kind, message).
    pub rejected: Vec<(usize, String, String)>,
}

/// Validates and publishes the lines of `input` (blank lines are skipped).
pub async fn publish(input: &str, target: &Target) -> anyhow::Result<PublishReport> {
    let validator = Validator::new()?;
    let mut report = PublishReport::default();
    let mut valid: Vec<(usize, String, String)> = Vec::new(); // (line, key, event)
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match validator.decode(text.as_bytes()) {
            Ok(event) => valid.push((line_no, waymark_server::record_key(&event), text.to_owned())),
            Err(Rejection { kind, message }) => {
                report.rejected.push((line_no, kind.to_string(), message))
            }
        }
    }
    match target {
        Target::Grpc(endpoint) => publish_grpc(endpoint, valid, &mut report).await?,
        Target::Kafka {
            bootstrap,
            topic,
            properties,
        } => publish_kafka(bootstrap, topic, properties, valid, &mut report).await?,
    }
    report.rejected.sort_by_key(|r| r.0);
    Ok(report)
}

async fn publish_grpc(
    endpoint: &Endpoint,
    valid: Vec<(usize, String, String)>,
    report: &mut PublishReport,
) -> anyhow::Result<()> {
    let mut client = IngestClient::new(connect(endpoint).await?)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let mut rest = valid.as_slice();
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len()
            && n < CHUNK_EVENTS
            && (n == 0 || bytes + rest[n].2.len() <= CHUNK_BYTES)
        {
            bytes += rest[n].2.len();
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let request = pb::PublishRequest {
            events: chunk.iter().map(|(_, _, e)| e.clone()).collect(),
        };
        let response = client
            .publish(request)
            .await
            .map_err(|s| anyhow!("publish failed: {}: {}", s.code(), s.message()))?
            .into_inner();
        for ((line, _, _), result) in chunk.iter().zip(response.results) {
            match result.outcome {
                Some(Outcome::Accepted(_)) => report.accepted += 1,
                Some(Outcome::Rejected(r)) => report.rejected.push((*line, r.error, r.message)),
                None => report.rejected.push((
                    *line,
                    "unknown".into(),
                    "no outcome in the answer".into(),
                )),
            }
        }
    }
    Ok(())
}

async fn publish_kafka(
    bootstrap: &str,
    topic: &str,
    properties: &[(String, String)],
    valid: Vec<(usize, String, String)>,
    report: &mut PublishReport,
) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    for (key, value) in properties {
        config.set(key, value);
    }
    let producer: FutureProducer = config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("cannot create the kafka producer")?;
    let mut pending = Vec::with_capacity(valid.len());
    for (line, key, event) in &valid {
        let record = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(event.as_bytes());
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow!("line {line}: cannot enqueue: {e}"))?;
        pending.push((*line, delivery));
    }
    for (line, delivery) in pending {
        match tokio::time::timeout(Duration::from_secs(60), delivery).await {
            Ok(Ok(Ok(_))) => report.accepted += 1,
            Ok(Ok(Err((e, _)))) => {
                return Err(anyhow!("line {line}: kafka refused the event: {e}"))
            }
            Ok(Err(_)) => return Err(anyhow!("line {line}: the producer was dropped")),
            Err(_) => {
                return Err(anyhow!(
                    "line {line}: no acknowledgement from kafka within 60s"
                ))
            }
        }
    }
    Ok(())
}
