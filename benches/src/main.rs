//! `waymark-bench`: the end-to-end benchmark harness of issue 4. Every
//! scenario measures its own baseline in the same run, on the same machine,
//! and reports the ratio. `benches/run` builds this binary in release and
//! runs it; see `docs/performance.md` for the results and how to read them.
//!
//! # Layout
//! - `s1.rs` rebuild: every folding processor replays `waymark.events` from
//!   offset 0 into empty projections, vs a raw scan of the same partitions.
//! - `s3.rs` `GetPerson` / `ListInteractions` over tonic on 127.0.0.1, vs a
//!   tonic handler that returns canned responses of the same sizes.
//! - `s2.rs` publish → visible latency, open loop at 50 % of S1's rate, vs
//!   append → read latency of a raw reader of the same log.
//! - `s4.rs` `Ingest.Publish` (validate + durable append), vs a raw append
//!   of the same bytes with the same durability.
//! - `s5.rs` peak RSS of the release `waymark dev` while a lag drains.
//! - `peer.rs` S1P (`--real`): the person fold by Waymark's `person`
//!   processor alone vs a Kafka Streams application doing the same fold
//!   (`benches/kstreams`), on the same records and engines.
//! - `s6.rs` `waymark dev`'s Kafka endpoint (`waymark_broker` on the
//!   embedded log) with librdkafka: idempotent acks=all produce vs a raw
//!   durable append of the same bytes, and an assigned consumer's fetch vs
//!   a raw scan of the same log; with `--real` also vs Apache Kafka.
//! - `engines.rs` where scenarios run: the embedded default, or (`--real`)
//!   Apache Kafka + Cassandra with fresh topics and keyspace per scenario;
//!   `raw.rs` the baselines' raw clients of each log (the embedded log's
//!   own append and scan; plain rdkafka producer and consumers).
//! - `report.rs` the report (`target/bench/report.json`) and the table;
//!   `machine.rs` what the machine is; `common.rs` shared set-up.
//!
//! # Guarantees
//! - Scenarios run one after another, never overlapping, and each baseline
//!   runs right next to its scenario with the same sizes, batching,
//!   concurrency and durability.
//! - Every loop is bounded in count and time; servers listen on 127.0.0.1
//!   only and stop with the scenario.

mod common;
mod engines;
mod machine;
mod peer;
mod raw;
mod report;
mod s1;
mod s2;
mod s3;
mod s4;
mod s5;
mod s6;

/// The allocator of the `waymark` binary, so the in-process scenarios
/// (S1–S4, S6) measure the product as it ships.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};

use crate::engines::Engines;

/// Sizes and switches of one run.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) quick: bool,
    /// Also run S1–S4 on Kafka + Cassandra, and S6 against Apache Kafka.
    pub(crate) real: bool,
    /// Run S1–S4 on Kafka + Cassandra only (S5 and S6 are skipped).
    pub(crate) real_only: bool,
    pub(crate) out: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) waymark: PathBuf,
    /// Where `benches/kstreams/build` put the Kafka Streams peer (S1P).
    pub(crate) kstreams: PathBuf,
    pub(crate) only: Option<BTreeSet<String>>,
    /// S1: events on the resolved topic (persons = events / 10).
    pub(crate) s1_events: u64,
    /// S3: measured seconds per side.
    pub(crate) s3_secs: f64,
    /// S3: requests in flight.
    pub(crate) s3_concurrency: usize,
    /// S2: seconds of open-loop publishing per side.
    pub(crate) s2_secs: f64,
    /// S2's offered rate as a fraction of S1's (the 0.5 by
    /// default; other values are for diagnosis).
    pub(crate) s2_rate_fraction: f64,
    /// S4: events published per side.
    pub(crate) s4_events: u64,
    /// S5: events of lag on the inputs topic.
    pub(crate) s5_events: u64,
    /// S6: events produced through the Kafka endpoint (and fetched back).
    pub(crate) s6_events: u64,
}

