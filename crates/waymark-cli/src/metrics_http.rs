//! Prometheus metrics: one process-wide recorder, rendered over plain HTTP.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How long the metrics endpoint waits for a request, and for its answer to
/// be taken.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The process-wide Prometheus recorder (installed on first use).
pub fn recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().ok();
            waymark_runtime::metrics::describe();
            waymark_broker::describe_metrics();
            handle
        })
        .clone()
}

/// Serves `GET /metrics` (any path) on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    serve_with_timeout(listener, shutdown, IO_TIMEOUT).await;
}

/// [`serve`] with `io_timeout` for [`IO_TIMEOUT`].
async fn serve_with_timeout(
    listener: TcpListener,
    shutdown: CancellationToken,
    io_timeout: Duration,
) {
    let Some(handle) = recorder() else {
        warn!("another metrics recorder is installed; /metrics is empty");
        return;
    };
    loop {
        let (mut socket, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "metrics accept failed"); continue; }
            },
        };
        let body = handle.render();
        tokio::spawn(async move {
            // A client that sends no request in time is dropped: idle
            // connections are never held open.
            let mut buf = [0u8; 1024];
            if !matches!(
                tokio::time::timeout(io_timeout, socket.read(&mut buf)).await,
                Ok(Ok(n)) if n > 0
            ) {
                return;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let answer = async {
                socket.write_all(head.as_bytes()).await?;
                socket.write_all(body.as_bytes()).await?;
                socket.shutdown().await
            };
            let _ = tokio::time::timeout(io_timeout, answer).await;
        });
    }
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
}
