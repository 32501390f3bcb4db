//! Replay on real Apache Kafka and Cassandra: `waymark replay --switch
//! --wait` for every processor through `waymark serve`'s Admin service while
//! `waymark run` builds and switches the versions — under live traffic and
//! query load — then `waymark verify` (also of a deliberately corrupted
//! row) and dropping the old versions. Under `CI=true` a missing engine
//! fails these tests; elsewhere they skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::engines::{engines, wait_for_grpc, Deployment};
use common::replay::{
    caught_up, input_records, mixed_workload, projections, replay_switch, snapshot, text, waymark,
    QueryLoad,
};
use common::{eventually, publish_all};
use waymark_core::default_person_id;
use waymark_cql::{CqlConfig, CqlStore};
use waymark_runtime::{ProjectionStore, RowWrite, StoreError, WriteBatch};

const PROCESSORS: [&str; 5] = ["identity", "person", "interactions", "journey", "learning"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_switch_verify_and_drop_on_kafka_and_cassandra() {
    let Some((bootstrap, cql)) = engines() else {
        return;
    };
    // One inputs partition: identity links then replay in publish order
    // (docs/operations/replay.md, "Identity across inputs partitions").
    let d = Deployment::single_inputs_partition(bootstrap, cql.clone());
    let mut run = d.run(&[]);
    let (_serve, addr) = d.serve();
    wait_for_grpc(&addr).await;
    let first = mixed_workload("k", 0, 1200, 41);
    let second = mixed_workload("k", 1200, 1200, 41);
    publish_all(&addr, &first).await;
    caught_up(&addr).await;

    // Queries keep running through the rebuilds and switches...
    let load = QueryLoad::start(&addr, "k", 41, 1).await;
    // ... and so does traffic.
    let traffic = {
        let addr = addr.clone();
        tokio::spawn(async move {
            for chunk in second.chunks(50) {
                publish_all(&addr, chunk).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    for p in PROCESSORS {
        replay_switch(&addr, p, "2");
    }
    traffic.await.unwrap();
    caught_up(&addr).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "queries failed during the switches");
    assert!(ok > 0);

    // Every input resolved exactly once, hand-off included, and the
    // versions built under traffic equal a recomputation from the log.
    let all = projections(&addr).await;
    assert_eq!(input_records(&all[0]), 2400, "{:?}", all[0]);
    assert_eq!(input_records(&all[1]), 2400, "{:?}", all[1]);
    let o = waymark(&["verify", "--grpc-addr", &addr]);
    assert!(o.status.success(), "{}\n{}", text(&o), run.log());

    // Quiescent replays change no answer.
    let before = snapshot(&addr, "k", 41).await;
    for p in PROCESSORS {
        replay_switch(&addr, p, "3");
    }
    assert_eq!(
        snapshot(&addr, "k", 41).await,
        before,
        "answers changed by the replays"
    );

    // verify finds a corrupted row of the CQL store.
    let store = CqlStore::connect(CqlConfig {
        nodes: vec![cql],
        keyspace: d.keyspace.clone(),
        ..CqlConfig::default()
    })
    .await
    .unwrap();
    let (a, b) = (
        default_person_id("web", "k-1").to_string(),
        default_person_id("web", "k-2").to_string(),
    );
    let b_row = store.get("journey_v3", &b).await.unwrap().unwrap();
    store
        .write(WriteBatch {
            rows: vec![RowWrite {
                table: "journey_v3".into(),
                key: a.clone(),
                value: Some(b_row),
                order: None,
            }],
            positions: Vec::new(),
        })
        .await
        .unwrap();
    let o = waymark(&["verify", "journey", "--grpc-addr", &addr]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains(&a) && out.contains("different"), "{out}");
    replay_switch(&addr, "journey", "4");
    let o = waymark(&["verify", "--grpc-addr", &addr]);
    assert!(o.status.success(), "{}", text(&o));

    // The old versions hand off, then are dropped with their tables.
    eventually("the old versions stop", || async {
        projections(&addr)
            .await
            .iter()
            .all(|p| {
                p.versions
                    .iter()
                    .filter(|v| v.version != p.active_version)
                    .all(|v| !v.running)
            })
            .then_some(())
    })
    .await;
    for p in projections(&addr).await {
        for v in p.versions.iter().filter(|v| v.version != p.active_version) {
            let o = waymark(&[
                "projections",
                "drop",
                &p.processor,
                &v.version.to_string(),
                "--grpc-addr",
                &addr,
            ]);
            assert!(
                o.status.success(),
                "drop {} {}: {}",
                p.processor,
                v.version,
                text(&o)
            );
        }
    }
    for p in projections(&addr).await {
        assert_eq!(p.versions.len(), 1, "{p:?}");
    }
    for table in [
        "journey_v1",
        "journey_v3",
        "person_v2_history",
        "identity_v1_links",
    ] {
        assert!(
            matches!(
                store.scan(table, None, 1).await,
                Err(StoreError::UnknownTable(_))
            ),
            "{table} was not dropped"
        );
    }
    assert!(store
        .positions(
            "journey.v1",
            &format!("{}.events", d.inputs.trim_end_matches(".inputs"))
        )
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        snapshot(&addr, "k", 41).await,
        before,
        "answers changed by the drops"
    );
    assert!(run.terminate().success(), "{}", run.log());
}
