//! The HTTP port of `waymark dev`, `waymark run` and `waymark serve`:
//! Prometheus metrics, and (dev and serve) the status page with its JSON
//! API ([`crate::status`]).
//!
//! # Routes
//! - `GET /metrics`: the Prometheus text format.
//! - `GET /`: the status page (HTML and its script, nothing fetched from
//!   elsewhere); `GET /api/status` and `GET /api/person?q=…` are what it
//!   shows. `waymark run` serves no status (404): it has no Admin or Query
//!   service.
//!
//! # Guarantees
//! - With a token ([`MetricsSecurity::token`]), a scrape without
//!   `authorization: Bearer <token>` is answered `401` and gets no metric
//!   (Prometheus: `authorization: {credentials_file: …}`).
//! - The status API asks for the same credentials and roles as the gRPC
//!   services it reads (`admin` for the status, `query` for a person) when
//!   gRPC authentication is configured: `401` without valid credentials,
//!   `403` without the role. The page itself holds no data.
//! - With TLS, the port speaks nothing else.
//! - A client that sends no complete request head within [`IO_TIMEOUT`] is
//!   dropped, and a connection carries one request: idle connections are
//!   never held open.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower::ServiceExt as _;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How long the metrics endpoint waits for a request, and for its answer to
/// be taken.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bucket bounds (seconds) of every `*_seconds` histogram: 0.5 ms to 1 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The largest request head the endpoint reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Who may scrape, and over what.
#[derive(Debug, Clone, Default)]
pub struct MetricsSecurity {
    /// The bearer token a scrape must send, as its digest
    /// (`waymark_server::auth::token_digest`); anyone may scrape when `None`.
    pub token: Option<String>,
    /// TLS; plaintext when `None`.
    pub tls: Option<waymark_tls::ServerTls>,
}

impl MetricsSecurity {
    /// Whether scrapes must authenticate.
    pub fn authenticates(&self) -> bool {
        self.token.is_some()
    }
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                // Latencies as histograms, so that replicas aggregate.
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.install_recorder())
                .ok();
            waymark_runtime::metrics::describe();
            waymark_broker::describe_metrics();
            waymark_server::observe::describe();
            waymark_control::controller::describe_metrics();
            handle
        })
        .clone()
}

/// Serves the port on `listener` until `shutdown`: the metrics, and the
/// status page when `status` is given.
pub async fn serve(
    listener: TcpListener,
    security: MetricsSecurity,
    status: Option<crate::status::StatusSources>,
    shutdown: CancellationToken,
) {
    serve_with_timeout(listener, security, status, shutdown, IO_TIMEOUT).await;
}

/// The state every route shares.
#[derive(Clone)]
struct Port {
    handle: PrometheusHandle,
    token: Option<Arc<str>>,
}

/// The routes of the port.
fn router(
    handle: PrometheusHandle,
    token: Option<String>,
    status: Option<crate::status::StatusSources>,
) -> Router {
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Port {
            handle,
            token: token.map(Arc::from),
        });
    let status = match status {
        Some(sources) => crate::status::router(sources),
        None => Router::new().fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "no status page here: `waymark dev` and `waymark serve` serve it; this port has /metrics\n",
            )
        }),
    };
    metrics.merge(status)
}

async fn metrics(State(port): State<Port>, headers: HeaderMap) -> Response {
    if !authorized(&headers, port.token.as_deref()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        port.handle.render(),
    )
        .into_response()
}

/// [`serve`] with `io_timeout` for [`IO_TIMEOUT`].
async fn serve_with_timeout(
    listener: TcpListener,
    security: MetricsSecurity,
    status: Option<crate::status::StatusSources>,
    shutdown: CancellationToken,
    io_timeout: Duration,
) {
    let Some(handle) = recorder() else {
        warn!("another metrics recorder is installed; /metrics is empty");
        return;
    };
    if let Some(tls) = &security.tls {
        tls.watch(waymark_tls::DEFAULT_RELOAD_INTERVAL, shutdown.clone());
    }
    let app = router(handle, security.token.clone(), status);
    loop {
        let (socket, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (app, tls) = (app.clone(), security.tls.clone());
        tokio::spawn(async move {
            // Nothing sent in time: dropped without a word.
            if !matches!(
                tokio::time::timeout(io_timeout, socket.readable()).await,
                Ok(Ok(()))
            ) {
                return;
            }
            match tls {
                None => answer(socket, app, io_timeout).await,
                Some(tls) => {
                    if let Ok(Ok(stream)) =
                        tokio::time::timeout(io_timeout, tls.acceptor().accept(socket)).await
                    {
                        answer(stream, app, io_timeout).await;
                    } else {
                        metrics::counter!(waymark_tls::HANDSHAKE_FAILURES, "listener" => "metrics")
                            .increment(1);
                    }
                }
            }
        });
    }
}

/// Serves one request on `socket` (HTTP/1.1 or 1.0), then closes it.
async fn answer<S>(socket: S, app: Router, io_timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let app = app.clone();
            async move { app.oneshot(request.map(axum::body::Body::new)).await }
        });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(io_timeout)
        .max_buf_size(MAX_REQUEST_HEAD.max(8192))
        .serve_connection(hyper_util::rt::TokioIo::new(socket), service);
    // The answers are small and quick; a peer that does not take one is
    // dropped.
    let _ = tokio::time::timeout(io_timeout * 6, connection).await;
}

