//! S1 rebuild: N resolved events (the benchmark mix, persons = N / 10)
//! already on `waymark.events`; every folding processor replays from offset
//! 0 into empty projections, assembled exactly as `waymark dev` (embedded)
//! or `waymark run` + `waymark serve` (Kafka + Cassandra) assemble them.
//! Baselines: the same number of raw readers scanning the same partitions
//! of the same log, decoding nothing (the embedded log's scan; plain
//! rdkafka consumers); on real engines also raw CQL writes of the rows the
//! rebuild produced, at the store's concurrency, and the baseline is the
//! smaller of the two.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use tokio::task::JoinSet;
use waymark_bench::measure::{processes_cpu_secs, CpuTime};
use waymark_bench::mix::Mix;
use waymark_cql::CqlConfig;
use waymark_runtime::{Log, OutRecord, ProjectionStore};
use waymark_schemas::Validator;

use crate::common;
use crate::engines::{Engines, Platform, REAL};
use crate::raw::RawLog;
use crate::report::{round, Baseline, Scenario};
use crate::Options;

/// The folding processors (everything but identity, which reads inputs).
pub(crate) const FOLDS: [&str; 4] = ["person", "interactions", "journey", "learning"];

/// Rows per page when reading the rebuilt projections back (CQL baseline).
const SCAN_PAGE: usize = 5000;

/// What S1 leaves running for S3 and S2: the platform with rebuilt
/// projections.
pub(crate) struct S1 {
    pub(crate) scenario: Scenario,
    /// Events per second of the rebuild.
    pub(crate) rate: f64,
    pub(crate) platform: Platform,
    pub(crate) persons: u64,
}

impl S1 {
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.platform.stop().await
    }
}

/// `readers` concurrent raw scans of `topic`; returns (wall seconds, CPU).
async fn scans(
    raw: &RawLog,
    topic: &str,
    n: u64,
    readers: usize,
    tag: &str,
) -> anyhow::Result<(f64, CpuTime)> {
    let cpu = CpuTime::now();
    let t = Instant::now();
    let mut set = JoinSet::new();
    for k in 0..readers {
        let (raw, topic, group) = (raw.clone(), topic.to_owned(), format!("{tag}.{k}"));
        set.spawn(async move { raw.scan(&topic, n, &group).await });
    }
    while let Some(done) = set.join_next().await {
        let (records, _) = done??;
        if records != n {
            bail!("raw scan read {records} records, expected {n}");
        }
    }
    Ok((t.elapsed().as_secs_f64(), CpuTime::now().since(&cpu)))
}

/// What the raw CQL baseline measured.
struct RawCql {
    wall: f64,
    rows: u64,
    bytes: u64,
    tables: usize,
    concurrency: usize,
}

/// The CQL baseline: the rows the rebuild left in `store` (every table of
/// the four folds) written again by a plain scylla session into tables of
/// the same schema (`PRIMARY KEY (head, sub)`, the key split at its first
/// `/`; `USING TIMESTAMP` as Waymark writes), one row per statement, one
/// writer per processor with the store's concurrency. Reading the rows back is not timed.
/// Rows of every table of each fold, as (table, rows).
type FoldRows = Vec<Vec<(String, Vec<(String, Vec<u8>)>)>>;

/// Reads back every row the rebuild left in the tables of the four folds.
async fn stored_rows(store: &dyn ProjectionStore) -> anyhow::Result<FoldRows> {
    let mut per_fold = Vec::new();
    for name in FOLDS {
        let mut tables = Vec::new();
        for table in waymark_cli::registry::registry().tables(name, 1) {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = store.scan(&table, after.as_deref(), SCAN_PAGE).await?;
                let done = page.len() < SCAN_PAGE;
                after = page.last().map(|(k, _)| k.clone());
                all.extend(page);
                if done {
                    break;
                }
            }
            tables.push((table, all));
        }
        per_fold.push(tables);
    }
    Ok(per_fold)
}

/// (rows, key + value bytes) of `rows`.
fn count_rows(rows: &FoldRows) -> (u64, u64) {
    let all = rows.iter().flatten().flat_map(|(_, rows)| rows);
    all.fold((0, 0), |(n, b), (k, v)| {
        (n + 1, b + (k.len() + v.len()) as u64)
    })
}

