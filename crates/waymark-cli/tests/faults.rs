//! The fault suite: each case injects one fault into a running Waymark
//! under traffic and then checks one oracle, an independent fold of what
//! was acknowledged:
//!
//! - every acknowledged event is in its person's history exactly once (no
//!   id missing, none twice), and an event whose publish call failed with
//!   the fault is there at most once;
//! - every poison record is a dead letter exactly once, with its kind;
//! - `verify` recomputes every projection from the log and finds no
//!   difference.
//!
//! The short form runs in every `cargo test` (so in CI); the full form
//! (`WAYMARK_FAULTS=full`, what `scripts/faults` runs) repeats the faults
//! more often over more events. Each case prints its run time; see
//! `docs/operations/faults.md` for the list with results and times.
//!
//! Cases on `waymark dev`: kill -9 at random points; poison records of
//! every kind through the Kafka endpoint; duplicate replays; a rebuild under
//! live traffic; a full disk (a file-size limit, recovery by a restart);
//! a full disk whose space returns while `waymark dev` runs (a tmpfs);
//! the same for the projection store alone. Cases on real Kafka +
//! Cassandra (`scripts/dev-services`):
//! processor kill -9; a zombie member (SIGSTOP past the session timeout,
//! then SIGCONT); a rebalance storm; a consumer-group offset reset; broker
//! SIGSTOP and SIGKILL; Cassandra SIGSTOP; Cassandra SIGKILL and restart;
//! two identity members racing links and merges on shared rows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::engines::{engines, wait_for_grpc, Deployment, Proc};
use common::{clients, event, eventually, free_port, spawn_dev, terminate};
use serde_json::json;
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_proto::v1::publish_result::Outcome;

/// One case at a time: the engine faults must not hit another case.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn full() -> bool {
    std::env::var("WAYMARK_FAULTS").is_ok_and(|v| v == "full")
}

/// `short` in the short form, `long` in the full form.
fn scale(short: usize, long: usize) -> usize {
    if full() {
        long
    } else {
        short
    }
}

/// xorshift64*, seeded per case so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn new(case: &str) -> Self {
        let seed = case.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        eprintln!("fault case {case}: seed {seed:#x}");
        Rng(seed | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

impl Rng {
    /// `n` letters and digits, as incompressible as text gets: a store
    /// that compresses (fjall's journal and tables do) must still write
    /// about `n` bytes for them.
    fn text(&mut self, n: usize) -> String {
        const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        (0..n)
            .map(|_| CHARS[self.below(CHARS.len() as u64) as usize] as char)
            .collect()
    }
}

/// One event of the traffic: who, its id, the envelope.
#[derive(Clone)]
struct Planned {
    who: String,
    id: String,
    json: String,
}

fn traffic(tag: &str, n: usize, persons: usize) -> Vec<Planned> {
    (0..n)
        .map(|i| {
            let who = format!("{tag}-{}", i % persons);
            let id = format!("{tag}-{i}");
            let time = format!(
                "2026-06-{:02}T{:02}:{:02}:00Z",
                1 + i / 1440 % 28,
                i / 60 % 24,
                i % 60
            );
            let src = ("web", who.as_str());
            let json = match i % 3 {
                0 => event(
                    &id,
                    "interaction.recorded",
                    &time,
                    src,
                    json!({"kind": "message", "content_type": "text", "content": format!("m{i}")}),
                ),
                1 => event(
                    &id,
                    "journey.stage_entered",
                    &time,
                    src,
                    json!({"journey_id": "j", "stage": format!("s{}", i % 5)}),
                ),
                _ => event(
                    &id,
                    "learning.quiz_answered",
                    &time,
                    src,
                    json!({"course_id": "c", "quiz_id": format!("q{i}"), "correct": i % 2 == 0}),
                ),
            };
            Planned { who, id, json }
        })
        .collect()
}

/// What the producers were told: acknowledged, or unknown (the call
/// failed with the fault: the event may or may not be in the log).
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, BTreeSet<String>>,
    maybe: BTreeMap<String, BTreeSet<String>>,
}

impl Ledger {
    fn persons(&self) -> BTreeSet<String> {
        self.acked
            .keys()
            .chain(self.maybe.keys())
            .cloned()
            .collect()
    }
    fn acked_count(&self) -> usize {
        self.acked.values().map(BTreeSet::len).sum()
    }
}

type SharedLedger = Arc<Mutex<Ledger>>;

