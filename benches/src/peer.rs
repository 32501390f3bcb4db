//! S1P, the peer of issue 13 (`--real` only): the person fold — per person
//! the event count, the interaction count, first and last seen — replayed
//! over the same `waymark.events` records by Waymark's `person` processor
//! alone (`waymark run --processors person` on Kafka + Cassandra) and by a
//! Kafka Streams application (`benches/kstreams`: a RocksDB state store
//! with its changelog, at-least-once, default settings otherwise), one
//! after the other on the same machine.
//!
//! Each side's CPU counts its engines: Waymark's is this process plus the
//! Kafka and Cassandra JVMs over the rebuild; the peer's is its own JVM
//! (as it reports it) plus the Kafka and Cassandra JVMs over its run.
//! Waymark's rebuild ends when `person`'s stored positions reach the end
//! of every partition (rows and positions written together); the peer's
//! when it has aggregated every record and `KafkaStreams::close` has
//! returned (its record cache flushed to RocksDB and the changelog, its
//! offsets committed). The ratio is Waymark's events/s over the peer's;
//! the target is ≥ 1.0.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use serde_json::json;
use waymark_bench::measure::{processes_cpu_secs, CpuTime};

use crate::common;
use crate::engines::{Engines, REAL};
use crate::report::{round, Baseline, Scenario};
use crate::s1;
use crate::Options;

/// What the peer prints when it is done (`benches/kstreams/README.md`).
#[derive(Debug, Deserialize)]
struct PeerResult {
    records: u64,
    skipped: u64,
    persons: u64,
    event_count_sum: u64,
    wall_secs: f64,
    process_cpu_secs: f64,
    close_secs: f64,
    first_record_secs: f64,
}

/// Runs S1P on `engines` (real engines only) with the peer built into
/// `kstreams` by `benches/kstreams/build`.
pub(crate) async fn run(
    o: &Options,
    engines: &Engines,
    kstreams: &Path,
) -> anyhow::Result<Scenario> {
    let Engines::Real { bootstrap, .. } = engines else {
        bail!("S1P runs on Kafka + Cassandra only (--real)");
    };
    let classpath = std::fs::read_to_string(kstreams.join("classpath")).with_context(|| {
        format!(
            "the Kafka Streams peer is not built in {} (benches/kstreams/build does it)",
            kstreams.display()
        )
    })?;
    let n = o.s1_events.max(1);
    let persons = (n / 10).max(1);
    let target = engines.target("s1p").await?;
    let topic = target.topology.topics.events.name.clone();

    // The same records S1 folds.
    s1::fill_resolved(target.log.clone(), &topic, n, persons).await?;
    let highs = common::highs(target.log.as_ref(), &topic).await?;

    // Waymark: `person` alone.
    let cpu = CpuTime::now();
    let jvms = processes_cpu_secs("java");
    let t = Instant::now();
    let platform = target.start_only(&["person".to_owned()]).await?;
    let timeout = Duration::from_secs(if o.quick { 300 } else { 3600 });
    while !platform.reached("person", &topic, &highs).await? {
        if t.elapsed() > timeout {
            bail!("person's rebuild did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waymark_wall = t.elapsed().as_secs_f64();
    let waymark_cpu = CpuTime::now().since(&cpu).total_secs();
    let waymark_jvms = processes_cpu_secs("java") - jvms;
    eprintln!(
        "   waymark person: {waymark_wall:.2}s, {waymark_cpu:.2} CPU-s + {waymark_jvms:.2} JVM CPU-s"
    );

    // The peer, on the same topic while Waymark's processors sit idle.
    let state_dir = o.work.join("s1p-kstreams-state");
    common::fresh_dir(&state_dir)?;
    let application_id = format!("{}kstreams", platform.prefix());
    let jvms = processes_cpu_secs("java");
    let mut command = std::process::Command::new("java");
    command
        .arg("-cp")
        .arg(classpath.trim())
        .arg("dev.waymark.bench.PersonFold")
        .args(["--bootstrap", bootstrap, "--topic", &topic])
        .args(["--expected", &n.to_string()])
        .args(["--application-id", &application_id])
        .arg("--state-dir")
        .arg(&state_dir)
        // The peer gives up (and exits 1) on its own after this long.
        .args(["--timeout-secs", &timeout.as_secs().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || command.output())
        .await?
        .context("running the Kafka Streams peer (java)")?;
    // The peer's JVM has exited: what is left of the delta is Kafka's and
    // Cassandra's.
    let peer_engines = processes_cpu_secs("java") - jvms;
    if !out.status.success() {
        bail!(
            "the Kafka Streams peer failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rfind(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("the Kafka Streams peer printed no result: {stdout}"))?;
    let peer: PeerResult = serde_json::from_str(line).context("the peer's result line")?;
    if peer.records != n || peer.skipped != 0 || peer.event_count_sum != n {
        bail!("the Kafka Streams peer did not fold every record once: {line}");
    }
    eprintln!(
        "   kafka streams person fold: {:.2}s, {:.2} CPU-s + {peer_engines:.2} engine JVM CPU-s",
        peer.wall_secs, peer.process_cpu_secs
    );
    platform.stop().await?;

    let nf = n as f64;
    let waymark_rate = nf / waymark_wall;
    let peer_rate = nf / peer.wall_secs;
    let waymark_cpu_total = waymark_cpu + waymark_jvms;
    let peer_cpu_total = peer.process_cpu_secs + peer_engines;
    let ratio = waymark_rate / peer_rate;
    Ok(Scenario {
        id: "S1P".into(),
        name: "person fold rebuild: Waymark's person processor vs a Kafka Streams peer".into(),
        engine: REAL.into(),
        value: round(waymark_rate, 0),
        unit: "events/s".into(),
        baseline: Some(Baseline {
            name:
                "Kafka Streams 4.4 person fold (RocksDB store + changelog, at-least-once, defaults)"
                    .into(),
            value: round(peer_rate, 0),
            unit: "events/s".into(),
        }),
        ratio: Some(round(ratio, 4)),
        details: json!({
            "mode": o.mode(),
            "events": n,
            "persons": persons,
            "partitions": highs.len(),
            "waymark_wall_s": round(waymark_wall, 3),
            "waymark_cpu_s": round(waymark_cpu, 2),
            "waymark_engines_jvm_cpu_s": round(waymark_jvms, 2),
            "waymark_events_per_cpu_s": round(nf / waymark_cpu_total, 0),
            "peer_wall_s": round(peer.wall_secs, 3),
            "peer_first_record_s": round(peer.first_record_secs, 3),
            "peer_close_s": round(peer.close_secs, 3),
            "peer_jvm_cpu_s": round(peer.process_cpu_secs, 2),
            "peer_engines_jvm_cpu_s": round(peer_engines, 2),
            "peer_events_per_cpu_s": round(nf / peer_cpu_total, 0),
            "peer_persons": peer.persons,
            "cpu_ratio": round((nf / waymark_cpu_total) / (nf / peer_cpu_total), 4),
            "target": "ratio >= 1.0",
            "target_met": ratio >= 1.0,
        }),
    })
}
