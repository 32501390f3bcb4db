//! The baselines' raw clients of a log: what a program that only moves
//! bytes would do with the same log. On the embedded default that is the
//! embedded log's own append and scan (no decoding, no runtime); on Kafka it
//! is a plain rdkafka `FutureProducer` with exactly the settings of
//! Waymark's producer and a plain rdkafka `BaseConsumer` that assigns
//! partitions itself (no group protocol, no commits).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use waymark_embedded::EmbeddedLog;
use waymark_runtime::{ConsumerEvent, Log, OutRecord};

/// Records per read of the embedded scan (the runner's batch size).
const EMBEDDED_READ_BATCH: usize = 10_000;
/// How long a raw Kafka reader may see nothing before it gives up.
const KAFKA_IDLE_LIMIT: Duration = Duration::from_secs(60);

/// A raw client of the log a scenario runs on.
#[derive(Clone)]
pub(crate) enum RawLog {
    Embedded(EmbeddedLog),
    Kafka(RawKafka),
}

/// Plain rdkafka clients of one cluster.
#[derive(Clone)]
pub(crate) struct RawKafka {
    bootstrap: String,
    producer: FutureProducer,
}

/// Records to append: (key, value).
pub(crate) type RawRecords = Vec<(String, Vec<u8>)>;

/// When a record was sent (the first 8 bytes of its value, microseconds
/// since the reader's epoch) and when the reader held it.
pub(crate) type Arrival = (Duration, Duration);

impl RawKafka {
    /// A producer configured exactly as `waymark_kafka::KafkaLog`'s
    /// (idempotent, acks=all, the same linger, batching and compression),
    /// partitioning by key with the Java client's murmur2 as Waymark does.
    pub(crate) fn new(bootstrap: &str) -> anyhow::Result<Self> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap);
        for (key, value) in waymark_kafka::PRODUCER_DEFAULTS
            .iter()
            .chain(waymark_kafka::PRODUCER_FORCED)
        {
            config.set(*key, *value);
        }
        config.set("partitioner", "murmur2_random");
        Ok(Self {
            bootstrap: bootstrap.to_owned(),
            producer: config.create().context("cannot create a raw producer")?,
        })
    }

    fn consumer(&self, group: &str) -> anyhow::Result<BaseConsumer> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .context("cannot create a raw consumer")
    }

    /// A consumer assigned every partition of `topic` from its beginning.
    fn assigned(&self, group: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
        let consumer = self.consumer(group)?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .context("raw consumer: metadata")?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .filter(|n| *n > 0)
            .ok_or_else(|| anyhow!("topic {topic} has no partitions"))?;
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&list)?;
        Ok(consumer)
    }

    /// Polls `topic` until `n` records were read, calling `each` on every
    /// value.
    fn read(
        &self,
        group: &str,
        topic: &str,
        n: u64,
        mut each: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let consumer = self.assigned(group, topic)?;
        let mut records = 0u64;
        let mut idle_since = Instant::now();
        while records < n {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    records += 1;
                    each(message.payload().unwrap_or_default())?;
                    idle_since = Instant::now();
                }
                Some(Err(e)) => bail!("raw consumer of {topic}: {e}"),
                None if idle_since.elapsed() > KAFKA_IDLE_LIMIT => {
                    bail!("raw consumer of {topic} read {records} of {n} records, then nothing for {KAFKA_IDLE_LIMIT:?}")
                }
                None => {}
            }
        }
        Ok(())
    }
}

impl RawLog {
    /// Reads every record of `topic` from the beginning, touching only the
    /// value's length, until `n` were read. Returns (records, value bytes).
    pub(crate) async fn scan(&self, topic: &str, n: u64, tag: &str) -> anyhow::Result<(u64, u64)> {
        match self {
            RawLog::Embedded(log) => {
                let mut consumer = log.subscribe(tag, topic).await?;
                let (mut records, mut bytes) = (0u64, 0u64);
                while records < n {
                    if let ConsumerEvent::Records(batch) =
                        consumer.next(EMBEDDED_READ_BATCH).await?
                    {
                        records += batch.len() as u64;
                        bytes += batch
                            .iter()
                            .map(|r| r.value.as_ref().map_or(0, Vec::len) as u64)
                            .sum::<u64>();
                    }
                }
                Ok((records, bytes))
            }
            RawLog::Kafka(kafka) => {
                let (kafka, topic, tag) = (kafka.clone(), topic.to_owned(), tag.to_owned());
                tokio::task::spawn_blocking(move || {
                    let mut bytes = 0u64;
                    kafka.read(&tag, &topic, n, |value| {
                        bytes += value.len() as u64;
                        Ok(())
                    })?;
                    Ok((n, bytes))
                })
                .await?
            }
        }
    }

