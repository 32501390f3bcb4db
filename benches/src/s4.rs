//! S4: `Ingest.Publish` over tonic on 127.0.0.1 (validate every event,
//! then one durable append per call), in chunks of 500 events as `waymark
//! publish` sends them, with a few calls in flight. No processor runs, so
//! nothing else competes for the two cores. Baseline: the same bytes with
//! the same keys appended straight to the same topic of the same log with
//! the same durability, in the same chunks at the same concurrency: on the
//! embedded log one fsynced group commit per append, as Ingest's; on Kafka
//! a plain rdkafka producer with Waymark's producer settings (idempotent,
//! acks=all).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use waymark_bench::measure::CpuTime;
use waymark_bench::mix::{Mix, RawEvent};
use waymark_cli::platform;
use waymark_proto::v1 as pb;
use waymark_proto::v1::ingest_client::IngestClient;
use waymark_proto::v1::ingest_server::IngestServer;
use waymark_proto::v1::publish_result::Outcome;
use waymark_schemas::Validator;

use crate::common;
use crate::engines::{Engines, REAL};
use crate::raw::RawRecords;
use crate::report::{round, Baseline, Scenario};
use crate::Options;

/// Events per call (`waymark publish` sends 500).
const CHUNK: usize = 500;
/// Calls in flight.
const IN_FLIGHT: usize = 4;

/// Runs `work(i)` for every i < n on IN_FLIGHT workers; returns (wall, CPU).
async fn drive<F, Fut>(n: usize, work: F) -> anyhow::Result<(f64, CpuTime)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let work = Arc::new(work);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = CpuTime::now();
    let t = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (work, next) = (work.clone(), next.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                work(i).await?;
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok((t.elapsed().as_secs_f64(), CpuTime::now().since(&cpu)))
}

