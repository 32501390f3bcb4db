//! Test support: a broker on a fresh embedded log, and a raw Kafka client
//! built on `kafka-protocol` for requests no ordinary client sends (corrupt
//! batches, oversize frames, unknown versions, hand-made sequences).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use waymark_broker::{Broker, BrokerConfig};
use waymark_embedded::EmbeddedLog;
use waymark_runtime::{Log, TopicConfig};

pub const INPUTS: &str = "waymark.inputs";
pub const EVENTS: &str = "waymark.events";

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub log: EmbeddedLog,
    pub broker: Broker,
}

impl Setup {
    pub fn bootstrap(&self) -> String {
        self.broker.addr().to_string()
    }
}

pub async fn open_log(dir: &std::path::Path) -> EmbeddedLog {
    let log = EmbeddedLog::open(&dir.join("log.redb")).unwrap();
    log.ensure_topics(&[
        TopicConfig {
            name: INPUTS.into(),
            partitions: 2,
            retention: None,
            compaction: false,
        },
        TopicConfig {
            name: EVENTS.into(),
            partitions: 4,
            retention: None,
            compaction: false,
        },
    ])
    .await
    .unwrap();
    log
}

/// A broker on 127.0.0.1 with `inputs` writable; `tweak` adjusts limits.
pub async fn setup(tweak: impl FnOnce(&mut BrokerConfig)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path()).await;
    let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap()).writable(INPUTS);
    tweak(&mut config);
    let broker = Broker::start(log.clone(), config).await.unwrap();
    Setup { dir, log, broker }
}

/// A raw Kafka connection.
pub struct Raw {
    pub stream: TcpStream,
    correlation: i32,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            correlation: 0,
        }
    }

    /// A request's frame body (header and request, no length prefix).
    fn body<R: Request>(req: &R, version: i16, correlation: i32) -> BytesMut {
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(StrBytes::from_static_str("raw-test")));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .unwrap();
        req.encode(&mut body, version).unwrap();
        body
    }

    /// The size of `req`'s frame (without the length prefix) as sent.
    pub fn frame_len<R: Request>(req: &R, version: i16) -> usize {
        Self::body(req, version, 0).len()
    }

    /// Sends a request without waiting; returns its correlation id.
    pub async fn send<R: Request>(&mut self, req: &R, version: i16) -> i32 {
        self.correlation += 1;
        let body = Self::body(req, version, self.correlation);
        let mut frame = BytesMut::new();
        frame.put_i32(body.len() as i32);
        frame.put_slice(&body);
        self.stream.write_all(&frame).await.unwrap();
        self.correlation
    }

    /// Reads one response frame, or `None` if the broker closed.
    pub async fn read_frame(&mut self) -> Option<Bytes> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; i32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut buf).await.ok()?;
        Some(buf.into())
    }

    pub async fn recv<R: Request>(&mut self, version: i16, correlation: i32) -> R::Response {
        let mut frame = tokio::time::timeout(Duration::from_secs(20), self.read_frame())
            .await
            .expect("a response in time")
            .expect("a response, not a closed connection");
        let header =
            ResponseHeader::decode(&mut frame, R::Response::header_version(version)).unwrap();
        assert_eq!(header.correlation_id, correlation);
        R::Response::decode(&mut frame, version).unwrap()
    }

    pub async fn call<R: Request>(&mut self, req: &R, version: i16) -> R::Response {
        let c = self.send(req, version).await;
        self.recv::<R>(version, c).await
    }

    /// Whether the broker has closed the connection (within `within`).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(within, self.stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Reads back every record of a partition through the log.
pub async fn stored(
    log: &EmbeddedLog,
    topic: &str,
    partition: u32,
) -> Vec<waymark_embedded::StoredRecord> {
    log.read_stored(topic, partition, 0, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

pub fn remaining(b: &Bytes) -> usize {
    b.remaining()
}
