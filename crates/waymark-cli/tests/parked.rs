//! Park the person, not the partition, end to end on `waymark dev`: a
//! person whose journey state cannot be read is parked by the journey
//! processor while every other person and every other processor flows;
//! `waymark parked` lists it, `waymark parked skip` dead-letters the
//! failing event and applies the rest in order, and `waymark dlq replay`
//! publishes the dead letter again through Ingest, applied exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use common::{clients, event, eventually, publish_all, start_dev};
use serde_json::json;
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_runtime::{ProjectionStore, RowWrite, WriteBatch};

fn waymark(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waymark"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

fn stage(id: &str, who: &str, minute: u32, stage: &str) -> String {
    event(
        id,
        "journey.stage_entered",
        &format!("2026-05-01T10:{minute:02}:00Z"),
        ("web", who),
        json!({"journey_id": "onboarding", "stage": stage}),
    )
}

async fn set_row(store: &dyn ProjectionStore, table: &str, key: &str, value: Option<Vec<u8>>) {
    store
        .write(WriteBatch {
            rows: vec![RowWrite {
                table: table.into(),
                key: key.into(),
                value,
                order: None,
            }],
            positions: Vec::new(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_with_unreadable_state_is_parked_listed_skipped_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.to_string();
    let alice = default_person_id("web", "alice").to_string();
    let bob = default_person_id("web", "bob").to_string();

    // Alice's journey row is unreadable (a row header, no value).
    let encoding = waymark_cli::registry::registry()
        .encoding("journey")
        .unwrap();
    let corrupt = vec![waymark_runtime::row::ROW_MAGIC, encoding as u8];
    set_row(&dev.store, "journey_v1", &alice, Some(corrupt)).await;

    publish_all(
        &addr,
        &[
            stage("a-0", "alice", 0, "s0"),
            stage("b-0", "bob", 0, "s0"),
            stage("a-1", "alice", 1, "s1"),
            stage("b-1", "bob", 1, "s1"),
            stage("a-2", "alice", 2, "s2"),
        ],
    )
    .await;
    let mut c = clients(&addr).await;
    let journey = |person: &str| pb::GetJourneyRequest {
        person_id: person.to_owned(),
        journey_id: "onboarding".into(),
    };

    // Bob flows; Alice's journey is parked, her other projections flow.
    let q = c.query.clone();
    eventually("bob's journey", || {
        let mut q = q.clone();
        let req = journey(&bob);
        async move {
            let j = q.get_journey(req).await.ok()?.into_inner();
            (j.stages == ["s0", "s1"]).then_some(())
        }
    })
    .await;
    let admin = c.admin.clone();
    let parked = eventually("alice parked with 3 records", || {
        let mut admin = admin.clone();
        async move {
            let page = admin
                .list_parked(pb::ListParkedRequest {
                    processor: "journey".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (page.parked.len() == 1 && page.parked[0].records == 3).then(|| page.parked[0].clone())
        }
    })
    .await;
    assert_eq!(parked.key, alice);
    assert_eq!(parked.version, 1);
    assert!(parked.reason.contains("corrupt row"), "{}", parked.reason);
    let person = c
        .query
        .get_person(pb::GetPersonRequest {
            person_id: alice.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        person.event_count, 3,
        "other processors apply alice's events"
    );

    let listed = waymark(&["parked", "--grpc-addr", &addr]);
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{out}");
    assert!(out.contains(&format!("journey v1 {alice}")), "{out}");
    assert!(out.contains("3 record(s) parked"), "{out}");

    // Bad requests are the client's mistake, never INTERNAL.
    let e = c
        .admin
        .retry_parked(pb::RetryParkedRequest {
            processor: "journey".into(),
            key: bob.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = c
        .admin
        .list_parked(pb::ListParkedRequest {
            processor: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = c
        .admin
        .list_parked(pb::ListParkedRequest {
            processor: "journey".into(),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    // Later events of Alice are parked behind; then the row is mended and
    // the failing event skipped: the rest are applied in order.
    publish_all(&addr, &[stage("a-3", "alice", 3, "s3")]).await;
    let admin = c.admin.clone();
    eventually("4 records parked", || {
        let mut admin = admin.clone();
        async move {
            let page = admin
                .list_parked(pb::ListParkedRequest {
                    processor: "journey".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (page.parked.first()?.records == 4).then_some(())
        }
    })
    .await;
    set_row(&dev.store, "journey_v1", &alice, None).await;
    let skip = waymark(&["parked", "skip", "journey", &alice, "--grpc-addr", &addr]);
    assert!(
        skip.status.success(),
        "{}",
        String::from_utf8_lossy(&skip.stderr)
    );
    let q = c.query.clone();
    eventually("alice's journey without the skipped stage", || {
        let mut q = q.clone();
        let req = journey(&alice);
        async move {
            let j = q.get_journey(req).await.ok()?.into_inner();
            (j.stages == ["s1", "s2", "s3"]).then_some(())
        }
    })
    .await;
    let page = c
        .admin
        .list_parked(pb::ListParkedRequest {
            processor: "journey".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.parked.is_empty(), "{:?}", page.parked);

    // The skipped event is a dead letter; replaying it publishes it again
    // through Ingest. The journey applies it; every other processor had
    // applied it already and counts it once.
    let listed = waymark(&[
        "dlq",
        "list",
        "--error",
        "processing_failed",
        "--grpc-addr",
        &addr,
    ]);
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(out.contains("1 dead letter(s)"), "{out}");
    assert!(out.contains("skipped by an operator"), "{out}");
    let replay = waymark(&[
        "dlq",
        "replay",
        "--error",
        "processing_failed",
        "--processor",
        "journey",
        "--grpc-addr",
        &addr,
    ]);
    let out = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replay.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(out.contains("1 published again, 0 rejected"), "{out}");
    let q = c.query.clone();
    eventually("the replayed stage applied", || {
        let mut q = q.clone();
        let req = journey(&alice);
        async move {
            let j = q.get_journey(req).await.ok()?.into_inner();
            j.stages.contains(&"s0".to_owned()).then_some(())
        }
    })
    .await;
    let person = c
        .query
        .get_person(pb::GetPersonRequest {
            person_id: alice.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(person.event_count, 4, "the replayed event counted once");

    // A replay of a dead letter the validation refuses again says so.
    let none = waymark(&[
        "dlq",
        "replay",
        "--error",
        "invalid_data",
        "--grpc-addr",
        &addr,
    ]);
    assert!(none.status.success());
    assert!(String::from_utf8_lossy(&none.stdout).contains("0 published again"));
    dev.stop().await.unwrap();
}
