//! S1 rebuild: N resolved events (the benchmark mix, persons = N / 10)
//! already on `waymark.events`; every folding processor replays from offset
//! 0 into empty projections, assembled exactly as `waymark dev` assembles
//! them (`Dev::start`). Baseline: the same number of raw readers scanning
//! the same partitions of the same log, decoding nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde_json::json;
use tokio::task::JoinSet;
use waymark_bench::measure::CpuTime;
use waymark_bench::mix::Mix;
use waymark_cli::dev::{Dev, DevOptions};
use waymark_cli::platform;
use waymark_embedded::EmbeddedLog;
use waymark_runtime::{ConsumerEvent, Log, OutRecord, ProjectionStore};
use waymark_schemas::Validator;

use crate::common::{self, ENGINE};
use crate::report::{round, Baseline, Scenario};
use crate::Options;

/// The folding processors (everything but identity, which reads inputs).
pub(crate) const FOLDS: [&str; 4] = ["person", "interactions", "journey", "learning"];

/// Records per read, as the runner asks for (`RunnerConfig::max_batch`).
const READ_BATCH: usize = 2000;

/// What S1 leaves running for S3 and S2: the platform with rebuilt
/// projections.
pub(crate) struct S1 {
    pub(crate) scenario: Scenario,
    /// Events per second of the rebuild.
    pub(crate) rate: f64,
    pub(crate) dev: Dev,
    pub(crate) persons: u64,
}

impl S1 {
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.dev.stop().await
    }
}

/// Reads every record of `topic` from offset 0 as a consumer group member,
/// touching only the value length. Returns (records, value bytes).
async fn scan(
    log: EmbeddedLog,
    group: String,
    topic: String,
    n: u64,
) -> anyhow::Result<(u64, u64)> {
    let mut consumer = log.subscribe(&group, &topic).await?;
    let (mut records, mut bytes) = (0u64, 0u64);
    while records < n {
        if let ConsumerEvent::Records(batch) = consumer.next(READ_BATCH).await? {
            records += batch.len() as u64;
            bytes += batch
                .iter()
                .map(|r| r.value.as_ref().map_or(0, Vec::len) as u64)
                .sum::<u64>();
        }
    }
    Ok((records, bytes))
}

/// `readers` concurrent scans; returns (wall seconds, CPU).
async fn scans(
    log: &EmbeddedLog,
    topic: &str,
    n: u64,
    readers: usize,
    tag: &str,
) -> anyhow::Result<(f64, CpuTime)> {
    let cpu = CpuTime::now();
    let t = Instant::now();
    let mut set = JoinSet::new();
    for k in 0..readers {
        set.spawn(scan(
            log.clone(),
            format!("bench.{tag}.{k}"),
            topic.to_owned(),
            n,
        ));
    }
    while let Some(done) = set.join_next().await {
        let (records, _) = done??;
        if records != n {
            bail!("raw scan read {records} records, expected {n}");
        }
    }
    Ok((t.elapsed().as_secs_f64(), CpuTime::now().since(&cpu)))
}

