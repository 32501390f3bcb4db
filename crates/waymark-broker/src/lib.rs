//! The Kafka-protocol broker of `waymark dev`, served by Waymark itself
//! directly on the durable embedded log: no mock cluster, no bridge, no
//! second copy of the data. Any Kafka client can produce to the inputs
//! topic and consume any topic, alone or in a consumer group.
//!
//! Requests and responses are decoded and encoded by the
//! [`kafka-protocol`](https://docs.rs/kafka-protocol) crate, generated from
//! Kafka's own message schemas; `records.rs` handles the record batches
//! inside them (see there why it does not use that crate's record type).
//!
//! # Layout
//! - `server.rs`: the listener and one tokio task per connection: framing,
//!   limits, pipelining with in-order responses, metrics.
//! - `api.rs`: ApiVersions (with KIP-511's answer for versions it does not
//!   know), Metadata, Produce, InitProducerId, ListOffsets, Fetch and
//!   FindCoordinator.
//! - `groups.rs`: a single-node group coordinator (the classic protocol:
//!   JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit,
//!   OffsetFetch, DescribeGroups, ListGroups).
//! - `records.rs`: record batches v2 in and out, every compression
//!   Kafka defines (gzip, snappy, lz4, zstd).
//! - `sasl.rs`: SASL authentication (SaslHandshake, SaslAuthenticate):
//!   PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, server side.
//!
//! # Guarantees
//! - **Acknowledged means durable.** A produce with `acks=1` or `acks=-1`
//!   is answered only after its records are in a committed, fsynced
//!   transaction of the embedded log; requests of every connection are
//!   group-committed together. `acks=0` is fire-and-forget, as in Kafka.
//! - **Idempotent producers append each record once** across retries and
//!   across a crash of the broker: the producer's sequence state is written
//!   in the same transaction as its records (`waymark_embedded`'s
//!   guarantees), a retried batch is answered with its original offset.
//! - **Order.** Produce requests of one connection are appended in the order
//!   they were sent, and responses go back in request order.
//! - **Every refusal has Kafka's own error code**, and nothing else is
//!   affected by it: an unknown topic (`UNKNOWN_TOPIC_OR_PARTITION`, no
//!   auto-creation), a topic written by processors only
//!   (`TOPIC_AUTHORIZATION_FAILED`), a batch or record over the topic's
//!   maximum (`MESSAGE_TOO_LARGE`), a corrupt batch (`CORRUPT_MESSAGE`),
//!   transactions (`TRANSACTIONAL_ID_AUTHORIZATION_FAILED`, the answer
//!   clients treat as final rather than retrying, with a message; a
//!   transactional batch: `INVALID_RECORD`),
//!   an out-of-order sequence (`OUT_OF_ORDER_SEQUENCE_NUMBER`). A request
//!   frame over the size limit is refused before it is buffered, and the
//!   connection closed, as Kafka does.
//! - **Bytes round-trip.** Keys, values and header names and values of any
//!   bytes and any length come back from a fetch exactly as produced, in
//!   order, null values included.
//! - **Bounded.** No thread per connection; a connection cap, a per-connection
//!   limit of requests in flight, a request size limit, a broker-wide bound
//!   on request bytes held, a bound on decompressed batch size and an idle
//!   timeout ([`BrokerConfig`]).
//! - **TLS is optional** ([`BrokerConfig::tls`], off by default). With it,
//!   every connection completes a TLS 1.2 or 1.3 handshake (no ALPN) before
//!   a byte of Kafka is read, within 10 s (or the idle timeout, if
//!   shorter). A handshake that fails or times out (a plaintext client, an
//!   untrusted client certificate under mutual TLS) closes that connection
//!   only: it is logged at debug level and counted
//!   (`waymark_tls_handshake_failures_total{listener="kafka"}` and the
//!   refusal `TLS_HANDSHAKE_FAILED`); the listener goes on. The
//!   certificate files are checked every 5 s and reloaded when they change
//!   (connections already open keep theirs). A connection counts against
//!   the connection cap from its accept, handshake included; the other
//!   limits apply unchanged to what it sends after the handshake.
//! - **SASL is optional** ([`BrokerConfig::sasl`], off by default): PLAIN,
//!   SCRAM-SHA-256 and SCRAM-SHA-512, through SaslHandshake v0–v1 and
//!   SaslAuthenticate v0–v2 (KIP-43, KIP-152), the legacy raw-token flow
//!   after a v0 handshake included. Passwords are kept only until the
//!   broker starts: SCRAM verifiers are derived then (random salt, 4096
//!   iterations), PLAIN ones are keyed hashes. Authentication does not
//!   expire (`session_lifetime_ms` is 0). A failed authentication is
//!   answered `SASL_AUTHENTICATION_FAILED` with the message
//!   "Authentication failed: Invalid username or password", the same for
//!   an unknown user as for a wrong password, counted
//!   (`waymark_kafka_auth_failures_total{mechanism}`) and the connection
//!   closed; an unsupported mechanism is answered
//!   `UNSUPPORTED_SASL_MECHANISM` with the enabled ones, then closed.
//! - **An unauthenticated connection can do nothing else.** With SASL on,
//!   until a connection has authenticated the only requests served are
//!   ApiVersions, SaslHandshake and SaslAuthenticate, each frame at most
//!   512 KiB (Kafka's `sasl.server.max.receive.size`); anything else closes
//!   the connection unanswered (as Kafka does) and is counted as
//!   `ILLEGAL_SASL_STATE`. SaslHandshake and SaslAuthenticate are always
//!   advertised by ApiVersions, as Kafka does, so clients see the same
//!   versions whether SASL is on or not; without SASL (or once
//!   authenticated) they are answered `ILLEGAL_SASL_STATE`, as Kafka
//!   answers them on a listener without SASL.
//!
//! # What it does not do
//! Transactions, static group membership (`group.instance.id` is accepted
//! and treated as dynamic), the KIP-848 consumer protocol, incremental fetch
//! sessions (every fetch is a full fetch, which clients fall back to), topic
//! ids (topics are addressed by name; request versions that need ids are not
//! advertised), offset-commit metadata (stored offsets come back with empty
//! metadata), and admin requests such as CreateTopics (topics come from
//! `topology.yaml`). Timestamps are the log's append time
//! (`message.timestamp.type=LogAppendTime`). With SASL: no ACLs (every
//! authenticated user may do what any client may do without SASL), no
//! re-authentication (KIP-368), no GSSAPI or OAUTHBEARER, no SCRAM channel
//! binding or delegation tokens; the principal of a client certificate
//! (mutual TLS) is not used for anything beyond the handshake.

