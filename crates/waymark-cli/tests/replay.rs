//! Replay on the embedded default: versioned projections rebuilt from
//! offset 0 while the live version serves, switched without failed
//! queries, dropped with their storage, verified against a recomputation,
//! and per-person history.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::replay::{
    admin, caught_up, input_records, mixed_workload, projections, replay_switch, snapshot, text,
    waymark, QueryLoad,
};
use common::{clients, eventually, publish_all, start_dev};
use tonic::Code;
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_runtime::{ProjectionStore, RowWrite, StoreError, WriteBatch};

const PROCESSORS: [&str; 5] = ["identity", "person", "interactions", "journey", "learning"];

fn live(p: &pb::Projection, version: u32) -> bool {
    p.active_version == version
        && p.versions
            .iter()
            .any(|v| v.version == version && v.state == pb::VersionState::Live as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_the_cli_changes_no_answer_and_verify_passes() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.clone();
    publish_all(&addr, &mixed_workload("r", 0, 1200, 41)).await;
    caught_up(&addr).await;
    let before = snapshot(&addr, "r", 41).await;

    for p in PROCESSORS {
        let o = replay_switch(&addr, p, "2");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("is live"),
            "{}",
            text(&o)
        );
    }
    for p in projections(&addr).await {
        assert!(live(&p, 2), "{p:?}");
    }
    assert_eq!(
        snapshot(&addr, "r", 41).await,
        before,
        "answers changed by the replays"
    );

    let o = waymark(&["verify", "--grpc-addr", &addr]);
    assert!(o.status.success(), "{}", text(&o));
    let o = waymark(&["projections", "--grpc-addr", &addr]);
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        table.contains("retired") && table.contains("live"),
        "{table}"
    );

    // Asking again for the version that is live is not an error.
    replay_switch(&addr, "journey", "2");
    // A version number already used is refused with a reason.
    let o = waymark(&[
        "replay",
        "journey",
        "--to-version",
        "1",
        "--grpc-addr",
        &addr,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("version 1 is retired"),
        "{}",
        text(&o)
    );
    let o = waymark(&["replay", "nope", "--grpc-addr", &addr]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // inspect prints the state and the history of a person.
    let person = default_person_id("web", "r-3").to_string();
    let o = waymark(&["inspect", &person, "--grpc-addr", &addr]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains(&format!("person {person}")), "{out}");
    assert!(
        out.contains("history (") && out.contains("journey.started"),
        "{out}"
    );
    let o = waymark(&["inspect", "not-a-uuid", "--grpc-addr", &addr]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // A restart keeps the switched versions and every answer.
    dev.stop().await.unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.clone();
    for p in projections(&addr).await {
        assert!(live(&p, 2), "{p:?}");
    }
    assert_eq!(
        snapshot(&addr, "r", 41).await,
        before,
        "answers changed by the restart"
    );
    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_during_live_traffic_equals_live_and_publishes_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.clone();
    let first = mixed_workload("t", 0, 1500, 51);
    let second = mixed_workload("t", 1500, 3000, 51);
    let total = (first.len() + second.len()) as i64;
    publish_all(&addr, &first).await;

    // Traffic keeps flowing while every processor is rebuilt and switched.
    let traffic = {
        let addr = addr.clone();
        tokio::spawn(async move {
            for chunk in second.chunks(100) {
                publish_all(&addr, chunk).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let mut admin = admin(&addr).await;
    for p in PROCESSORS {
        admin
            .start_rebuild(pb::StartRebuildRequest {
                processor: p.into(),
                to_version: 0,
                switch_when_caught_up: true,
            })
            .await
            .unwrap();
    }
    eventually("every rebuilt version is live", || async {
        projections(&addr)
            .await
            .iter()
            .all(|p| live(p, 2))
            .then_some(())
    })
    .await;
    traffic.await.unwrap();
    caught_up(&addr).await;

    // Each accepted input became exactly one resolved event: the identity
    // rebuild and its hand-off published nothing twice.
    let all = projections(&addr).await;
    let inputs = all.iter().find(|p| p.processor == "identity").unwrap();
    let events = all.iter().find(|p| p.processor == "person").unwrap();
    assert_eq!(input_records(inputs), total);
    assert_eq!(input_records(events), total);

    // The versions built during traffic equal a recomputation from the log.
    let reports = admin
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .reports;
    assert_eq!(reports.len(), 5);
    for r in &reports {
        assert_eq!(r.version, 2, "{r:?}");
        assert_eq!(r.difference_count, 0, "{r:?}");
        assert!(r.rows_compared > 0, "{r:?}");
    }
    // And the retired versions stop once they have handed off.
    eventually("retired versions stop", || async {
        projections(&addr)
            .await
            .iter()
            .all(|p| {
                p.versions
                    .iter()
                    .filter(|v| v.version == 1)
                    .all(|v| !v.running)
            })
            .then_some(())
    })
    .await;
    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_under_query_load_fails_no_query() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.clone();
    publish_all(&addr, &mixed_workload("q", 0, 1000, 21)).await;
    caught_up(&addr).await;
    let before = snapshot(&addr, "q", 21).await;

    let load = QueryLoad::start(&addr, "q", 21, 4).await;

    let mut admin = admin(&addr).await;
    for p in PROCESSORS {
        admin
            .start_rebuild(pb::StartRebuildRequest {
                processor: p.into(),
                to_version: 2,
                switch_when_caught_up: false,
            })
            .await
            .unwrap();
    }
    // Switching before the new version has caught up is refused.
    for p in PROCESSORS {
        let name = p.to_owned();
        eventually(&format!("{p} v2 caught up"), || async {
            projections(&addr)
                .await
                .iter()
                .find(|x| x.processor == name)
                .and_then(|x| x.versions.iter().find(|v| v.version == 2))
                .filter(|v| v.caught_up)
                .map(|_| ())
        })
        .await;
    }
    for p in PROCESSORS {
        let switched = admin
            .switch_version(pb::SwitchVersionRequest {
                processor: p.into(),
                version: 2,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(switched.active_version, 2);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "queries failed during the switch");
    assert!(ok > 0);
    assert_eq!(snapshot(&addr, "q", 21).await, before);
    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_frees_a_retired_version_and_never_the_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.clone();
    publish_all(&addr, &mixed_workload("d", 0, 600, 11)).await;
    caught_up(&addr).await;
    let before = snapshot(&addr, "d", 11).await;
    let mut admin = admin(&addr).await;

    // The live version cannot be dropped; unknown ones are NOT_FOUND.
    let e = admin
        .drop_version(pb::DropVersionRequest {
            processor: "journey".into(),
            version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = admin
        .drop_version(pb::DropVersionRequest {
            processor: "journey".into(),
            version: 7,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = admin
        .start_rebuild(pb::StartRebuildRequest {
            processor: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    admin
        .start_rebuild(pb::StartRebuildRequest {
            processor: "journey".into(),
            to_version: 2,
            switch_when_caught_up: false,
        })
        .await
        .unwrap();
    replay_switch(&addr, "journey", "2");
    eventually("journey v1 has handed off", || async {
        projections(&addr)
            .await
            .iter()
            .find(|p| p.processor == "journey")
            .and_then(|p| p.versions.iter().find(|v| v.version == 1))
            .filter(|v| !v.running)
            .map(|_| ())
    })
    .await;
    let stored = dev.store.stored_bytes("journey_v1").await.unwrap();
    assert!(stored.is_some_and(|b| b > 0));

    let o = waymark(&["projections", "drop", "journey", "1", "--grpc-addr", &addr]);
    assert!(o.status.success(), "{}", text(&o));
    let journey = projections(&addr)
        .await
        .into_iter()
        .find(|p| p.processor == "journey")
        .unwrap();
    assert_eq!(
        journey
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![2]
    );
    // Its table and positions are gone.
    assert_eq!(dev.store.stored_bytes("journey_v1").await.unwrap(), None);
    assert!(matches!(
        dev.store.scan("journey_v1", None, 10).await,
        Err(StoreError::UnknownTable(_))
    ));
    assert!(dev
        .store
        .positions("journey.v1", "waymark.events")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(snapshot(&addr, "d", 11).await, before);
    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_corrupted_missing_and_unexpected_rows() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.clone();
    publish_all(&addr, &mixed_workload("v", 0, 400, 7)).await;
    caught_up(&addr).await;
    let o = waymark(&["verify", "learning", "--grpc-addr", &addr]);
    assert!(o.status.success(), "{}", text(&o));

    let a = default_person_id("web", "v-1").to_string();
    let b = default_person_id("web", "v-2").to_string();
    let c = default_person_id("web", "v-3").to_string();
    let row = |key: &str, value: Option<Vec<u8>>| RowWrite {
        table: "learning_v1".into(),
        key: key.into(),
        value,
        order: None,
    };
    let rows = dev
        .store
        .get_many("learning_v1", &[a.clone(), b.clone()])
        .await
        .unwrap();
    let (a_row, b_row) = (rows[0].clone().unwrap(), rows[1].clone().unwrap());
    dev.store
        .write(WriteBatch {
            rows: vec![
                // a's row holds b's state, c's row is gone, an extra row appears.
                row(&a, Some(b_row.clone())),
                row(&c, None),
                row("00000000-0000-0000-0000-00000000beef", Some(a_row)),
            ],
            positions: Vec::new(),
        })
        .await
        .unwrap();

    let reports = admin(&addr)
        .await
        .verify(pb::VerifyRequest {
            processor: "learning".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .reports;
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(r.difference_count, 3, "{r:?}");
    let kinds: Vec<(&str, &str)> = r
        .differences
        .iter()
        .map(|d| (d.key.as_str(), d.kind.as_str()))
        .collect();
    assert!(kinds.contains(&(a.as_str(), "different")), "{kinds:?}");
    assert!(kinds.contains(&(c.as_str(), "missing")), "{kinds:?}");
    assert!(
        kinds.contains(&("00000000-0000-0000-0000-00000000beef", "unexpected")),
        "{kinds:?}"
    );

    let o = waymark(&["verify", "--grpc-addr", &addr]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("3 DIFFERENCES") && out.contains(&a), "{out}");
    assert!(out.contains("person v1: identical"), "{out}");

    // Rebuilding repairs it.
    let o = waymark(&[
        "replay",
        "learning",
        "--switch",
        "--wait",
        "--grpc-addr",
        &addr,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = waymark(&["verify", "--grpc-addr", &addr]);
    assert!(o.status.success(), "{}", text(&o));
    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_events_pages_a_persons_history_in_log_order() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.clone();
    let events: Vec<String> = (0..75)
        .map(|i| {
            common::event(
                &format!("h{i}"),
                "learning.quiz_answered",
                // event times deliberately out of order: history is log order
                &format!("2026-06-01T00:{:02}:00Z", 59 - i % 60),
                ("web", "hist"),
                serde_json::json!({"course_id": "c", "quiz_id": format!("q{i}"), "correct": true}),
            )
        })
        .chain([common::event(
            "h3",
            "learning.quiz_answered",
            "2026-06-01T00:56:00Z",
            ("web", "hist"),
            serde_json::json!({"course_id": "c", "quiz_id": "q3", "correct": true}),
        )])
        .collect();
    publish_all(&addr, &events).await;
    caught_up(&addr).await;
    let mut q = clients(&addr).await.query;
    let id = default_person_id("web", "hist").to_string();
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = q
            .list_events(pb::ListEventsRequest {
                person_id: id.clone(),
                page_size: 30,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        ids.extend(page.events.iter().map(|e| e.id.clone()));
        assert!(page
            .events
            .iter()
            .all(|e| e.r#type == "learning.quiz_answered" && e.json.contains(&id)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    // 75 events (the duplicate h3 is not history), log order, 3 pages.
    assert_eq!(ids, (0..75).map(|i| format!("h{i}")).collect::<Vec<_>>());
    assert_eq!(pages, 3);

    let e = q
        .list_events(pb::ListEventsRequest {
            person_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = q
        .list_events(pb::ListEventsRequest {
            person_id: id.clone(),
            page_token: "zz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = q
        .list_events(pb::ListEventsRequest {
            person_id: default_person_id("web", "nobody").to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_rebuild_is_refused_once_retention_removed_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.clone();
    publish_all(&addr, &mixed_workload("k", 0, 50, 5)).await;
    caught_up(&addr).await;
    let log = dev.log.clone();
    // Forced: what the live version applied is deleted anyway (as an
    // operator's retention on Kafka would).
    let everything = std::collections::BTreeMap::new();
    tokio::task::spawn_blocking(move || {
        log.apply_retention("waymark.inputs", Duration::ZERO, &everything)
    })
    .await
    .unwrap()
    .unwrap();
    let o = waymark(&["replay", "identity", "--grpc-addr", &addr]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("retention already removed offsets"),
        "{}",
        text(&o)
    );
    // The folds of waymark.events (kept forever) can still be rebuilt.
    let o = waymark(&[
        "replay",
        "person",
        "--switch",
        "--wait",
        "--grpc-addr",
        &addr,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    dev.stop().await.unwrap();
}
