//! S6: `waymark dev`'s Kafka endpoint (`waymark_broker`, served on the
//! durable embedded log) with librdkafka as the client, in one process with
//! nothing else running.
//!
//! - **Produce**: a librdkafka producer (rdkafka's `ThreadedProducer`, a
//!   `BaseProducer` with a delivery callback) with Waymark's producer
//!   settings (`waymark_kafka::PRODUCER_DEFAULTS` + `PRODUCER_FORCED`:
//!   idempotent, acks=all, 5 ms linger, at most 5 requests in flight) but
//!   without compression, sends N events of the benchmark mix, keyed by
//!   source as on `waymark.inputs`, to a [`Broker`] on 127.0.0.1:0 and
//!   waits for every delivery report (each is sent only once its records
//!   are fsynced). Baseline: the same bytes with the same keys appended
//!   with `EmbeddedLog::produce` to a fresh log of the same topology, in
//!   chunks of the mean batch librdkafka sent (produce requests counted by
//!   the broker's metrics), 5 appends in flight as librdkafka's 5 requests.
//!   Diagnostics (each on a fresh log, in `details`): the baseline at one
//!   append in flight (what an idempotent librdkafka producer really keeps
//!   per partition), the produce with Waymark's settings as shipped (zstd),
//!   and the produce with `enable.idempotence=false` (acks=all, up to 5
//!   requests in flight).
//! - **Fetch**: a librdkafka `BaseConsumer` (consumer defaults, every
//!   partition assigned from the beginning, no group protocol) reads the N
//!   records back through the broker. Baseline: `EmbeddedLog::read_stored`
//!   of the same log from offset 0 in reads of 1 MiB, the consumer's
//!   `max.partition.fetch.bytes` and what the broker asks of the log per
//!   fetch.
//! - With `--real`: the same producer and consumer against Apache Kafka
//!   (a fresh topic with the partitions of `waymark dev`'s inputs, deleted
//!   afterwards); ratio = endpoint rate / Kafka rate.
//!
//! Every loop is bounded by a count and a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use waymark_bench::measure::{processes_cpu_secs, CpuTime};
use waymark_bench::mix::{Mix, RawEvent};
use waymark_broker::{Broker, BrokerConfig};
use waymark_cli::platform;
use waymark_embedded::EmbeddedLog;
use waymark_kafka::{KafkaConfig, KafkaLog};
use waymark_runtime::{Log, OutRecord, TopicConfig};

use crate::common;
use crate::report::{round, Baseline, Scenario};
use crate::Options;

/// Appends in flight in the baseline: librdkafka's
/// `max.in.flight.requests.per.connection` in `PRODUCER_FORCED`. (An
/// idempotent librdkafka producer in fact sends one produce request per
/// partition at a time, whatever that setting says: it allows
/// `RD_KAFKA_IDEMP_MAX_INFLIGHT` (5) minus the partition's *messages* in
/// flight, see confluentinc/librdkafka#4989; a diagnostic baseline at one
/// append in flight shows that case.)
const IN_FLIGHT: usize = 5;
/// Bytes per read of the raw scan: librdkafka's default
/// `max.partition.fetch.bytes`, which the broker passes to the log.
const READ_BYTES: usize = 1024 * 1024;
/// Longest any phase (produce, wait for acks, fetch, scan) may take.
const PHASE_LIMIT: Duration = Duration::from_secs(900);
/// How long a client may see no progress before it gives up.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// The produce scenario's target (as S4's: the endpoint may cost 20 % of
/// the raw append).
const PRODUCE_TARGET: f64 = 0.8;
/// Against Apache Kafka: one process with no JVM should not be slower than
/// Kafka on the same two cores.
const KAFKA_TARGET: f64 = 1.0;

/// Delivery reports seen by a producer.
#[derive(Default)]
struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct AckContext(Arc<Acks>);

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.0.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