mod api;
mod groups;
pub mod records;
mod sasl;
mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use sasl::{SaslConfig, SaslConfigError, SaslMechanism, UnknownMechanism, SCRAM_ITERATIONS};
pub use server::{
    decode_request, Broker, BrokerError, DecodedRequest, FrameError,
    MAX_UNAUTHENTICATED_REQUEST_BYTES,
};
pub use waymark_tls::ServerTls;

/// Metric: requests handled, by `api`.
pub const REQUESTS: &str = "waymark_kafka_requests_total";
/// Metric: request latency in seconds, by `api`.
pub const REQUEST_SECONDS: &str = "waymark_kafka_request_duration_seconds";
/// Metric: records appended through the endpoint, by `topic`.
pub const RECORDS_IN: &str = "waymark_kafka_records_in_total";
/// Metric: record bytes appended through the endpoint, by `topic`.
pub const BYTES_IN: &str = "waymark_kafka_bytes_in_total";
/// Metric: records sent to consumers, by `topic`.
pub const RECORDS_OUT: &str = "waymark_kafka_records_out_total";
/// Metric: record bytes sent to consumers, by `topic`.
pub const BYTES_OUT: &str = "waymark_kafka_bytes_out_total";
/// Metric: refusals, by Kafka error `code` name.
pub const REFUSALS: &str = "waymark_kafka_refusals_total";
/// Metric: open connections.
pub const CONNECTIONS: &str = "waymark_kafka_connections";
/// Metric: failed SASL authentications, by `mechanism`.
pub const AUTH_FAILURES: &str = "waymark_kafka_auth_failures_total";
/// The `listener` label of this endpoint's TLS handshake failures
/// ([`waymark_tls::HANDSHAKE_FAILURES`]).
pub const TLS_LISTENER: &str = "kafka";

/// Registers the help text of every metric above with the installed
/// recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(REQUESTS, "Kafka requests handled, by api");
    metrics::describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Kafka request latency, by api (a long poll counts its wait)"
    );
    metrics::describe_counter!(
        RECORDS_IN,
        "Records appended through the Kafka endpoint, by topic"
    );
    metrics::describe_counter!(
        BYTES_IN,
        "Record bytes appended through the Kafka endpoint, by topic"
    );
    metrics::describe_counter!(RECORDS_OUT, "Records fetched by Kafka consumers, by topic");
    metrics::describe_counter!(
        BYTES_OUT,
        "Record bytes fetched by Kafka consumers, by topic"
    );
    metrics::describe_counter!(REFUSALS, "Kafka requests or batches refused, by error code");
    metrics::describe_gauge!(CONNECTIONS, "Open Kafka connections");
    metrics::describe_counter!(
        AUTH_FAILURES,
        "Failed SASL authentications on the Kafka endpoint, by mechanism"
    );
}

/// What clients may do with one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPolicy {
    /// Whether clients may produce to it (processors' outputs are not).
    pub writable: bool,
    /// Largest batch as sent, and largest record (`max.message.bytes`).
    pub max_message_bytes: usize,
}