async fn raw_cql(per_fold: FoldRows, nodes: &[String], keyspace: &str) -> anyhow::Result<RawCql> {
    let (rows, bytes) = count_rows(&per_fold);
    let session = Arc::new(
        scylla::client::session_builder::SessionBuilder::new()
            .known_nodes(nodes)
            .build()
            .await
            .context("raw cql session")?,
    );
    let concurrency = CqlConfig::default().concurrency;
    let mut prepared = Vec::new();
    for tables in &per_fold {
        let mut statements = Vec::new();
        for (table, _) in tables {
            session
                .query_unpaged(
                    format!(
                        "CREATE TABLE IF NOT EXISTS {keyspace}.raw_{table} (head text, sub text, value blob, PRIMARY KEY (head, sub))"
                    ),
                    (),
                )
                .await?;
            statements.push(
                session
                    .prepare(format!(
                        "INSERT INTO {keyspace}.raw_{table} (head, sub, value) VALUES (?, ?, ?) USING TIMESTAMP ?"
                    ))
                    .await?,
            );
        }
        prepared.push(statements);
    }
    let t = Instant::now();
    let mut writers = JoinSet::new();
    for (tables, statements) in per_fold.into_iter().zip(prepared) {
        let session = session.clone();
        writers.spawn(async move {
            let writes = tables
                .into_iter()
                .zip(statements)
                .flat_map(|((_, rows), statement)| {
                    rows.into_iter()
                        .map(move |(key, value)| (statement.clone(), key, value))
                })
                .map(|(statement, key, value)| {
                    let session = session.clone();
                    async move {
                        let (head, sub) = key.split_at(key.find('/').unwrap_or(key.len()));
                        session
                            .execute_unpaged(&statement, (head, sub, value, 1i64))
                            .await
                            .map(|_| ())
                    }
                });
            futures::stream::iter(writes)
                .buffer_unordered(concurrency)
                .try_collect::<Vec<()>>()
                .await
                .map(|_| ())
        });
    }
    while let Some(done) = writers.join_next().await {
        done?.context("raw cql write")?;
    }
    Ok(RawCql {
        wall: t.elapsed().as_secs_f64(),
        rows,
        bytes,
        tables: FOLDS
            .iter()
            .map(|f| waymark_cli::registry::registry().tables(f, 1).len())
            .sum(),
        concurrency,
    })
}

/// Appends S1's `n` resolved events over `persons` persons to `topic`, as
/// the identity processor would have left them (S1P folds the same
/// records). Returns the total value bytes.
pub(crate) async fn fill_resolved(
    log: Arc<dyn Log>,
    topic: &str,
    n: u64,
    persons: u64,
) -> anyhow::Result<u64> {
    let validator = Arc::new(Validator::new()?);
    let mix = Mix::new("s1", persons);
    let topic = topic.to_owned();
    common::fill(log, n, move |i| {
        let (key, value) = mix
            .resolved(&validator, i)
            .map_err(|r| anyhow!("generated event {i} rejected: {r:?}"))?;
        Ok(OutRecord::keyed(topic.clone(), key, value))
    })
    .await
}

