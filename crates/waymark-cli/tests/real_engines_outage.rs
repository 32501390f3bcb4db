//! Cassandra stopped for ~20 s under traffic: processors back off, commit
//! nothing they have not written, and catch up afterwards with exactly the
//! right state. Its own test binary, so no other test shares the outage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::engines::{engines, wait_for_grpc, Deployment};
use common::{assert_counts, publish_all, workload};

fn dev_services(args: &[&str]) -> bool {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/dev-services");
    Command::new(script)
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_outage_under_traffic_is_ridden_out() {
    let Some((bootstrap, cql)) = engines() else {
        return;
    };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !dev_services(&["status", "cassandra"]) {
        assert!(
            !ci,
            "CI=true: cassandra must be managed by scripts/dev-services for the outage test"
        );
        eprintln!("skipped: cassandra is not managed by scripts/dev-services, cannot stop it");
        return;
    }
    let d = Deployment::new(bootstrap, cql);
    let (_serve, addr) = d.serve();
    wait_for_grpc(&addr).await;
    let mut run = d.run(&[]);
    let (events, expected) = workload("o", 3000, 30);

    publish_all(&addr, &events[..1000]).await;
    let (_, before) = workload("o", 1000, 30);
    assert_counts(&addr, &before).await;

    assert!(dev_services(&["down", "cassandra"]), "stop cassandra");
    let outage = Instant::now();
    // Traffic keeps arriving while the store is down (Ingest only needs Kafka).
    for chunk in events[1000..].chunks(400) {
        publish_all(&addr, chunk).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let remaining = Duration::from_secs(20).saturating_sub(outage.elapsed());
    tokio::time::sleep(remaining).await;
    assert!(dev_services(&["up", "cassandra"]), "restart cassandra");

    assert_counts(&addr, &expected).await;
    let log = run.log();
    assert!(
        log.contains("retrying"),
        "processors reported the outage and retried:\n{log}"
    );
    assert!(run.terminate().success(), "{}", run.log());
}
