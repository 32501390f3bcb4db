//! The listener and its connections.
//!
//! Each connection is one tokio task plus a reader task. The reader reads
//! length-prefixed frames, refusing a frame over the size limit before it
//! reads its body, and hands them over through a channel of one; the
//! connection task starts each request in arrival order (a produce is
//! queued to the log's writer right there, so pipelined produces keep their
//! order), keeps at most `max_in_flight` of them running and writes their
//! responses in request order, as Kafka clients require.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use waymark_embedded::EmbeddedLog;

use crate::api::Api;
use crate::{BrokerConfig, Counters, StatusHandle, CONNECTIONS, REQUESTS, REQUEST_SECONDS};

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The listen address could not be bound.
    #[error("cannot listen for Kafka clients on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running broker. [`Broker::stop`] (or dropping it) closes the listener
/// and every connection.
pub struct Broker {
    addr: SocketAddr,
    status: StatusHandle,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A request being handled: resolves to its response, or `None` when none
/// is sent (a produce with `acks=0`).
pub(crate) type Pending = Pin<Box<dyn Future<Output = Option<ResponseKind>> + Send>>;

impl Broker {
    /// Binds `config.addr` and serves `log` until stopped. A busy address
    /// is an error here, before anything is served.
    pub async fn start(log: EmbeddedLog, config: BrokerConfig) -> Result<Self, BrokerError> {
        let listener =
            TcpListener::bind(config.addr)
                .await
                .map_err(|source| BrokerError::Bind {
                    addr: config.addr,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: config.addr,
            source,
        })?;
        let counters = Arc::new(Counters::default());
        let shutdown = CancellationToken::new();
        let api = Arc::new(Api::new(log, config, counters.clone(), shutdown.clone()));
        let token = shutdown.clone();
        let task = tokio::spawn(accept_loop(listener, api, counters.clone(), token));
        info!(%addr, "kafka endpoint listening");
        Ok(Self {
            addr,
            status: StatusHandle {
                bootstrap: addr.to_string(),
                counters,
            },
            shutdown,
            task: Some(task),
        })
    }

