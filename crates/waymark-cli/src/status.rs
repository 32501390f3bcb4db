//! The status page of `waymark dev` and `waymark serve`, on the metrics
//! port: one HTML page with its script (`status/index.html`, no framework,
//! nothing fetched from elsewhere) and the JSON it shows.
//!
//! The JSON is read from the same Admin and Query services the gRPC port
//! serves, called in process, with the same credentials and roles
//! (`admin` for `/api/status`, `query` for `/api/person`) when gRPC
//! authentication is configured.
//!
//! - `GET /api/status`: processors and their projection versions (state,
//!   lag in records and seconds, rebuild rate and ETA), the Kafka
//!   endpoint, partitions that keep failing, the newest dead letters and
//!   the parked persons.
//! - `GET /api/person?q=<person id | platform:platform_id>`: the person,
//!   their journeys, learning progress and latest interactions.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tonic::{Code, Request};
use waymark_proto::v1 as pb;
use waymark_proto::v1::admin_server::Admin;
use waymark_proto::v1::query_server::Query as _;
use waymark_server::auth::Authenticator;
use waymark_server::{AdminService, QueryService};

/// The page.
const PAGE: &str = include_str!("status/index.html");
/// Dead letters the status shows.
const DEAD_LETTERS: i32 = 20;
/// Parked keys shown per processor.
const PARKED: i32 = 20;
/// Interactions shown for a person.
const INTERACTIONS: i32 = 20;

/// What the status page reads.
#[derive(Clone)]
pub struct StatusSources {
    /// The Admin service (in process).
    pub admin: AdminService,
    /// The Query service (in process).
    pub query: QueryService,
    /// The gRPC port's credentials and roles.
    pub auth: Arc<Authenticator>,
}

/// The routes of the status page.
pub fn router(sources: StatusSources) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/person", get(person))
        .with_state(sources)
}

async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        Html(PAGE),
    )
        .into_response()
}

