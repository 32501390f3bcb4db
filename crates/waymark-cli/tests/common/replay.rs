//! Helpers of the replay tests: a workload touching every projection
//! (links included), a snapshot of every answer the Query service gives
//! about its persons, and the CLI.

use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;
use tonic::transport::Channel;
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_proto::v1::admin_client::AdminClient;
use waymark_proto::v1::query_client::QueryClient;

use super::{clients, event, eventually};

/// `n` events of every type over `persons` web identities, with
/// `identity.linked` events re-pointing chat identities between them.
pub fn mixed_workload(tag: &str, from: usize, n: usize, persons: usize) -> Vec<String> {
    (from..from + n)
        .map(|i| {
            let who = format!("{tag}-{}", i % persons);
            let src = ("web", who.as_str());
            let time = format!("2026-05-{:02}T{:02}:{:02}:00Z", 1 + i / 1440 % 28, i / 60 % 24, i % 60);
            let id = format!("{tag}-e{i}");
            match i % 8 {
                0 => event(&id, "interaction.recorded", &time, src, json!({"kind": "message", "content_type": "text", "content": format!("m{i}")})),
                1 => event(&id, "journey.started", &time, src, json!({"journey_id": format!("j{}", i % 3), "stage": "welcome"})),
                2 => event(&id, "journey.stage_entered", &time, src, json!({"journey_id": format!("j{}", i % 3), "stage": format!("s{}", i % 5)})),
                3 => event(&id, "journey.completed", &time, src, json!({"journey_id": format!("j{}", i % 3)})),
                4 => event(&id, "learning.lesson_completed", &time, src, json!({"course_id": "c", "lesson_id": format!("l{}", i % 7), "score": (i % 100) as u64})),
                5 => event(&id, "learning.quiz_answered", &time, src, json!({"course_id": "c", "quiz_id": format!("q{i}"), "correct": i % 3 == 0})),
                6 => event(&id, "identity.linked", &time, src, json!({"platform": "slack", "platform_id": format!("{tag}-S{}", i % (persons / 2).max(1))})),
                _ => event(&id, "interaction.recorded", &time, ("slack", &format!("{tag}-S{}", i % persons)), json!({"kind": "reaction", "content_type": "none"})),
            }
        })
        .collect()
}

/// Every answer the Query service gives about the persons of a
/// [`mixed_workload`] (a `Debug` rendering, so two snapshots compare).
pub async fn snapshot(addr: &str, tag: &str, persons: usize) -> Vec<String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut q = QueryClient::new(channel);
    let mut out = Vec::new();
    let mut ids: Vec<String> = (0..persons)
        .map(|p| default_person_id("web", &format!("{tag}-{p}")).to_string())
        .collect();
    for s in 0..persons {
        let r = q
            .resolve_identity(pb::ResolveIdentityRequest {
                platform: "slack".into(),
                platform_id: format!("{tag}-S{s}"),
            })
            .await;
        match r {
            Ok(p) => {
                let p = p.into_inner();
                ids.push(p.person_id.clone());
                out.push(format!("resolve slack {s}: {p:?}"));
            }
            Err(e) => out.push(format!("resolve slack {s}: {:?}", e.code())),
        }
    }
    ids.sort();
    ids.dedup();
    for id in ids {
        let person = q
            .get_person(pb::GetPersonRequest {
                person_id: id.clone(),
            })
            .await
            .map(|r| format!("{:?}", r.into_inner()))
            .unwrap_or_else(|e| format!("{:?}", e.code()));
        out.push(format!("person {id}: {person}"));
        let mut token = String::new();
        loop {
            let page = q
                .list_interactions(pb::ListInteractionsRequest {
                    person_id: id.clone(),
                    page_size: 100,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            out.push(format!("interactions {id}: {:?}", page.interactions));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let journeys = q
            .list_journeys(pb::ListJourneysRequest {
                person_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        out.push(format!("journeys {id}: {journeys:?}"));
        let learning = q
            .list_learning_progress(pb::ListLearningProgressRequest {
                person_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        out.push(format!("learning {id}: {learning:?}"));
        let mut token = String::new();
        loop {
            let page = q
                .list_events(pb::ListEventsRequest {
                    person_id: id.clone(),
                    page_size: 100,
                    page_token: token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            out.push(format!("events {id}: {:?}", page.events));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    out
}

/// Runs the `waymark` binary.
pub fn waymark(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run waymark")
}

/// Stdout and stderr of an output, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Admin client.
pub async fn admin(addr: &str) -> AdminClient<Channel> {
    AdminClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

/// The projections as listed by `Admin.ListProjections`.
pub async fn projections(addr: &str) -> Vec<pb::Projection> {
    admin(addr)
        .await
        .list_projections(pb::ListProjectionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .projections
}

/// Waits until every live version has applied everything on the log
/// (an `UNAVAILABLE` answer, e.g. right after a broker restart, is asked
/// again).
pub async fn caught_up(addr: &str) {
    eventually("every live version has caught up", || async {
        let all = match admin(addr)
            .await
            .list_projections(pb::ListProjectionsRequest {})
            .await
        {
            Ok(r) => r.into_inner().projections,
            Err(s) if s.code() == tonic::Code::Unavailable => return None,
            Err(s) => panic!("ListProjections: {s}"),
        };
        all.iter()
            .all(|p| {
                p.versions
                    .iter()
                    .filter(|v| v.version == p.active_version)
                    .all(|v| v.lag == 0)
            })
            .then_some(())
    })
    .await;
}

/// Sum of the high-water marks of a projection's input.
pub fn input_records(p: &pb::Projection) -> i64 {
    p.versions
        .first()
        .map_or(0, |v| v.partitions.iter().map(|x| x.high_watermark).sum())
}

/// `waymark replay PROCESSOR --to-version VERSION --switch --wait`,
/// asserting success.
pub fn replay_switch(addr: &str, processor: &str, version: &str) -> Output {
    let o = waymark(&[
        "replay",
        processor,
        "--to-version",
        version,
        "--switch",
        "--wait",
        "--grpc-addr",
        addr,
    ]);
    assert!(o.status.success(), "replay {processor}: {}", text(&o));
    o
}

/// Closed loops calling every `Query` rpc about the persons of a
/// [`mixed_workload`], counting answers and failures.
pub struct QueryLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl QueryLoad {
    /// Starts `workers` loops against `addr`.
    pub async fn start(addr: &str, tag: &str, persons: usize, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut handles = Vec::new();
        for worker in 0..workers {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let mut q = clients(addr).await.query;
            let tag = tag.to_owned();
            handles.push(tokio::spawn(async move {
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    let id =
                        default_person_id("web", &format!("{tag}-{}", i % persons)).to_string();
                    let results = [
                        q.get_person(pb::GetPersonRequest {
                            person_id: id.clone(),
                        })
                        .await
                        .map(|_| ()),
                        q.list_interactions(pb::ListInteractionsRequest {
                            person_id: id.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                        q.list_journeys(pb::ListJourneysRequest {
                            person_id: id.clone(),
                        })
                        .await
                        .map(|_| ()),
                        q.list_learning_progress(pb::ListLearningProgressRequest {
                            person_id: id.clone(),
                        })
                        .await
                        .map(|_| ()),
                        q.list_events(pb::ListEventsRequest {
                            person_id: id,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    ];
                    for r in results {
                        match r {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("query failed: {e:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    i += workers;
                }
            }));
        }
        Self {
            stop,
            ok,
            failed,
            workers: handles,
        }
    }

    /// Stops the loops; returns (answered, failed).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
