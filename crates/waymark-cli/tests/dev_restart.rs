//! `waymark dev` keeps every event and projection across restarts,
//! including `kill -9` in the middle of processing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{clients, event, eventually, start_dev};
use serde_json::json;
use waymark_cli::dev::DevInfo;
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_proto::v1::publish_result::Outcome;

/// `n` events spread over `persons` people; returns the events and the
/// number of events per person.
fn workload(tag: &str, n: usize, persons: usize) -> (Vec<String>, BTreeMap<String, u64>) {
    let mut events = Vec::with_capacity(n);
    let mut per_person = BTreeMap::new();
    for i in 0..n {
        let who = format!("{tag}-{}", i % persons);
        let minute = i / persons;
        let time = format!(
            "2026-04-01T{:02}:{:02}:{:02}Z",
            minute / 3600 % 24,
            minute / 60 % 60,
            minute % 60
        );
        let e = match i % 3 {
            0 => event(
                &format!("{tag}-{i}"),
                "interaction.recorded",
                &time,
                ("web", &who),
                json!({"kind": "message", "content_type": "text", "content": "x"}),
            ),
            1 => event(
                &format!("{tag}-{i}"),
                "journey.stage_entered",
                &time,
                ("web", &who),
                json!({"journey_id": "j", "stage": format!("s{i}")}),
            ),
            _ => event(
                &format!("{tag}-{i}"),
                "learning.quiz_answered",
                &time,
                ("web", &who),
                json!({"course_id": "c", "quiz_id": format!("q{i}"), "correct": i % 2 == 0}),
            ),
        };
        events.push(e);
        *per_person.entry(who).or_insert(0) += 1;
    }
    (events, per_person)
}

async fn publish_all(addr: &str, events: &[String]) {
    let mut c = clients(addr).await;
    for chunk in events.chunks(500) {
        let results = c
            .ingest
            .publish(pb::PublishRequest {
                events: chunk.to_vec(),
            })
            .await
            .expect("publish")
            .into_inner()
            .results;
        assert!(results
            .iter()
            .all(|r| matches!(r.outcome, Some(Outcome::Accepted(_)))));
    }
}

/// Waits until every person's event count is as expected, then checks it
/// stays there (no late double counting).
async fn assert_counts(addr: &str, expected: &BTreeMap<String, u64>) {
    let c = clients(addr).await;
    for (who, count) in expected {
        let id = default_person_id("web", who).to_string();
        let q = c.query.clone();
        let got = eventually(&format!("{who} has {count} events"), || {
            let mut q = q.clone();
            let id = id.clone();
            async move {
                let p = q
                    .get_person(pb::GetPersonRequest { person_id: id })
                    .await
                    .ok()?
                    .into_inner();
                (p.event_count >= *count).then_some(p.event_count)
            }
        })
        .await;
        assert_eq!(got, *count, "{who}: event count");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_events_and_projections() {
    let dir = tempfile::tempdir().unwrap();
    let (events, expected) = workload("r", 300, 10);
    let dev = start_dev(dir.path(), false).await;
    publish_all(&dev.info.grpc_addr, &events).await;
    assert_counts(&dev.info.grpc_addr, &expected).await;
    dev.stop().await.unwrap();

    // Same directory: everything is still there, and nothing is re-applied.
    let dev = start_dev(dir.path(), false).await;
    assert_counts(&dev.info.grpc_addr, &expected).await;
    let (more, more_expected) = workload("r", 330, 10);
    publish_all(&dev.info.grpc_addr, &more[300..]).await;
    assert_counts(&dev.info.grpc_addr, &more_expected).await;
    let info: DevInfo =
        serde_json::from_slice(&std::fs::read(dir.path().join("dev.json")).unwrap()).unwrap();
    assert_eq!(info.grpc_addr, dev.info.grpc_addr);
    dev.stop().await.unwrap();
}

// Callers own the child and always kill and wait for it.
#[allow(clippy::zombie_processes)]
fn spawn_dev(dir: &Path) -> (Child, DevInfo) {
    let _ = std::fs::remove_file(dir.join("dev.json"));
    let child = Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args([
            "dev",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn waymark dev");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(bytes) = std::fs::read(dir.join("dev.json")) {
            if let Ok(info) = serde_json::from_slice::<DevInfo>(&bytes) {
                return (child, info);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waymark dev did not become ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_loses_nothing_and_double_counts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (events, expected) = workload("k", 20000, 40);

    let (mut child, info) = spawn_dev(dir.path());
    publish_all(&info.grpc_addr, &events[..12000]).await;
    // Every event above is acknowledged, hence durable. Kill the process
    // while the processors are still working through them.
    child.kill().expect("kill -9");
    child.wait().unwrap();

    let (mut child, info) = spawn_dev(dir.path());
    publish_all(&info.grpc_addr, &events[12000..]).await;
    child.kill().expect("kill -9");
    child.wait().unwrap();

    // A clean run over the same directory converges to exactly the fold of
    // what was acknowledged.
    let (mut child, info) = spawn_dev(dir.path());
    assert_counts(&info.grpc_addr, &expected).await;
    // Graceful stop on SIGTERM.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "waymark dev exits 0 on SIGTERM, got {exit:?}"
    );
}
