//! Operator commands over the `Admin` and `Query` services: `waymark
//! replay`, `projections`, `verify` and `inspect`.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use tonic::Code;
use waymark_proto::v1 as pb;

use crate::connect::{connect, Endpoint};
use waymark_proto::v1::admin_client::AdminClient;
use waymark_proto::v1::query_client::QueryClient;

/// How often `replay --wait` looks at the progress.
const WAIT_POLL: Duration = Duration::from_secs(1);

pub(crate) fn status(e: tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", code_name(e.code()), e.message())
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::FailedPrecondition => "failed precondition",
        Code::Unavailable => "unavailable",
        Code::Unimplemented => "not supported by this server",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Unauthenticated => "not authenticated (give --token, --token-file or WAYMARK_TOKEN)",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "server busy",
        _ => "error",
    }
}

/// The name of a `VersionState` (`building`, `live`, `retired`).
pub fn state_name(state: i32) -> &'static str {
    match pb::VersionState::try_from(state) {
        Ok(pb::VersionState::Building) => "building",
        Ok(pb::VersionState::Live) => "live",
        Ok(pb::VersionState::Retired) => "retired",
        _ => "unknown",
    }
}

fn eta(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{s:.0}s"),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

fn bytes(n: Option<u64>) -> String {
    match n {
        None => "-".into(),
        Some(n) if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        Some(n) => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

/// How far behind the append time a version is: `-` when caught up.
fn behind(lag: u64, seconds: f64) -> String {
    if lag == 0 {
        return "-".to_owned();
    }
    eta(Some(seconds))
}

/// Renders `waymark projections`.
pub fn projections_table(projections: &[pb::Projection]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<13} {:>7} {:<9} {:>10} {:>10} {:>8} {:>9} {:>8} {:<9} {:<8} {:>10}",
        "PROCESSOR",
        "VERSION",
        "STATE",
        "POSITION",
        "LAG",
        "BEHIND",
        "RATE/s",
        "ETA",
        "CAUGHT_UP",
        "RUNNING",
        "SIZE"
    );
    for p in projections {
        for v in &p.versions {
            let position: i64 = v.partitions.iter().map(|x| x.position).sum();
            let _ = writeln!(
                out,
                "{:<13} {:>7} {:<9} {:>10} {:>10} {:>8} {:>9.0} {:>8} {:<9} {:<8} {:>10}",
                p.processor,
                format!("v{}", v.version),
                state_name(v.state),
                position,
                v.lag,
                behind(v.lag, v.lag_seconds),
                v.rate,
                eta(v.eta_seconds),
                if v.caught_up { "yes" } else { "no" },
                if v.running { "yes" } else { "no" },
                bytes(v.stored_bytes),
            );
        }
    }
    out
}

/// `waymark projections`.
pub async fn projections(endpoint: &Endpoint) -> anyhow::Result<ExitCode> {
    let mut admin = AdminClient::new(connect(endpoint).await?);
    let list = admin
        .list_projections(pb::ListProjectionsRequest {})
        .await
        .map_err(status)?
        .into_inner();
    print!("{}", projections_table(&list.projections));
    Ok(ExitCode::SUCCESS)
}

/// `waymark projections switch|drop`.
pub async fn switch_or_drop(
    endpoint: &Endpoint,
    processor: &str,
    version: u32,
    drop: bool,
) -> anyhow::Result<ExitCode> {
    let mut admin = AdminClient::new(connect(endpoint).await?);
    let p = if drop {
        admin
            .drop_version(pb::DropVersionRequest {
                processor: processor.to_owned(),
                version,
            })
            .await
    } else {
        admin
            .switch_version(pb::SwitchVersionRequest {
                processor: processor.to_owned(),
                version,
            })
            .await
    }
    .map_err(status)?
    .into_inner();
    if drop {
        println!("{processor} version {version} dropped and its data deleted");
    } else {
        println!("{processor} version {version} is live");
    }
    print!("{}", projections_table(std::slice::from_ref(&p)));
    Ok(ExitCode::SUCCESS)
}

/// Options of `waymark replay`.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Processor to rebuild.
    pub processor: String,
    /// Version to build; the highest so far + 1 when `None`.
    pub to_version: Option<u32>,
    /// Switch once caught up.
    pub switch: bool,
    /// Wait (with progress) until caught up, or switched with `switch`.
    pub wait: bool,
}

