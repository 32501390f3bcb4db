//! S2: publish → visible. On the platform S1 left running (identity and the
//! four folds, gRPC), events of the mix are published through
//! `Ingest.Publish` open loop: every 10 ms a call carrying rate/100 events
//! is sent, whether earlier calls have returned or not. Ten times a second
//! the call also carries a probe: an `interaction.recorded` of a fresh
//! person. A probe is visible once `GetPerson` counts it and
//! `ListInteractions` lists it; its latency runs from the moment its call
//! was sent. Baseline: the same schedule appending records straight to a
//! topic of the same log, read back by a raw consumer; its latency runs
//! from the append call to the moment the reader holds the record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use waymark_bench::measure::{CpuTime, Percentiles};
use waymark_bench::mix::{probe_event, Mix};
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_proto::v1::ingest_client::IngestClient;
use waymark_proto::v1::query_client::QueryClient;

use crate::common;
use crate::engines::Platform;
use crate::report::{round, Baseline, Scenario};
use crate::s1::{FOLDS, S1};
use crate::Options;

const TICK: Duration = Duration::from_millis(10);
/// A probe every this many ticks (10 per second).
const PROBE_EVERY: u64 = 10;
/// Probes sent in the first second are not counted.
const WARMUP: Duration = Duration::from_secs(1);
/// Calls (or appends) in flight at most; a tick that finds none free waits,
/// and is counted as late.
const MAX_IN_FLIGHT: usize = 256;
/// A tick more than this late counts as late (open loop broken).
const LATE: Duration = Duration::from_millis(5);
const RAW_TOPIC: &str = "bench.raw";
/// Value size of the baseline's records (the mix's raw events are ~200 B).
const RAW_VALUE_BYTES: usize = 200;

struct Schedule {
    per_tick: usize,
    ticks: u64,
}

/// The baseline: appends on the same schedule, read by a raw consumer.
async fn raw_latency(
    platform: &Platform,
    s: &Schedule,
    give_up: Duration,
) -> anyhow::Result<(Vec<Duration>, Vec<f64>, u64)> {
    let topic = platform.topic(RAW_TOPIC);
    platform.create_topic(&topic).await?;
    let total = s.per_tick * s.ticks as usize;
    let epoch = Instant::now();
    let reader = platform.raw.arrivals(&topic, total, epoch).await?;
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut late = 0;
    for k in 0..s.ticks {
        let at = epoch + TICK * k as u32;
        tokio::time::sleep_until(at.into()).await;
        let permit = slots.clone().acquire_owned().await?;
        if at.elapsed() > LATE {
            late += 1;
        }
        let sent = epoch.elapsed().as_micros() as u64;
        let records = (0..s.per_tick)
            .map(|j| {
                let mut value = sent.to_le_bytes().to_vec();
                value.resize(RAW_VALUE_BYTES, b'x');
                (format!("k{j}"), value)
            })
            .collect();
        let (raw, topic) = (platform.raw.clone(), topic.clone());
        tokio::spawn(async move {
            let _ = raw.append(&topic, records).await;
            drop(permit);
        });
    }
    let arrivals = tokio::time::timeout(give_up, reader)
        .await
        .map_err(|_| anyhow!("the raw reader did not read every record within {give_up:?}"))???;
    let mut latencies = Vec::with_capacity(arrivals.len());
    let mut worst: Vec<f64> = Vec::new();
    for (sent, read) in arrivals {
        if sent < WARMUP {
            continue;
        }
        let latency = read.saturating_sub(sent);
        let second = sent.as_secs() as usize;
        if worst.len() <= second {
            worst.resize(second + 1, 0.0);
        }
        worst[second] = f64::max(worst[second], round(latency.as_secs_f64() * 1e3, 2));
        latencies.push(latency);
    }
    Ok((latencies, worst, late))
}

