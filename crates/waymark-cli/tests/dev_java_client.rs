//! Any Kafka client can produce to `waymark dev`: the Apache Kafka Java
//! client (the console producer from `scripts/dev-services`) included, not
//! only librdkafka-based ones. Under `CI=true` the Java tools must be
//! available; elsewhere the test skips without them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{clients, eventually, start_dev};
use waymark_proto::v1 as pb;

fn dev_services() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/dev-services")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_java_kafka_client_produces_to_the_dev_endpoint() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let available = Command::new(dev_services())
        .args(["kafka", "console-producer", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        assert!(
            !ci,
            "CI=true: the Kafka Java tools of scripts/dev-services must be available"
        );
        eprintln!("skipped: no Kafka Java tools (run scripts/dev-services up once)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let bootstrap = dev.info.kafka_bootstrap.clone();
    let lines = (0..3)
        .map(|i| {
            format!(
                r#"java:j1|{{"id":"java-{i}","type":"interaction.recorded","time":"2026-03-01T11:00:0{i}Z","source":{{"platform":"java","platform_id":"j1"}},"data":{{"kind":"message","content_type":"text"}}}}"#
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let status = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(dev_services())
            .args([
                "kafka",
                "console-producer",
                "--bootstrap-server",
                &bootstrap,
                "--topic",
                "waymark.inputs",
            ])
            .args([
                "--reader-property",
                "parse.key=true",
                "--reader-property",
                "key.separator=|",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "the Java console producer failed");

    let c = clients(&dev.info.grpc_addr).await;
    let person = waymark_core::default_person_id("java", "j1").to_string();
    eventually("the Java client's events are applied", || {
        let mut q = c.query.clone();
        let person_id = person.clone();
        async move {
            let p = q
                .get_person(pb::GetPersonRequest { person_id })
                .await
                .ok()?
                .into_inner();
            (p.interaction_count == 3).then_some(())
        }
    })
    .await;
    dev.stop().await.unwrap();
}
