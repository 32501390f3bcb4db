//! The `waymark` binary: exit codes and messages of `publish` and
//! `topology check`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{clients, eventually, start_dev};
use waymark_proto::v1 as pb;

fn waymark(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn topology_check_accepts_the_real_file_and_reports_every_error() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../topology.yaml");
    let out = waymark(&["topology", "check", root], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("t.yaml");
    let broken = std::fs::read_to_string(root)
        .unwrap()
        .replacen("partitions: 6", "partitions: 0", 1)
        .replacen("dedupe_window: 7d", "dedupe_window: 7 days", 1)
        .replacen(
            "projection_version: 1",
            "projection_version: 1\n    colour: blue",
            1,
        );
    std::fs::write(&bad, broken).unwrap();
    let out = waymark(&["topology", "check", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("t.yaml:")).collect();
    assert!(lines.len() >= 3, "every error at once: {err}");
    assert!(err.contains("colour"), "{err}");

    let out = waymark(&["topology", "check", "/no/such/file.yaml"], None);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("/no/such/file.yaml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reports_rejects_by_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let addr = dev.info.grpc_addr.clone();

    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/events.jsonl");
    let out = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || waymark(&["publish", "--grpc-addr", &addr, examples], None)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("published 10 events, rejected 0"),
        "{}",
        text(&out.stdout)
    );

    let input = concat!(
        r#"{"id":"p1","type":"journey.started","time":"2026-01-01T00:00:00Z","source":{"platform":"web","platform_id":"pub"},"data":{"journey_id":"j"}}"#,
        "\n\n",
        "{oops\n",
        r#"{"id":"p2","type":"journey.flew","time":"2026-01-01T00:00:00Z","source":{"platform":"web","platform_id":"pub"},"data":{}}"#,
        "\n"
    );
    let out = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || waymark(&["publish", "--grpc-addr", &addr], Some(input))
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("line 3: rejected: malformed_json"), "{err}");
    assert!(err.contains("line 4: rejected: unknown_type"), "{err}");
    assert!(text(&out.stdout).contains("published 1 events, rejected 2"));

    // Straight to Kafka (the dev endpoint) with an idempotent producer.
    let bootstrap = dev.info.kafka_bootstrap.clone();
    let line = r#"{"id":"p3","type":"journey.started","time":"2026-01-01T00:00:00Z","source":{"platform":"web","platform_id":"kafka-pub"},"data":{"journey_id":"k"}}"#;
    let out = tokio::task::spawn_blocking(move || {
        waymark(&["publish", "--bootstrap", &bootstrap], Some(line))
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let c = clients(&addr).await;
    let person = waymark_core::default_person_id("web", "kafka-pub").to_string();
    eventually("event published through kafka is applied", || {
        let mut q = c.query.clone();
        let person_id = person.clone();
        async move {
            q.get_journey(pb::GetJourneyRequest {
                person_id,
                journey_id: "k".into(),
            })
            .await
            .ok()
        }
    })
    .await;

    // Nothing listening: a clear error and a non-zero exit.
    let out = waymark(&["publish", "--grpc-addr", "127.0.0.1:1"], Some(line));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );
    dev.stop().await.unwrap();
}