/// Polls until the probe person is visible; `None` after `give_up`.
async fn probe(
    mut q: QueryClient<Channel>,
    person: String,
    sent: Instant,
    give_up: Duration,
) -> Option<Duration> {
    loop {
        let counted = matches!(
            q.get_person(pb::GetPersonRequest { person_id: person.clone() }).await,
            Ok(p) if p.get_ref().event_count >= 1
        );
        let listed = counted
            && matches!(
                q.list_interactions(pb::ListInteractionsRequest {
                    person_id: person.clone(),
                    ..Default::default()
                })
                .await,
                Ok(l) if !l.get_ref().interactions.is_empty()
            );
        let elapsed = sent.elapsed();
        if listed {
            return Some(elapsed);
        }
        if elapsed > give_up {
            return None;
        }
        // At most 5 % of the latency so far is added by polling.
        tokio::time::sleep((elapsed / 20).max(Duration::from_millis(1))).await;
    }
}

/// Whether every processor has applied everything appended so far.
async fn drained(platform: &Platform) -> anyhow::Result<bool> {
    let topics = &platform.topology.topics;
    if !platform.caught_up("identity", &topics.inputs.name).await? {
        return Ok(false);
    }
    for name in FOLDS {
        if !platform.caught_up(name, &topics.events.name).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

pub(crate) async fn run(o: &Options, s1: &S1, rate: f64) -> anyhow::Result<Scenario> {
    let s = Schedule {
        per_tick: ((rate * TICK.as_secs_f64()).round() as usize).max(1),
        ticks: (o.s2_secs / TICK.as_secs_f64()).round().max(1.0) as u64,
    };
    let offered = s.per_tick as f64 / TICK.as_secs_f64();
    let give_up = Duration::from_secs(if o.quick { 30 } else { 120 });

    // Baseline first, while the processors are idle.
    let (mut raw, raw_worst, raw_late) =
        raw_latency(&s1.platform, &s, give_up + TICK * s.ticks as u32).await?;
    let base = Percentiles::of(&mut raw);
    eprintln!(
        "   baseline append → read: p50 {:.2} ms, p99 {:.2} ms",
        base.p50_ms, base.p99_ms
    );

    let addr = format!("http://{}", s1.platform.grpc_addr);
    let ingest = IngestClient::new(
        Channel::from_shared(addr.clone())?
            .connect()
            .await
            .context("connect ingest")?,
    )
    .max_encoding_message_size(64 * 1024 * 1024);
    let query = QueryClient::new(
        Channel::from_shared(addr)?
            .connect()
            .await
            .context("connect query")?,
    );
    let mix = Mix::new("s2", s1.persons);
    let run_tag = std::process::id();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let failed = Arc::new(AtomicU64::new(0));
    let mut probes = JoinSet::new();
    let (mut late, mut published) = (0u64, 0u64);
    let metrics_before = common::metric_totals();
    let cpu = CpuTime::now();
    let epoch = Instant::now();
    for k in 0..s.ticks {
        let at = epoch + TICK * k as u32;
        tokio::time::sleep_until(at.into()).await;
        let permit = slots.clone().acquire_owned().await?;
        if at.elapsed() > LATE {
            late += 1;
        }
        let first = k * s.per_tick as u64;
        let mut events: Vec<String> = (first..first + s.per_tick as u64)
            .map(|i| mix.raw(i).json)
            .collect();
        let probe_person = k.is_multiple_of(PROBE_EVERY).then(|| {
            let platform_id = format!("probe-{run_tag}-{k}");
            events.push(probe_event(
                &format!("s2-{platform_id}"),
                &platform_id,
                1_767_225_600 + k as i64,
            ));
            default_person_id("bench", &platform_id).to_string()
        });
        published += events.len() as u64;
        let sent = Instant::now();
        let (mut client, failed) = (ingest.clone(), failed.clone());
        tokio::spawn(async move {
            let ok =
                match client.publish(pb::PublishRequest { events }).await {
                    Ok(r) => r.into_inner().results.iter().all(|r| {
                        matches!(r.outcome, Some(pb::publish_result::Outcome::Accepted(_)))
                    }),
                    Err(_) => false,
                };
            if !ok {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
        if let Some(person) = probe_person {
            if at.duration_since(epoch) >= WARMUP {
                let second = at.duration_since(epoch).as_secs();
                let q = query.clone();
                probes.spawn(async move { (second, probe(q, person, sent, give_up).await) });
            }
        }
    }
    let publishing = epoch.elapsed();
    // How long the pipeline needs to catch up once publishing stops.
    let drain_start = Instant::now();
    let mut drain_s = None;
    while drain_start.elapsed() < give_up {
        if drained(&s1.platform).await? {
            drain_s = Some(drain_start.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let used = CpuTime::now().since(&cpu);
    let batches = common::metric_delta(&metrics_before, &common::metric_totals());
    let mut latencies = Vec::new();
    let mut invisible = 0;
    let mut worst: Vec<f64> = Vec::new();
    while let Some(done) = probes.join_next().await {
        let (second, latency) = done?;
        let latency = latency.unwrap_or_else(|| {
            invisible += 1;
            give_up
        });
        let second = second as usize;
        if worst.len() <= second {
            worst.resize(second + 1, 0.0);
        }
        worst[second] = f64::max(worst[second], round(latency.as_secs_f64() * 1e3, 2));
        latencies.push(latency);
    }
    let got = Percentiles::of(&mut latencies);
    eprintln!(
        "   publish → visible: p50 {:.2} ms, p99 {:.2} ms ({} probes, {invisible} not visible)",
        got.p50_ms, got.p99_ms, got.count
    );
    let ratio = if got.p99_ms > 0.0 {
        base.p99_ms / got.p99_ms
    } else {
        0.0
    };
    let failed = failed.load(Ordering::Relaxed);
    Ok(Scenario {
        id: "S2".into(),
        name: format!(
            "publish → visible over gRPC, open loop at {:.0} % of S1's rate (p99)",
            o.s2_rate_fraction * 100.0
        ),
        engine: s1.platform.engine.into(),
        value: round(got.p99_ms, 3),
        unit: "ms".into(),
        baseline: Some(Baseline {
            name: "append → read p99 of a raw reader of the same log, same schedule".into(),
            value: round(base.p99_ms, 3),
            unit: "ms".into(),
        }),
        ratio: Some(round(ratio, 4)),
        details: json!({
            "mode": o.mode(),
            "ratio_is": "baseline p99 / S2 p99",
            "s1_rate_events_per_s": round(rate / o.s2_rate_fraction, 0),
            "rate_fraction_of_s1": o.s2_rate_fraction,
            "offered_events_per_s": round(offered, 0),
            "events_per_call": s.per_tick,
            "tick_ms": TICK.as_millis(),
            "publishing_s": round(publishing.as_secs_f64(), 3),
            "events_published": published,
            "achieved_events_per_s": round(published as f64 / publishing.as_secs_f64(), 0),
            "late_ticks": late,
            "batches": batches,
            "failed_calls": failed,
            "drain_after_publishing_s": drain_s.map(|d| round(d, 3)),
            "cpu_utilisation_of_2_cores": round(used.total_secs() / (publishing.as_secs_f64() + drain_s.unwrap_or(0.0)) / 2.0, 3),
            "probes_per_s": 1.0 / (TICK.as_secs_f64() * PROBE_EVERY as f64),
            "probe_visible_means": "GetPerson counts it and ListInteractions lists it (identity, person, interactions applied)",
            "probes_not_visible_within_s": give_up.as_secs(),
            "probes_not_visible": invisible,
            "latency_ms": got,
            "worst_ms_by_second": worst,
            "baseline_latency_ms": base,
            "baseline_late_ticks": raw_late,
            "baseline_worst_ms_by_second": raw_worst,
            "target": "p99 < 50 ms",
            "target_met": got.p99_ms < 50.0 && invisible == 0,
        }),
    })
}
