//! `waymark dev` keeps every event and projection across restarts,
//! including `kill -9` in the middle of processing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{assert_counts, publish_all, spawn_dev, start_dev, terminate, workload};
use waymark_cli::dev::DevInfo;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_loses_nothing_and_double_counts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (events, expected) = workload("k", 20000, 40);

    let (mut child, info) = spawn_dev(dir.path(), "127.0.0.1:0");
    publish_all(&info.grpc_addr, &events[..12000]).await;
    // Every event above is acknowledged, hence durable. Kill the process
    // while the processors are still working through them.
    child.kill().expect("kill -9");
    child.wait().unwrap();

    let (mut child, info) = spawn_dev(dir.path(), "127.0.0.1:0");
    publish_all(&info.grpc_addr, &events[12000..]).await;
    child.kill().expect("kill -9");
    child.wait().unwrap();

    // A clean run over the same directory converges to exactly the fold of
    // what was acknowledged.
    let (mut child, info) = spawn_dev(dir.path(), "127.0.0.1:0");
    assert_counts(&info.grpc_addr, &expected).await;
    // Graceful stop on SIGTERM.
    terminate(&mut child);
}
