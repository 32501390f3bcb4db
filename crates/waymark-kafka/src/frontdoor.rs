//! The Kafka-protocol front door of `waymark dev`.
//!
//! librdkafka's mock cluster speaks the real Kafka protocol (metadata,
//! produce, idempotence, consumer groups), so any Kafka client can produce
//! to it. It is in-memory and keeps only a few MiB per partition, so it is a
//! *door*, not the log: a bridge thread consumes every partition as soon as
//! records arrive and appends them, keyed the same way, to the durable log.
//! The bridge tracks the next offset it expects per partition; if the mock
//! dropped records before they were bridged (the bridge fell more than the
//! mock's buffer behind), the jump is detected and reported loudly: an error
//! log line, the `waymark_frontdoor_lost_records_total` counter and
//! [`FrontDoorStatus`], which the Admin API exposes. Records acknowledged by
//! the door but not yet bridged when the process dies are lost; producers
//! that need no-loss use `Ingest` or a real Kafka cluster.

use std::collections::HashMap;
use std::ffi::CString;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::{error, info, warn};
use waymark_runtime::{Log, OutRecord};

use crate::proxy::Proxy;

/// Metric: records the door lost before they reached the durable log.
pub const LOST_RECORDS: &str = "waymark_frontdoor_lost_records_total";
/// Metric: records moved from the door to the durable log.
pub const BRIDGED_RECORDS: &str = "waymark_frontdoor_bridged_records_total";

/// What the front door has done, for the Admin API and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontDoorStatus {
    /// Records moved into the durable log.
    pub bridged: u64,
    /// Records lost before they could be bridged.
    pub lost: u64,
    /// A description of the last loss, if any.
    pub last_loss: Option<String>,
}

/// Why the front door could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrontDoorError {
    /// librdkafka refused to create the mock cluster, topic or consumer.
    #[error("kafka front door: {0}")]
    Kafka(String),
}

/// A running front door. Dropping it (or [`FrontDoor::stop`]) stops the
/// bridge and the mock cluster.
pub struct FrontDoor {
    bootstrap: String,
    status: Arc<Mutex<FrontDoorStatus>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FrontDoor {
    /// Starts a mock cluster with `topic` (`partitions` partitions) and a
    /// bridge appending what arrives to `topic` of `log`.
    pub fn start(log: Arc<dyn Log>, topic: &str, partitions: u32) -> Result<Self, FrontDoorError> {
        let status = Arc::new(Mutex::new(FrontDoorStatus::default()));
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, String>>();
        let topic_name = topic.to_owned();
        // The mock cluster is not Send: it lives on its own thread.
        let cluster_thread = std::thread::Builder::new()
            .name("waymark-frontdoor".into())
            .spawn(move || {
                // A client that owns a mock cluster of one broker.
                let owner: BaseProducer = match ClientConfig::new()
                    .set("test.mock.num.brokers", "1")
                    .create()
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let started = (|| {
                    let cluster = owner.client().mock_cluster().ok_or("no mock cluster")?;
                    cluster
                        .create_topic(&topic_name, partitions as i32, 1)
                        .map_err(|e| e.to_string())?;
                    let upstream: SocketAddr = cluster
                        .bootstrap_servers()
                        .split(',')
                        .next()
                        .and_then(|a| a.parse().ok())
                        .ok_or("mock cluster has no address")?;
                    let proxy = Proxy::start(upstream).map_err(|e| e.to_string())?;
                    advertise(&owner, proxy.addr())?;
                    Ok::<_, String>(proxy)
                })();
                let proxy = match started {
                    Ok(proxy) => proxy,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(proxy.addr().to_string()));
                // Keep the cluster alive until stopped (or the door dropped).
                let _ = stop_rx.recv();
                drop(proxy);
                drop(owner);
            })
            .map_err(|e| FrontDoorError::Kafka(e.to_string()))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|e| FrontDoorError::Kafka(e.to_string()))?
            .map_err(FrontDoorError::Kafka)?;

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "waymark.frontdoor")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("fetch.wait.max.ms", "5")
            // Read ahead little: what the bridge holds but has not appended is
            // not durable, and a bounded buffer keeps memory flat under lag.
            .set("queued.max.messages.kbytes", "2048")
            .create()
            .map_err(|e| FrontDoorError::Kafka(e.to_string()))?;
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p as i32, Offset::Beginning)
                .map_err(|e| FrontDoorError::Kafka(e.to_string()))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| FrontDoorError::Kafka(e.to_string()))?;
        drop(assignment);

        let (bridge_stop_tx, bridge_stop_rx) = oneshot::channel::<()>();
        let handle = Handle::current();
        let bridge_status = status.clone();
        let bridge_topic = topic.to_owned();
        let bridge = std::thread::Builder::new()
            .name("waymark-frontdoor-bridge".into())
            .spawn(move || {
                bridge_loop(
                    consumer,
                    log,
                    &bridge_topic,
                    handle,
                    bridge_status,
                    bridge_stop_rx,
                )
            })
            .map_err(|e| FrontDoorError::Kafka(e.to_string()))?;
        // The bridge stops when `stop` is dropped or signalled.
        let (stop, stop_relay) = std::sync::mpsc::channel::<()>();
        let relay = std::thread::Builder::new()
            .name("waymark-frontdoor-stop".into())
            .spawn(move || {
                let _ = stop_relay.recv();
                let _ = bridge_stop_tx.send(());
                let _ = bridge.join();
                let _ = stop_tx.send(());
                let _ = cluster_thread.join();
            })
            .map_err(|e| FrontDoorError::Kafka(e.to_string()))?;
        info!(%bootstrap, topic, partitions, "kafka front door listening");
        Ok(Self {
            bootstrap,
            status,
            stop: Some(stop),
            threads: vec![relay],
        })
    }

    /// `host:port` for Kafka clients.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A shared view of the bridge's status.
    pub fn status(&self) -> Arc<Mutex<FrontDoorStatus>> {
        self.status.clone()
    }

    /// Stops the bridge (after its current batch) and the mock cluster.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Makes the mock cluster of `owner` advertise `addr` (the proxy) as its
