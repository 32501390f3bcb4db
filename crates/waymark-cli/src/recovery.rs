//! Recovering from permanent failures: `waymark parked` (list, retry and
//! skip parked keys) and `waymark dlq` (list and replay dead letters).

use std::fmt::Write as _;
use std::process::ExitCode;

use waymark_proto::v1 as pb;
use waymark_proto::v1::admin_client::AdminClient;
use waymark_proto::v1::ingest_client::IngestClient;

use crate::connect::{connect, Endpoint};
use crate::ops::{status, time};

/// Renders parked keys as `waymark parked` prints them.
pub fn parked_table(parked: &[pb::ParkedKey]) -> String {
    let mut out = String::new();
    for p in parked {
        let _ = writeln!(
            out,
            "{} v{} {}  partition {} offset {}  {} record(s) parked since {}{}{}",
            p.processor,
            p.version,
            p.key,
            p.partition,
            p.offset,
            p.records,
            time(p.parked_at.as_ref()),
            if p.retries > 0 {
                format!(", {} failed retries", p.retries)
            } else {
                String::new()
            },
            if p.retry_requested {
                ", retry requested"
            } else {
                ""
            }
        );
        let _ = writeln!(out, "    reason: {}", p.reason);
        if !p.last_error.is_empty() {
            let _ = writeln!(out, "    last retry: {}", p.last_error);
        }
    }
    out
}