/// One side's wall and CPU time over `events` records of `bytes` (keys +
/// values).
#[derive(Debug, Clone, Copy)]
struct Run {
    wall: f64,
    cpu: CpuTime,
    events: u64,
    bytes: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.events as f64 / self.wall
    }

    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.wall
    }

    fn json(&self) -> Value {
        json!({
            "events_per_s": round(self.rate(), 0),
            "mb_per_s": round(self.mb_per_s(), 2),
            "wall_s": round(self.wall, 3),
            "cpu_user_s": round(self.cpu.user.as_secs_f64(), 3),
            "cpu_system_s": round(self.cpu.system.as_secs_f64(), 3),
            "events_per_cpu_s": round(self.events as f64 / self.cpu.total_secs().max(1e-9), 0),
        })
    }
}

/// The scenario's producer settings: Waymark's, without compression (the
/// baseline appends uncompressed bytes).
const SCENARIO: &[(&str, &str)] = &[("compression.type", "none")];
/// Diagnostic: Waymark's settings exactly as shipped (zstd).
const AS_SHIPPED: &[(&str, &str)] = &[];
/// Diagnostic: not idempotent (acks=all still), so that librdkafka keeps up
/// to 5 requests in flight.
const NOT_IDEMPOTENT: &[(&str, &str)] = &[
    ("compression.type", "none"),
    ("enable.idempotence", "false"),
];

/// Waymark's producer settings with `overrides`.
fn producer_settings(
    overrides: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    let mut settings: Vec<(&str, &str)> = waymark_kafka::PRODUCER_DEFAULTS
        .iter()
        .chain(waymark_kafka::PRODUCER_FORCED)
        .copied()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
        .collect();
    settings.extend_from_slice(overrides);
    // Waymark's partitioning (the Java client's murmur2 of the key).
    settings.push(("partitioner", "murmur2_random"));
    settings
}

fn bytes_of(raws: &[RawEvent]) -> u64 {
    raws.iter()
        .map(|r| (r.key.len() + r.json.len()) as u64)
        .sum()
}

/// Sends every event to `topic` with a librdkafka producer and waits for
/// every delivery report. The clock starts once the producer has the
/// topic's metadata (connected).
///
/// The producer is rdkafka's `ThreadedProducer` (a `BaseProducer` whose
/// own thread serves the delivery callbacks), and this thread sleeps while
/// it waits: `BaseProducer::poll` with a timeout spins through its last
/// millisecond (librdkafka takes whole milliseconds), so polling it in a
/// loop here would burn a core the broker needs.
fn produce_blocking(
    bootstrap: &str,
    topic: &str,
    raws: &[RawEvent],
    settings: &[(&str, &str)],
) -> anyhow::Result<Run> {
    let acks = Arc::new(Acks::default());
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (key, value) in settings {
        config.set(*key, *value);
    }
    let producer: ThreadedProducer<AckContext> = config
        .create_with_context(AckContext(acks.clone()))
        .context("cannot create the producer")?;
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("producer: metadata of {topic} at {bootstrap}"))?;
    let n = raws.len() as u64;
    let cpu = CpuTime::now();
    let t = Instant::now();
    let deadline = t + PHASE_LIMIT;
    for r in raws.iter() {
        let mut record: BaseRecord<'_, str, str> = BaseRecord::to(topic)
            .key(r.key.as_str())
            .payload(r.json.as_str());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() > deadline {
                        bail!("producer to {topic}: queue still full after {PHASE_LIMIT:?}");
                    }
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("producer to {topic}: {e}"),
            }
        }
    }
    let (mut seen, mut progress) = (0u64, Instant::now());
    loop {
        let done = acks.ok.load(Ordering::Relaxed) + acks.failed.load(Ordering::Relaxed);
        if done >= n {
            break;
        }
        if done > seen {
            (seen, progress) = (done, Instant::now());
        }
        if progress.elapsed() > IDLE_LIMIT || Instant::now() > deadline {
            bail!(
                "producer to {topic}: {done} of {n} delivery reports, then none for {IDLE_LIMIT:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = CpuTime::now().since(&cpu);
    let failed = acks.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = acks.first_error.lock().ok().and_then(|e| e.clone());
        bail!("producer to {topic}: {failed} of {n} records failed, first: {first:?}");
    }
    producer.flush(Duration::from_secs(10))?;
    Ok(Run {
        wall,
        cpu,
        events: n,
        bytes: bytes_of(raws),
    })
}

/// Reads `n` records of `topic` from the beginning with a librdkafka
/// `BaseConsumer` that assigns every partition itself (no subscribe, no
/// commits). The clock starts at `assign`.
fn fetch_blocking(bootstrap: &str, topic: &str, n: u64, group: &str) -> anyhow::Result<Run> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("cannot create the consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("consumer: metadata of {topic} at {bootstrap}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .filter(|p| *p > 0)
        .ok_or_else(|| anyhow!("topic {topic} has no partitions"))?;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p as i32, Offset::Beginning)?;
    }
    let cpu = CpuTime::now();
    let t = Instant::now();
    let deadline = t + PHASE_LIMIT;
    consumer.assign(&list)?;
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut progress = Instant::now();
    while records < n {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                records += 1;
                bytes += (m.key_len() + m.payload_len()) as u64;
                progress = Instant::now();
            }
            Some(Err(e)) => bail!("consumer of {topic}: {e}"),
            None => {}
        }
        if progress.elapsed() > IDLE_LIMIT || Instant::now() > deadline {
            bail!("consumer of {topic}: {records} of {n} records, then none for {IDLE_LIMIT:?}");
        }
    }
    Ok(Run {
        wall: t.elapsed().as_secs_f64(),
        cpu: CpuTime::now().since(&cpu),
        events: records,
        bytes,
    })
}

