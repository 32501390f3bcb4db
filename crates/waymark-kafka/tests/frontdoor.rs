//! The Kafka-protocol front door of `waymark dev`: records produced by a
//! Kafka client reach the durable log in order, and a loss inside the
//! in-memory door (the bridge fell more than its buffer behind) is detected
//! and reported, never silent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Semaphore;
use waymark_embedded::EmbeddedLog;
use waymark_kafka::FrontDoor;
use waymark_runtime::log::LogConsumer;
use waymark_runtime::{Appended, Log, LogError, OutRecord, Record, TopicConfig};

const TOPIC: &str = "waymark.inputs";

/// A log whose appends wait until the test opens the gate.
struct GatedLog {
    inner: EmbeddedLog,
    gate: Arc<Semaphore>,
}

#[async_trait]
impl Log for GatedLog {
    async fn ensure_topics(&self, topics: &[TopicConfig]) -> Result<(), LogError> {
        self.inner.ensure_topics(topics).await
    }
    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.inner.partitions(topic).await
    }
    async fn produce(&self, records: Vec<OutRecord>) -> Result<Vec<Appended>, LogError> {
        let _permit = self.gate.acquire().await.map_err(|_| LogError::Closed)?;
        self.inner.produce(records).await
    }
    async fn subscribe(&self, group: &str, topic: &str) -> Result<Box<dyn LogConsumer>, LogError> {
        self.inner.subscribe(group, topic).await
    }
    async fn watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64), LogError> {
        self.inner.watermarks(topic, partition).await
    }
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        self.inner.read(topic, partition, from, max).await
    }
}

async fn setup(open: bool) -> (tempfile::TempDir, EmbeddedLog, Arc<Semaphore>, FrontDoor) {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log.redb")).unwrap();
    log.ensure_topics(&[TopicConfig {
        name: TOPIC.into(),
        partitions: 1,
        retention: None,
        compaction: false,
    }])
    .await
    .unwrap();
    let gate = Arc::new(Semaphore::new(if open {
        Semaphore::MAX_PERMITS
    } else {
        0
    }));
    let gated: Arc<dyn Log> = Arc::new(GatedLog {
        inner: log.clone(),
        gate: gate.clone(),
    });
    let door = tokio::task::spawn_blocking(move || FrontDoor::start(gated, TOPIC, 1))
        .await
        .unwrap()
        .unwrap();
    (dir, log, gate, door)
}

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_the_durable_log_in_order() {
    let (_dir, log, _gate, door) = setup(true).await;
    let p = producer(door.bootstrap());
    for i in 0..200 {
        let key = format!("k{}", i % 7);
        p.send(
            FutureRecord::to(TOPIC).key(&key).payload(&format!("v{i}")),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    }
    let status = door.status();
    wait_for("200 bridged", || status.lock().unwrap().bridged == 200).await;
    let records = log.read(TOPIC, 0, 0, 1000).await.unwrap();
    let values: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap()).unwrap())
        .collect();
    let expected: Vec<String> = (0..200).map(|i| format!("v{i}")).collect();
    assert_eq!(values, expected);
    assert_eq!(status.lock().unwrap().lost, 0);
    tokio::task::spawn_blocking(move || door.stop())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_dropped_by_the_door_are_detected_and_reported() {
    // The durable log is "slow" (gate closed): the bridge falls behind while
    // a client produces far more than the door keeps per partition.
    let (_dir, log, gate, door) = setup(false).await;
    let p = producer(door.bootstrap());
    let payload = vec![b'x'; 100 * 1024];
    let sent = 160; // 16 MiB, well past the door's few MiB per partition
    for i in 0..sent {
        p.send(
            FutureRecord::to(TOPIC).key("k").payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap_or_else(|e| panic!("record {i}: {e}"));
    }
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    let status = door.status();
    wait_for("the loss to be reported", || {
        status.lock().unwrap().lost > 0
    })
    .await;
    wait_for("the bridge to reach the end", || {
        let s = status.lock().unwrap();
        s.bridged + s.lost == sent
    })
    .await;
    let s = status.lock().unwrap().clone();
    assert!(
        s.last_loss.as_deref().unwrap_or_default().contains("lost"),
        "{s:?}"
    );
    let (_, high) = log.watermarks(TOPIC, 0).await.unwrap();
    assert_eq!(
        high, s.bridged,
        "everything the door still had reached the log"
    );
    tokio::task::spawn_blocking(move || door.stop())
        .await
        .unwrap();
}
