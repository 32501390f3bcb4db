//! The listener and its connections.
//!
//! Each connection is one tokio task plus a reader task. The reader reads
//! length-prefixed frames, refusing a frame over the size limit before it
//! reads its body, and hands them over through a channel of one; the
//! connection task starts each request in arrival order (a produce is
//! queued to the log's writer right there, so pipelined produces keep their
//! order), keeps at most `max_in_flight` of them running and writes their
//! responses in request order, as Kafka clients require.
//!
//! With TLS, the connection task first completes the handshake; the reader
//! and the connection task then share the TLS stream through
//! `tokio::io::split`. With SASL, the connection task holds the
//! connection's SASL session and lets nothing but ApiVersions, SaslHandshake
//! and SaslAuthenticate through until it has authenticated (the reader
//! bounds frames by [`MAX_UNAUTHENTICATED_REQUEST_BYTES`] until then).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use waymark_embedded::EmbeddedLog;

use crate::api::Api;
use crate::sasl::{Authenticator, SaslConfigError, Session};
use crate::{
    BrokerConfig, Counters, StatusHandle, CONNECTIONS, REQUESTS, REQUEST_SECONDS, TLS_LISTENER,
};

/// The largest request frame of a connection that has not authenticated
/// yet, when SASL is on (Kafka's `sasl.server.max.receive.size`).
pub const MAX_UNAUTHENTICATED_REQUEST_BYTES: usize = 512 * 1024;

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
    /// The SASL configuration cannot be used.
    #[error("Kafka endpoint SASL: {0}")]
    Sasl(#[from] SaslConfigError),
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
    /// or an unusable SASL configuration is an error here, before anything
    /// is served. With SASL, every user's verifiers are derived here (4096
    /// PBKDF2 rounds per user and SCRAM mechanism) and the passwords
    /// dropped; with TLS, its files are watched until the broker stops.
    pub async fn start(log: EmbeddedLog, mut config: BrokerConfig) -> Result<Self, BrokerError> {
        // Verifiers are derived here, and the passwords dropped.
        let sasl = match config.sasl.take() {
            Some(sasl) => Some(Arc::new(Authenticator::new(sasl)?)),
            None => None,
        };
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
        if let Some(tls) = &config.tls {
            tls.watch(waymark_tls::DEFAULT_RELOAD_INTERVAL, shutdown.clone());
        }
        let (tls, with_sasl) = (config.tls.is_some(), sasl.is_some());
        let api = Arc::new(Api::new(
            log,
            config,
            sasl,
            counters.clone(),
            shutdown.clone(),
        ));
        let token = shutdown.clone();
        let task = tokio::spawn(accept_loop(listener, api, counters.clone(), token));
        info!(%addr, tls, sasl = with_sasl, "kafka endpoint listening");
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
            if let Err(e) = serve(stream, peer, &api, token).await {
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

/// Serves one accepted connection: the TLS handshake first when TLS is on,
/// then Kafka.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    api: &Arc<Api>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let Some(tls) = &api.config.tls else {
        let (rd, wr) = stream.into_split();
        return connection(rd, wr, peer, local, api, shutdown).await;
    };
    let limit = waymark_tls::HANDSHAKE_TIMEOUT.min(api.config.idle_timeout);
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        handshake = tokio::time::timeout(limit, tls.acceptor().accept(stream)) => handshake,
    };
    let why = match handshake {
        Ok(Ok(stream)) => {
            let (rd, wr) = tokio::io::split(stream);
            return connection(rd, wr, peer, local, api, shutdown).await;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no handshake within {limit:?}"),
    };
    metrics::counter!(waymark_tls::HANDSHAKE_FAILURES, "listener" => TLS_LISTENER).increment(1);
    api.counters.refused(
        "TLS_HANDSHAKE_FAILED",
        &format!("{peer}: TLS handshake failed: {why}"),
    );
    debug!(%peer, error = %why, "kafka endpoint: TLS handshake failed; connection closed");
    Ok(())
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
///
/// Until `authenticated` (always, without SASL) frames are bounded by
/// [`MAX_UNAUTHENTICATED_REQUEST_BYTES`]. Frames shorter than a request
/// header are handed over (raw SASL tokens of the v0 flow are); the
/// connection task refuses them otherwise.
async fn read_frames<R: AsyncRead + Unpin>(
    mut rd: R,
    tx: mpsc::Sender<Incoming>,
    api: Arc<Api>,
    peer: SocketAddr,
    authenticated: Arc<AtomicBool>,
) {
    let idle = api.config.idle_timeout;
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
        // Read once the frame has begun: a client sends its first request
        // after authenticating once it has the answer, written after the
        // flag is set.
        let max = if authenticated.load(Ordering::Acquire) {
            api.config.max_request_bytes
        } else {
            api.config
                .max_request_bytes
                .min(MAX_UNAUTHENTICATED_REQUEST_BYTES)
        };
        let size = i32::from_be_bytes(len);
        let Ok(size) = usize::try_from(size) else {
            api.counters
                .refused("INVALID_REQUEST", &format!("{peer}: negative frame size"));
            return;
        };
        if size > max {
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

/// Serves Kafka on one connection (TCP or TLS, already split) until the
/// peer closes, a request closes it, it idles out or the broker stops.
async fn connection<R, W>(
    rd: R,
    mut wr: W,
    peer: SocketAddr,
    local: SocketAddr,
    api: &Arc<Api>,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send,
{
    let mut session = api.sasl.as_ref().map(|a| Session::new(a.clone(), peer));
    let authenticated = Arc::new(AtomicBool::new(session.is_none()));
    let (tx, mut rx) = mpsc::channel(1);
    // Ends with the connection, however it ends (even aborted at shutdown).
    let _reader = AbortOnDrop(tokio::spawn(read_frames(
        rd,
        tx,
        api.clone(),
        peer,
        authenticated.clone(),
    )));
    let mut pending: FuturesOrdered<Outgoing> = FuturesOrdered::new();
    let closed = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            incoming = rx.recv(), if pending.len() < api.config.max_in_flight => {
                match incoming {
                    None => {
                        // The peer closed (or sent a bad frame): finish what
                        // is in flight, then close.
                        break drain(&mut pending, &mut wr).await;
                    }
                    Some(Incoming::Idle) => {
                        if pending.is_empty() {
                            debug!(%peer, "kafka endpoint: idle connection closed");
                            break Ok(());
                        }
                    }
                    Some(Incoming::Frame(frame, permit)) => {
                        let started = start_request(api, frame, peer, local, session.as_mut()).await;
                        if session.as_ref().is_some_and(Session::authenticated) {
                            authenticated.store(true, Ordering::Release);
                        }
                        match started {
                            Started::Respond(fut, close) => {
                                pending.push_back(Box::pin(async move {
                                    let out = fut.await;
                                    drop(permit);
                                    out
                                }));
                                if close {
                                    // Its answer (and those before it) go
                                    // out, then the connection closes.
                                    break drain(&mut pending, &mut wr).await;
                                }
                            }
                            Started::Close => break Ok(()),
                        }
                    }
                }
            }
            Some(out) = pending.next(), if !pending.is_empty() => {
                if let Some(frame) = out {
                    send(&mut wr, &frame).await?;
                }
            }
        }
    };
    // Best effort: a TLS close_notify, a TCP FIN.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    closed
}

/// Writes a response frame and flushes it (TLS buffers otherwise).
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, frame: &[u8]) -> std::io::Result<()> {
    wr.write_all(frame).await?;
    wr.flush().await
}

/// Finishes every request in flight and writes their answers, in order.
async fn drain<W: AsyncWrite + Unpin>(
    pending: &mut FuturesOrdered<Outgoing>,
    wr: &mut W,
) -> std::io::Result<()> {
    while let Some(out) = pending.next().await {
        if let Some(frame) = out {
            send(wr, &frame).await?;
        }
    }
    Ok(())
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

/// What became of a request frame.
enum Started {
    /// Its answer; `true`: close the connection once it is written.
    Respond(Outgoing, bool),
    /// Close the connection without an answer.
    Close,
}

/// The requests an unauthenticated connection may send.
fn allowed_before_authentication(key: i16) -> bool {
    [
        ApiKey::ApiVersions,
        ApiKey::SaslHandshake,
        ApiKey::SaslAuthenticate,
    ]
    .iter()
    .any(|k| *k as i16 == key)
}

/// Decodes a frame and starts its request; `Close` closes the connection
/// (what Kafka does with a request it cannot parse or does not support).
/// Until `session` (SASL on) has authenticated, only ApiVersions and the
/// SASL requests get through, and after a v0 handshake frames are raw SASL
/// tokens.
async fn start_request(
    api: &Arc<Api>,
    frame: Bytes,
    peer: SocketAddr,
    local: SocketAddr,
    session: Option<&mut Session>,
) -> Started {
    let mut session = session.filter(|s| !s.authenticated());
    if let Some(session) = session.as_deref_mut() {
        if session.wants_raw_token() {
            return match session.raw_token(&frame, &api.counters) {
                Some(reply) => Started::Respond(Box::pin(async move { Some(reply) }), false),
                None => Started::Close,
            };
        }
        let key = frame.get(..2).map(|k| i16::from_be_bytes([k[0], k[1]]));
        if !key.is_some_and(allowed_before_authentication) {
            let name = key.map_or_else(
                || "a frame".to_owned(),
                |k| match ApiKey::try_from(k) {
                    Ok(k) => format!("{k:?}"),
                    Err(_) => format!("API key {k}"),
                },
            );
            api.counters.refused(
                "ILLEGAL_SASL_STATE",
                &format!("{peer}: {name} before SASL authentication; connection closed"),
            );
            debug!(%peer, request = %name, "kafka endpoint: request before authentication; closing");
            return Started::Close;
        }
    }
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
            return Started::Respond(
                Box::pin(
                    async move { encode_response(ApiKey::ApiVersions, 0, correlation_id, &body) },
                ),
                false,
            );
        }
        Err(e) => {
            api.counters.refused(e.code(), &format!("{peer}: {e}"));
            if !matches!(e, FrameError::UnknownKey(_) | FrameError::Header(_)) {
                warn!(%peer, error = %e, "kafka endpoint: request refused; closing");
            }
            return Started::Close;
        }
    };
    let started = Instant::now();
    // The SASL requests of a connection that has not authenticated go to
    // its session.
    let sasl = match (session, request) {
        (Some(s), RequestKind::SaslHandshake(r)) => {
            let (response, close) = s.handshake(r.mechanism.as_str(), version, &api.counters);
            Ok((ResponseKind::SaslHandshake(response), close))
        }
        (Some(s), RequestKind::SaslAuthenticate(r)) => {
            let (response, close) = s.authenticate(&r.auth_bytes, &api.counters);
            Ok((ResponseKind::SaslAuthenticate(response), close))
        }
        (_, request) => Err(request),
    };
    let (pending, close): (crate::server::Pending, bool) = match sasl {
        Ok((response, close)) => (Box::pin(async move { Some(response) }), close),
        Err(request) => (api.start(request, &header, version, local).await, false),
    };
    let outgoing: Outgoing = Box::pin(async move {
        let response = pending.await;
        let name = format!("{key:?}");
        metrics::counter!(REQUESTS, "api" => name.clone()).increment(1);
        metrics::histogram!(REQUEST_SECONDS, "api" => name).record(started.elapsed().as_secs_f64());
        let response = response?;
        encode_response(key, version, correlation_id, &response)
    });
    Started::Respond(outgoing, close)
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