    /// Appends `records` (key, value) to `topic` and returns once every one
    /// is durable: one group-committed, fsynced transaction on the embedded
    /// log; acknowledged by all in-sync replicas on Kafka.
    pub(crate) async fn append(&self, topic: &str, records: RawRecords) -> anyhow::Result<()> {
        match self {
            RawLog::Embedded(log) => {
                let records = records
                    .into_iter()
                    .map(|(key, value)| OutRecord::keyed(topic, key, value))
                    .collect();
                log.produce(records).await?;
                Ok(())
            }
            RawLog::Kafka(kafka) => {
                let mut deliveries = Vec::with_capacity(records.len());
                for (key, value) in &records {
                    let mut record: FutureRecord<'_, str, [u8]> =
                        FutureRecord::to(topic).key(key.as_str()).payload(value);
                    loop {
                        match kafka.producer.send_result(record) {
                            Ok(delivery) => break deliveries.push(delivery),
                            Err((
                                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                back,
                            )) => {
                                record = back;
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err((e, _)) => bail!("raw produce to {topic}: {e}"),
                        }
                    }
                }
                for delivery in deliveries {
                    match delivery.await {
                        Ok(Ok(_)) => {}
                        Ok(Err((e, _))) => bail!("raw produce to {topic}: {e}"),
                        Err(_) => bail!("raw producer closed"),
                    }
                }
                Ok(())
            }
        }
    }

    /// Starts a reader of `topic` (from its beginning) that returns, for
    /// each of the `total` records, when it was sent and when it was read.
    pub(crate) async fn arrivals(
        &self,
        topic: &str,
        total: usize,
        epoch: Instant,
    ) -> anyhow::Result<JoinHandle<anyhow::Result<Vec<Arrival>>>> {
        let sent_at = |value: &[u8]| -> anyhow::Result<Duration> {
            let sent: [u8; 8] = value
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| anyhow!("short baseline record"))?;
            Ok(Duration::from_micros(u64::from_le_bytes(sent)))
        };
        match self {
            RawLog::Embedded(log) => {
                let mut consumer = log.subscribe("bench.raw.reader", topic).await?;
                Ok(tokio::spawn(async move {
                    let mut out = Vec::with_capacity(total);
                    while out.len() < total {
                        if let ConsumerEvent::Records(records) = consumer.next(2000).await? {
                            let now = epoch.elapsed();
                            for r in records {
                                out.push((sent_at(r.value.as_deref().unwrap_or_default())?, now));
                            }
                        }
                    }
                    Ok(out)
                }))
            }
            RawLog::Kafka(kafka) => {
                let (kafka, topic) = (kafka.clone(), topic.to_owned());
                // Assign before returning, so the first append is not missed
                // by a reader that is still starting.
                let consumer = kafka.assigned("bench.raw.reader", &topic)?;
                Ok(tokio::task::spawn_blocking(move || {
                    let mut out = Vec::with_capacity(total);
                    let mut idle_since = Instant::now();
                    while out.len() < total {
                        match consumer.poll(Duration::from_millis(100)) {
                            Some(Ok(message)) => {
                                let now = epoch.elapsed();
                                out.push((sent_at(message.payload().unwrap_or_default())?, now));
                                idle_since = Instant::now();
                            }
                            Some(Err(e)) => bail!("raw reader of {topic}: {e}"),
                            None if idle_since.elapsed() > KAFKA_IDLE_LIMIT => {
                                bail!("raw reader of {topic}: nothing for {KAFKA_IDLE_LIMIT:?}")
                            }
                            None => {}
                        }
                    }
                    Ok(out)
                }))
            }
        }
    }
}