async fn produce(
    bootstrap: String,
    topic: &str,
    raws: &Arc<Vec<RawEvent>>,
    overrides: &'static [(&'static str, &'static str)],
) -> anyhow::Result<Run> {
    let (topic, raws) = (topic.to_owned(), raws.clone());
    tokio::task::spawn_blocking(move || {
        produce_blocking(&bootstrap, &topic, &raws, &producer_settings(overrides))
    })
    .await?
}

/// A diagnostic produce with `overrides` through a broker on a fresh log.
async fn diagnostic_produce(
    o: &Options,
    name: &str,
    inputs: &str,
    raws: &Arc<Vec<RawEvent>>,
    overrides: &'static [(&'static str, &'static str)],
) -> anyhow::Result<Run> {
    let log = fresh_log(o, name).await?;
    let broker = start_broker(&log, inputs).await?;
    let run = produce(broker.addr().to_string(), inputs, raws, overrides).await;
    broker.stop().await;
    let high = stored(&log, inputs).await;
    log.close();
    let (run, high) = (run?, high?);
    if high != run.events {
        bail!(
            "the {name} run's log holds {high} records, expected {}",
            run.events
        );
    }
    Ok(run)
}

async fn fetch(bootstrap: String, topic: &str, n: u64, group: &str) -> anyhow::Result<Run> {
    let (topic, group) = (topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || fetch_blocking(&bootstrap, &topic, n, &group)).await?
}

/// A fresh embedded log under `work/s6/<name>` with `waymark dev`'s topics.
async fn fresh_log(o: &Options, name: &str) -> anyhow::Result<EmbeddedLog> {
    let dir = o.work.join("s6").join(name);
    common::fresh_dir(&dir)?;
    let log = EmbeddedLog::open(&dir.join("log.redb"))?;
    log.ensure_topics(&platform::topic_configs(&common::dev_topology()?))
        .await?;
    Ok(log)
}

async fn start_broker(log: &EmbeddedLog, inputs: &str) -> anyhow::Result<Broker> {
    Ok(Broker::start(
        log.clone(),
        BrokerConfig::new("127.0.0.1:0".parse()?).writable(inputs),
    )
    .await?)
}

/// Records in `topic` of `log` (sum of high watermarks).
async fn stored(log: &EmbeddedLog, topic: &str) -> anyhow::Result<u64> {
    Ok(common::highs(log, topic).await?.iter().sum())
}

