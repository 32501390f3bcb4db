//! Prometheus metrics: one process-wide recorder, rendered over HTTP.
//!
//! # Guarantees
//! - With a token ([`MetricsSecurity::token`]), a scrape without
//!   `authorization: Bearer <token>` is answered `401` and gets no metric
//!   (Prometheus: `authorization: {credentials_file: …}`).
//! - With TLS, the port speaks nothing else.
//! - A client that sends no complete request head (at most
//!   [`MAX_REQUEST_HEAD`] bytes) within [`IO_TIMEOUT`] is dropped; idle
//!   connections are never held open.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
            handle
        })
        .clone()
}

/// Serves `GET /metrics` (any path) on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, security: MetricsSecurity, shutdown: CancellationToken) {
    serve_with_timeout(listener, security, shutdown, IO_TIMEOUT).await;
}

/// [`serve`] with `io_timeout` for [`IO_TIMEOUT`].
async fn serve_with_timeout(
    listener: TcpListener,
    security: MetricsSecurity,
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
    let token = std::sync::Arc::new(security.token);
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
        let (handle, token, tls) = (handle.clone(), token.clone(), security.tls.clone());
        tokio::spawn(async move {
            match tls {
                None => answer(socket, &handle, token.as_deref(), io_timeout).await,
                Some(tls) => {
                    if let Ok(Ok(stream)) =
                        tokio::time::timeout(io_timeout, tls.acceptor().accept(socket)).await
                    {
                        answer(stream, &handle, token.as_deref(), io_timeout).await;
                    } else {
                        metrics::counter!(waymark_tls::HANDSHAKE_FAILURES, "listener" => "metrics")
                            .increment(1);
                    }
                }
            }
        });
    }
}

/// Reads one request head and answers it: the metrics, or `401` without
/// the right token.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    handle: &PrometheusHandle,
    token: Option<&str>,
    io_timeout: Duration,
) {
    let Ok(Some(head)) = tokio::time::timeout(io_timeout, read_head(&mut socket)).await else {
        return;
    };
    let (status, body) = if authorized(&head, token) {
        ("200 OK", handle.render())
    } else {
        (
            "401 Unauthorized\r\nwww-authenticate: Bearer",
            String::new(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        socket.write_all(head.as_bytes()).await?;
        socket.write_all(body.as_bytes()).await?;
        socket.shutdown().await
    };
    let _ = tokio::time::timeout(io_timeout, write).await;
}

/// The request head (through the blank line), or `None` when the peer
/// closes first or it is larger than [`MAX_REQUEST_HEAD`].
async fn read_head<S: AsyncRead + Unpin>(socket: &mut S) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return None;
        }
    }
}

/// Whether the head carries the bearer token whose digest is `token`
/// (always, when no token is configured).
fn authorized(head: &[u8], token: Option<&str>) -> bool {
    let Some(expected) = token else {
        return true;
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("authorization")
            && std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().split_once(' '))
                .is_some_and(|(scheme, credential)| {
                    scheme.eq_ignore_ascii_case("bearer")
                        && waymark_server::auth::token_digest(credential.trim()) == expected
                })
    })
}

/// The address a listener is bound to, for printing.
pub fn local(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_a_request_and_drops_an_idle_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_with_timeout(
            listener,
            MetricsSecurity::default(),
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
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        let refused = scrape(addr, None).await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        assert!(
            refused.ends_with("\r\n\r\n"),
            "no metrics without the token"
        );
        let wrong = scrape(addr, Some("Bearer guess")).await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        let ok = scrape(addr, Some("Bearer scrape-me")).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        shutdown.cancel();
        server.await.unwrap();
    }
}
