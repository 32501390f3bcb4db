//! Waymark's gRPC services (contract §6), served by `waymark dev` and
//! `waymark serve`.
//!
//! # Layout
//! - [`QueryService`] (`query/`) reads projections through
//!   [`Projections`] (`projections.rs`, by processor name and the active
//!   version); each processor's rpcs and conversions are one module of
//!   `query/` (`person.rs` with the identity links, `interactions.rs`,
//!   `journey.rs`, `learning.rs`).
//! - [`IngestService`] (`ingest.rs`) validates and appends events.
//! - [`AdminService`] (`admin.rs`) lists dead letters and operates
//!   projection versions through an [`Operator`].
//! - `error.rs` maps every error to a status code, in one place;
//!   `convert.rs` has the conversions the query modules share.
//! - [`serve_with`] wires them with reflection (v1 and v1alpha), health,
//!   request size and concurrency limits, optional TLS (with client
//!   certificates, reloaded on change: `waymark_tls`) and the [`auth`]
//!   layer; [`admission`] sheds load beyond a limit of requests at once
//!   across all connections.
//!
//! # Guarantees
//! - A page of a list rpc holds at most `page_size` items and at most
//!   [`MAX_PAGE_BYTES`] of them (never fewer than one), with a token to
//!   the rest.
//! - Malformed requests get `INVALID_ARGUMENT` (including bytes that are no
//!   valid protobuf encoding, or strings that are not UTF-8:
//!   `waymark_proto::codec`), unknown persons, identities, journeys and
//!   courses `NOT_FOUND`, an unreachable store or log `UNAVAILABLE`; never
//!   `INTERNAL` for a client's mistake.
//! - Beyond [`admission::DEFAULT_MAX_CONCURRENT_REQUESTS`] requests at once
//!   (all connections together), a request is answered `RESOURCE_EXHAUSTED`
//!   at once rather than queued; health checks are exempt.
//! - With authentication configured, every rpc but health and reflection
//!   (unless those are protected too) is refused `UNAUTHENTICATED` without
//!   valid credentials and `PERMISSION_DENIED` without its role, before
//!   any service code runs ([`auth`]).
//! - With TLS configured, the port speaks nothing else: a plaintext client
//!   fails its handshake, and with a client CA so does a client without a
//!   certificate it signed.
//! - `Ingest.Publish` answers only after every accepted event is durable in
//!   the log; a log failure fails the whole call with `UNAVAILABLE` (retry
//!   is safe: event ids deduplicate).

mod admin;
pub mod admission;
pub mod auth;
mod convert;
mod error;
mod ingest;
pub mod observe;
mod projections;
mod query;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use waymark_proto::v1::admin_server::AdminServer;
use waymark_proto::v1::ingest_server::IngestServer;
use waymark_proto::v1::query_server::QueryServer;

pub use admin::{AdminService, KafkaEndpointProbe, KafkaEndpointStatus, Operator};
pub use error::{parse_person_id, ApiError, MAX_PAGE_BYTES};
pub use ingest::{record_key, IngestService, MAX_EVENTS_PER_PUBLISH};
pub use projections::{ActiveVersion, ActiveVersions, Projections, Table};
pub use query::QueryService;