/// `name{label="value"}` of the in-process Prometheus recorder (0 when
/// absent). Summaries' `_sum` and `_count` work too.
fn metric(name: &str, label: &str, value: &str) -> f64 {
    let text = waymark_cli::metrics_http::recorder()
        .map(|h| h.render())
        .unwrap_or_default();
    let series = format!("{name}{{{label}=\"{value}\"}} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&series))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// Produce (or fetch) requests the broker has answered so far, and the
/// seconds they took in all.
fn requests(api: &str) -> (f64, f64) {
    (
        metric(waymark_broker::REQUESTS, "api", api),
        metric(
            &format!("{}_sum", waymark_broker::REQUEST_SECONDS),
            "api",
            api,
        ),
    )
}

/// The baseline: `chunks` appended with `EmbeddedLog::produce` (the
/// runtime's `Log`), `in_flight` at a time; each answered once fsynced.
async fn raw_append(
    log: &EmbeddedLog,
    chunks: Vec<Vec<OutRecord>>,
    bytes: u64,
    in_flight: usize,
) -> anyhow::Result<Run> {
    let events: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let queue = Arc::new(Mutex::new(chunks.into_iter()));
    let cpu = CpuTime::now();
    let t = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..in_flight {
        let (log, queue) = (log.clone(), queue.clone());
        set.spawn(async move {
            loop {
                let next = queue.lock().map_err(|_| anyhow!("poisoned"))?.next();
                let Some(chunk) = next else {
                    return Ok::<_, anyhow::Error>(());
                };
                log.produce(chunk).await?;
            }
        });
    }
    let all = tokio::time::timeout(PHASE_LIMIT, async {
        while let Some(done) = set.join_next().await {
            done??;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match all {
        Ok(result) => result?,
        Err(_) => bail!("raw appends took longer than {PHASE_LIMIT:?}"),
    }
    Ok(Run {
        wall: t.elapsed().as_secs_f64(),
        cpu: CpuTime::now().since(&cpu),
        events,
        bytes,
    })
}

/// The baseline of the fetch: every partition of `topic` read from offset 0
/// with `read_stored`, `READ_BYTES` per read, keys and values counted.
async fn raw_scan(log: &EmbeddedLog, topic: &str, n: u64) -> anyhow::Result<Run> {
    let partitions = log
        .partition_count(topic)
        .ok_or_else(|| anyhow!("no topic {topic}"))?;
    let cpu = CpuTime::now();
    let t = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    for p in 0..partitions {
        let (low, high) = log.offsets(topic, p)?;
        let mut from = low;
        while from < high {
            if t.elapsed() > PHASE_LIMIT {
                bail!("raw scan of {topic} took longer than {PHASE_LIMIT:?}");
            }
            let batch = log.read_stored(topic, p, from, READ_BYTES).await?;
            let Some((last, _)) = batch.last() else {
                bail!("raw scan of {topic}/{p}: nothing at {from} below {high}");
            };
            from = last + 1;
            records += batch.len() as u64;
            bytes += batch
                .iter()
                .map(|(_, r)| {
                    (r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len))
                        as u64
                })
                .sum::<u64>();
        }
    }
    if records != n {
        bail!("raw scan of {topic}: {records} records, expected {n}");
    }
    Ok(Run {
        wall: t.elapsed().as_secs_f64(),
        cpu: CpuTime::now().since(&cpu),
        events: records,
        bytes,
    })
}

/// The same produce and fetch against Apache Kafka at `bootstrap`, on a
/// fresh topic with `partitions` partitions that is deleted afterwards.
/// Returns (produce, fetch, JVM CPU seconds of each).
async fn on_kafka(
    bootstrap: &str,
    partitions: u32,
    raws: &Arc<Vec<RawEvent>>,
) -> anyhow::Result<(Run, Run, f64, f64)> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let id = format!("bench{}s6x{:x}", std::process::id(), nanos % 0xffff_ffff);
    let topic = format!("{id}.inputs");
    let log = KafkaLog::new(KafkaConfig::new(bootstrap)).map_err(|e| anyhow!("{e}"))?;
    log.ensure_topics(&[TopicConfig {
        name: topic.clone(),
        partitions,
        retention: None,
        compaction: false,
    }])
    .await
    .with_context(|| format!("kafka at {bootstrap}"))?;
    let result = async {
        let n = raws.len() as u64;
        let jvm = processes_cpu_secs("java");
        let produced = produce(bootstrap.to_owned(), &topic, raws, SCENARIO).await?;
        let produce_jvm = processes_cpu_secs("java") - jvm;
        let jvm = processes_cpu_secs("java");
        let fetched = fetch(bootstrap.to_owned(), &topic, n, &format!("{id}.reader")).await?;
        let fetch_jvm = processes_cpu_secs("java") - jvm;
        Ok::<_, anyhow::Error>((produced, fetched, produce_jvm, fetch_jvm))
    }
    .await;
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    admin
        .delete_topics(&[topic.as_str()], &AdminOptions::new())
        .await
        .with_context(|| format!("cannot delete {topic}"))?;
    result
}

pub(crate) async fn run(o: &Options, kafka: Option<&str>) -> anyhow::Result<Vec<Scenario>> {
    let n = o.s6_events.max(1);
    let topology = common::dev_topology()?;
    let inputs = topology.topics.inputs.name.clone();
    let partitions = topology.topics.inputs.partitions;
    // The broker's request counters live in the in-process recorder.
    if waymark_cli::metrics_http::recorder().is_none() {
        bail!("S6 needs the in-process metrics recorder, and another one is installed");
    }

    let mix = Mix::new("s6", (n / 10).max(1));
    let raws: Arc<Vec<RawEvent>> = Arc::new((0..n).map(|i| mix.raw(i)).collect());
    let bytes = bytes_of(&raws);
    let value_bytes: u64 = raws.iter().map(|r| r.json.len() as u64).sum();

    // Produce through the broker.
    let log = fresh_log(o, "broker").await?;
    let broker = start_broker(&log, &inputs).await?;
    let bootstrap = broker.addr().to_string();
    let (requests_before, seconds_before) = requests("Produce");
    let produced = produce(bootstrap.clone(), &inputs, &raws, SCENARIO).await?;
    let (requests_after, seconds_after) = requests("Produce");
    let produce_requests = requests_after - requests_before;
    let mean_request_ms = (seconds_after - seconds_before) * 1e3 / produce_requests.max(1.0);
    let mean_in_flight = (seconds_after - seconds_before) / produced.wall;
    let high = stored(&log, &inputs).await?;
    if high != n {
        bail!("the broker's log holds {high} records, expected {n}");
    }
    if produce_requests < 1.0 {
        bail!("the broker counted no produce requests");
    }
    let chunk = ((n as f64 / produce_requests).round() as usize).max(1);
    eprintln!(
        "   produce via the endpoint: {:.0} events/s ({:.0} produce requests, {chunk} records each)",
        produced.rate(),
        produce_requests
    );

    // Baseline: raw durable appends of the same bytes and keys to a fresh
    // log, in chunks of librdkafka's mean batch.
    let chunks = || -> Vec<Vec<OutRecord>> {
        raws.chunks(chunk)
            .map(|c| {
                c.iter()
                    .map(|r| {
                        OutRecord::keyed(&inputs, r.key.as_bytes(), r.json.as_bytes().to_vec())
                    })
                    .collect()
            })
            .collect()
    };
    let mut raw_runs = Vec::new();
    for (name, in_flight) in [("raw", IN_FLIGHT), ("raw1", 1)] {
        let raw_log = fresh_log(o, name).await?;
        let run = raw_append(&raw_log, chunks(), bytes, in_flight).await?;
        let raw_high = stored(&raw_log, &inputs).await?;
        raw_log.close();
        if raw_high != n {
            bail!("the baseline's log holds {raw_high} records, expected {n}");
        }
        raw_runs.push(run);
    }
    let (appended, appended_one) = (raw_runs[0], raw_runs[1]);
    eprintln!(
        "   raw durable append: {:.0} events/s ({IN_FLIGHT} in flight), {:.0} events/s (1 in flight)",
        appended.rate(),
        appended_one.rate()
    );

    // Fetch through the broker, then the raw scan of the same log.
    let (fetches_before, fetch_seconds_before) = requests("Fetch");
    let fetched = fetch(bootstrap.clone(), &inputs, n, "bench.s6.reader").await?;
    let (fetches_after, fetch_seconds_after) = requests("Fetch");
    let fetch_requests = fetches_after - fetches_before;
    if fetched.bytes != bytes {
        bail!(
            "fetched {} bytes of keys and values, produced {bytes}",
            fetched.bytes
        );
    }
    let scanned = raw_scan(&log, &inputs, n).await?;
    eprintln!(
        "   fetch via the endpoint: {:.0} events/s vs raw scan {:.0} events/s",
        fetched.rate(),
        scanned.rate()
    );
    broker.stop().await;
    log.close();

    // Diagnostics: Waymark's producer settings as shipped (zstd), and a
    // producer that is not idempotent (up to 5 requests in flight).
    let zstd = diagnostic_produce(o, "zstd", &inputs, &raws, AS_SHIPPED).await?;
    let (plain_before, plain_seconds_before) = requests("Produce");
    let plain = diagnostic_produce(o, "plain", &inputs, &raws, NOT_IDEMPOTENT).await?;
    let (plain_after, plain_seconds_after) = requests("Produce");
    let plain_requests = plain_after - plain_before;
    let plain_in_flight = (plain_seconds_after - plain_seconds_before) / plain.wall;

    let settings: Value = producer_settings(SCENARIO)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::from(v)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let common_details = json!({
        "mode": o.mode(),
        "events": n,
        "mean_event_bytes": value_bytes / n,
        "mean_key_bytes": (bytes - value_bytes) / n,
        "mb_means": "10^6 bytes of keys + values",
        "inputs_partitions": partitions,
        "client_in_process": true,
    });
    let produce_ratio = produced.rate() / appended.rate();
    let mut produce_details = common_details.clone();
    if let Some(d) = produce_details.as_object_mut() {
        d.extend(
            json!({
                "producer_settings": settings,
                "durability": "acks=all answered after the fsynced group commit; baseline: fsync per group commit (redb Durability::Immediate)",
                "endpoint": produced.json(),
                "produce_requests": produce_requests,
                "mean_records_per_request": round(n as f64 / produce_requests, 1),
                "mean_request_ms_in_broker": round(mean_request_ms, 2),
                "baseline": appended.json(),
                "baseline_chunk_records": chunk,
                "baseline_appends_in_flight": IN_FLIGHT,
                "mean_requests_in_flight_at_broker": round(mean_in_flight, 2),
                "diagnostic_baseline_one_append_in_flight": {
                    "what": "the same raw appends, one at a time: what an idempotent librdkafka producer does per partition (librdkafka#4989)",
                    "run": appended_one.json(),
                    "ratio": round(produced.rate() / appended_one.rate(), 4),
                },
                "diagnostic_waymark_producer_settings_as_shipped_zstd": {
                    "what": "the same produce with compression.type=zstd (PRODUCER_DEFAULTS unchanged) to a fresh log",
                    "run": zstd.json(),
                    "ratio_to_baseline": round(zstd.rate() / appended.rate(), 4),
                },
                "diagnostic_not_idempotent": {
                    "what": "the same produce with enable.idempotence=false (acks=all, uncompressed) to a fresh log: librdkafka then keeps up to 5 requests in flight",
                    "run": plain.json(),
                    "ratio_to_baseline": round(plain.rate() / appended.rate(), 4),
                    "produce_requests": plain_requests,
                    "mean_requests_in_flight_at_broker": round(plain_in_flight, 2),
                },
                "target": format!("ratio >= {PRODUCE_TARGET}"),
                "target_met": produce_ratio >= PRODUCE_TARGET,
            })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        );
    }
    let fetch_ratio = fetched.rate() / scanned.rate();
    let mut fetch_details = common_details.clone();
    if let Some(d) = fetch_details.as_object_mut() {
        d.extend(
            json!({
                "consumer": "librdkafka defaults, every partition assigned from the beginning, no group protocol",
                "endpoint": fetched.json(),
                "fetch_requests": fetch_requests,
                "mean_records_per_fetch": round(n as f64 / fetch_requests.max(1.0), 1),
                "mean_fetch_ms_in_broker": round((fetch_seconds_after - fetch_seconds_before) * 1e3 / fetch_requests.max(1.0), 2),
                "baseline": scanned.json(),
                "baseline_read_bytes": READ_BYTES,
            })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        );
    }
    let mut scenarios = vec![
        Scenario {
            id: "S6".into(),
            name: "Kafka produce (librdkafka, idempotent, acks=all) to waymark dev's endpoint"
                .into(),
            engine: crate::engines::EMBEDDED.into(),
            value: round(produced.rate(), 0),
            unit: "events/s".into(),
            baseline: Some(Baseline {
                name: "raw durable append of the same bytes and keys (EmbeddedLog::produce)".into(),
                value: round(appended.rate(), 0),
                unit: "events/s".into(),
            }),
            ratio: Some(round(produce_ratio, 4)),
            details: produce_details,
        },
        Scenario {
            id: "S6".into(),
            name: "Kafka fetch (librdkafka BaseConsumer, assigned) from waymark dev's endpoint"
                .into(),
            engine: crate::engines::EMBEDDED.into(),
            value: round(fetched.rate(), 0),
            unit: "events/s".into(),
            baseline: Some(Baseline {
                name: "raw scan of the same log (EmbeddedLog::read_stored, 1 MiB reads)".into(),
                value: round(scanned.rate(), 0),
                unit: "events/s".into(),
            }),
            ratio: Some(round(fetch_ratio, 4)),
            details: fetch_details,
        },
    ];

    if let Some(kafka) = kafka {
        eprintln!("   the same produce and fetch on Apache Kafka at {kafka}");
        let (k_produced, k_fetched, produce_jvm, fetch_jvm) =
            on_kafka(kafka, partitions, &raws).await?;
        eprintln!(
            "   Apache Kafka: produce {:.0} events/s, fetch {:.0} events/s",
            k_produced.rate(),
            k_fetched.rate()
        );
        for (what, ours, theirs, jvm) in [
            ("produce", produced, k_produced, produce_jvm),
            ("fetch", fetched, k_fetched, fetch_jvm),
        ] {
            let ratio = ours.rate() / theirs.rate();
            scenarios.push(Scenario {
                id: "S6".into(),
                name: format!("Kafka {what}: waymark dev's endpoint vs Apache Kafka, same client"),
                engine: "kafka".into(),
                value: round(ours.rate(), 0),
                unit: "events/s".into(),
                baseline: Some(Baseline {
                    name: format!("the same {what} against Apache Kafka ({kafka}), same machine"),
                    value: round(theirs.rate(), 0),
                    unit: "events/s".into(),
                }),
                ratio: Some(round(ratio, 4)),
                details: json!({
                    "mode": o.mode(),
                    "events": n,
                    "partitions": partitions,
                    "endpoint": ours.json(),
                    "kafka": theirs.json(),
                    "kafka_jvm_cpu_s": round(jvm, 2),
                    "kafka_events_per_cpu_s_incl_jvm": round(n as f64 / (theirs.cpu.total_secs() + jvm).max(1e-9), 0),
                    "what": "one process with no JVM should not be slower than Kafka on the same two cores",
                    "target": format!("ratio >= {KAFKA_TARGET}"),
                    "target_met": ratio >= KAFKA_TARGET,
                }),
            });
        }
    }
    Ok(scenarios)
}