pub(crate) async fn run(o: &Options, engines: &Engines) -> anyhow::Result<Scenario> {
    let n = o.s4_events.max(1);
    let target = engines.target("s4").await?;
    let topology = target.topology.clone();
    let inputs = topology.topics.inputs.name.clone();
    let validator = Arc::new(Validator::new()?);
    let token = CancellationToken::new();
    let mut tasks = platform::Tasks::new();
    let services = platform::services(
        &mut tasks,
        &target.log,
        &target.store,
        &topology,
        &validator,
        None,
        "waymark",
        &token,
    )
    .await?;
    let ingest_service = services.ingest.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(waymark_server::serve(listener, services, token.clone()));

    let mix = Mix::new("s4", (n / 10).max(1));
    let raws: Vec<RawEvent> = (0..n).map(|i| mix.raw(i)).collect();
    let bytes: usize = raws.iter().map(|r| r.json.len()).sum();
    let chunks: Vec<&[RawEvent]> = raws.chunks(CHUNK).collect();

    // Baseline: raw appends of the same bytes and keys.
    let batches: Arc<Vec<RawRecords>> = Arc::new(
        chunks
            .iter()
            .map(|c| {
                c.iter()
                    .map(|r| (r.key.clone(), r.json.clone().into_bytes()))
                    .collect()
            })
            .collect(),
    );
    let (raw, topic) = (target.raw.clone(), inputs.clone());
    let (base_wall, base_cpu) = drive(batches.len(), move |i| {
        let (raw, topic, batches) = (raw.clone(), topic.clone(), batches.clone());
        async move { raw.append(&topic, batches[i].clone()).await }
    })
    .await?;

    // Ingest.Publish over gRPC.
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .context("cannot connect to the ingest server")?;
    let client = IngestClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let requests: Arc<Vec<pb::PublishRequest>> = Arc::new(
        chunks
            .iter()
            .map(|c| pb::PublishRequest {
                events: c.iter().map(|r| r.json.clone()).collect(),
            })
            .collect(),
    );
    let stock_requests = requests.clone();
    let rejected = Arc::new(AtomicUsize::new(0));
    let counted = rejected.clone();
    let (wall, cpu) = drive(requests.len(), move |i| {
        let (mut client, requests, rejected) = (client.clone(), requests.clone(), counted.clone());
        async move {
            let results = client
                .publish(requests[i].clone())
                .await?
                .into_inner()
                .results;
            let bad = results
                .iter()
                .filter(|r| !matches!(r.outcome, Some(Outcome::Accepted(_))))
                .count();
            rejected.fetch_add(bad, Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;
    // Diagnostic: the same Ingest handlers on tonic's stock transport
    // (TCP_NODELAY on accepted sockets), same calls.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let stock_addr = listener.local_addr()?;
    let stock_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                IngestServer::new(ingest_service)
                    .max_decoding_message_size(waymark_server::MAX_INGEST_REQUEST_BYTES),
            )
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                token.clone().cancelled_owned(),
            ),
    );
    let stock_client = IngestClient::new(
        Channel::from_shared(format!("http://{stock_addr}"))?
            .connect()
            .await?,
    )
    .max_encoding_message_size(64 * 1024 * 1024);
    let counted = rejected.clone();
    let (stock_wall, stock_cpu) = drive(stock_requests.len(), move |i| {
        let (mut client, requests, rejected) = (
            stock_client.clone(),
            stock_requests.clone(),
            counted.clone(),
        );
        async move {
            let results = client
                .publish(requests[i].clone())
                .await?
                .into_inner()
                .results;
            let bad = results
                .iter()
                .filter(|r| !matches!(r.outcome, Some(Outcome::Accepted(_))))
                .count();
            rejected.fetch_add(bad, Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;
    token.cancel();
    let _ = server.await;
    let _ = stock_server.await;
    let rejected = rejected.load(Ordering::Relaxed);
    if rejected > 0 {
        bail!("ingest rejected {rejected} generated events");
    }
    let high: u64 = common::highs(target.log.as_ref(), &inputs)
        .await?
        .iter()
        .sum();
    if high != 3 * n {
        bail!("inputs holds {high} records, expected {}", 3 * n);
    }
    let engine = target.engine;
    target.cleanup().await?;
    let durability = if engine == REAL {
        "idempotent produce, acks=all (Waymark's producer settings), both sides"
    } else {
        "fsync per group commit (redb Durability::Immediate), both sides"
    };

    let nf = n as f64;
    let rate = nf / wall;
    let base_rate = nf / base_wall;
    let ratio = rate / base_rate;
    eprintln!("   ingest {rate:.0} events/s vs raw append {base_rate:.0} events/s");
    Ok(Scenario {
        id: "S4".into(),
        name: "Ingest.Publish over tonic: validate + durable append".into(),
        engine: engine.into(),
        value: round(rate, 0),
        unit: "events/s".into(),
        baseline: Some(Baseline {
            name: if engine == REAL {
                "raw rdkafka producer (same settings) of the same bytes to the same topic".into()
            } else {
                "raw durable append of the same bytes to the same log".into()
            },
            value: round(base_rate, 0),
            unit: "events/s".into(),
        }),
        ratio: Some(round(ratio, 4)),
        details: json!({
            "mode": o.mode(),
            "events": n,
            "mean_event_bytes": bytes / raws.len().max(1),
            "events_per_call": CHUNK,
            "calls_in_flight": IN_FLIGHT,
            "durability": durability,
            "wall_s": round(wall, 3),
            "cpu_user_s": round(cpu.user.as_secs_f64(), 3),
            "cpu_system_s": round(cpu.system.as_secs_f64(), 3),
            "events_per_cpu_s": round(nf / cpu.total_secs(), 0),
            "baseline_wall_s": round(base_wall, 3),
            "baseline_cpu_user_s": round(base_cpu.user.as_secs_f64(), 3),
            "baseline_cpu_system_s": round(base_cpu.system.as_secs_f64(), 3),
            "baseline_events_per_cpu_s": round(nf / base_cpu.total_secs(), 0),
            "client_in_process": true,
            "diagnostic_same_handlers_stock_tonic_transport": {
                "what": "the same IngestService on tonic's stock transport (TCP_NODELAY on accepted sockets)",
                "events_per_s": round(nf / stock_wall, 0),
                "ratio_to_baseline": round((nf / stock_wall) / base_rate, 4),
                "events_per_cpu_s": round(nf / stock_cpu.total_secs(), 0),
            },
            "target": "ratio >= 0.8",
            "target_met": ratio >= 0.8,
        }),
    })
}