/// Batches per fold and their mean duration, from the in-process
/// Prometheus recorder `waymark dev` installs.
fn batch_stats() -> serde_json::Value {
    let text = waymark_cli::metrics_http::recorder()
        .map(|h| h.render())
        .unwrap_or_default();
    let mut out = serde_json::Map::new();
    for name in FOLDS {
        let value = |metric: &str| {
            let prefix = format!("{metric}{{processor=\"{name}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        let count = value("waymark_processor_batch_duration_seconds_count");
        let sum = value("waymark_processor_batch_duration_seconds_sum");
        if let (Some(count), Some(sum)) = (count, sum) {
            out.insert(
                name.to_owned(),
                json!({"batches": count, "mean_batch_ms": round(sum / count.max(1.0) * 1e3, 2)}),
            );
        }
    }
    serde_json::Value::Object(out)
}

pub(crate) async fn run(o: &Options) -> anyhow::Result<S1> {
    let n = o.s1_events.max(1);
    let persons = (n / 10).max(1);
    let dir = o.work.join("s1");
    common::fresh_dir(&dir)?;
    let topology = common::dev_topology()?;
    let events_topic = topology.topics.events.name.clone();

    // The log as the identity processor would have left it.
    let log = EmbeddedLog::open(&dir.join("log.redb"))?;
    log.ensure_topics(&platform::topic_configs(&topology))
        .await?;
    let validator = Arc::new(Validator::new()?);
    let mix = Mix::new("s1", persons);
    let t = Instant::now();
    let topic = events_topic.clone();
    let bytes = common::fill(&log, n, move |i| {
        let (key, value) = mix
            .resolved(&validator, i)
            .map_err(|r| anyhow!("generated event {i} rejected: {r:?}"))?;
        Ok(OutRecord::keyed(topic.clone(), key, value))
    })
    .await?;
    let highs = common::highs(&log, &events_topic).await?;
    eprintln!(
        "   {n} events ({} B mean) on {} partitions in {:.1}s",
        bytes / n,
        highs.len(),
        t.elapsed().as_secs_f64()
    );

    // Baseline: one raw reader per folding processor, concurrently.
    let (base_wall, base_cpu) = scans(&log, &events_topic, n, FOLDS.len(), "scan").await?;
    let (one_wall, one_cpu) = scans(&log, &events_topic, n, 1, "scan1").await?;
    eprintln!(
        "   baseline: {} raw readers in {base_wall:.2}s; one reader in {one_wall:.2}s",
        FOLDS.len()
    );
    log.close();
    drop(log);

    // The rebuild, as `waymark dev` runs it.
    let cpu = CpuTime::now();
    let t = Instant::now();
    let dev = Dev::start(DevOptions {
        data_dir: dir.clone(),
        grpc_addr: "127.0.0.1:0".parse()?,
        metrics_addr: "127.0.0.1:0".parse()?,
        topology: topology.clone(),
        kafka_endpoint: false,
    })
    .await?;
    let timeout = Duration::from_secs(if o.quick { 120 } else { 1800 });
    let mut finished: BTreeMap<&str, f64> = BTreeMap::new();
    while finished.len() < FOLDS.len() {
        for name in FOLDS {
            if finished.contains_key(name) {
                continue;
            }
            let version = topology.processor(name).map_or(1, |p| p.projection_version);
            let stored = dev
                .store
                .positions(&format!("{name}.v{version}"), &events_topic)
                .await?;
            let caught_up = highs
                .iter()
                .enumerate()
                .all(|(p, high)| stored.get(&(p as u32)).copied().unwrap_or(0) >= *high);
            if caught_up {
                finished.insert(name, t.elapsed().as_secs_f64());
            }
        }
        if t.elapsed() > timeout {
            bail!("rebuild did not finish within {timeout:?}: {finished:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = finished.values().copied().fold(0.0, f64::max);
    let used = CpuTime::now().since(&cpu);
    let batches = batch_stats();
    eprintln!("   rebuild: {wall:.2}s, {:.2} CPU-s", used.total_secs());

    let nf = n as f64;
    let rate = nf / wall;
    let base_rate = nf / base_wall;
    let ratio = rate / base_rate;
    let scenario = Scenario {
        id: "S1".into(),
        name: "rebuild: 4 folds replay waymark.events from offset 0".into(),
        engine: ENGINE.into(),
        value: round(rate, 0),
        unit: "events/s".into(),
        baseline: Some(Baseline {
            name: format!("raw scan, {} readers, no decoding", FOLDS.len()),
            value: round(base_rate, 0),
            unit: "events/s".into(),
        }),
        ratio: Some(round(ratio, 4)),
        details: json!({
            "mode": o.mode(),
            "events": n,
            "persons": persons,
            "mean_event_bytes": bytes / n,
            "partitions": highs.len(),
            "processors": FOLDS,
            "wall_s": round(wall, 3),
            "finished_s": finished,
            "cpu_user_s": round(used.user.as_secs_f64(), 3),
            "cpu_system_s": round(used.system.as_secs_f64(), 3),
            "events_per_cpu_s": round(nf / used.total_secs(), 0),
            "fold_applications_per_s": round(nf * FOLDS.len() as f64 / wall, 0),
            "baseline_wall_s": round(base_wall, 3),
            "baseline_cpu_user_s": round(base_cpu.user.as_secs_f64(), 3),
            "baseline_cpu_system_s": round(base_cpu.system.as_secs_f64(), 3),
            "baseline_events_per_cpu_s": round(nf / base_cpu.total_secs(), 0),
            "single_reader_scan_events_per_s": round(nf / one_wall, 0),
            "single_reader_scan_events_per_cpu_s": round(nf / one_cpu.total_secs(), 0),
            "cpu_ratio": round((nf / used.total_secs()) / (nf / base_cpu.total_secs()), 4),
            "batches": batches,
            "log_file_bytes": common::file_size(&dir.join("log.redb")),
            "store_file_bytes": common::file_size(&dir.join("store.redb")),
            "target": "ratio >= 0.5",
            "target_met": ratio >= 0.5,
        }),
    };
    Ok(S1 {
        scenario,
        rate,
        dev,
        persons,
    })
}
