//! The integration suite on real Apache Kafka and Cassandra (started by
//! `scripts/dev-services up`): the real `waymark run` and `waymark serve`
//! binaries, each test with its own topics, consumer groups and keyspace.
//! Under `CI=true` a missing engine fails these tests; elsewhere they skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::contract::contract_workload;
use common::engines::{engines, wait_for_grpc, Deployment};
use common::{assert_counts, publish_all, workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_workload_on_kafka_and_cassandra() {
    let Some((bootstrap, cql)) = engines() else {
        return;
    };
    let d = Deployment::new(bootstrap.clone(), cql);
    let _run = d.run(&[]);
    let (_serve, addr) = d.serve();
    wait_for_grpc(&addr).await;
    contract_workload(&addr, &bootstrap, &d.inputs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_partitions_and_hand_them_over() {
    let Some((bootstrap, cql)) = engines() else {
        return;
    };
    let d = Deployment::new(bootstrap, cql);
    let (_serve, addr) = d.serve();
    wait_for_grpc(&addr).await;
    let (events, expected) = workload("m", 3000, 30);

    let mut a = d.run(&[]);
    publish_all(&addr, &events[..1000]).await;
    // A second member joins: the partitions are split between the two.
    let mut b = d.run(&[]);
    publish_all(&addr, &events[1000..2000]).await;
    common::eventually("the second member is assigned partitions", || async {
        b.log().contains("partitions assigned").then_some(())
    })
    .await;
    // The first leaves: the second takes everything over.
    assert!(a.terminate().success(), "{}", a.log());
    publish_all(&addr, &events[2000..]).await;
    assert_counts(&addr, &expected).await;
    assert!(
        b.log().contains("partitions revoked")
            || b.log().matches("partitions assigned").count() > 1
    );
    assert!(b.terminate().success(), "{}", b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_processor_loses_nothing_and_double_counts_nothing() {
    let Some((bootstrap, cql)) = engines() else {
        return;
    };
    let d = Deployment::new(bootstrap, cql);
    let (_serve, addr) = d.serve();
    wait_for_grpc(&addr).await;
    let (events, expected) = workload("x", 6000, 40);
    let mut run = d.run(&[]);
    publish_all(&addr, &events[..3000]).await;
    run.kill9();
    publish_all(&addr, &events[3000..]).await;
    let mut again = d.run(&[]);
    assert_counts(&addr, &expected).await;
    assert!(again.terminate().success(), "{}", again.log());
}
