//! Every list rpc bounds a page by bytes as well as by count: a person
//! with large interactions gets several pages of at most
//! `MAX_PAGE_BYTES`, never one answer a client cannot receive, and the
//! pages together hold every item exactly once, in order.

mod common;

use common::{clients, event, eventually, publish_all, start_dev};
use serde_json::json;
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_server::MAX_PAGE_BYTES;

/// Content of one interaction: the most the schema allows (65536
/// characters), so 80 of them are more than two 2 MiB pages.
const CONTENT: usize = 65_536;
const ITEMS: usize = 80;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_items_are_paged_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let addr = dev.info.grpc_addr.to_string();
    let events: Vec<String> = (0..ITEMS)
        .map(|i| {
            event(
                &format!("big-{i}"),
                "interaction.recorded",
                &format!("2026-07-01T00:{:02}:{:02}Z", i / 60, i % 60),
                ("web", "big"),
                json!({
                    "kind": "message",
                    "content_type": "text",
                    "content": "x".repeat(CONTENT),
                }),
            )
        })
        .collect();
    publish_all(&addr, &events).await;
    let person = default_person_id("web", "big").to_string();
    let mut c = clients(&addr).await;
    let query = c.query.clone();
    eventually("all events in the history", || {
        let mut q = query.clone();
        let person = person.clone();
        async move {
            let r = q
                .list_events(pb::ListEventsRequest {
                    person_id: person,
                    page_size: 1,
                    page_token: (ITEMS - 1).to_string(),
                })
                .await
                .ok()?
                .into_inner();
            (!r.events.is_empty()).then_some(())
        }
    })
    .await;
    eventually("all interactions stored", || {
        let mut q = query.clone();
        let person = person.clone();
        async move {
            let r = q
                .list_interactions(pb::ListInteractionsRequest {
                    person_id: person,
                    page_size: 1,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (r.interactions.first()?.id == format!("big-{}", ITEMS - 1)).then_some(())
        }
    })
    .await;

    // ListInteractions: newest first, pages within the budget.
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .query
            .list_interactions(pb::ListInteractionsRequest {
                person_id: person.clone(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(!r.interactions.is_empty());
        assert!(
            prost::Message::encoded_len(&r) <= MAX_PAGE_BYTES + CONTENT,
            "page of {} bytes",
            prost::Message::encoded_len(&r)
        );
        assert!(r.interactions.len() < ITEMS);
        ids.extend(r.interactions.iter().map(|i| i.id.clone()));
        token = r.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = (0..ITEMS).rev().map(|i| format!("big-{i}")).collect();
    assert_eq!(ids, expected);
    assert!(pages >= 3, "{pages} pages");

    // ListEvents: log order, pages within the budget.
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .query
            .list_events(pb::ListEventsRequest {
                person_id: person.clone(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.events.is_empty() && r.events.len() < ITEMS);
        ids.extend(r.events.iter().map(|e| e.id.clone()));
        token = r.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = (0..ITEMS).map(|i| format!("big-{i}")).collect();
    assert_eq!(ids, expected);
    dev.stop().await.unwrap();
}