/// An error as the page shows it: `{"error": …}` with an HTTP status that
/// matches the gRPC code.
fn error(status: &tonic::Status) -> Response {
    let code = match status.code() {
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unavailable | Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = (code, Json(json!({ "error": status.message() }))).into_response();
    if code == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// Checks the caller as the gRPC port would check a call to `rpc`.
fn check(sources: &StatusSources, headers: &HeaderMap, rpc: &str) -> Result<(), tonic::Status> {
    sources.auth.check(rpc, headers, None)
}

fn time(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
}

fn projection(p: &pb::Projection) -> Value {
    let versions: Vec<Value> = p
        .versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "state": crate::ops::state_name(v.state),
                "lag_records": v.lag,
                "lag_seconds": v.lag_seconds,
                "rate": v.rate,
                "eta_seconds": v.eta_seconds,
                "caught_up": v.caught_up,
                "switch_when_caught_up": v.switch_when_caught_up,
                "running": v.running,
                "created_at": time(v.created_at.as_ref()),
                "switched_at": time(v.switched_at.as_ref()),
                "partitions": v.partitions.iter().map(|p| json!({
                    "partition": p.partition,
                    "position": p.position,
                    "high_watermark": p.high_watermark,
                    "lag_records": p.lag,
                    "lag_seconds": p.lag_seconds,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "processor": p.processor,
        "active_version": p.active_version,
        "input_topic": p.input_topic,
        "versions": versions,
    })
}

fn dead_letter(d: &pb::DeadLetter) -> Value {
    json!({
        "time": time(d.time.as_ref()),
        "processor": d.processor,
        "error": d.error,
        "message": d.message,
        "topic": d.topic,
        "partition": d.partition,
        "offset": d.offset,
        "key": String::from_utf8_lossy(&d.key),
    })
}

fn parked(k: &pb::ParkedKey) -> Value {
    json!({
        "processor": k.processor,
        "version": k.version,
        "key": k.key,
        "partition": k.partition,
        "offset": k.offset,
        "reason": k.reason,
        "records": k.records,
        "retries": k.retries,
        "last_error": k.last_error,
        "parked_at": time(k.parked_at.as_ref()),
    })
}

async fn status(State(sources): State<StatusSources>, headers: HeaderMap) -> Response {
    if let Err(refused) = check(&sources, &headers, "/waymark.v1.Admin/ListProjections") {
        return error(&refused);
    }
    match read_status(&sources).await {
        Ok(v) => Json(v).into_response(),
        Err(status) => error(&status),
    }
}

async fn read_status(sources: &StatusSources) -> Result<Value, tonic::Status> {
    let admin = &sources.admin;
    let projections = admin
        .list_projections(Request::new(pb::ListProjectionsRequest {}))
        .await?
        .into_inner()
        .projections;
    let general = admin
        .get_status(Request::new(pb::GetStatusRequest {}))
        .await?
        .into_inner();
    let dead_letters = admin
        .list_dead_letters(Request::new(pb::ListDeadLettersRequest {
            page_size: DEAD_LETTERS,
            page_token: String::new(),
            newest_first: true,
        }))
        .await?
        .into_inner();
    let mut parked_keys = Vec::new();
    for p in &projections {
        let page = admin
            .list_parked(Request::new(pb::ListParkedRequest {
                processor: p.processor.clone(),
                version: 0,
                page_size: PARKED,
                page_token: String::new(),
            }))
            .await?
            .into_inner();
        parked_keys.extend(page.parked.iter().map(parked));
    }
    let kafka = general.kafka_endpoint.map(|k| {
        json!({
            "bootstrap": k.bootstrap,
            "connections": k.connections,
            "records_in": k.records_in,
            "records_out": k.records_out,
            "refusals": k.refusals,
            "last_refusal": k.last_refusal,
        })
    });
    Ok(json!({
        "now": chrono::Utc::now().to_rfc3339(),
        "projections": projections.iter().map(projection).collect::<Vec<_>>(),
        "kafka_endpoint": kafka,
        "failing": general.failing.iter().map(|f| json!({
            "processor": f.processor,
            "version": f.version,
            "topic": f.topic,
            "partition": f.partition,
            "offset": f.offset,
            "retries": f.retries,
            "error": f.error,
            "since": time(f.since.as_ref()),
        })).collect::<Vec<_>>(),
        "dead_letters": dead_letters.dead_letters.iter().map(dead_letter).collect::<Vec<_>>(),
        "more_dead_letters": !dead_letters.next_page_token.is_empty(),
        "parked": parked_keys,
    }))
}

/// `?q=` of `/api/person`.
#[derive(Debug, serde::Deserialize)]
struct PersonQuery {
    #[serde(default)]
    q: String,
}

async fn person(
    State(sources): State<StatusSources>,
    headers: HeaderMap,
    Query(query): Query<PersonQuery>,
) -> Response {
    if let Err(refused) = check(&sources, &headers, "/waymark.v1.Query/GetPerson") {
        return error(&refused);
    }
    match read_person(&sources, query.q.trim()).await {
        Ok(v) => Json(v).into_response(),
        Err(status) => error(&status),
    }
}

async fn read_person(sources: &StatusSources, q: &str) -> Result<Value, tonic::Status> {
    let query = &sources.query;
    let person = if q.parse::<uuid::Uuid>().is_ok() {
        query
            .get_person(Request::new(pb::GetPersonRequest {
                person_id: q.to_owned(),
            }))
            .await?
    } else {
        let Some((platform, platform_id)) = q.split_once(':') else {
            return Err(tonic::Status::invalid_argument(
                "look up a person id (a UUID) or an identity as platform:platform_id",
            ));
        };
        query
            .resolve_identity(Request::new(pb::ResolveIdentityRequest {
                platform: platform.to_owned(),
                platform_id: platform_id.to_owned(),
            }))
            .await?
    }
    .into_inner();
    let person_id = person.person_id.clone();
    let journeys = query
        .list_journeys(Request::new(pb::ListJourneysRequest {
            person_id: person_id.clone(),
        }))
        .await?
        .into_inner()
        .journeys;
    let courses = query
        .list_learning_progress(Request::new(pb::ListLearningProgressRequest {
            person_id: person_id.clone(),
        }))
        .await?
        .into_inner()
        .courses;
    let interactions = query
        .list_interactions(Request::new(pb::ListInteractionsRequest {
            person_id: person_id.clone(),
            page_size: INTERACTIONS,
            ..Default::default()
        }))
        .await?
        .into_inner()
        .interactions;
    Ok(json!({
        "person_id": person.person_id,
        "merged_into": person.merged_into,
        "identities": person.identities.iter().map(|i| format!("{}:{}", i.platform, i.platform_id)).collect::<Vec<_>>(),
        "first_seen": time(person.first_seen.as_ref()),
        "last_seen": time(person.last_seen.as_ref()),
        "event_count": person.event_count,
        "interaction_count": person.interaction_count,
        "journeys": journeys.iter().map(|j| json!({
            "journey_id": j.journey_id,
            "status": match pb::JourneyStatus::try_from(j.status) {
                Ok(pb::JourneyStatus::Active) => "active",
                Ok(pb::JourneyStatus::Completed) => "completed",
                _ => "unknown",
            },
            "stage": j.stage,
            "stages": j.stages,
            "runs": j.runs,
            "started_at": time(j.started_at.as_ref()),
            "updated_at": time(j.updated_at.as_ref()),
            "completed_at": time(j.completed_at.as_ref()),
        })).collect::<Vec<_>>(),
        "learning": courses.iter().map(|c| json!({
            "course_id": c.course_id,
            "lessons_completed": c.lessons_completed,
            "average_score": c.average_score,
            "quizzes_answered": c.quizzes_answered,
            "quizzes_correct": c.quizzes_correct,
            "last_activity": time(c.last_activity.as_ref()),
        })).collect::<Vec<_>>(),
        "interactions": interactions.iter().map(|i| json!({
            "id": i.id,
            "time": time(i.time.as_ref()),
            "channel": i.channel,
            "kind": i.kind,
            "direction": i.direction,
            "content_type": i.content_type,
            "content": i.content,
        })).collect::<Vec<_>>(),
    }))
}
