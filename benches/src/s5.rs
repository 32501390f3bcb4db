//! S5: peak resident memory of the release `waymark dev` binary while a
//! lag drains. N raw events of the mix are appended to `waymark.inputs` of
//! a fresh data directory before `waymark dev` starts on it, so identity
//! and then every fold start with the whole lag. The harness samples
//! `VmRSS` of the process every 100 ms, follows progress through the
//! processors' `events_applied` counters on its Prometheus endpoint, and
//! reads `VmHWM` (the peak) once every processor has applied all N.
//! No baseline: an absolute bound (512 MiB, not growing with lag).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use waymark_bench::measure::proc_status_kib;
use waymark_bench::mix::Mix;
use waymark_cli::dev::DevInfo;
use waymark_cli::platform;
use waymark_cli::registry::registry;
use waymark_embedded::EmbeddedLog;
use waymark_runtime::{Log, OutRecord};

use crate::common;
use crate::engines::EMBEDDED;
use crate::report::{round, Scenario};
use crate::Options;

const BOUND_MIB: f64 = 512.0;
/// Drain progress (fraction of N applied by the slowest processor) at which
/// the resident size is recorded.
const MARKS: [f64; 5] = [0.1, 0.25, 0.5, 0.75, 1.0];

/// Stops the child on every path out of the scenario.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `GET /metrics` from the Prometheus endpoint of `waymark dev`.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

/// Records handled per processor: applied, duplicate and dead-lettered.
fn handled(metrics: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let counted = [
            "waymark_processor_events_applied_total{",
            "waymark_processor_events_duplicate_total{",
            "waymark_processor_dead_letters_total{",
        ]
        .iter()
        .any(|m| line.starts_with(m));
        if !counted {
            continue;
        }
        let processor = line
            .split("processor=\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(p), Some(v)) = (processor, value) {
            *out.entry(p.to_owned()).or_insert(0.0) += v;
        }
    }
    out
}

fn mib(kib: u64) -> f64 {
    round(kib as f64 / 1024.0, 1)
}