/// Publishes `events` through `Ingest` in chunks, recording each chunk as
/// acknowledged or (its call failed) unknown; stops at the first failed
/// call and returns how many events it got through (acknowledged or not).
async fn publish_tracked(
    addr: &str,
    events: &[Planned],
    ledger: &SharedLedger,
    pause: Duration,
) -> usize {
    let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    else {
        return 0;
    };
    let mut ingest = waymark_proto::v1::ingest_client::IngestClient::new(channel);
    let mut done = 0;
    for chunk in events.chunks(50) {
        let result = ingest
            .publish(pb::PublishRequest {
                events: chunk.iter().map(|e| e.json.clone()).collect(),
            })
            .await;
        let failed = {
            let mut l = ledger.lock().unwrap();
            match result {
                Ok(r) => {
                    for (e, result) in chunk.iter().zip(r.into_inner().results) {
                        match result.outcome {
                            Some(Outcome::Accepted(_)) => {
                                l.acked
                                    .entry(e.who.clone())
                                    .or_default()
                                    .insert(e.id.clone());
                            }
                            other => panic!("{} refused: {other:?}", e.id),
                        }
                    }
                    false
                }
                Err(_) => {
                    for e in chunk {
                        l.maybe
                            .entry(e.who.clone())
                            .or_default()
                            .insert(e.id.clone());
                    }
                    true
                }
            }
        };
        done += chunk.len();
        if failed {
            return done;
        }
        tokio::time::sleep(pause).await;
    }
    done
}

/// Publishes everything, retrying a failed chunk until it is acknowledged
/// (a retried event may then be in the log twice with one id: the folds
/// apply it once).
async fn publish_retrying(addr: &str, events: &[Planned], ledger: &SharedLedger) {
    let mut at = 0;
    while at < events.len() {
        let scratch: SharedLedger = Arc::default();
        let n = publish_tracked(addr, &events[at..], &scratch, Duration::ZERO).await;
        let s = std::mem::take(&mut *scratch.lock().unwrap());
        {
            let mut l = ledger.lock().unwrap();
            for (who, ids) in s.acked {
                for id in ids {
                    l.maybe.get_mut(&who).map(|m| m.remove(&id));
                    l.acked.entry(who.clone()).or_default().insert(id);
                }
            }
        }
        let failed: usize = s.maybe.values().map(BTreeSet::len).sum();
        at += n - failed;
        if failed > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The oracle (see the module docs), once everything is applied.
async fn assert_exactly_once(addr: &str, ledger: &Ledger) {
    let c = clients(addr).await;
    for who in ledger.persons() {
        let person = default_person_id("web", &who).to_string();
        let acked = ledger.acked.get(&who).cloned().unwrap_or_default();
        let maybe = ledger.maybe.get(&who).cloned().unwrap_or_default();
        let q = c.query.clone();
        let ids = eventually(
            &format!("{who}: {} acknowledged events applied", acked.len()),
            || {
                let mut q = q.clone();
                let person = person.clone();
                let acked = acked.clone();
                async move {
                    let mut ids = Vec::new();
                    let mut token = String::new();
                    loop {
                        let page = q
                            .list_events(pb::ListEventsRequest {
                                person_id: person.clone(),
                                page_size: 1000,
                                page_token: token,
                            })
                            .await
                            .ok()?
                            .into_inner();
                        ids.extend(page.events.into_iter().map(|e| e.id));
                        if page.next_page_token.is_empty() {
                            break;
                        }
                        token = page.next_page_token;
                    }
                    let have: BTreeSet<&String> = ids.iter().collect();
                    acked.iter().all(|id| have.contains(id)).then_some(ids)
                }
            },
        )
        .await;
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "{who}: an event applied twice: {ids:?}"
        );
        for id in &ids {
            assert!(
                acked.contains(id) || maybe.contains(id),
                "{who}: {id} applied but never published"
            );
        }
        let mut q = c.query.clone();
        let p = q
            .get_person(pb::GetPersonRequest { person_id: person })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.event_count as usize, ids.len(), "{who}: event count");
    }
    common::replay::caught_up(addr).await;
    let mut admin = c.admin.clone();
    let reports = admin
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .reports;
    for r in reports {
        assert_eq!(
            r.difference_count, 0,
            "{}: {:?}",
            r.processor, r.differences
        );
    }
}

fn done(case: &str, started: Instant, ledger: &Ledger) {
    eprintln!(
        "fault case {case}: ok in {:.1}s ({} events acknowledged, {} unknown)",
        started.elapsed().as_secs_f64(),
        ledger.acked_count(),
        ledger.maybe.values().map(BTreeSet::len).sum::<usize>()
    );
}

// ---------------------------------------------------------------- dev --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_kill_9_at_random_points() {
    let _serial = SERIAL.lock().await;
    let case = "dev_kill_9_at_random_points";
    let started = Instant::now();
    let mut rng = Rng::new(case);
    let dir = tempfile::tempdir().unwrap();
    let events = traffic("k9", scale(3000, 20000), 30);
    let ledger: SharedLedger = Arc::default();
    let kills = scale(4, 20);
    // Each run gets its share of the traffic and is killed at a random
    // point of it: mid-publish, or after it while the processors work.
    let share = events.len() / (kills + 1);
    let mut at = 0;
    for _ in 0..kills {
        let (mut child, info) = spawn_dev(dir.path(), "127.0.0.1:0");
        let addr = info.grpc_addr.clone();
        let slice: Vec<Planned> = events[at..(at + share).min(events.len())].to_vec();
        let l = ledger.clone();
        let publisher = tokio::spawn(async move {
            publish_tracked(&addr, &slice, &l, Duration::from_millis(10)).await
        });
        tokio::time::sleep(Duration::from_millis(50 + rng.below(400))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        at += publisher.await.unwrap();
    }
    let (mut child, info) = spawn_dev(dir.path(), "127.0.0.1:0");
    publish_retrying(&info.grpc_addr, &events[at..], &ledger).await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert_exactly_once(&info.grpc_addr, &ledger).await;
    terminate(&mut child);
    done(case, started, &ledger);
}