const USAGE: &str =
    "usage: waymark-bench [--quick] [--real | --real-only] [--out FILE] [--work DIR] [--waymark BIN]
                     [--kstreams DIR]
                     [--only S1,S2,...] [--s1-events N] [--s4-events N] [--s5-events N]
                     [--s6-events N]
                     [--s2-secs S] [--s2-rate-fraction F] [--s3-secs S] [--s3-concurrency N]";

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let args: Vec<String> = args.collect();
        let quick = args.iter().any(|a| a == "--quick");
        let real_only = args.iter().any(|a| a == "--real-only");
        let real = real_only || args.iter().any(|a| a == "--real");
        let mut o = Options {
            quick,
            real,
            real_only,
            out: PathBuf::from("target/bench/report.json"),
            work: PathBuf::from("target/bench/work"),
            waymark: PathBuf::from("target/release/waymark"),
            kstreams: PathBuf::from("target/kstreams"),
            only: None,
            s1_events: if quick { 100_000 } else { 1_000_000 },
            s3_secs: if quick { 5.0 } else { 15.0 },
            s3_concurrency: 16,
            s2_secs: if quick { 10.0 } else { 30.0 },
            s2_rate_fraction: 0.5,
            s4_events: if quick { 50_000 } else { 200_000 },
            s5_events: if quick { 250_000 } else { 2_000_000 },
            s6_events: if quick { 200_000 } else { 1_000_000 },
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| anyhow!("{arg} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--quick" | "--real" | "--real-only" => {}
                "--out" => o.out = value()?.into(),
                "--work" => o.work = value()?.into(),
                "--waymark" => o.waymark = value()?.into(),
                "--kstreams" => o.kstreams = value()?.into(),
                "--only" => {
                    o.only = Some(
                        value()?
                            .split(',')
                            .map(|s| s.trim().to_uppercase())
                            .collect(),
                    )
                }
                "--s1-events" => o.s1_events = value()?.parse()?,
                "--s4-events" => o.s4_events = value()?.parse()?,
                "--s5-events" => o.s5_events = value()?.parse()?,
                "--s6-events" => o.s6_events = value()?.parse()?,
                "--s2-secs" => o.s2_secs = value()?.parse()?,
                "--s2-rate-fraction" => o.s2_rate_fraction = value()?.parse()?,
                "--s3-secs" => o.s3_secs = value()?.parse()?,
                "--s3-concurrency" => o.s3_concurrency = value()?.parse()?,
                "-h" | "--help" => return Err(anyhow!("{USAGE}")),
                other => return Err(anyhow!("unknown argument {other}\n{USAGE}")),
            }
        }
        Ok(o)
    }

    pub(crate) fn wants(&self, id: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(id))
    }

    pub(crate) fn mode(&self) -> &'static str {
        if self.quick {
            "quick"
        } else {
            "default"
        }
    }
}

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("waymark-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("waymark-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// S1, S3, S2 (on the platform S1 leaves running) and S4 on `engines`.
async fn s1_to_s4(o: &Options, engines: &Engines) -> anyhow::Result<Vec<report::Scenario>> {
    let mut scenarios = Vec::new();
    let on = engines.name();
    if o.wants("S1") || o.wants("S2") || o.wants("S3") {
        eprintln!("== S1 rebuild ({} events) on {on}", o.s1_events);
        let s1 = s1::run(o, engines).await?;
        let rate = s1.rate;
        scenarios.push(s1.scenario.clone());
        if o.wants("S3") {
            eprintln!("== S3 queries over tonic on {on}");
            scenarios.push(s3::run(o, &s1).await?);
        }
        if o.wants("S2") {
            let offered = rate * o.s2_rate_fraction;
            eprintln!("== S2 publish → visible at {offered:.0} events/s on {on}");
            scenarios.push(s2::run(o, &s1, offered).await?);
        }
        s1.stop().await?;
    }
    if o.wants("S1P") && matches!(engines, Engines::Real { .. }) {
        eprintln!(
            "== S1P person fold ({} events): Waymark's person vs Kafka Streams on {on}",
            o.s1_events
        );
        scenarios.push(peer::run(o, engines, &o.kstreams).await?);
    }
    if o.wants("S4") {
        eprintln!("== S4 ingest ({} events) on {on}", o.s4_events);
        scenarios.push(s4::run(o, engines).await?);
    }
    Ok(scenarios)
}

async fn run(o: Options) -> anyhow::Result<()> {
    if o.work.exists() {
        std::fs::remove_dir_all(&o.work)
            .with_context(|| format!("cannot clear {}", o.work.display()))?;
    }
    std::fs::create_dir_all(&o.work)?;
    if let Some(parent) = o.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    eprintln!("== machine");
    let machine = machine::describe(&o.work);
    let mut scenarios = Vec::new();

    let mut engines = Vec::new();
    if !o.real_only {
        engines.push(Engines::Embedded {
            work: o.work.clone(),
        });
    }
    if o.real {
        engines.push(Engines::real_from_env());
    }
    for e in &engines {
        scenarios.extend(s1_to_s4(&o, e).await?);
    }
    if o.wants("S5") && !o.real_only {
        eprintln!(
            "== S5 peak RSS of waymark dev ({} events of lag)",
            o.s5_events
        );
        scenarios.push(s5::run(&o).await?);
    }
    if o.wants("S6") && !o.real_only {
        // With `--real` the same produce and fetch also run on Apache Kafka.
        let kafka = engines.iter().find_map(|e| match e {
            Engines::Real { bootstrap, .. } => Some(bootstrap.as_str()),
            Engines::Embedded { .. } => None,
        });
        eprintln!(
            "== S6 Kafka endpoint of waymark dev: produce + fetch ({} events)",
            o.s6_events
        );
        scenarios.extend(s6::run(&o, kafka).await?);
    }

    let report = report::Report { machine, scenarios };
    report::print_table(&report);
    std::fs::write(&o.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", o.out.display()))?;
    println!("report: {}", o.out.display());
    if !o.quick || o.only.is_some() {
        return Ok(());
    }
    // A quick run keeps nothing but the report.
    let _ = std::fs::remove_dir_all(&o.work);
    Ok(())
}
