//! Set-up shared by the scenarios.

use std::path::Path;
use std::sync::Arc;
use std::thread;

use anyhow::{anyhow, Context};
use tokio::sync::mpsc;
use waymark_cli::registry::PROCESSORS;
use waymark_runtime::{Log, OutRecord};
use waymark_topology::Topology;

/// Records per produce call when filling a log.
const FILL_CHUNK: u64 = 2000;

/// The topology `waymark dev` runs: the built-in one with a single inputs
/// partition (docs/decisions/0002-dev-inputs-partition.md).
pub(crate) fn dev_topology() -> anyhow::Result<Topology> {
    let mut t = Topology::default_for(PROCESSORS).map_err(|e| anyhow!("{e}"))?;
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

/// Size of a file in bytes (0 when missing).
pub(crate) fn file_size(path: &Path) -> u64 {
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