/// `waymark parked [PROCESSOR]`: every parked key of `processor` (of every
/// processor when `None`) in `version` (the live one when `None`).
pub async fn parked(
    endpoint: &Endpoint,
    processor: Option<&str>,
    version: Option<u32>,
) -> anyhow::Result<ExitCode> {
    let mut admin = AdminClient::new(connect(endpoint).await?);
    let processors: Vec<String> = match processor {
        Some(p) => vec![p.to_owned()],
        None => admin
            .list_projections(pb::ListProjectionsRequest {})
            .await
            .map_err(status)?
            .into_inner()
            .projections
            .into_iter()
            .map(|p| p.processor)
            .collect(),
    };
    let mut total = 0;
    for processor in processors {
        let mut token = String::new();
        loop {
            let page = admin
                .list_parked(pb::ListParkedRequest {
                    processor: processor.clone(),
                    version: version.unwrap_or(0),
                    page_size: 1000,
                    page_token: token,
                })
                .await
                .map_err(status)?
                .into_inner();
            total += page.parked.len();
            print!("{}", parked_table(&page.parked));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    if total == 0 {
        println!("nothing is parked");
    } else {
        println!(
            "{total} key(s) parked; `waymark parked retry PROCESSOR KEY` applies a key's records \
             again once the cause is fixed, `waymark parked skip PROCESSOR KEY` dead-letters the \
             failing one first"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `waymark parked retry|skip PROCESSOR KEY`.
pub async fn retry_parked(
    endpoint: &Endpoint,
    processor: &str,
    key: &str,
    version: Option<u32>,
    skip: bool,
) -> anyhow::Result<ExitCode> {
    let mut admin = AdminClient::new(connect(endpoint).await?);
    let parked = admin
        .retry_parked(pb::RetryParkedRequest {
            processor: processor.to_owned(),
            version: version.unwrap_or(0),
            key: key.to_owned(),
            skip_failing: skip,
        })
        .await
        .map_err(status)?
        .into_inner();
    println!(
        "{} of {} parked record(s) of {key} in {processor} v{} requested; the processor \
         applies them within a second or two (`waymark parked {processor}` shows the result)",
        if skip {
            "skip of the failing one and retry"
        } else {
            "retry"
        },
        parked.records,
        parked.version,
    );
    Ok(ExitCode::SUCCESS)
}

/// Which dead letters `waymark dlq` works on.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    /// Only those rejected by this processor.
    pub processor: Option<String>,
    /// Only those of this kind (`waymark.error`).
    pub error: Option<String>,
    /// Only those read from this topic.
    pub topic: Option<String>,
}

impl DlqFilter {
    fn matches(&self, d: &pb::DeadLetter) -> bool {
        self.processor.as_ref().is_none_or(|p| *p == d.processor)
            && self.error.as_ref().is_none_or(|e| *e == d.error)
            && self.topic.as_ref().is_none_or(|t| *t == d.topic)
    }
}

/// Every dead letter matching `filter`, oldest first.
async fn dead_letters(
    endpoint: &Endpoint,
    filter: &DlqFilter,
) -> anyhow::Result<Vec<pb::DeadLetter>> {
    let mut admin = AdminClient::new(connect(endpoint).await?);
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                page_size: 1000,
                page_token: token,
                newest_first: false,
            })
            .await
            .map_err(status)?
            .into_inner();
        out.extend(page.dead_letters.into_iter().filter(|d| filter.matches(d)));
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// `waymark dlq list`.
pub async fn dlq_list(endpoint: &Endpoint, filter: &DlqFilter) -> anyhow::Result<ExitCode> {
    let letters = dead_letters(endpoint, filter).await?;
    for d in &letters {
        println!(
            "{} {}/{}@{} [{}] by {}: {}{}",
            time(d.time.as_ref()),
            d.topic,
            d.partition,
            d.offset,
            d.error,
            d.processor,
            d.message,
            d.truncated_from
                .map(|n| format!(" (value cut from {n} bytes)"))
                .unwrap_or_default()
        );
    }
    println!("{} dead letter(s)", letters.len());
    Ok(ExitCode::SUCCESS)
}

/// What `waymark dlq replay` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Published again (accepted by Ingest).
    pub accepted: usize,
    /// Refused by Ingest's validation, with why.
    pub rejected: Vec<(String, String)>,
    /// Not sent: a value cut to fit the dead letters, or not UTF-8.
    pub unsendable: Vec<(String, String)>,
}

/// `waymark dlq replay`: publishes the value of every dead letter matching
/// `filter` again through `Ingest.Publish`, the validation every new input
/// goes through (nothing when `dry_run`). Values that were cut to fit the
/// dead letters or are not UTF-8 cannot be events and are reported, not
/// sent.
pub async fn dlq_replay(
    endpoint: &Endpoint,
    filter: &DlqFilter,
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    let letters = dead_letters(endpoint, filter).await?;
    let mut report = ReplayReport::default();
    let mut events: Vec<(String, String)> = Vec::new();
    for d in letters {
        let at = format!("{}/{}@{}", d.topic, d.partition, d.offset);
        if let Some(n) = d.truncated_from {
            report.unsendable.push((
                at,
                format!("its value was cut from {n} bytes to fit the dead letters"),
            ));
            continue;
        }
        match String::from_utf8(d.value) {
            Ok(text) => events.push((at, text)),
            Err(_) => report
                .unsendable
                .push((at, "its value is not UTF-8, so it is no event".to_owned())),
        }
    }
    if dry_run {
        report.accepted = events.len();
        return Ok(report);
    }
    let mut ingest = IngestClient::new(connect(endpoint).await?);
    for chunk in events.chunks(500) {
        let results = ingest
            .publish(pb::PublishRequest {
                events: chunk.iter().map(|(_, e)| e.clone()).collect(),
            })
            .await
            .map_err(status)?
            .into_inner()
            .results;
        for ((at, _), result) in chunk.iter().zip(results) {
            match result.outcome {
                Some(pb::publish_result::Outcome::Accepted(_)) => report.accepted += 1,
                Some(pb::publish_result::Outcome::Rejected(r)) => report
                    .rejected
                    .push((at.clone(), format!("{}: {}", r.error, r.message))),
                None => report
                    .rejected
                    .push((at.clone(), "no result from the server".to_owned())),
            }
        }
    }
    Ok(report)
}