/// Configuration of the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Open connections at most; more are closed at once (and counted).
    pub max_connections: usize,
    /// Requests of one connection being handled at once; a client that
    /// pipelines more waits (the broker stops reading its socket).
    pub max_in_flight: usize,
    /// Largest request frame; a larger one is refused before it is read and
    /// the connection closed (Kafka's `socket.request.max.bytes`).
    pub max_request_bytes: usize,
    /// Bytes of request frames all connections may hold at once (being
    /// read or handled); a connection whose next request does not fit waits
    /// (Kafka's `queued.max.request.bytes`). At least `max_request_bytes`.
    pub max_queued_request_bytes: usize,
    /// Largest decompressed size of one record batch.
    pub max_decompressed_bytes: usize,
    /// A connection with nothing in flight and no request for this long is
    /// closed (Kafka's `connections.max.idle.ms`).
    pub idle_timeout: Duration,
    /// Per-topic rules; topics not listed are read-only with the default
    /// size limit.
    pub topics: HashMap<String, TopicPolicy>,
    /// Bounds on a group member's session timeout
    /// (`group.min/max.session.timeout.ms`).
    pub session_timeout_bounds: (Duration, Duration),
    /// TLS for every connection (load it with no ALPN protocol); `None`:
    /// plaintext. Its files are watched for changes while the broker runs.
    pub tls: Option<ServerTls>,
    /// SASL authentication before anything else; `None`: none.
    pub sasl: Option<SaslConfig>,
    /// The host and port clients are told to connect to (Metadata,
    /// FindCoordinator), like Kafka's `advertised.listeners`; `None`: the
    /// address each connection arrived on. Needed behind NAT, e.g. in a
    /// container whose port is published on the host.
    pub advertised: Option<(String, u16)>,
}

/// Kafka's `max.message.bytes` of Waymark topics (as on real Kafka).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

impl BrokerConfig {
    /// Defaults as Kafka's where Kafka has one: 100 MiB requests, 10-minute
    /// idle timeout, sessions of 6 s to 30 min; 1024 connections, 32
    /// requests in flight per connection and 512 MiB of requests held at
    /// once.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            max_connections: 1024,
            max_in_flight: 32,
            max_request_bytes: 100 * 1024 * 1024,
            max_queued_request_bytes: 512 * 1024 * 1024,
            max_decompressed_bytes: 64 * 1024 * 1024,
            idle_timeout: Duration::from_secs(600),
            topics: HashMap::new(),
            session_timeout_bounds: (Duration::from_secs(6), Duration::from_secs(1800)),
            tls: None,
            sasl: None,
            advertised: None,
        }
    }

    /// Serves every connection over TLS.
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Requires SASL authentication.
    pub fn with_sasl(mut self, sasl: SaslConfig) -> Self {
        self.sasl = Some(sasl);
        self
    }

    /// Lets clients produce to `topic`.
    pub fn writable(mut self, topic: impl Into<String>) -> Self {
        self.topics.insert(
            topic.into(),
            TopicPolicy {
                writable: true,
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            },
        );
        self
    }

    pub(crate) fn policy(&self, topic: &str) -> TopicPolicy {
        self.topics.get(topic).cloned().unwrap_or(TopicPolicy {
            writable: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        })
    }
}

/// Counters of what the broker has done, for `Admin.GetStatus`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) records_in: AtomicU64,
    pub(crate) records_out: AtomicU64,
    pub(crate) refusals: AtomicU64,
    pub(crate) last_refusal: std::sync::Mutex<Option<String>>,
}

impl Counters {
    pub(crate) fn refused(&self, code: &str, why: &str) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(REFUSALS, "code" => code.to_owned()).increment(1);
        if let Ok(mut last) = self.last_refusal.lock() {
            *last = Some(format!("{code}: {why}"));
        }
    }
}

/// A snapshot of the broker's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStatus {
    /// `host:port` clients bootstrap from.
    pub bootstrap: String,
    /// Connections open now.
    pub connections: u64,
    /// Records appended through the endpoint since start.
    pub records_in: u64,
    /// Records sent to consumers since start.
    pub records_out: u64,
    /// Requests or batches refused since start.
    pub refusals: u64,
    /// The last refusal, `CODE: reason`.
    pub last_refusal: Option<String>,
}

/// Reads the broker's status; cheap to clone.
#[derive(Clone)]
pub struct StatusHandle {
    bootstrap: String,
    counters: Arc<Counters>,
}

impl StatusHandle {
    /// The current status.
    pub fn get(&self) -> BrokerStatus {
        let c = &self.counters;
        BrokerStatus {
            bootstrap: self.bootstrap.clone(),
            connections: c.connections.load(Ordering::Relaxed),
            records_in: c.records_in.load(Ordering::Relaxed),
            records_out: c.records_out.load(Ordering::Relaxed),
            refusals: c.refusals.load(Ordering::Relaxed),
            last_refusal: c.last_refusal.lock().ok().and_then(|l| l.clone()),
        }
    }
}