pub(crate) async fn run(o: &Options) -> anyhow::Result<Scenario> {
    let n = o.s5_events.max(1);
    let bin = o.waymark.clone();
    if !bin.exists() {
        bail!(
            "{} not found (benches/run builds it; or pass --waymark)",
            bin.display()
        );
    }
    let dir = o.work.join("s5");
    common::fresh_dir(&dir)?;
    let topology = common::dev_topology()?;
    let inputs = topology.topics.inputs.name.clone();
    let log = EmbeddedLog::open(&dir.join("log.redb"))?;
    log.ensure_topics(&platform::topic_configs(&topology))
        .await?;
    let mix = Mix::new("s5", (n / 10).max(1));
    let t = Instant::now();
    let topic = inputs.clone();
    let bytes = common::fill(std::sync::Arc::new(log.clone()), n, move |i| {
        let raw = mix.raw(i);
        Ok(OutRecord::keyed(
            topic.clone(),
            raw.key,
            raw.json.into_bytes(),
        ))
    })
    .await?;
    eprintln!(
        "   {n} events of lag appended in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    log.close();
    drop(log);

    let out = std::fs::File::create(dir.join("waymark-dev.log"))?;
    let child = Command::new(&bin)
        .args(["dev", "--data-dir"])
        .arg(&dir)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--kafka-addr",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut child = Guard(child);
    let pid = child.0.id();
    let started = Instant::now();
    let info_path = dir.join("dev.json");
    let info: DevInfo = loop {
        if let Ok(text) = std::fs::read_to_string(&info_path) {
            if let Ok(info) = serde_json::from_str(&text) {
                break info;
            }
        }
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "waymark dev exited with {status} before it was ready (see {})",
                dir.join("waymark-dev.log").display()
            );
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("waymark dev was not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ready_s = started.elapsed().as_secs_f64();
    let rss_ready = proc_status_kib(pid, "VmRSS").unwrap_or(0);

    let timeout = Duration::from_secs(if o.quick { 150 } else { 3600 });
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut marks: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut next_mark = 0;
    let mut last_progress = (0.0, Instant::now());
    let mut tick = 0u64;
    let drained_s = loop {
        if let Some(status) = child.0.try_wait()? {
            bail!("waymark dev exited with {status} while draining");
        }
        let rss = proc_status_kib(pid, "VmRSS").unwrap_or(0);
        samples.push((started.elapsed().as_secs_f64(), rss));
        if tick.is_multiple_of(5) {
            let counts = handled(&scrape(&info.metrics_addr).await.unwrap_or_default());
            let slowest = registry()
                .names()
                .iter()
                .map(|p| counts.get(*p).copied().unwrap_or(0.0))
                .fold(f64::MAX, f64::min);
            let progress = slowest / n as f64;
            while next_mark < MARKS.len() && progress >= MARKS[next_mark] {
                marks.insert(
                    format!("{}%", (MARKS[next_mark] * 100.0) as u32),
                    json!({"t_s": round(started.elapsed().as_secs_f64(), 1), "rss_mib": mib(rss)}),
                );
                next_mark += 1;
            }
            if progress > last_progress.0 {
                last_progress = (progress, Instant::now());
            }
            if progress >= 1.0 {
                break started.elapsed().as_secs_f64();
            }
            if last_progress.1.elapsed() > Duration::from_secs(60) {
                bail!(
                    "no drain progress for 60 s at {:.1} % (see {})",
                    progress * 100.0,
                    dir.join("waymark-dev.log").display()
                );
            }
        }
        if started.elapsed() > timeout {
            bail!("the lag did not drain within {timeout:?}");
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hwm = proc_status_kib(pid, "VmHWM").ok_or_else(|| anyhow!("cannot read VmHWM of {pid}"))?;
    // SIGTERM: the documented clean stop.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let stop = Instant::now();
    let exited = loop {
        if let Some(status) = child.0.try_wait()? {
            break Some(status.success());
        }
        if stop.elapsed() > Duration::from_secs(40) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let peak = mib(hwm);
    let rss_max_sampled = samples.iter().map(|s| s.1).max().unwrap_or(0);
    // Resident size over the second half of the drain vs the first half.
    let half = drained_s / 2.0;
    let max_in = |from: f64, to: f64| {
        samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    };
    eprintln!("   peak RSS {peak} MiB; drained {n} events in {drained_s:.1}s");
    Ok(Scenario {
        id: "S5".into(),
        name: format!("peak RSS of waymark dev (release) while {n} events of lag drain"),
        engine: EMBEDDED.into(),
        value: peak,
        unit: "MiB".into(),
        baseline: None,
        ratio: None,
        details: json!({
            "mode": o.mode(),
            "events_of_lag": n,
            "issue_asks_for_events": 10_000_000,
            "scaled_down": n < 10_000_000,
            "mean_event_bytes": bytes / n,
            "measured": "VmHWM of /proc/<pid>/status",
            "ready_s": round(ready_s, 2),
            "rss_at_ready_mib": mib(rss_ready),
            "drained_s": round(drained_s, 2),
            "drain_events_per_s": round(n as f64 / (drained_s - ready_s).max(1e-9), 0),
            "rss_max_sampled_mib": mib(rss_max_sampled),
            "rss_max_first_half_mib": mib(max_in(0.0, half)),
            "rss_max_second_half_mib": mib(max_in(half, f64::MAX)),
            "rss_at_progress": marks,
            "clean_exit_on_sigterm": exited,
            "log_file_bytes": common::file_size(&dir.join("log.redb")),
            "store_bytes": common::file_size(&dir.join(waymark_cli::dev::STORE_DIR)),
            "target": format!("< {BOUND_MIB} MiB and not growing with lag"),
            "target_met": peak < BOUND_MIB,
        }),
    })
}