pub(crate) async fn run(o: &Options, engines: &Engines) -> anyhow::Result<S1> {
    let n = o.s1_events.max(1);
    let persons = (n / 10).max(1);
    let target = engines.target("s1").await?;
    let engine = target.engine;
    let real = engine == REAL;
    let events_topic = target.topology.topics.events.name.clone();

    // The log as the identity processor would have left it.
    let t = Instant::now();
    let bytes = fill_resolved(target.log.clone(), &events_topic, n, persons).await?;
    let highs = common::highs(target.log.as_ref(), &events_topic).await?;
    eprintln!(
        "   {n} events ({} B mean) on {} partitions in {:.1}s",
        bytes / n,
        highs.len(),
        t.elapsed().as_secs_f64()
    );

    // Baseline: one raw reader per folding processor, concurrently.
    let (base_wall, base_cpu) =
        scans(&target.raw, &events_topic, n, FOLDS.len(), "bench.scan").await?;
    let (one_wall, one_cpu) = scans(&target.raw, &events_topic, n, 1, "bench.scan1").await?;
    eprintln!(
        "   baseline: {} raw readers in {base_wall:.2}s; one reader in {one_wall:.2}s",
        FOLDS.len()
    );
    let cql = target.cql();

    // The rebuild, as the product runs it.
    let metrics_before = common::metric_totals();
    let cpu = CpuTime::now();
    let engines_cpu = processes_cpu_secs("java");
    let t = Instant::now();
    let platform = target.start().await?;
    let timeout = Duration::from_secs(if o.quick { 300 } else { 3600 });
    let mut finished: BTreeMap<&str, f64> = BTreeMap::new();
    while finished.len() < FOLDS.len() {
        for name in FOLDS {
            if finished.contains_key(name) {
                continue;
            }
            if platform.reached(name, &events_topic, &highs).await? {
                finished.insert(name, t.elapsed().as_secs_f64());
            }
        }
        if t.elapsed() > timeout {
            bail!("rebuild did not finish within {timeout:?}: {finished:?}");
        }
        tokio::time::sleep(Duration::from_millis(if real { 20 } else { 5 })).await;
    }
    let wall = finished.values().copied().fold(0.0, f64::max);
    let used = CpuTime::now().since(&cpu);
    let engines_used = processes_cpu_secs("java") - engines_cpu;
    let batches = common::metric_delta(&metrics_before, &common::metric_totals());
    let rows_written: f64 = FOLDS
        .iter()
        .filter_map(|f| batches.get(f)?.get("rows_written")?.as_f64())
        .sum();
    eprintln!("   rebuild: {wall:.2}s, {:.2} CPU-s", used.total_secs());

    let nf = n as f64;
    let rate = nf / wall;
    let scan_rate = nf / base_wall;
    let rows = stored_rows(platform.store.as_ref()).await?;
    let (stored, stored_bytes) = count_rows(&rows);
    let raw_cql = match &cql {
        Some((nodes, keyspace)) => {
            let r = raw_cql(rows, nodes, keyspace).await?;
            eprintln!(
                "   baseline: raw CQL writes of the {} rebuilt rows in {:.2}s",
                r.rows, r.wall
            );
            Some(r)
        }
        None => {
            drop(rows);
            None
        }
    };
    let cql_rate = raw_cql.as_ref().map(|r| nf / r.wall);
    let (base_rate, base_name) = match cql_rate {
        Some(c) if c < scan_rate => (
            c,
            "raw CQL writes of the rebuilt rows at the store's concurrency (smaller than the raw consumers)".to_owned(),
        ),
        _ => (
            scan_rate,
            if real {
                format!("{} raw rdkafka consumers, no decoding (smaller than raw CQL writes)", FOLDS.len())
            } else {
                format!("raw scan, {} readers, no decoding", FOLDS.len())
            },
        ),
    };
    let ratio = rate / base_rate;
    let target_ratio = if real { 0.7 } else { 0.5 };
    let scenario = Scenario {
        id: "S1".into(),
        name: "rebuild: 4 folds replay waymark.events from offset 0".into(),
        engine: engine.into(),
        value: round(rate, 0),
        unit: "events/s".into(),
        baseline: Some(Baseline {
            name: base_name,
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
            "engines_jvm_cpu_s": real.then(|| round(engines_used, 2)),
            "fold_applications_per_s": round(nf * FOLDS.len() as f64 / wall, 0),
            "baseline_scan_events_per_s": round(scan_rate, 0),
            "baseline_wall_s": round(base_wall, 3),
            "baseline_cpu_user_s": round(base_cpu.user.as_secs_f64(), 3),
            "baseline_cpu_system_s": round(base_cpu.system.as_secs_f64(), 3),
            "baseline_events_per_cpu_s": round(nf / base_cpu.total_secs(), 0),
            "single_reader_scan_events_per_s": round(nf / one_wall, 0),
            "single_reader_scan_events_per_cpu_s": round(nf / one_cpu.total_secs(), 0),
            "cpu_ratio": round((nf / used.total_secs()) / (nf / base_cpu.total_secs()), 4),
            "baseline_raw_cql": raw_cql.as_ref().map(|r| json!({
                "events_per_s": round(nf / r.wall, 0),
                "rows": r.rows,
                "bytes": r.bytes,
                "tables": r.tables,
                "wall_s": round(r.wall, 3),
                "concurrency_per_processor": r.concurrency,
                "rows_per_s": round(r.rows as f64 / r.wall, 0),
            })),
            "batches": batches,
            "rows_written": rows_written,
            "rows_stored": stored,
            "rows_stored_bytes": stored_bytes,
            "rows_written_per_stored_row": round(rows_written / stored.max(1) as f64, 2),
            "target": format!("ratio >= {target_ratio}"),
            "target_met": ratio >= target_ratio,
        }),
    };
    Ok(S1 {
        scenario,
        rate,
        platform,
        persons,
    })
}