/// Largest request the Ingest service decodes (1000 events of typical size;
/// a single event is at most 1 MiB).
pub const MAX_INGEST_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Largest request the other services decode.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Longest a request may take (`Admin.Verify` recomputes projections, so
/// it is generous; queries take milliseconds).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Concurrent requests per connection.
pub const MAX_CONCURRENT_REQUESTS_PER_CONNECTION: usize = 256;

/// The services to serve.
#[derive(Clone)]
pub struct Services {
    /// `waymark.v1.Query`.
    pub query: QueryService,
    /// `waymark.v1.Ingest`.
    pub ingest: IngestService,
    /// `waymark.v1.Admin`.
    pub admin: AdminService,
}

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Reflection could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The transport failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How the port is secured: TLS and who may call what.
#[derive(Debug, Clone)]
pub struct Security {
    /// TLS (mutual when it has a client CA); plaintext when `None`.
    pub tls: Option<waymark_tls::ServerTls>,
    /// The credentials and roles checked before every rpc.
    pub auth: Arc<auth::Authenticator>,
}

impl Security {
    /// Plaintext, everyone may do everything: loopback development only.
    pub fn open() -> Self {
        Self {
            tls: None,
            auth: Arc::new(auth::Authenticator::open()),
        }
    }
}

/// Serves `services` on `listener`, plaintext and open to everyone, until
/// `shutdown` is cancelled (see [`serve_with`]).
pub async fn serve(
    listener: TcpListener,
    services: Services,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_with(listener, services, Security::open(), shutdown).await
}

/// Serves `services` on `listener` with `security` until `shutdown` is
/// cancelled.
pub async fn serve_with(
    listener: TcpListener,
    services: Services,
    security: Security,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<QueryServer<QueryService>>()
        .await;
    health_reporter
        .set_serving::<IngestServer<IngestService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(waymark_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(waymark_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let router = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(MAX_CONCURRENT_REQUESTS_PER_CONNECTION)
        .timeout(REQUEST_TIMEOUT)
        // Outermost: every answer is counted, refusals and shedding too.
        .layer(observe::ObserveLayer::new(
            observe::KnownMethods::from_descriptor_sets(&[
                waymark_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ]),
        ))
        // Refusals first: a caller without credentials takes no permit.
        .layer(auth::AuthLayer::new(security.auth.clone()))
        .layer(admission::AdmissionLayer::new(
            admission::DEFAULT_MAX_CONCURRENT_REQUESTS,
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(QueryServer::new(services.query).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(
            IngestServer::new(services.ingest).max_decoding_message_size(MAX_INGEST_REQUEST_BYTES),
        )
        .add_service(AdminServer::new(services.admin).max_decoding_message_size(MAX_REQUEST_BYTES));
    match security.tls {
        None => {
            router
                // Small unary answers must not wait for Nagle + delayed ACKs (~40 ms).
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown.cancelled(),
                )
                .await?;
        }
        Some(tls) => {
            tls.watch(waymark_tls::DEFAULT_RELOAD_INTERVAL, shutdown.clone());
            let (ready, established) = tokio::sync::mpsc::channel(64);
            tokio::spawn(waymark_tls::accept_loop(
                listener,
                tls,
                "grpc",
                ready,
                shutdown.clone(),
            ));
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::ReceiverStream::new(established),
                Ok::<_, std::io::Error>,
            );
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await?;
        }
    }
    Ok(())
}

/// Serves only `grpc.health.v1` on `listener`, plaintext and open, until
/// `shutdown`: the port for probes that cannot speak TLS or send
/// credentials (the kubelet's `grpc` probe). It answers `SERVING` for the
/// server and for Query, Ingest and Admin while the process serves them,
/// and nothing else (every other rpc is `UNIMPLEMENTED`), so it reveals no
/// data.
pub async fn serve_health(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<QueryServer<QueryService>>().await;
    reporter.set_serving::<IngestServer<IngestService>>().await;
    reporter.set_serving::<AdminServer<AdminService>>().await;
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(8)
        .timeout(Duration::from_secs(10))
        .add_service(health)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod health_port_tests {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    use super::*;

    #[tokio::test]
    async fn the_health_port_answers_health_and_nothing_else() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_health(listener, shutdown.clone()));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("a uri")
            .connect()
            .await
            .expect("connects");
        let mut health = HealthClient::new(channel.clone());
        for service in [
            "",
            "waymark.v1.Query",
            "waymark.v1.Ingest",
            "waymark.v1.Admin",
        ] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("answered")
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
        }
        let query = waymark_proto::v1::query_client::QueryClient::new(channel)
            .get_person(waymark_proto::v1::GetPersonRequest {
                person_id: "0b9f5a2e-3a47-4f1d-9c61-3f0d8f1e2a11".into(),
            })
            .await
            .expect_err("no query here");
        assert_eq!(query.code(), tonic::Code::Unimplemented);
        shutdown.cancel();
        server.await.expect("joins").expect("stops cleanly");
    }
}