/// A poison record of every kind, produced with a stock Kafka client.
fn poison() -> Vec<(&'static str, Vec<u8>)> {
    let valid = |ty: &str, data: serde_json::Value, version: u32| {
        json!({"id": format!("p-{ty}-{version}"), "type": ty, "version": version, "time": "2026-06-01T00:00:00Z",
               "source": {"platform": "web", "platform_id": "poisoned"}, "data": data})
    };
    let mut no_id = valid("journey.started", json!({"journey_id": "j"}), 1);
    no_id.as_object_mut().unwrap().remove("id");
    vec![
        ("malformed_json", b"{oops".to_vec()),
        ("malformed_json", vec![0xff, 0xfe, 0x00, 0x80]),
        ("malformed_json", Vec::new()),
        ("invalid_envelope", no_id.to_string().into_bytes()),
        ("unknown_type", valid("journey.teleported", json!({}), 1).to_string().into_bytes()),
        ("unsupported_version", valid("journey.started", json!({"journey_id": "j"}), 99).to_string().into_bytes()),
        ("invalid_data", valid("journey.started", json!({"journey_id": ""}), 1).to_string().into_bytes()),
        (
            "too_large",
            valid("interaction.recorded", json!({"kind": "message", "content_type": "text", "content": "x".repeat(1_200_000)}), 1)
                .to_string()
                .into_bytes(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_poison_records_of_every_kind() {
    use rdkafka::producer::{BaseRecord, Producer};
    let _serial = SERIAL.lock().await;
    let case = "dev_poison_records_of_every_kind";
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let kafka = format!("127.0.0.1:{}", free_port());
    let (mut child, info) = spawn_dev(dir.path(), &kafka);
    let acks = common::kafka::Acks::default();
    // A stock librdkafka producer, allowed records as large as the
    // endpoint accepts (the too_large poison is over 1 MiB).
    let producer: rdkafka::producer::BaseProducer<common::kafka::Acks> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &info.kafka_bootstrap)
            .set("enable.idempotence", "true")
            .set("message.max.bytes", "4000000")
            .create_with_context(acks.clone())
            .unwrap();
    let good = traffic("pz", scale(300, 3000), 10);
    let bad = poison();
    let mut ledger = Ledger::default();
    for (i, e) in good.iter().enumerate() {
        producer
            .send(
                BaseRecord::to("waymark.inputs")
                    .key(&format!("web:{}", e.who))
                    .payload(&e.json),
            )
            .unwrap();
        ledger
            .acked
            .entry(e.who.clone())
            .or_default()
            .insert(e.id.clone());
        let step = good.len() / bad.len();
        if i % step == 0 && i / step < bad.len() {
            let (_, value) = &bad[i / step];
            producer
                .send(
                    BaseRecord::to("waymark.inputs")
                        .key("web:poisoned")
                        .payload(value),
                )
                .unwrap();
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    assert!(
        acks.failed.lock().unwrap().is_empty(),
        "{:?}",
        acks.failed.lock().unwrap()
    );
    assert_exactly_once(&info.grpc_addr, &ledger).await;

    // Every poison record is a dead letter exactly once, with its kind.
    let mut c = clients(&info.grpc_addr).await;
    let mut letters = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                page_size: 1000,
                page_token: token,
                newest_first: false,
            })
            .await
            .unwrap()
            .into_inner();
        letters.extend(page.dead_letters);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        letters.len(),
        bad.len(),
        "one dead letter per poison record"
    );
    for (kind, value) in &bad {
        let matching: Vec<&pb::DeadLetter> = letters.iter().filter(|d| d.value == *value).collect();
        assert_eq!(matching.len(), 1, "{kind}: exactly one dead letter");
        assert_eq!(matching[0].error, *kind, "{}", matching[0].message);
        assert_eq!(matching[0].topic, "waymark.inputs");
        assert_eq!(matching[0].processor, "identity");
    }
    terminate(&mut child);
    done(case, started, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_duplicate_replays() {
    let _serial = SERIAL.lock().await;
    let case = "dev_duplicate_replays";
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, info) = spawn_dev(dir.path(), "127.0.0.1:0");
    let events = traffic("dup", scale(600, 6000), 12);
    let ledger: SharedLedger = Arc::default();
    publish_retrying(&info.grpc_addr, &events, &ledger).await;
    // Everything published again (a producer retrying everything): the
    // folds apply each id once.
    let again: SharedLedger = Arc::default();
    publish_retrying(&info.grpc_addr, &events, &again).await;
    publish_retrying(&info.grpc_addr, &events[..events.len() / 3], &again).await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert_exactly_once(&info.grpc_addr, &ledger).await;
    terminate(&mut child);
    done(case, started, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_rebuild_under_live_traffic() {
    let _serial = SERIAL.lock().await;
    let case = "dev_rebuild_under_live_traffic";
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, info) = spawn_dev(dir.path(), "127.0.0.1:0");
    let events = traffic("rb", scale(2000, 20000), 20);
    let ledger: SharedLedger = Arc::default();
    let half = events.len() / 2;
    publish_retrying(&info.grpc_addr, &events[..half], &ledger).await;
    let addr = info.grpc_addr.clone();
    let rest = events[half..].to_vec();
    let l = ledger.clone();
    let live = tokio::spawn(async move {
        let mut at = 0;
        while at < rest.len() {
            let end = (at + 50).min(rest.len());
            publish_retrying(&addr, &rest[at..end], &l).await;
            at = end;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    for processor in ["journey", "person"] {
        let addr = info.grpc_addr.clone();
        let out = tokio::task::spawn_blocking(move || {
            common::replay::replay_switch(&addr, processor, "2")
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", common::replay::text(&out));
    }
    live.await.unwrap();
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert_exactly_once(&info.grpc_addr, &ledger).await;
    let projections = common::replay::projections(&info.grpc_addr).await;
    for p in projections
        .iter()
        .filter(|p| p.processor == "journey" || p.processor == "person")
    {
        assert_eq!(p.active_version, 2, "{}", p.processor);
    }
    terminate(&mut child);
    done(case, started, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_full_disk() {
    let _serial = SERIAL.lock().await;
    let case = "dev_full_disk";
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // No file of the process may grow past 96 MiB (more than the 64 MiB
    // the store's journal preallocates): a write past it fails with EFBIG
    // (SIGXFSZ ignored), as on a full disk. Starting with less space is
    // refused at once: "cannot open the embedded store … File too large".
    let limited = "trap '' XFSZ; ulimit -f 98304; exec \"$0\" \"$@\"";
    let (mut child, info) = common::spawn_dev_in(dir.path(), "127.0.0.1:0", Some(limited));
    let big = "x".repeat(60_000);
    let events: Vec<Planned> = (0..scale(3000, 6000))
        .map(|i| {
            let who = format!("fd-{}", i % 10);
            let id = format!("fd-{i}");
            let json = event(
                &id,
                "interaction.recorded",
                "2026-06-01T00:00:00Z",
                ("web", &who),
                json!({"kind": "message", "content_type": "text", "content": big}),
            );
            Planned { who, id, json }
        })
        .collect();
    let mut ledger = Ledger::default();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", info.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut ingest = waymark_proto::v1::ingest_client::IngestClient::new(channel);
    let mut refused = None;
    let mut at = 0;
    while at < events.len() {
        let chunk = &events[at..(at + 20).min(events.len())];
        match ingest
            .publish(pb::PublishRequest {
                events: chunk.iter().map(|e| e.json.clone()).collect(),
            })
            .await
        {
            Ok(r) => {
                for (e, result) in chunk.iter().zip(r.into_inner().results) {
                    assert!(
                        matches!(result.outcome, Some(Outcome::Accepted(_))),
                        "{result:?}"
                    );
                    ledger
                        .acked
                        .entry(e.who.clone())
                        .or_default()
                        .insert(e.id.clone());
                }
                at += chunk.len();
            }
            Err(status) => {
                for e in chunk {
                    ledger
                        .maybe
                        .entry(e.who.clone())
                        .or_default()
                        .insert(e.id.clone());
                }
                at += chunk.len();
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("the space ran out before the events did");
    // A clear error: the log is unavailable, never INTERNAL, and the
    // process is still there, answering.
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "waymark dev exited on a full disk"
    );
    let mut admin = clients(&info.grpc_addr).await.admin;
    admin
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("still answering");
    child.kill().unwrap();
    child.wait().unwrap();

    // Space returns: nothing acknowledged is lost or corrupt.
    let (mut child, info) = spawn_dev(dir.path(), "127.0.0.1:0");
    let rest: SharedLedger = Arc::new(Mutex::new(ledger));
    publish_retrying(&info.grpc_addr, &events[at..], &rest).await;
    let ledger = std::mem::take(&mut *rest.lock().unwrap());
    assert_exactly_once(&info.grpc_addr, &ledger).await;
    terminate(&mut child);
    eprintln!(
        "fault case {case}: refused with {:?}: {}",
        status.code(),
        status.message()
    );
    done(case, started, &ledger);
}

/// A small filesystem of its own for a data directory (a tmpfs, mounted
/// as root): filled up and freed again while `waymark dev` runs on it.
struct SmallDisk {
    dir: tempfile::TempDir,
    fillers: Vec<PathBuf>,
}

impl SmallDisk {
    /// `None` (with a SKIPPED line) where mounting is not allowed, which
    /// fails under `CI=true`.
    fn mount(mib: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                !waymark_testenv::in_ci(),
                "mounting a tmpfs needs root, which CI has"
            );
            waymark_testenv::skip("mounting a tmpfs needs root");
            return None;
        }
        Some(Self {
            dir,
            fillers: Vec::new(),
        })
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Fills the disk with 4 MiB files until it is full, then frees
    /// `free_mib` of them again.
    fn fill_leaving(&mut self, free_mib: usize) {
        use std::io::Write;
        let chunk = vec![0u8; 4 << 20];
        for i in 0.. {
            let path = self.dir.path().join(format!("filler-{i}"));
            let mut f = std::fs::File::create(&path).unwrap();
            let full = f.write_all(&chunk).and_then(|()| f.sync_all()).is_err();
            self.fillers.push(path);
            if full {
                break;
            }
        }
        for _ in 0..free_mib.div_ceil(4) {
            if let Some(path) = self.fillers.pop() {
                std::fs::remove_file(path).unwrap();
            }
        }
    }

    /// Frees every filler.
    fn free(&mut self) {
        for path in self.fillers.drain(..) {
            std::fs::remove_file(path).unwrap();
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_disk_full_then_space_returns() {
    let _serial = SERIAL.lock().await;
    let case = "dev_disk_full_then_space_returns";
    let started = Instant::now();
    let Some(mut disk) = SmallDisk::mount(1024) else {
        return;
    };
    std::fs::create_dir_all(disk.data()).unwrap();
    let (mut child, info) = spawn_dev(&disk.data(), "127.0.0.1:0");
    disk.fill_leaving(24);
    let big = "x".repeat(60_000);
    let events: Vec<Planned> = (0..scale(3000, 6000))
        .map(|i| {
            let who = format!("sr-{}", i % 10);
            let id = format!("sr-{i}");
            let json = event(
                &id,
                "interaction.recorded",
                "2026-06-01T00:00:00Z",
                ("web", &who),
                json!({"kind": "message", "content_type": "text", "content": big}),
            );
            Planned { who, id, json }
        })
        .collect();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", info.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut ingest = waymark_proto::v1::ingest_client::IngestClient::new(channel);
    let mut ledger = Ledger::default();
    let mut refused = None;
    let mut at = 0;
    while at < events.len() && refused.is_none() {
        let chunk = &events[at..(at + 20).min(events.len())];
        let result = ingest
            .publish(pb::PublishRequest {
                events: chunk.iter().map(|e| e.json.clone()).collect(),
            })
            .await;
        for (i, e) in chunk.iter().enumerate() {
            let acked = match &result {
                Ok(r) => matches!(r.get_ref().results[i].outcome, Some(Outcome::Accepted(_))),
                Err(_) => false,
            };
            let book = if acked {
                &mut ledger.acked
            } else {
                &mut ledger.maybe
            };
            book.entry(e.who.clone()).or_default().insert(e.id.clone());
        }
        if let Err(status) = result {
            refused = Some(status);
        }
        at += chunk.len();
    }
    let status = refused.expect("the space ran out before the events did");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(child.try_wait().unwrap().is_none(), "waymark dev exited");
    let refused_at = ledger.acked_count();

    // Space returns; the same process takes events again.
    disk.free();
    let rest: SharedLedger = Arc::new(Mutex::new(ledger));
    let more = (at + scale(300, 1000)).min(events.len());
    tokio::time::timeout(
        Duration::from_secs(120),
        publish_retrying(&info.grpc_addr, &events[at..more], &rest),
    )
    .await
    .expect("waymark dev takes events again within 2 minutes of space returning");
    let ledger = std::mem::take(&mut *rest.lock().unwrap());
    assert_exactly_once(&info.grpc_addr, &ledger).await;

    // And what is on the disk is sound: killed and started again, the same.
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, info) = spawn_dev(&disk.data(), "127.0.0.1:0");
    assert_exactly_once(&info.grpc_addr, &ledger).await;
    terminate(&mut child);
    eprintln!(
        "fault case {case}: refused after {refused_at} events with {:?}: {}",
        status.code(),
        status.message()
    );
    done(case, started, &ledger);
}

/// The sum of `waymark_processor_retries_total` over the series whose
/// stage is `stage`.
fn retries(metrics: &str, stage: &str) -> f64 {
    let label = format!("stage=\"{stage}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("waymark_processor_retries_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_store_disk_full_then_space_returns() {
    let _serial = SERIAL.lock().await;
    let case = "dev_store_disk_full_then_space_returns";
    let started = Instant::now();
    // Only the projection store is on the small disk: the log keeps taking
    // events while the store's writes fail.
    let Some(mut disk) = SmallDisk::mount(256) else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let store = disk.dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    std::os::unix::fs::symlink(&store, data.path().join("store")).unwrap();
    let (mut child, info) = spawn_dev(data.path(), "127.0.0.1:0");
    disk.fill_leaving(16);
    let mut rng = Rng::new(case);
    let events: Vec<Planned> = (0..scale(600, 1500))
        .map(|i| {
            let who = format!("ss-{}", i % 10);
            let id = format!("ss-{i}");
            let json = event(
                &id,
                "interaction.recorded",
                "2026-06-01T00:00:00Z",
                ("web", &who),
                json!({"kind": "message", "content_type": "text", "content": rng.text(60_000)}),
            );
            Planned { who, id, json }
        })
        .collect();
    let ledger: SharedLedger = Arc::default();
    publish_retrying(&info.grpc_addr, &events, &ledger).await;
    // Failing for a while: opened again (once a second) and failing again.
    let failed = eventually("the store's writes failing for want of space", || async {
        // Identity's writes, and the folds' flushes of what they deferred.
        let metrics = common::metrics_text(&info.metrics_addr).await;
        let failed = retries(&metrics, "write") + retries(&metrics, "flush");
        (failed >= 4.0).then_some(failed)
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "waymark dev exited");

    // Space returns; the same process applies everything.
    disk.free();
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert_exactly_once(&info.grpc_addr, &ledger).await;

    // And what is on the disk is sound: killed and started again, the same.
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, info) = spawn_dev(data.path(), "127.0.0.1:0");
    assert_exactly_once(&info.grpc_addr, &ledger).await;
    terminate(&mut child);
    eprintln!("fault case {case}: {failed} store writes failed before space returned");
    done(case, started, &ledger);
}

// ------------------------------------------------------- real engines --

fn dev_services(args: &[&str]) -> bool {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/dev-services");
    Command::new(script)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// The pid of a service `scripts/dev-services` runs.
fn service_pid(name: &str) -> u32 {
    let file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../.services/{name}.pid"));
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// SIGKILLs `pid` and waits until it is gone: the kernel closes a dying
/// JVM's listening sockets only once all its threads have exited, and a
/// restart before that finds its port still taken.
async fn kill_and_wait(pid: u32) {
    signal(pid, "KILL");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    // A zombie keeps its /proc entry until reaped, but has no threads left.
    while std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    }) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} still alive 60 s after SIGKILL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Processor flags for the real-engine cases: a short session timeout, so
/// that a stopped member loses its partitions within seconds.
const FAST_GROUP: &str = "session.timeout.ms=6000,heartbeat.interval.ms=1000";

struct Real {
    d: Deployment,
    _serve: Proc,
    addr: String,
}

async fn real() -> Option<Real> {
    let (bootstrap, cql) = engines()?;
    let d = Deployment::new(bootstrap, cql);
    let (serve, addr) = d.serve();
    wait_for_grpc(&addr).await;
    Some(Real {
        d,
        _serve: serve,
        addr,
    })
}

impl Drop for Real {
    /// On a failure, the end of every process's log, to see why.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.d.path()) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("---- {} (last 40 lines)", path.display());
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Real {
    fn member(&self) -> Proc {
        self.d
            .run_with(&[], &[("WAYMARK_KAFKA_PROPERTIES", FAST_GROUP)])
    }
}

/// Publishes `events` in the background, retrying until acknowledged.
fn background(
    addr: &str,
    events: Vec<Planned>,
    ledger: &SharedLedger,
) -> tokio::task::JoinHandle<()> {
    let (addr, l) = (addr.to_owned(), ledger.clone());
    tokio::spawn(async move {
        let mut at = 0;
        while at < events.len() {
            let end = (at + 50).min(events.len());
            publish_retrying(&addr, &events[at..end], &l).await;
            at = end;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn finish(case: &str, started: Instant, r: &Real, ledger: &SharedLedger) {
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert_exactly_once(&r.addr, &ledger).await;
    done(case, started, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_processor_kill_9_at_random_points() {
    let _serial = SERIAL.lock().await;
    let Some(r) = real().await else { return };
    let case = "real_processor_kill_9_at_random_points";
    let started = Instant::now();
    let mut rng = Rng::new(case);
    let ledger: SharedLedger = Arc::default();
    let load = background(&r.addr, traffic("rk", scale(3000, 30000), 30), &ledger);
    for _ in 0..scale(3, 20) {
        let mut member = r.member();
        tokio::time::sleep(Duration::from_millis(1500 + rng.below(3000))).await;
        member.kill9();
    }
    load.await.unwrap();
    let mut member = r.member();
    finish(case, started, &r, &ledger).await;
    assert!(member.terminate().success(), "{}", member.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_zombie_member_and_rebalance_storm() {
    let _serial = SERIAL.lock().await;
    let Some(r) = real().await else { return };
    let case = "real_zombie_member_and_rebalance_storm";
    let started = Instant::now();
    let mut rng = Rng::new(case);
    let ledger: SharedLedger = Arc::default();
    let load = background(&r.addr, traffic("rz", scale(3000, 30000), 30), &ledger);
    let mut steady = r.member();
    // The zombie: stopped past the session timeout while it owns
    // partitions (the group moves them to the steady member), then resumed
    // mid-batch with its old assignment.
    let zombie = r.member();
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal(zombie.child.id(), "STOP");
    tokio::time::sleep(Duration::from_secs(10)).await;
    signal(zombie.child.id(), "CONT");
    // The storm: members joining and leaving (cleanly and not) while the
    // traffic goes on.
    let mut storm: Vec<Proc> = Vec::new();
    for i in 0..scale(4, 20) {
        if storm.len() < 2 || rng.below(2) == 0 {
            storm.push(r.member());
        } else {
            let mut gone = storm.remove(rng.below(storm.len() as u64) as usize);
            if i % 2 == 0 {
                gone.kill9();
            } else {
                gone.terminate();
            }
        }
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(2000))).await;
    }
    drop(storm);
    drop(zombie);
    load.await.unwrap();
    finish(case, started, &r, &ledger).await;
    assert!(steady.terminate().success(), "{}", steady.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_consumer_group_offsets_reset_to_earliest() {
    let _serial = SERIAL.lock().await;
    let Some(r) = real().await else { return };
    let case = "real_consumer_group_offsets_reset_to_earliest";
    let started = Instant::now();
    let ledger: SharedLedger = Arc::default();
    let mut member = r.member();
    publish_retrying(&r.addr, &traffic("ro", scale(1500, 15000), 15), &ledger).await;
    let snapshot = std::mem::take(&mut *ledger.lock().unwrap());
    assert_exactly_once(&r.addr, &snapshot).await;
    *ledger.lock().unwrap() = snapshot;
    assert!(member.terminate().success(), "{}", member.log());
    // An operator resets every processor group to the earliest offset
    // (Kafka's own tool): positions live with the rows, so nothing is
    // applied twice.
    for processor in ["identity", "person", "interactions", "journey", "learning"] {
        let group = format!("{}.{processor}.v1", r.d.group_prefix);
        assert!(
            dev_services(&[
                "kafka",
                "consumer-groups",
                "--bootstrap-server",
                &r.d.bootstrap,
                "--group",
                &group,
                "--reset-offsets",
                "--to-earliest",
                "--all-topics",
                "--execute"
            ]),
            "reset {group}"
        );
    }
    let mut member = r.member();
    finish(case, started, &r, &ledger).await;
    assert!(member.terminate().success(), "{}", member.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_broker_sigstop_and_sigkill() {
    let _serial = SERIAL.lock().await;
    let Some(r) = real().await else { return };
    let case = "real_broker_sigstop_and_sigkill";
    let started = Instant::now();
    let ledger: SharedLedger = Arc::default();
    let mut member = r.member();
    let load = background(&r.addr, traffic("rb", scale(2000, 20000), 20), &ledger);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Restarted as it ran: with its SASL_SSL listener when it had one
    // (`scripts/test` starts it so, for the secured-engine tests).
    let secure = dev_services(&["status", "--secure", "kafka"]);
    let kafka = service_pid("kafka");
    signal(kafka, "STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(kafka, "CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill_and_wait(kafka).await;
    let up: &[&str] = if secure {
        &["up", "--secure", "kafka"]
    } else {
        &["up", "kafka"]
    };
    assert!(dev_services(up), "kafka restarts");
    load.await.unwrap();
    finish(case, started, &r, &ledger).await;
    assert!(member.terminate().success(), "{}", member.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cassandra_sigstop() {
    let _serial = SERIAL.lock().await;
    let Some(r) = real().await else { return };
    let case = "real_cassandra_sigstop";
    let started = Instant::now();
    let ledger: SharedLedger = Arc::default();
    let mut member = r.member();
    let load = background(&r.addr, traffic("rc", scale(2000, 20000), 20), &ledger);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cassandra = service_pid("cassandra");
    signal(cassandra, "STOP");
    tokio::time::sleep(Duration::from_secs(scale(8, 30) as u64)).await;
    signal(cassandra, "CONT");
    load.await.unwrap();
    finish(case, started, &r, &ledger).await;
    assert!(member.terminate().success(), "{}", member.log());
}

/// Cassandra killed with SIGKILL under traffic and started again on its
/// data. With the periodic commit log of `scripts/dev-services` (synced
/// every 10 s, one replica) the restarted node may have lost its last
/// acknowledged writes; the commit log is replayed in order, so what is
/// lost is a suffix of every writer's writes, and a batch whose position
/// is lost is applied again from the log: still exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cassandra_sigkill_and_restart() {
    let _serial = SERIAL.lock().await;
    let Some(r) = real().await else { return };
    let case = "real_cassandra_sigkill_and_restart";
    let started = Instant::now();
    let ledger: SharedLedger = Arc::default();
    let mut member = r.member();
    let load = background(&r.addr, traffic("rs", scale(2000, 20000), 20), &ledger);
    tokio::time::sleep(Duration::from_secs(4)).await;
    kill_and_wait(service_pid("cassandra")).await;
    assert!(dev_services(&["up", "cassandra"]), "cassandra restarts");
    load.await.unwrap();
    finish(case, started, &r, &ledger).await;
    assert!(member.terminate().success(), "{}", member.log());
}

/// Two identity members on real Kafka + Cassandra race on shared identity
/// rows: targets seen first on their own partition while another member
/// links them, targets linked by two sources on different partitions. The
/// result is what a sequential fold in some order of the partitions gives,
/// and every acknowledged event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_members_race_links_and_merges() {
    let _serial = SERIAL.lock().await;
    let Some(r) = real().await else { return };
    let case = "real_members_race_links_and_merges";
    let started = Instant::now();
    let targets = scale(120, 1200);
    let contested = targets / 6;
    // Sources `l<j>` link target `t<j>`; contested targets are linked by a
    // second source `m<j>` too. Each target also shows up as a source.
    let time = |i: usize| {
        format!(
            "2026-07-01T{:02}:{:02}:{:02}Z",
            i / 3600 % 24,
            i / 60 % 60,
            i % 60
        )
    };
    let mut events: Vec<(String, String, String)> = Vec::new(); // (who, id, json)
    for j in 0..targets {
        let t = format!("t{j}");
        let linked = json!({"platform": "tg", "platform_id": t});
        events.push((
            format!("web:l{j}"),
            format!("race-l{j}"),
            event(
                &format!("race-l{j}"),
                "identity.linked",
                &time(j),
                ("web", &format!("l{j}")),
                linked.clone(),
            ),
        ));
        events.push((
            format!("tg:{t}"),
            format!("race-t{j}"),
            event(
                &format!("race-t{j}"),
                "journey.started",
                &time(j),
                ("tg", &t),
                json!({"journey_id": "j"}),
            ),
        ));
        if j < contested {
            events.push((
                format!("web:m{j}"),
                format!("race-m{j}"),
                event(
                    &format!("race-m{j}"),
                    "identity.linked",
                    &time(j),
                    ("web", &format!("m{j}")),
                    linked,
                ),
            ));
        }
    }
    // Both members up before the traffic, so the partitions are split.
    let mut a = r.member();
    let mut b = r.member();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let ledger: SharedLedger = Arc::default();
    let planned: Vec<Planned> = events
        .iter()
        .map(|(who, id, json)| Planned {
            who: who.clone(),
            id: id.clone(),
            json: json.clone(),
        })
        .collect();
    publish_retrying(&r.addr, &planned, &ledger).await;
    common::replay::caught_up(&r.addr).await;

    let c = clients(&r.addr).await;
    let person = |who: &str| {
        let (platform, id) = who.split_once(':').unwrap();
        default_person_id(platform, id).to_string()
    };
    let resolve = |platform: &str, id: &str| {
        let mut q = c.query.clone();
        let (platform, id) = (platform.to_owned(), id.to_owned());
        async move {
            q.resolve_identity(pb::ResolveIdentityRequest {
                platform,
                platform_id: id,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let get = |person: String| {
        let mut q = c.query.clone();
        async move {
            q.get_person(pb::GetPersonRequest { person_id: person })
                .await
                .ok()
                .map(tonic::Response::into_inner)
        }
    };
    let names = |p: &pb::Person| -> Vec<String> {
        p.identities
            .iter()
            .map(|i| format!("{}:{}", i.platform, i.platform_id))
            .collect()
    };
    let mut persons: BTreeSet<String> = BTreeSet::new();
    for j in 0..targets {
        let t = format!("tg:t{j}");
        let l = person(&format!("web:l{j}"));
        let owner = resolve("tg", &format!("t{j}")).await;
        persons.extend([l.clone(), person(&t), owner.person_id.clone()]);
        if j < contested {
            let m = person(&format!("web:m{j}"));
            persons.insert(m.clone());
            assert!(
                owner.person_id == l || owner.person_id == m,
                "{t} resolves to one of its linkers, not {}",
                owner.person_id
            );
            // The loser had it first: merged into the winner.
            let loser = if owner.person_id == l { m } else { l };
            let loser = get(loser).await.unwrap();
            assert_eq!(
                names(&loser).len(),
                1,
                "{t}'s losing linker keeps its source only: {loser:?}"
            );
            assert_eq!(loser.merged_into, owner.person_id, "{t}'s losing linker");
        } else {
            assert_eq!(owner.person_id, l, "{t} resolves to its linker");
            assert_eq!(
                names(&owner),
                [t.clone(), format!("web:l{j}")],
                "{t}'s linker"
            );
        }
        assert!(names(&owner).contains(&t), "{t} is listed by its person");
        assert_eq!(owner.merged_into, "", "{t}'s person was not merged");
        // Its own default person: unknown (it was linked before it was
        // seen), or emptied and merged into the person that took it first.
        if let Some(default) = get(person(&t)).await {
            assert!(
                names(&default).is_empty(),
                "{t}'s default person lost it: {default:?}"
            );
            assert!(
                !default.merged_into.is_empty(),
                "{t}'s default person is merged: {default:?}"
            );
        }
    }
    // Exactly once: every acknowledged event in exactly one person's history.
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let mut applied: BTreeMap<String, usize> = BTreeMap::new();
    for p in &persons {
        let mut q = c.query.clone();
        let mut token = String::new();
        loop {
            let page = match q
                .list_events(pb::ListEventsRequest {
                    person_id: p.clone(),
                    page_size: 1000,
                    page_token: token,
                })
                .await
            {
                Ok(page) => page.into_inner(),
                // a linker's person that never had an event of its own
                Err(s) if s.code() == tonic::Code::NotFound => break,
                Err(s) => panic!("ListEvents {p}: {s}"),
            };
            for e in page.events {
                *applied.entry(e.id).or_default() += 1;
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    for ids in ledger.acked.values() {
        for id in ids {
            assert_eq!(applied.get(id), Some(&1), "{id} applied once");
        }
    }
    assert!(a.terminate().success(), "{}", a.log());
    assert!(b.terminate().success(), "{}", b.log());
    done(case, started, &ledger);
}