/// Whether `headers` carry the bearer token whose digest is `token`
/// (always, when no token is configured).
fn authorized(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(expected) = token else {
        return true;
    };
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.trim().split_once(' '))
        .any(|(scheme, credential)| {
            scheme.eq_ignore_ascii_case("bearer")
                && waymark_server::auth::token_digest(credential.trim()) == expected
        })
}

/// The address a listener is bound to, for printing.
pub fn local(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// docs/operations/metrics.md lists every metric a process exports.
    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../../docs/operations/metrics.md");
        use waymark_runtime::metrics as m;
        let names = [
            m::DECODED,
            m::EVENTS_APPLIED,
            m::EVENTS_DUPLICATE,
            m::EVENTS_REDELIVERED,
            m::DEAD_LETTERS,
            m::DROPPED,
            m::BATCH_DURATION,
            m::BATCH_SIZE,
            m::LAG,
            m::LAG_SECONDS,
            m::POSITION,
            m::RETRIES,
            m::ROWS_WRITTEN,
            m::FAILING_RETRIES,
            m::PARKED,
            m::PARKED_KEYS,
            m::STAGE_DURATION,
            waymark_broker::REQUESTS,
            waymark_broker::REQUEST_SECONDS,
            waymark_broker::RECORDS_IN,
            waymark_broker::BYTES_IN,
            waymark_broker::RECORDS_OUT,
            waymark_broker::BYTES_OUT,
            waymark_broker::REFUSALS,
            waymark_broker::CONNECTIONS,
            waymark_broker::AUTH_FAILURES,
            waymark_server::observe::REQUESTS,
            waymark_server::observe::REQUEST_DURATION,
            waymark_server::auth::REFUSED,
            waymark_server::admission::SHED,
            waymark_tls::HANDSHAKE_FAILURES,
            waymark_tls::RELOADS,
            waymark_control::controller::PROJECTION_STATE,
        ];
        for name in names {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not in docs/operations/metrics.md"
            );
        }
    }

    /// A scrape has the histograms' buckets, so replicas aggregate.
    #[tokio::test]
    async fn latencies_are_histograms() {
        let handle = recorder().expect("the recorder installs");
        metrics::histogram!(waymark_server::observe::REQUEST_DURATION, "service" => "s", "method" => "m", "code" => "OK")
            .record(0.003);
        let text = handle.render();
        assert!(
            text.contains("waymark_grpc_request_duration_seconds_bucket{service=\"s\",method=\"m\",code=\"OK\",le=\"0.005\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn answers_a_request_and_drops_an_idle_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_with_timeout(
            listener,
            MetricsSecurity::default(),
            None,
            shutdown.clone(),
            Duration::from_millis(100),
        ));

        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

        // Connected, sending nothing: closed by the server, not held.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("the server closes an idle connection");
        assert_eq!(read.unwrap(), 0);

        shutdown.cancel();
        server.await.unwrap();
    }

    async fn scrape(addr: SocketAddr, authorization: Option<&str>) -> String {
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let extra = authorization.map_or(String::new(), |a| format!("authorization: {a}\r\n"));
        // Sent in two pieces: the head is read until its blank line.
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(format!("{extra}\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_token_is_required_when_configured() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_with_timeout(
            listener,
            MetricsSecurity {
                token: Some(waymark_server::auth::token_digest("scrape-me")),
                tls: None,
            },
            None,
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        let refused = scrape(addr, None).await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        assert!(
            !refused.contains("# TYPE") && !refused.contains("waymark_"),
            "no metrics without the token: {refused}"
        );
        let wrong = scrape(addr, Some("Bearer guess")).await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        let ok = scrape(addr, Some("Bearer scrape-me")).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        shutdown.cancel();
        server.await.unwrap();
    }
}
