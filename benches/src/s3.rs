//! S3: `GetPerson` and `ListInteractions` (half each) over tonic on
//! 127.0.0.1 at a fixed concurrency, against the projections S1 rebuilt.
//! Baseline: a tonic `Query` server whose handlers return canned responses
//! captured from the real service for the same persons, so requests and
//! responses have the same sizes, with the same server limits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use waymark_bench::measure::{CpuTime, Percentiles};
use waymark_bench::mix::Mix;
use waymark_proto::v1 as pb;
use waymark_proto::v1::query_client::QueryClient;
use waymark_proto::v1::query_server::{Query, QueryServer};
use waymark_runtime::ProjectionStore;
use waymark_server::{Projections, QueryService};

use crate::report::{round, Baseline, Scenario};
use crate::s1::S1;
use crate::Options;

/// Persons the clients ask about (spread over all persons).
const SAMPLE: u64 = 256;
/// Not measured at the start of each side.
const WARMUP: Duration = Duration::from_secs(1);

/// The empty handler: canned responses by person id.
#[derive(Clone)]
struct Canned {
    persons: Arc<HashMap<String, pb::Person>>,
    interactions: Arc<HashMap<String, pb::ListInteractionsResponse>>,
}

fn not_here<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of the baseline"))
}

#[tonic::async_trait]
impl Query for Canned {
    async fn resolve_identity(
        &self,
        _: Request<pb::ResolveIdentityRequest>,
    ) -> Result<Response<pb::Person>, Status> {
        not_here()
    }

    async fn get_person(
        &self,
        request: Request<pb::GetPersonRequest>,
    ) -> Result<Response<pb::Person>, Status> {
        self.persons
            .get(&request.get_ref().person_id)
            .map(|p| Response::new(p.clone()))
            .ok_or_else(|| Status::not_found("unknown person"))
    }

    async fn list_interactions(
        &self,
        request: Request<pb::ListInteractionsRequest>,
    ) -> Result<Response<pb::ListInteractionsResponse>, Status> {
        self.interactions
            .get(&request.get_ref().person_id)
            .map(|p| Response::new(p.clone()))
            .ok_or_else(|| Status::not_found("unknown person"))
    }

    async fn get_journey(
        &self,
        _: Request<pb::GetJourneyRequest>,
    ) -> Result<Response<pb::Journey>, Status> {
        not_here()
    }

    async fn list_journeys(
        &self,
        _: Request<pb::ListJourneysRequest>,
    ) -> Result<Response<pb::ListJourneysResponse>, Status> {
        not_here()
    }

    async fn get_learning_progress(
        &self,
        _: Request<pb::GetLearningProgressRequest>,
    ) -> Result<Response<pb::LearningProgress>, Status> {
        not_here()
    }

    async fn list_learning_progress(
        &self,
        _: Request<pb::ListLearningProgressRequest>,
    ) -> Result<Response<pb::ListLearningProgressResponse>, Status> {
        not_here()
    }

    async fn list_events(
        &self,
        _: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        not_here()
    }
}

/// How the canned server accepts connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Stock tonic: `TCP_NODELAY` on accepted sockets, as
    /// `Server::serve(addr)` does by default.
    Stock,
    /// As `waymark_server::serve` accepts them: a `TcpListenerStream`, on
    /// which tonic applies no socket options (Nagle stays on).
    LikeWaymarkServer,
}

/// Serves `service` with the limits `waymark_server::serve` uses.
async fn serve_query<Q: Query>(
    service: Q,
    transport: Transport,
    token: CancellationToken,
) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        let builder = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(
                waymark_server::MAX_CONCURRENT_REQUESTS_PER_CONNECTION,
            )
            .timeout(Duration::from_secs(30))
            .add_service(
                QueryServer::new(service)
                    .max_decoding_message_size(waymark_server::MAX_REQUEST_BYTES),
            );
        let _ = match transport {
            Transport::Stock => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                builder
                    .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                    .await
            }
            Transport::LikeWaymarkServer => {
                builder
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(listener),
                        token.cancelled_owned(),
                    )
                    .await
            }
        };
    });
    Ok(addr)
}

async fn connect(addr: &str) -> anyhow::Result<QueryClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    Ok(QueryClient::new(channel))
}

/// What one side of the load measured.
struct Load {
    secs: f64,
    cpu: CpuTime,
    person: Vec<Duration>,
    interactions: Vec<Duration>,
    errors: u64,
}

impl Load {
    fn requests(&self) -> usize {
        self.person.len() + self.interactions.len()
    }
    fn rate(&self) -> f64 {
        self.requests() as f64 / self.secs
    }
    fn all(&self) -> Percentiles {
        let mut all: Vec<Duration> = self
            .person
            .iter()
            .chain(&self.interactions)
            .copied()
            .collect();
        Percentiles::of(&mut all)
    }
}

