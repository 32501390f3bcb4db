//! The contract workload shared by the embedded and the real-engine
//! end-to-end tests: every event type through `Ingest` and a Kafka client,
//! duplicates, out-of-order event times, a linked identity, a v2 event,
//! every bad-input kind, checked over a real gRPC connection.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tonic::Code;
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_proto::v1::publish_result::Outcome;

use super::{clients, event, eventually};

fn ts(s: &str) -> prost_types::Timestamp {
    let t: chrono::DateTime<chrono::Utc> = s.parse().unwrap();
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

async fn publish(
    ingest: &mut pb::ingest_client::IngestClient<tonic::transport::Channel>,
    events: Vec<String>,
) -> Vec<Outcome> {
    ingest
        .publish(pb::PublishRequest { events })
        .await
        .expect("publish")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.outcome.expect("outcome"))
        .collect()
}

/// Runs the workload against a platform serving gRPC at `grpc_addr` whose
/// Kafka producers use `kafka_bootstrap` and `inputs_topic`; returns how
/// many records were produced through Kafka.
pub async fn contract_workload(grpc_addr: &str, kafka_bootstrap: &str, inputs_topic: &str) -> u64 {
    let mut c = clients(grpc_addr).await;
    let tg = ("telegram", "alice");
    let alice = default_person_id("telegram", "alice");

    // Every type, a duplicate, out-of-order event times, a v1 and a v2 lesson.
    let batch = vec![
        event("e1", "interaction.recorded", "2026-03-01T10:10:00Z", tg, json!({"kind": "message", "content_type": "text", "content": "hi"})),
        event("e2", "interaction.recorded", "2026-03-01T10:05:00Z", tg, json!({"kind": "reaction", "content_type": "none", "direction": "outbound", "channel": "group"})),
        event("e1", "interaction.recorded", "2026-03-01T10:10:00Z", tg, json!({"kind": "message", "content_type": "text", "content": "hi"})),
        event("e3", "journey.started", "2026-03-01T10:01:00Z", tg, json!({"journey_id": "onboarding", "stage": "welcome"})),
        event("e4", "journey.stage_entered", "2026-03-01T10:02:00Z", tg, json!({"journey_id": "onboarding", "stage": "profile"})),
        event("e5", "journey.completed", "2026-03-01T10:03:00Z", tg, json!({"journey_id": "onboarding"})),
        event("e6", "learning.lesson_completed", "2026-03-01T10:04:00Z", tg, json!({"course_id": "c1", "lesson_id": "l1", "score": 80})),
        serde_json::json!({"id": "e7", "type": "learning.lesson_completed", "version": 2, "time": "2026-03-01T10:06:00Z",
            "source": {"platform": "telegram", "platform_id": "alice"},
            "data": {"course_id": "c1", "lesson_id": "l2", "result": {"points": 3, "max_points": 4}}}).to_string(),
        event("e8", "learning.quiz_answered", "2026-03-01T10:07:00Z", tg, json!({"course_id": "c1", "quiz_id": "q1", "correct": true})),
        event("e9", "identity.linked", "2026-03-01T10:08:00Z", tg, json!({"platform": "web", "platform_id": "alice-web"})),
    ];
    let outcomes = publish(&mut c.ingest, batch).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Accepted(_))),
        "{outcomes:?}"
    );

    // A link re-points the identity for every event processed after it:
    // wait until it is resolved (across partitions Kafka orders nothing),
    // then act as the linked identity.
    let q = c.query.clone();
    eventually("the link is resolved", || {
        let mut q = q.clone();
        async move {
            let p = q
                .resolve_identity(pb::ResolveIdentityRequest {
                    platform: "web".into(),
                    platform_id: "alice-web".into(),
                })
                .await
                .ok()?
                .into_inner();
            (p.person_id == alice.to_string()).then_some(())
        }
    })
    .await;
    let outcomes = publish(
        &mut c.ingest,
        vec![event(
            "e10",
            "interaction.recorded",
            "2026-03-01T10:09:00Z",
            ("web", "alice-web"),
            json!({"kind": "view", "content_type": "none"}),
        )],
    )
    .await;
    assert!(matches!(outcomes[0], Outcome::Accepted(_)));

    // Every bad-input kind is rejected by Ingest with its kind, the rest accepted.
    let big = "x".repeat(1024 * 1024 + 10);
    let bad = vec![
        "{not json".to_string(),
        json!({"id": "", "type": "journey.started", "time": "2026-03-01T10:00:00Z", "source": {"platform": "web", "platform_id": "x"}, "data": {"journey_id": "j"}}).to_string(),
        event("b3", "journey.teleported", "2026-03-01T10:00:00Z", tg, json!({})),
        json!({"id": "b4", "type": "journey.started", "version": 7, "time": "2026-03-01T10:00:00Z", "source": {"platform": "web", "platform_id": "x"}, "data": {"journey_id": "j"}}).to_string(),
        event("b5", "journey.stage_entered", "2026-03-01T10:00:00Z", tg, json!({"journey_id": "j"})),
        event("b6", "interaction.recorded", "2026-03-01T10:00:00Z", tg, json!({"kind": "message", "content_type": "text", "content": big})),
        event("ok", "journey.started", "2026-03-01T09:00:00Z", ("web", "carol"), json!({"journey_id": "j"})),
    ];
    let outcomes = publish(&mut c.ingest, bad).await;
    let kinds: Vec<String> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Rejected(r) => r.error.clone(),
            Outcome::Accepted(_) => "accepted".into(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "malformed_json",
            "invalid_envelope",
            "unknown_type",
            "unsupported_version",
            "invalid_data",
            "too_large",
            "accepted"
        ]
    );

    // Person: identities (incl. the linked one), counts without the duplicate.
    let mut q = c.query.clone();
    let person = eventually("alice's person", || {
        let mut q = q.clone();
        async move {
            let p = q
                .get_person(pb::GetPersonRequest {
                    person_id: alice.to_string(),
                })
                .await
                .ok()?
                .into_inner();
            (p.event_count == 10).then_some(p)
        }
    })
    .await;
    assert_eq!(person.interaction_count, 3);
    assert_eq!(person.first_seen, Some(ts("2026-03-01T10:01:00Z")));
    assert_eq!(person.last_seen, Some(ts("2026-03-01T10:10:00Z")));
    assert_eq!(person.merged_into, "");
    let ids: Vec<(String, String)> = person
        .identities
        .iter()
        .map(|i| (i.platform.clone(), i.platform_id.clone()))
        .collect();
    assert_eq!(
        ids,
        [
            ("telegram".into(), "alice".into()),
            ("web".into(), "alice-web".into())
        ]
    );

    let resolved = q
        .resolve_identity(pb::ResolveIdentityRequest {
            platform: "web".into(),
            platform_id: "alice-web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.person_id, alice.to_string());

    // Each projection is folded by its own processor: wait until all have
    // caught up with alice's last event of their kind.
    let alice_id = alice.to_string();
    eventually("every projection caught up", || {
        let mut q = q.clone();
        let person_id = alice_id.clone();
        async move {
            let i = q
                .list_interactions(pb::ListInteractionsRequest {
                    person_id: person_id.clone(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            let j = q
                .get_journey(pb::GetJourneyRequest {
                    person_id: person_id.clone(),
                    journey_id: "onboarding".into(),
                })
                .await
                .ok()?
                .into_inner();
            let l = q
                .get_learning_progress(pb::GetLearningProgressRequest {
                    person_id,
                    course_id: "c1".into(),
                })
                .await
                .ok()?
                .into_inner();
            (i.interactions.len() == 3 && j.completed_at.is_some() && l.quizzes_answered == 1)
                .then_some(())
        }
    })
    .await;

    // Interactions: newest event time first, defaults applied, paging.
    let page = q
        .list_interactions(pb::ListInteractionsRequest {
            person_id: alice.to_string(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = page.interactions.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["e1", "e10"]);
    assert_eq!(page.interactions[0].channel, "telegram");
    assert_eq!(page.interactions[0].direction, "inbound");
    assert_eq!(
        page.interactions[1].source.as_ref().unwrap().platform,
        "web"
    );
    assert!(!page.next_page_token.is_empty());
    let rest = q
        .list_interactions(pb::ListInteractionsRequest {
            person_id: alice.to_string(),
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.interactions.len(), 1);
    assert_eq!(rest.interactions[0].id, "e2");
    assert_eq!(rest.interactions[0].channel, "group");
    assert_eq!(rest.interactions[0].direction, "outbound");
    assert!(rest.next_page_token.is_empty());

    // Journey.
    let j = q
        .get_journey(pb::GetJourneyRequest {
            person_id: alice.to_string(),
            journey_id: "onboarding".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.status, pb::JourneyStatus::Completed as i32);
    assert_eq!(j.stage, "profile");
    assert_eq!(j.stages, ["welcome", "profile"]);
    assert_eq!(j.runs, 1);
    assert_eq!(j.started_at, Some(ts("2026-03-01T10:01:00Z")));
    assert_eq!(j.completed_at, Some(ts("2026-03-01T10:03:00Z")));

    // Learning: v1 score 80 and v2 3/4 = 75 → 77.5.
    let l = q
        .get_learning_progress(pb::GetLearningProgressRequest {
            person_id: alice.to_string(),
            course_id: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.lessons_completed, 2);
    assert_eq!(l.average_score, Some(77.5));
    assert_eq!((l.quizzes_answered, l.quizzes_correct), (1, 1));
    assert_eq!(l.last_activity, Some(ts("2026-03-01T10:07:00Z")));

    // Status codes.
    let err = q
        .get_person(pb::GetPersonRequest {
            person_id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = q
        .get_person(pb::GetPersonRequest {
            person_id: waymark_core::default_person_id("nobody", "here").to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = q
        .list_interactions(pb::ListInteractionsRequest {
            person_id: alice.to_string(),
            page_size: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = q
        .get_journey(pb::GetJourneyRequest {
            person_id: alice.to_string(),
            journey_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = q
        .resolve_identity(pb::ResolveIdentityRequest {
            platform: "web".into(),
            platform_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Through the Kafka endpoint: good events and every bad kind as dead letters.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap();
    let bob = ("whatsapp", "bob");
    let too_large = event(
        "k-big",
        "interaction.recorded",
        "2026-03-02T10:00:00Z",
        bob,
        json!({"kind": "message", "content_type": "text", "content": big}),
    );
    let records: Vec<(String, String)> = vec![
        ("whatsapp:bob".into(), event("k1", "journey.started", "2026-03-02T10:00:00Z", bob, json!({"journey_id": "trial"}))),
        ("whatsapp:bob".into(), "{not json".into()),
        ("whatsapp:bob".into(), json!({"id": "k2", "type": "journey.started", "time": "yesterday", "source": {"platform": "whatsapp", "platform_id": "bob"}, "data": {"journey_id": "t"}}).to_string()),
        ("whatsapp:bob".into(), event("k3", "journey.teleported", "2026-03-02T10:00:00Z", bob, json!({}))),
        ("whatsapp:bob".into(), json!({"id": "k4", "type": "learning.quiz_answered", "version": 3, "time": "2026-03-02T10:00:00Z", "source": {"platform": "whatsapp", "platform_id": "bob"}, "data": {}}).to_string()),
        ("whatsapp:bob".into(), event("k5", "learning.quiz_answered", "2026-03-02T10:00:00Z", bob, json!({"course_id": "c", "quiz_id": "q"}))),
        ("whatsapp:bob".into(), too_large),
        ("whatsapp:bob".into(), event("k6", "journey.stage_entered", "2026-03-02T10:01:00Z", bob, json!({"journey_id": "trial", "stage": "day-1"}))),
    ];
    for (key, value) in &records {
        producer
            .send(
                FutureRecord::to(inputs_topic).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("kafka produce");
    }
    let bob_id = default_person_id("whatsapp", "bob");
    let journey = eventually("bob's journey", || {
        let mut q = q.clone();
        async move {
            let j = q
                .get_journey(pb::GetJourneyRequest {
                    person_id: bob_id.to_string(),
                    journey_id: "trial".into(),
                })
                .await
                .ok()?
                .into_inner();
            (j.stage == "day-1").then_some(j)
        }
    })
    .await;
    assert_eq!(journey.stages, ["day-1"]);

    let mut admin = c.admin.clone();
    let letters = eventually("six dead letters", || {
        let mut admin = admin.clone();
        async move {
            let r = admin
                .list_dead_letters(pb::ListDeadLettersRequest::default())
                .await
                .ok()?
                .into_inner();
            (r.dead_letters.len() >= 6).then_some(r.dead_letters)
        }
    })
    .await;
    let kinds: Vec<&str> = letters.iter().map(|d| d.error.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "malformed_json",
            "invalid_envelope",
            "unknown_type",
            "unsupported_version",
            "invalid_data",
            "too_large"
        ]
    );
    for d in &letters {
        assert_eq!(d.topic, inputs_topic);
        assert_eq!(d.processor, "identity");
        assert_eq!(d.key, b"whatsapp:bob");
        assert!(!d.message.is_empty());
        assert!(d.time.is_some());
    }
    assert_eq!(letters[0].value, b"{not json");
    // Paging through dead letters.
    let first = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            page_size: 4,
            page_token: String::new(),
            newest_first: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.dead_letters.len(), 4);
    let second = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            page_size: 4,
            page_token: first.next_page_token,
            newest_first: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.dead_letters.len(), 2);
    assert!(second.next_page_token.is_empty());
    // Newest first, in pages: the same letters in reverse.
    let mut newest = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                page_size: 4,
                page_token: token,
                newest_first: true,
            })
            .await
            .unwrap()
            .into_inner();
        newest.extend(
            page.dead_letters
                .into_iter()
                .map(|d| (d.partition, d.offset)),
        );
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let mut oldest: Vec<(i32, i64)> = first
        .dead_letters
        .iter()
        .chain(&second.dead_letters)
        .map(|d| (d.partition, d.offset))
        .collect();
    oldest.reverse();
    assert_eq!(newest, oldest, "newest first is oldest first reversed");
    let err = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            page_size: 1001,
            page_token: String::new(),
            newest_first: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    records.len() as u64
}
