//! Set-up shared by the scenarios.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::thread;

use anyhow::{anyhow, Context};
use tokio::sync::mpsc;
use waymark_cli::registry::registry;
use waymark_runtime::{Log, OutRecord};
use waymark_topology::Topology;

/// Records per produce call when filling a log.
const FILL_CHUNK: u64 = 2000;

/// The topology `waymark dev` runs: the built-in one with a single inputs
/// partition (docs/decisions/0002-dev-inputs-partition.md).
pub(crate) fn dev_topology() -> anyhow::Result<Topology> {
    let mut t = Topology::default_for(&registry().declarations()).map_err(|e| anyhow!("{e}"))?;
    t.topics.inputs.partitions = 1;
    Ok(t)
}

/// An empty directory at `path`.
pub(crate) fn fresh_dir(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path)?;
    }
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}

/// Appends `n` records made by `make(i)` to `log`, generating on a
/// separate thread while the previous chunk is being appended. Returns the
/// total value bytes.
pub(crate) async fn fill<F>(log: Arc<dyn Log>, n: u64, make: F) -> anyhow::Result<u64>
where
    F: Fn(u64) -> anyhow::Result<OutRecord> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<Vec<OutRecord>>>(4);
    let generator = thread::Builder::new()
        .name("bench-generator".into())
        .spawn(move || {
            let mut start = 0;
            while start < n {
                let end = (start + FILL_CHUNK).min(n);
                let chunk: anyhow::Result<Vec<OutRecord>> = (start..end).map(&make).collect();
                if tx.blocking_send(chunk).is_err() {
                    return;
                }
                start = end;
            }
        })?;
    let mut bytes = 0u64;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        bytes += chunk.iter().map(|r| r.value.len() as u64).sum::<u64>();
        log.produce(chunk).await?;
    }
    generator
        .join()
        .map_err(|_| anyhow!("the event generator panicked"))?;
    Ok(bytes)
}

/// Bytes of a file, or of every file under a directory (0 when missing).
pub(crate) fn file_size(path: &Path) -> u64 {
    if path.is_dir() {
        return std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| file_size(&e.path())).sum())
            .unwrap_or(0);
    }
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The high watermark of every partition of `topic`.
pub(crate) async fn highs(log: &dyn Log, topic: &str) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    for p in 0..log.partitions(topic).await? {
        out.push(log.watermarks(topic, p).await?.1);
    }
    Ok(out)
}

/// Per-processor totals of the runtime's metrics so far, from the
/// in-process Prometheus recorder the platform installs: `(processor,
/// measure) → value`, where measure is `batches`, `batch_s`, `records`,
/// `rows_written` or `<stage>_s`.
pub(crate) type MetricTotals = BTreeMap<(String, String), f64>;

pub(crate) fn metric_totals() -> MetricTotals {
    let text = waymark_cli::metrics_http::recorder()
        .map(|h| h.render())
        .unwrap_or_default();
    let mut out = MetricTotals::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let label = |key: &str| {
            labels
                .trim_end_matches('}')
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"').to_owned())
        };
        let Some(processor) = label("processor") else {
            continue;
        };
        let measure = match name {
            "waymark_processor_batch_duration_seconds_count" => "batches".to_owned(),
            "waymark_processor_batch_duration_seconds_sum" => "batch_s".to_owned(),
            "waymark_processor_batch_records_sum" => "records".to_owned(),
            "waymark_processor_rows_written_total" => "rows_written".to_owned(),
            "waymark_processor_decoded_records_total" => match label("shared").as_deref() {
                Some("true") => "decoded_shared".to_owned(),
                _ => "decoded_here".to_owned(),
            },
            "waymark_processor_stage_duration_seconds_sum" => match label("stage") {
                Some(stage) => format!("{stage}_s"),
                None => continue,
            },
            _ => continue,
        };
        *out.entry((processor, measure)).or_default() += value;
    }
    out
}

/// What each processor did between two [`metric_totals`]: batches, mean
/// records and milliseconds per batch, rows written, time per stage, and
/// records decoded by the processor or shared by another one.
pub(crate) fn metric_delta(before: &MetricTotals, after: &MetricTotals) -> serde_json::Value {
    let mut by: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for ((processor, measure), value) in after {
        let delta = value
            - before
                .get(&(processor.clone(), measure.clone()))
                .copied()
                .unwrap_or(0.0);
        by.entry(processor.clone())
            .or_default()
            .insert(measure.clone(), delta);
    }
    let mut out = serde_json::Map::new();
    for (processor, m) in by {
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
        let batches = get("batches");
        if batches == 0.0 {
            continue;
        }
        let ms = |x: f64| crate::report::round(x * 1e3 / batches, 2);
        out.insert(
            processor,
            serde_json::json!({
                "batches": batches,
                "mean_batch_records": crate::report::round(get("records") / batches, 1),
                "mean_batch_ms": ms(get("batch_s")),
                "mean_handle_ms": ms(get("handle_s")),
                "mean_produce_ms": ms(get("produce_s")),
                "mean_write_ms": ms(get("write_s")),
                "rows_written": get("rows_written"),
                "records_decoded_here": get("decoded_here"),
                "records_decoded_by_another_runner": get("decoded_shared"),
            }),
        );
    }
    serde_json::Value::Object(out)
}