fn find(list: &pb::ListProjectionsResponse, processor: &str) -> Option<pb::Projection> {
    list.projections
        .iter()
        .find(|p| p.processor == processor)
        .cloned()
}

/// `waymark replay`.
pub async fn replay(endpoint: &Endpoint, options: &ReplayOptions) -> anyhow::Result<ExitCode> {
    let mut admin = AdminClient::new(connect(endpoint).await?);
    let processor = &options.processor;
    let started = admin
        .start_rebuild(pb::StartRebuildRequest {
            processor: processor.clone(),
            to_version: options.to_version.unwrap_or(0),
            switch_when_caught_up: options.switch,
        })
        .await;
    let projection = match started {
        Ok(p) => p.into_inner(),
        Err(e) if e.code() == Code::FailedPrecondition => {
            // Asking for the version that is already live is done already.
            let list = admin
                .list_projections(pb::ListProjectionsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            match (find(&list, processor), options.to_version) {
                (Some(p), Some(v)) if p.active_version == v && options.switch => {
                    println!("{processor} version {v} is already live");
                    return Ok(ExitCode::SUCCESS);
                }
                _ => return Err(status(e)),
            }
        }
        Err(e) => return Err(status(e)),
    };
    let version = match options.to_version {
        Some(v) => v,
        None => projection
            .versions
            .iter()
            .map(|v| v.version)
            .max()
            .ok_or_else(|| anyhow!("the server listed no version of {processor}"))?,
    };
    println!(
        "rebuilding {processor} version {version} from offset 0 of {} (live: version {}){}",
        projection.input_topic,
        projection.active_version,
        if options.switch {
            "; it becomes live as soon as it has caught up"
        } else {
            ""
        }
    );
    if !options.wait {
        println!("follow it with `waymark projections`");
        return Ok(ExitCode::SUCCESS);
    }
    let tty = std::io::stderr().is_terminal();
    let mut last_print = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let list = admin
            .list_projections(pb::ListProjectionsRequest {})
            .await
            .map_err(status)?
            .into_inner();
        let p = find(&list, processor).ok_or_else(|| anyhow!("{processor} is not listed"))?;
        let Some(v) = p.versions.iter().find(|v| v.version == version) else {
            return Err(anyhow!(
                "{processor} version {version} was dropped while waiting"
            ));
        };
        let position: i64 = v.partitions.iter().map(|x| x.position).sum();
        let high: i64 = v.partitions.iter().map(|x| x.high_watermark).sum();
        let percent = if high > 0 {
            100.0 * position as f64 / high as f64
        } else {
            100.0
        };
        let line = format!(
            "{processor} v{version}: {position}/{high} ({percent:.1}%) {:.0} records/s, lag {}, ETA {}",
            v.rate,
            v.lag,
            eta(v.eta_seconds)
        );
        let done = if options.switch {
            v.state == pb::VersionState::Live as i32
        } else {
            v.caught_up
        };
        if tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if done || last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!("{line}");
            last_print = std::time::Instant::now();
        }
        if done {
            if tty {
                eprintln!();
            }
            if options.switch {
                println!("{processor} version {version} has caught up and is live");
            } else {
                println!(
                    "{processor} version {version} has caught up; switch with `waymark projections switch {processor} {version}`"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// `waymark verify`.
pub async fn verify(endpoint: &Endpoint, processor: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut admin = AdminClient::new(connect(endpoint).await?);
    let reports = admin
        .verify(pb::VerifyRequest {
            processor: processor.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .reports;
    let mut differences = 0;
    for r in &reports {
        differences += r.difference_count;
        println!(
            "{} v{}: {} — {} rows compared, {} skipped (changed after the snapshot), {} records replayed",
            r.processor,
            r.version,
            if r.difference_count == 0 {
                "identical".to_owned()
            } else {
                format!("{} DIFFERENCES", r.difference_count)
            },
            r.rows_compared,
            r.rows_skipped,
            r.records_replayed
        );
        for d in &r.differences {
            println!("  {} {} [{}]: {}", d.table, d.key, d.kind, d.detail);
        }
        if r.difference_count as usize > r.differences.len() {
            println!(
                "  … and {} more",
                r.difference_count as usize - r.differences.len()
            );
        }
    }
    if differences == 0 {
        println!("verify: every projection equals its recomputation from the log");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("verify: {differences} rows differ from their recomputation from the log");
        Ok(ExitCode::FAILURE)
    }
}

pub(crate) fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
        .map_or_else(
            || "-".to_owned(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        )
}

/// `waymark inspect PERSON_ID`: one person's state and history.
pub async fn inspect(endpoint: &Endpoint, person_id: &str) -> anyhow::Result<ExitCode> {
    let mut query = QueryClient::new(connect(endpoint).await?);
    let id = person_id.to_owned();
    let person = query
        .get_person(pb::GetPersonRequest {
            person_id: id.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = String::new();
    let _ = writeln!(out, "person {}", person.person_id);
    let identities: Vec<String> = person
        .identities
        .iter()
        .map(|i| format!("{}:{}", i.platform, i.platform_id))
        .collect();
    let _ = writeln!(
        out,
        "  identities:   {}",
        if identities.is_empty() {
            "-".into()
        } else {
            identities.join(", ")
        }
    );
    let _ = writeln!(out, "  first seen:   {}", time(person.first_seen.as_ref()));
    let _ = writeln!(out, "  last seen:    {}", time(person.last_seen.as_ref()));
    let _ = writeln!(out, "  events:       {}", person.event_count);
    let _ = writeln!(out, "  interactions: {}", person.interaction_count);
    let _ = writeln!(
        out,
        "  merged into:  {}",
        if person.merged_into.is_empty() {
            "-"
        } else {
            &person.merged_into
        }
    );

    let journeys = query
        .list_journeys(pb::ListJourneysRequest {
            person_id: id.clone(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .journeys;
    let _ = writeln!(out, "journeys ({}):", journeys.len());
    for j in &journeys {
        let status = match pb::JourneyStatus::try_from(j.status) {
            Ok(pb::JourneyStatus::Active) => "ACTIVE",
            Ok(pb::JourneyStatus::Completed) => "COMPLETED",
            _ => "UNSPECIFIED",
        };
        let _ = writeln!(
            out,
            "  {}: {status}, stage {:?}, stages [{}], runs {}, started {}, updated {}, completed {}",
            j.journey_id,
            j.stage,
            j.stages.join(", "),
            j.runs,
            time(j.started_at.as_ref()),
            time(j.updated_at.as_ref()),
            time(j.completed_at.as_ref())
        );
    }

    let courses = query
        .list_learning_progress(pb::ListLearningProgressRequest {
            person_id: id.clone(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .courses;
    let _ = writeln!(out, "learning ({} courses):", courses.len());
    for c in &courses {
        let _ = writeln!(
            out,
            "  {}: {} lessons, average score {}, quizzes {}/{} correct, last activity {}",
            c.course_id,
            c.lessons_completed,
            c.average_score
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}")),
            c.quizzes_correct,
            c.quizzes_answered,
            time(c.last_activity.as_ref())
        );
    }

    let interactions = query
        .list_interactions(pb::ListInteractionsRequest {
            person_id: id.clone(),
            page_size: 20,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let _ = writeln!(
        out,
        "interactions (newest first{}):",
        if interactions.next_page_token.is_empty() {
            ""
        } else {
            ", first 20"
        }
    );
    for i in &interactions.interactions {
        let mut content: String = i.content.chars().take(60).collect();
        if i.content.chars().count() > 60 {
            content.push('…');
        }
        let _ = writeln!(
            out,
            "  {} {} {} {} {} {:?}",
            time(i.time.as_ref()),
            i.channel,
            i.kind,
            i.direction,
            i.content_type,
            content
        );
    }

    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = query
            .list_events(pb::ListEventsRequest {
                person_id: id.clone(),
                page_size: 1000,
                page_token: token.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let _ = writeln!(out, "history ({} events, log order):", events.len());
    for e in &events {
        let _ = writeln!(
            out,
            "  {} {:<24} {} (partition {} offset {})",
            time(e.time.as_ref()),
            e.r#type,
            e.id,
            e.partition,
            e.offset
        );
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