/// broker address in metadata, so clients never bypass the proxy.
#[allow(unsafe_code)]
fn advertise(owner: &BaseProducer, addr: SocketAddr) -> Result<(), String> {
    let host = CString::new(addr.ip().to_string()).map_err(|e| e.to_string())?;
    // SAFETY: `owner` was created with `test.mock.num.brokers`, so its handle
    // owns a mock cluster that lives as long as `owner`, which outlives this
    // call; librdkafka copies `host` before returning. Broker ids of a mock
    // cluster start at 1.
    unsafe {
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
        if cluster.is_null() {
            return Err("the client has no mock cluster".into());
        }
        rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
            cluster,
            1,
            host.as_ptr(),
            i32::from(addr.port()),
        );
    }
    Ok(())
}

const BRIDGE_BATCH: usize = 1000;
const BRIDGE_LINGER: Duration = Duration::from_millis(2);

fn bridge_loop(
    consumer: BaseConsumer,
    log: Arc<dyn Log>,
    topic: &str,
    handle: Handle,
    status: Arc<Mutex<FrontDoorStatus>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut expected: HashMap<i32, i64> = HashMap::new();
    loop {
        if !matches!(stop.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
            break;
        }
        let mut batch = Vec::new();
        let deadline = Instant::now() + BRIDGE_LINGER;
        let mut wait = Duration::from_millis(100);
        while batch.len() < BRIDGE_BATCH {
            match consumer.poll(wait) {
                Some(Ok(message)) => {
                    let partition = message.partition();
                    let offset = message.offset();
                    let want = expected.get(&partition).copied().unwrap_or(0);
                    if offset > want {
                        report_loss(&status, topic, partition, want, offset);
                    }
                    expected.insert(partition, offset + 1);
                    let headers = message
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| {
                                    (
                                        h.key.to_owned(),
                                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    batch.push(OutRecord {
                        topic: topic.to_owned(),
                        partition: None,
                        key: message.key().map(<[u8]>::to_vec),
                        value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        headers,
                    });
                    wait = deadline.saturating_duration_since(Instant::now());
                    if wait.is_zero() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "front door consumer error");
                    break;
                }
                None => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        // Appending retries until it succeeds: the door must not drop what it took.
        let mut delay = Duration::from_millis(50);
        loop {
            match handle.block_on(log.produce(batch.clone())) {
                Ok(_) => break,
                Err(e) => {
                    error!(error = %e, "front door could not append to the durable log; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        metrics::counter!(BRIDGED_RECORDS).increment(n);
        if let Ok(mut s) = status.lock() {
            s.bridged += n;
        }
    }
}

fn report_loss(status: &Mutex<FrontDoorStatus>, topic: &str, partition: i32, want: i64, got: i64) {
    let lost = (got - want) as u64;
    let what = format!(
        "kafka front door lost {lost} records of {topic} partition {partition} (offsets {want}..{got}) before they reached the durable log"
    );
    error!(topic, partition, lost, "{what}");
    metrics::counter!(LOST_RECORDS).increment(lost);
    if let Ok(mut s) = status.lock() {
        s.lost += lost;
        s.last_loss = Some(what);
    }
}