    /// The bound address (`host:port` for `bootstrap.servers`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reads the broker's status.
    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Stops accepting, closes every connection and waits for them. Appends
    /// already queued to the log complete (the log answers them); their
    /// responses may not reach the client, which then retries — idempotent
    /// producers get the original offsets.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    api: Arc<Api>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(api.config.max_connections));
    let mut connections = JoinSet::new();
    api.start_sweeper(&mut connections);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, go on.
                warn!(error = %e, "kafka endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            counters.refused(
                "CONNECTION_LIMIT",
                &format!(
                    "{peer}: more than {} connections",
                    api.config.max_connections
                ),
            );
            warn!(%peer, limit = api.config.max_connections, "kafka endpoint: connection limit reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (api, counters, token) = (api.clone(), counters.clone(), shutdown.clone());
        connections.spawn(async move {
            counters.connections.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(CONNECTIONS).increment(1.0);
            if let Err(e) = connection(stream, peer, &api, token).await {
                debug!(%peer, error = %e, "kafka connection closed");
            }
            counters.connections.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(CONNECTIONS).decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// What the reader hands to the connection task.
enum Incoming {
    /// A request frame and its share of the broker-wide request memory,
    /// held until its response is written.
    Frame(Bytes, OwnedSemaphorePermit),
    /// Nothing arrived for the idle timeout.
    Idle,
}

/// Reads frames until the peer closes, a frame is too large, or the
/// connection task is gone.
async fn read_frames(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    tx: mpsc::Sender<Incoming>,
    api: Arc<Api>,
    peer: SocketAddr,
) {
    let idle = api.config.idle_timeout;
    let max = api.config.max_request_bytes;
    loop {
        let mut len = [0u8; 4];
        match tokio::time::timeout(idle, rd.read_exact(&mut len)).await {
            Err(_) => {
                if tx.send(Incoming::Idle).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
        let size = i32::from_be_bytes(len);
        let Ok(size) = usize::try_from(size) else {
            api.counters
                .refused("INVALID_REQUEST", &format!("{peer}: negative frame size"));
            return;
        };
        if size > max || size < 8 {
            api.counters.refused(
                "INVALID_REQUEST",
                &format!("{peer}: request frame of {size} bytes (limit {max}); connection closed"),
            );
            warn!(%peer, size, limit = max, "kafka endpoint: request frame refused; closing the connection");
            return;
        }
        // Waits while the requests of all connections already hold the
        // broker's request memory (Kafka's `queued.max.request.bytes`).
        let Ok(permit) = api.memory.clone().acquire_many_owned(size as u32).await else {
            return;
        };
        let mut buf = BytesMut::zeroed(size);
        if rd.read_exact(&mut buf).await.is_err() {
            return;
        }
        if tx
            .send(Incoming::Frame(buf.freeze(), permit))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    api: &Arc<Api>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel(1);
    // Ends with the connection, however it ends (even aborted at shutdown).
    let _reader = AbortOnDrop(tokio::spawn(read_frames(rd, tx, api.clone(), peer)));
    let mut pending: FuturesOrdered<Outgoing> = FuturesOrdered::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            incoming = rx.recv(), if pending.len() < api.config.max_in_flight => {
                match incoming {
                    None => {
                        // The peer closed (or sent a bad frame): finish what
                        // is in flight, then close.
                        while let Some(out) = pending.next().await {
                            if let Some(frame) = out {
                                wr.write_all(&frame).await?;
                            }
                        }
                        break Ok(());
                    }
                    Some(Incoming::Idle) => {
                        if pending.is_empty() {
                            debug!(%peer, "kafka endpoint: idle connection closed");
                            break Ok(());
                        }
                    }
                    Some(Incoming::Frame(frame, permit)) => {
                        match start_request(api, frame, peer, local).await {
                            Some(fut) => pending.push_back(Box::pin(async move {
                                let out = fut.await;
                                drop(permit);
                                out
                            })),
                            None => break Ok(()),
                        }
                    }
                }
            }
            Some(out) = pending.next(), if !pending.is_empty() => {
                if let Some(frame) = out {
                    wr.write_all(&frame).await?;
                }
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A request frame, decoded.
#[derive(Debug)]
pub struct DecodedRequest {
    /// Its API.
    pub key: ApiKey,
    /// Its API version.
    pub version: i16,
    /// The id its response carries.
    pub correlation_id: i32,
    /// Its header.
    pub header: RequestHeader,
    /// Its body.
    pub body: RequestKind,
}

/// Why a request frame is refused (the connection is then closed, as Kafka
/// does, except for an ApiVersions of an unsupported version, answered per
/// KIP-511).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Shorter than the fixed start of every request header.
    #[error("request of {0} bytes is shorter than a request header")]
    TooShort(usize),
    /// An API key Kafka does not have.
    #[error("unknown API key {0}")]
    UnknownKey(i16),
    /// An API or version this endpoint does not serve.
    #[error("{key:?} v{version} is not supported")]
    Unsupported {
        /// API.
        key: ApiKey,
        /// Version asked for.
        version: i16,
        /// The id its response would carry.
        correlation_id: i32,
    },
    /// The request header does not parse.
    #[error("bad request header: {0}")]
    Header(String),
    /// The body does not parse.
    #[error("{key:?} v{version} does not parse: {reason}")]
    Body {
        /// API.
        key: ApiKey,
        /// Version.
        version: i16,
        /// Why.
        reason: String,
    },
}

impl FrameError {
    /// The Kafka error code it is counted under.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::UnknownKey(_) | FrameError::Unsupported { .. } => "UNSUPPORTED_VERSION",
            FrameError::TooShort(_) | FrameError::Header(_) | FrameError::Body { .. } => {
                "INVALID_REQUEST"
            }
        }
    }
}

/// Decodes one request frame (without its length prefix): API key and
/// version, checked against what this endpoint serves, then header and
/// body with `kafka-protocol`. Never panics, whatever the bytes (fuzzed by
/// `fuzz/fuzz_targets/kafka_request.rs`).
pub fn decode_request(mut frame: Bytes) -> Result<DecodedRequest, FrameError> {
    if frame.len() < 8 {
        return Err(FrameError::TooShort(frame.len()));
    }
    let key_code = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let key = ApiKey::try_from(key_code).map_err(|_| FrameError::UnknownKey(key_code))?;
    if !crate::api::supported(key, version) {
        return Err(FrameError::Unsupported {
            key,
            version,
            correlation_id,
        });
    }
    let header = RequestHeader::decode(&mut frame, key.request_header_version(version))
        .map_err(|e| FrameError::Header(e.to_string()))?;
    let body = RequestKind::decode(key, &mut frame, version).map_err(|e| FrameError::Body {
        key,
        version,
        reason: e.to_string(),
    })?;
    Ok(DecodedRequest {
        key,
        version,
        correlation_id,
        header,
        body,
    })
}

/// A response frame, or nothing to send.
type Outgoing = Pin<Box<dyn Future<Output = Option<Bytes>> + Send>>;

/// Decodes a frame and starts its request; `None` closes the connection
/// (what Kafka does with a request it cannot parse or does not support).
async fn start_request(
    api: &Arc<Api>,
    frame: Bytes,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<Outgoing> {
    let DecodedRequest {
        key,
        version,
        correlation_id,
        header,
        body: request,
    } = match decode_request(frame) {
        Ok(r) => r,
        Err(FrameError::Unsupported {
            key: ApiKey::ApiVersions,
            correlation_id,
            ..
        }) => {
            // KIP-511: answer in v0 with UNSUPPORTED_VERSION and the versions
            // supported, so the client can pick one.
            let body = api.api_versions_unsupported();
            return Some(Box::pin(async move {
                encode_response(ApiKey::ApiVersions, 0, correlation_id, &body)
            }));
        }
        Err(e) => {
            api.counters.refused(e.code(), &format!("{peer}: {e}"));
            if !matches!(e, FrameError::UnknownKey(_) | FrameError::Header(_)) {
                warn!(%peer, error = %e, "kafka endpoint: request refused; closing");
            }
            return None;
        }
    };
    let started = Instant::now();
    let pending = api.start(request, &header, version, local).await;
    Some(Box::pin(async move {
        let response = pending.await;
        let name = format!("{key:?}");
        metrics::counter!(REQUESTS, "api" => name.clone()).increment(1);
        metrics::histogram!(REQUEST_SECONDS, "api" => name).record(started.elapsed().as_secs_f64());
        let response = response?;
        encode_response(key, version, correlation_id, &response)
    }))
}

fn encode_response(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    response: &ResponseKind,
) -> Option<Bytes> {
    let header_version = key.response_header_version(version);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let mut body = BytesMut::new();
    let encoded = header
        .encode(&mut body, header_version)
        .and_then(|()| response.encode(&mut body, version));
    if let Err(e) = encoded {
        // A response this broker cannot encode is its own bug; the client
        // sees the connection close and retries.
        tracing::error!(api = ?key, version, error = %e, "kafka endpoint: cannot encode a response");
        return None;
    }
    let mut frame = BytesMut::with_capacity(4 + body.len());
    frame.put_i32(body.len() as i32);
    frame.put_slice(&body);
    Some(frame.freeze())
}
