//! End to end on the embedded default: `waymark dev` in-process, events
//! through its Kafka endpoint (rdkafka) and through `Ingest`, answers over
//! a real gRPC connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::contract::contract_workload;
use common::{clients, start_dev};
use waymark_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_through_ingest_and_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let produced = contract_workload(
        &dev.info.grpc_addr,
        &dev.info.kafka_bootstrap,
        "waymark.inputs",
    )
    .await;

    // The Kafka endpoint appended every record it was sent, refusing none.
    let mut admin = clients(&dev.info.grpc_addr).await.admin;
    let status = admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let endpoint = status
        .kafka_endpoint
        .expect("dev reports its kafka endpoint");
    assert_eq!(endpoint.bootstrap, dev.info.kafka_bootstrap);
    assert_eq!(endpoint.records_in, produced);
    assert_eq!(endpoint.refusals, 0, "{}", endpoint.last_refusal);

    dev.stop().await.unwrap();
}
