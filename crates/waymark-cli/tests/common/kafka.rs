//! librdkafka clients for the tests of `waymark dev`'s Kafka endpoint: an
//! idempotent producer that counts delivery reports, and a reader that
//! fetches a whole topic back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};

/// Counts acknowledged and failed deliveries.
#[derive(Default, Clone)]
pub struct Acks {
    pub acked: Arc<AtomicU64>,
    pub failed: Arc<Mutex<Vec<String>>>,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => self.failed.lock().unwrap().push(e.to_string()),
        }
    }
}

/// A stock idempotent producer (librdkafka defaults, acks=all), patient
/// enough to ride out a restart of the broker.
pub fn idempotent_producer(bootstrap: &str) -> (BaseProducer<Acks>, Acks) {
    let acks = Acks::default();
    let producer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "120000")
        .set("reconnect.backoff.max.ms", "500")
        .create_with_context(acks.clone())
        .expect("producer");
    (producer, acks)
}

/// Queues every record (waiting while librdkafka's queue is full), then
/// flushes; returns once every record is acknowledged or failed.
pub fn produce_all(producer: &BaseProducer<Acks>, topic: &str, records: &[(String, String)]) {
    for (key, value) in records {
        let mut record = BaseRecord::to(topic).key(key).payload(value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => panic!("cannot queue a record: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(180)).expect("flush");
}

/// Every record of `topic` (all partitions, from the beginning) as
/// `(partition, offset, key, value)`, read through `bootstrap` until `n`
/// records arrived and no more came for a second.
pub fn read_all(bootstrap: &str, topic: &str, n: usize) -> Vec<(i32, i64, Vec<u8>, Vec<u8>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "waymark-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut quiet_since = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push((
                    m.partition(),
                    m.offset(),
                    m.key().unwrap_or_default().to_vec(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
                quiet_since = Instant::now();
            }
            Some(Err(e)) => panic!("fetch failed: {e}"),
            None => {
                if out.len() >= n && quiet_since.elapsed() > Duration::from_secs(1) {
                    return out;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "read {} of {n} records of {topic}",
            out.len()
        );
    }
}

/// The event ids of the JSON values of `records`.
pub fn ids(records: &[(i32, i64, Vec<u8>, Vec<u8>)]) -> Vec<String> {
    records
        .iter()
        .map(|(_, _, _, v)| {
            let v: serde_json::Value = serde_json::from_slice(v).expect("a JSON event");
            v["id"].as_str().expect("an id").to_owned()
        })
        .collect()
}