/// `concurrency` closed loops over one connection for WARMUP + `secs`.
async fn load(
    client: QueryClient<Channel>,
    ids: Arc<Vec<String>>,
    concurrency: usize,
    secs: f64,
) -> anyhow::Result<Load> {
    let start = Instant::now();
    let measure_from = start + WARMUP;
    let end = measure_from + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for task in 0..concurrency {
        let mut client = client.clone();
        let ids = ids.clone();
        set.spawn(async move {
            let mut person = Vec::new();
            let mut interactions = Vec::new();
            let mut errors = 0u64;
            let mut k = task;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let id = ids[(k * 7919) % ids.len()].clone();
                let ok = if k.is_multiple_of(2) {
                    client
                        .get_person(pb::GetPersonRequest { person_id: id })
                        .await
                        .is_ok()
                } else {
                    client
                        .list_interactions(pb::ListInteractionsRequest {
                            person_id: id,
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                };
                if now >= measure_from {
                    if !ok {
                        errors += 1;
                    } else if k.is_multiple_of(2) {
                        person.push(now.elapsed());
                    } else {
                        interactions.push(now.elapsed());
                    }
                }
                k += concurrency;
            }
            (person, interactions, errors)
        });
    }
    // CPU of the measured window only (the warm-up is excluded).
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu = CpuTime::now();
    let mut out = Load {
        secs,
        cpu: CpuTime::default(),
        person: Vec::new(),
        interactions: Vec::new(),
        errors: 0,
    };
    while let Some(done) = set.join_next().await {
        let (p, i, e) = done?;
        out.person.extend(p);
        out.interactions.extend(i);
        out.errors += e;
    }
    out.cpu = CpuTime::now().since(&cpu);
    Ok(out)
}

fn side(l: &mut Load) -> serde_json::Value {
    let all = l.all();
    json!({
        "requests": l.requests(),
        "errors": l.errors,
        "req_per_s": round(l.rate(), 0),
        "req_per_cpu_s": round(l.requests() as f64 / l.cpu.total_secs(), 0),
        "latency_ms": all,
        "get_person_latency_ms": Percentiles::of(&mut l.person),
        "list_interactions_latency_ms": Percentiles::of(&mut l.interactions),
    })
}

pub(crate) async fn run(o: &Options, s1: &S1) -> anyhow::Result<Scenario> {
    let mut real = connect(&s1.platform.grpc_addr).await?;
    let ids: Vec<String> = (0..SAMPLE)
        .map(|k| Mix::person_id(k * s1.persons / SAMPLE).to_string())
        .collect();
    let mut persons = HashMap::new();
    let mut interactions = HashMap::new();
    let (mut person_bytes, mut list_bytes, mut items) = (0usize, 0usize, 0usize);
    for id in &ids {
        let p = real
            .get_person(pb::GetPersonRequest {
                person_id: id.clone(),
            })
            .await
            .with_context(|| format!("GetPerson {id}"))?
            .into_inner();
        let l = real
            .list_interactions(pb::ListInteractionsRequest {
                person_id: id.clone(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("ListInteractions {id}"))?
            .into_inner();
        person_bytes += prost_len(&p);
        list_bytes += prost_len(&l);
        items += l.interactions.len();
        persons.insert(id.clone(), p);
        interactions.insert(id.clone(), l);
    }
    let ids = Arc::new(ids);
    let canned = Canned {
        persons: Arc::new(persons),
        interactions: Arc::new(interactions),
    };
    let token = CancellationToken::new();
    let stock = serve_query(canned.clone(), Transport::Stock, token.clone()).await?;
    let like = serve_query(canned, Transport::LikeWaymarkServer, token.clone()).await?;
    let stock = connect(&stock).await?;
    let like = connect(&like).await?;
    // Diagnostic: Waymark's own Query handlers on the stock transport.
    let store: Arc<dyn ProjectionStore> = s1.platform.store.clone();
    let topology = s1.platform.topology.clone();
    let handlers = QueryService::new(Projections::new(
        store,
        waymark_control::configured_versions(waymark_cli::registry::registry(), &topology),
    ));
    let handlers = serve_query(handlers, Transport::Stock, token.clone()).await?;
    let handlers = connect(&handlers).await?;

    let c = o.s3_concurrency.max(1);
    let mut base = load(stock, ids.clone(), c, o.s3_secs).await?;
    let mut got = load(real, ids.clone(), c, o.s3_secs).await?;
    let mut like = load(like, ids.clone(), c, o.s3_secs).await?;
    let mut own = load(handlers, ids.clone(), c, o.s3_secs).await?;
    token.cancel();
    let ratio = got.rate() / base.rate();
    let p99 = got.all().p99_ms;
    eprintln!(
        "   {:.0} req/s (p99 {p99:.2} ms) vs canned {:.0} req/s (p99 {:.2} ms)",
        got.rate(),
        base.rate(),
        base.all().p99_ms
    );
    let n = ids.len();
    Ok(Scenario {
        id: "S3".into(),
        name: format!("GetPerson + ListInteractions over tonic, {c} in flight"),
        engine: s1.platform.engine.into(),
        value: round(got.rate(), 0),
        unit: "req/s".into(),
        baseline: Some(Baseline {
            name: "stock tonic handler returning canned responses of the same sizes".into(),
            value: round(base.rate(), 0),
            unit: "req/s".into(),
        }),
        ratio: Some(round(ratio, 4)),
        details: json!({
            "mode": o.mode(),
            "concurrency": c,
            "connections": 1,
            "measured_s": o.s3_secs,
            "warmup_s": WARMUP.as_secs_f64(),
            "persons_sampled": n,
            "mean_person_response_bytes": person_bytes / n,
            "mean_list_interactions_response_bytes": list_bytes / n,
            "mean_interactions_per_person": round(items as f64 / n as f64, 2),
            "p99_ms": round(p99, 3),
            "waymark": side(&mut got),
            "baseline": side(&mut base),
            "baseline_transport": "stock tonic (TCP_NODELAY on accepted sockets)",
            "canned_with_waymark_server_transport": side(&mut like),
            "waymark_handlers_with_stock_transport": side(&mut own),
            "target": "ratio >= 0.5 and p99 < 5 ms",
            "target_met": ratio >= 0.5 && p99 < 5.0,
        }),
    })
}

fn prost_len<M: prost::Message>(m: &M) -> usize {
    m.encoded_len()
}
