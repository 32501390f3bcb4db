//! TLS and SASL on the Kafka endpoint, with real handshakes: librdkafka
//! (through rdkafka) over `SASL_SSL`, `SSL` and `SASL_PLAINTEXT` with each
//! mechanism, wrong passwords, plaintext clients on the TLS port, a renewed
//! certificate; and raw requests for what no ordinary client sends
//! (requests before authentication, the legacy v0 flow, unknown
//! mechanisms).
//!
//! Certificates are made here (`waymark_testenv::certs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{setup, Raw, Setup, INPUTS};
use kafka_protocol::messages::{
    ApiVersionsRequest, MetadataRequest, SaslAuthenticateRequest, SaslHandshakeRequest,
};
use kafka_protocol::protocol::StrBytes;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseProducer, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext,
};
use rdkafka::{Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waymark_broker::{BrokerConfig, SaslConfig, SaslMechanism, ServerTls};
use waymark_testenv::certs::{write_pem as write, TestCa as Ca};
use waymark_tls::TlsFiles;

const USER: &str = "alice";
const PASSWORD: &str = "wonder:land,=pw";

/// A CA and a server certificate it signed, as files.
struct Material {
    dir: tempfile::TempDir,
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn material() -> Material {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("waymark test ca");
    let ca_file = write(dir.path(), "ca.pem", ca.pem());
    let (cert, key) = ca.server("localhost");
    let cert = write(dir.path(), "server.pem", &cert);
    let key = write(dir.path(), "server.key", &key);
    Material {
        dir,
        ca_file,
        cert,
        key,
    }
}

impl Material {
    fn tls(&self) -> ServerTls {
        ServerTls::load(
            TlsFiles {
                cert: self.cert.clone(),
                key: self.key.clone(),
                client_ca: None,
            },
            Vec::new(),
        )
        .unwrap()
    }

    fn ca(&self) -> String {
        self.ca_file.display().to_string()
    }
}

fn sasl() -> SaslConfig {
    SaslConfig::new(HashMap::new())
        .user(USER, PASSWORD)
        .user("bob", "builder")
}

/// A broker with TLS and/or SASL.
async fn secured(tls: Option<&Material>, sasl: Option<SaslConfig>) -> Setup {
    let tls = tls.map(Material::tls);
    setup(move |c: &mut BrokerConfig| {
        c.tls = tls;
        c.sasl = sasl;
    })
    .await
}

/// Client properties: `security.protocol` and what it needs.
fn security(
    protocol: &str,
    ca: Option<&Material>,
    mechanism: Option<(&str, &str, &str)>,
) -> Vec<(String, String)> {
    let mut props = vec![("security.protocol".to_owned(), protocol.to_owned())];
    if let Some(m) = ca {
        props.push(("ssl.ca.location".to_owned(), m.ca()));
    }
    if let Some((mechanism, user, password)) = mechanism {
        props.push(("sasl.mechanism".to_owned(), mechanism.to_owned()));
        props.push(("sasl.username".to_owned(), user.to_owned()));
        props.push(("sasl.password".to_owned(), password.to_owned()));
    }
    props
}

fn config(bootstrap: &str, props: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in props {
        c.set(k, v);
    }
    c
}

/// Produces `n` records tagged `tag` to partition 0 and fetches them back
/// (the log holds nothing else there).
async fn produce_and_fetch(bootstrap: &str, props: &[(String, String)], tag: &str, n: usize) {
    let producer: FutureProducer = config(bootstrap, props)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "15000")
        .create()
        .unwrap();
    let expected: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    for value in &expected {
        producer
            .send(
                FutureRecord::to(INPUTS)
                    .partition(0)
                    .key("k")
                    .payload(value),
                Duration::from_secs(15),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce over {props:?}: {e}"));
    }
    let consumer: BaseConsumer = config(bootstrap, props)
        .set("group.id", "unused")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(INPUTS, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while got.len() < n && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                got.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
            }
        }
        got
    })
    .await
    .unwrap();
    assert_eq!(got, expected, "every record back, in order");
}

/// The errors librdkafka reports for a client.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl ClientContext for Errors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.lock().unwrap().push(format!("{error}: {reason}"));
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.0.lock().unwrap().push(format!("{fac}: {log_message}"));
        }
    }
}

impl ProducerContext for Errors {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

impl Errors {
    fn all(&self) -> String {
        self.0.lock().unwrap().join(" | ")
    }
}

/// Asks for metadata for up to 10 s: the topic count, or the last error
/// once the client has reported one (an authentication failure, a failed
/// handshake), with the errors and warnings it reported.
async fn metadata(bootstrap: &str, props: &[(String, String)]) -> (Result<usize, String>, String) {
    let errors = Errors::default();
    let client: BaseProducer<Errors> = config(bootstrap, props)
        .set("reconnect.backoff.ms", "200")
        .create_with_context(errors.clone())
        .unwrap();
    let started = Instant::now();
    let reported = errors.clone();
    let result = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let result = client
                .client()
                .fetch_metadata(None, Duration::from_secs(1))
                .map(|m| m.topics().len())
                .map_err(|e| e.to_string());
            // Error events reach the context when the client is polled.
            client.poll(Duration::from_millis(100));
            if result.is_ok() || !reported.0.lock().unwrap().is_empty() || Instant::now() > deadline
            {
                return result;
            }
        }
    })
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
    (result, errors.all())
}

/// Whether the broker closes `raw` within 5 s (whatever it sends first:
/// a TLS alert, say).
async fn closed_soon(raw: &mut Raw) -> bool {
    let read_to_end = async {
        let mut buf = [0u8; 512];
        loop {
            match raw.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_to_end)
        .await
        .is_ok()
}

fn refusals_with(s: &Setup, code: &str) -> bool {
    s.broker
        .status()
        .get()
        .last_refusal
        .is_some_and(|r| r.starts_with(code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_with_scram_sha_512_produces_and_fetches() {
    let m = material();
    let s = secured(Some(&m), Some(sasl())).await;
    let props = security(
        "SASL_SSL",
        Some(&m),
        Some(("SCRAM-SHA-512", USER, PASSWORD)),
    );
    produce_and_fetch(&s.bootstrap(), &props, "scram-512", 20).await;
    assert_eq!(s.broker.status().get().refusals, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_with_scram_sha_256_produces_and_fetches() {
    let m = material();
    let s = secured(Some(&m), Some(sasl())).await;
    let props = security(
        "SASL_SSL",
        Some(&m),
        Some(("SCRAM-SHA-256", "bob", "builder")),
    );
    produce_and_fetch(&s.bootstrap(), &props, "scram-256", 20).await;
    assert_eq!(s.broker.status().get().refusals, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_with_plain_produces_and_fetches() {
    let m = material();
    let s = secured(Some(&m), Some(sasl())).await;
    let props = security("SASL_SSL", Some(&m), Some(("PLAIN", USER, PASSWORD)));
    produce_and_fetch(&s.bootstrap(), &props, "plain", 20).await;
    assert_eq!(s.broker.status().get().refusals, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_unknown_user_fails_with_an_authentication_error() {
    let m = material();
    let s = secured(Some(&m), Some(sasl())).await;
    for (mechanism, user, password) in [
        ("SCRAM-SHA-512", USER, "wrong"),
        ("SCRAM-SHA-256", "mallory", PASSWORD),
        ("PLAIN", USER, "wrong"),
    ] {
        let props = security("SASL_SSL", Some(&m), Some((mechanism, user, password)));
        let (result, errors) = metadata(&s.bootstrap(), &props).await;
        assert!(result.is_err(), "{mechanism}: {result:?}");
        // librdkafka's error callback has the code and the broker's message.
        assert!(
            errors.contains("Global error: Authentication (Local: Authentication failure)")
                && errors.contains("Authentication failed: Invalid username or password"),
            "{mechanism}: {result:?} {errors}"
        );
        assert!(refusals_with(&s, "SASL_AUTHENTICATION_FAILED"));
    }
    // The right password still works on the same broker.
    let props = security(
        "SASL_SSL",
        Some(&m),
        Some(("SCRAM-SHA-512", USER, PASSWORD)),
    );
    let (result, _) = metadata(&s.bootstrap(), &props).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_cannot_use_the_tls_port_and_others_go_on() {
    let m = material();
    let s = secured(Some(&m), None).await;
    let (result, errors) = metadata(&s.bootstrap(), &security("PLAINTEXT", None, None)).await;
    assert!(result.is_err(), "{result:?} {errors}");
    // A raw Kafka request in clear: the handshake fails at once (before
    // its 10 s timeout), the connection is closed, and that is counted.
    let mut raw = Raw::connect(s.broker.addr()).await;
    raw.send(&ApiVersionsRequest::default(), 3).await;
    assert!(closed_soon(&mut raw).await);
    assert!(refusals_with(&s, "TLS_HANDSHAKE_FAILED"));
    // An SSL client that does not trust the certificate fails too.
    let stranger = material();
    let (result, _) = metadata(&s.bootstrap(), &security("SSL", Some(&stranger), None)).await;
    assert!(result.is_err(), "{result:?}");
    // The listener goes on.
    let (result, errors) = metadata(&s.bootstrap(), &security("SSL", Some(&m), None)).await;
    assert_eq!(result, Ok(2), "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_sasl_serves_ssl_clients() {
    let m = material();
    let s = secured(Some(&m), None).await;
    produce_and_fetch(&s.bootstrap(), &security("SSL", Some(&m), None), "ssl", 20).await;
    assert_eq!(s.broker.status().get().refusals, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_without_tls_serves_sasl_plaintext_clients() {
    let s = secured(None, Some(sasl())).await;
    for (mechanism, tag) in [("SCRAM-SHA-256", "a"), ("PLAIN", "b")] {
        let props = security("SASL_PLAINTEXT", None, Some((mechanism, USER, PASSWORD)));
        let (result, errors) = metadata(&s.bootstrap(), &props).await;
        assert_eq!(result, Ok(2), "{mechanism}: {errors}");
        if tag == "a" {
            produce_and_fetch(&s.bootstrap(), &props, tag, 10).await;
        }
    }
    // Only the mechanisms configured are offered.
    let s = secured(
        None,
        Some(sasl().with_mechanisms([SaslMechanism::ScramSha512])),
    )
    .await;
    let props = security("SASL_PLAINTEXT", None, Some(("PLAIN", USER, PASSWORD)));
    let (result, errors) = metadata(&s.bootstrap(), &props).await;
    assert!(result.is_err());
    assert!(
        errors.contains("Unsupported SASL mechanism") && errors.contains("SCRAM-SHA-512"),
        "the client is told what is offered: {errors}"
    );
    assert!(refusals_with(&s, "UNSUPPORTED_SASL_MECHANISM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let m = material();
    let s = secured(Some(&m), None).await;
    let (result, errors) = metadata(&s.bootstrap(), &security("SSL", Some(&m), None)).await;
    assert_eq!(result, Ok(2), "{errors}");
    // A new CA signs the renewed certificate (another name, so another
    // size: the change is seen within the file system's time resolution).
    let renewed = Ca::new("waymark renewed test ca");
    let (cert, key) = renewed.server("renewed.localhost.example");
    let new_ca = write(m.dir.path(), "renewed-ca.pem", renewed.pem());
    write(m.dir.path(), "server.key", &key);
    write(m.dir.path(), "server.pem", &cert);
    let mut props = security("SSL", None, None);
    props.push(("ssl.ca.location".to_owned(), new_ca.display().to_string()));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let consumer: BaseConsumer = config(&s.bootstrap(), &props).create().unwrap();
        let ok = tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok()
        })
        .await
        .unwrap();
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate is served"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// Raw requests (SASL without TLS).

/// Metadata of every topic.
fn all_topics() -> MetadataRequest {
    MetadataRequest::default().with_topics(None)
}

fn handshake(mechanism: &'static str) -> SaslHandshakeRequest {
    SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism))
}

fn token(bytes: &'static [u8]) -> SaslAuthenticateRequest {
    SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from_static(bytes))
}

#[tokio::test]
async fn before_authentication_only_api_versions_and_sasl_are_served() {
    let s = secured(None, Some(sasl())).await;
    let addr = s.broker.addr();

    // ApiVersions is served, and advertises the SASL requests.
    let mut raw = Raw::connect(addr).await;
    let versions = raw.call(&ApiVersionsRequest::default(), 3).await;
    let range = |key: i16| {
        let k = versions.api_keys.iter().find(|k| k.api_key == key).unwrap();
        (k.min_version, k.max_version)
    };
    assert_eq!(range(17), (0, 1), "SaslHandshake");
    assert_eq!(range(36), (0, 2), "SaslAuthenticate");
    // Anything else closes the connection unanswered.
    raw.send(&all_topics(), 12).await;
    assert!(raw.closed_within(Duration::from_secs(10)).await);
    assert!(refusals_with(&s, "ILLEGAL_SASL_STATE"));

    // SaslAuthenticate before SaslHandshake.
    let mut raw = Raw::connect(addr).await;
    let r = raw.call(&token(b"\0alice\0x"), 2).await;
    assert_eq!(r.error_code, 34, "ILLEGAL_SASL_STATE");
    assert!(raw.closed_within(Duration::from_secs(10)).await);

    // An unsupported mechanism: 33 and the list, then closed.
    let mut raw = Raw::connect(addr).await;
    let r = raw.call(&handshake("GSSAPI"), 1).await;
    assert_eq!(r.error_code, 33, "UNSUPPORTED_SASL_MECHANISM");
    let offered: Vec<String> = r.mechanisms.iter().map(|m| m.to_string()).collect();
    assert_eq!(offered, ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]);
    assert!(raw.closed_within(Duration::from_secs(10)).await);

    // A large frame before authentication is refused before it is read.
    let mut raw = Raw::connect(addr).await;
    raw.stream
        .write_all(&(1024i32 * 1024).to_be_bytes())
        .await
        .unwrap();
    assert!(raw.closed_within(Duration::from_secs(10)).await);
}

#[tokio::test]
async fn plain_over_sasl_authenticate_then_everything_is_served() {
    let s = secured(None, Some(sasl())).await;
    let addr = s.broker.addr();
    let mut raw = Raw::connect(addr).await;
    let r = raw.call(&handshake("PLAIN"), 1).await;
    assert_eq!(r.error_code, 0);
    let r = raw.call(&token(b"\0bob\0builder"), 2).await;
    assert_eq!(r.error_code, 0);
    assert_eq!(r.error_message, None);
    assert_eq!(r.session_lifetime_ms, 0, "no re-authentication");
    let md = raw.call(&all_topics(), 12).await;
    assert_eq!(md.topics.len(), 2);
    // Once authenticated, the SASL requests are answered as Kafka does,
    // and the connection goes on.
    let r = raw.call(&handshake("PLAIN"), 1).await;
    assert_eq!(r.error_code, 34);
    let r = raw.call(&token(b"\0bob\0builder"), 1).await;
    assert_eq!(r.error_code, 34);
    assert_eq!(
        raw.call(&ApiVersionsRequest::default(), 3).await.error_code,
        0
    );

    // A wrong password and an unknown user: the same answer, then closed.
    for bad in [&b"\0bob\0wrong"[..], b"\0nobody\0builder"] {
        let mut raw = Raw::connect(addr).await;
        assert_eq!(raw.call(&handshake("PLAIN"), 1).await.error_code, 0);
        let r = raw
            .call(
                &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::copy_from_slice(bad)),
                0,
            )
            .await;
        assert_eq!(r.error_code, 58, "SASL_AUTHENTICATION_FAILED");
        assert_eq!(
            r.error_message.unwrap().as_str(),
            "Authentication failed: Invalid username or password"
        );
        assert!(raw.closed_within(Duration::from_secs(10)).await);
    }
}

#[tokio::test]
async fn the_legacy_v0_flow_takes_raw_tokens() {
    let s = secured(None, Some(sasl())).await;
    let addr = s.broker.addr();
    let frame = |token: &[u8]| {
        let mut f = (token.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(token);
        f
    };
    let mut raw = Raw::connect(addr).await;
    assert_eq!(raw.call(&handshake("PLAIN"), 0).await.error_code, 0);
    // A raw PLAIN token (shorter than any request header), answered with
    // an empty token.
    raw.stream
        .write_all(&frame(b"\0bob\0builder"))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), raw.read_frame())
        .await
        .unwrap()
        .expect("an empty token, not a close");
    assert!(reply.is_empty());
    let md = raw.call(&all_topics(), 12).await;
    assert_eq!(md.topics.len(), 2);

    // A wrong password: closed, without an answer (the v0 flow has none).
    let mut raw = Raw::connect(addr).await;
    assert_eq!(raw.call(&handshake("PLAIN"), 0).await.error_code, 0);
    raw.stream.write_all(&frame(b"\0bob\0wrong")).await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(10)).await);
    assert!(refusals_with(&s, "SASL_AUTHENTICATION_FAILED"));
}

#[tokio::test]
async fn without_sasl_the_sasl_requests_are_answered_illegal_state() {
    let s = setup(|_| {}).await;
    let mut raw = Raw::connect(s.broker.addr()).await;
    let versions = raw.call(&ApiVersionsRequest::default(), 3).await;
    assert!(versions.api_keys.iter().any(|k| k.api_key == 17));
    let r = raw.call(&handshake("PLAIN"), 1).await;
    assert_eq!(r.error_code, 34);
    assert!(r.mechanisms.is_empty());
    let r = raw.call(&token(b"\0bob\0builder"), 2).await;
    assert_eq!(r.error_code, 34);
    // And the connection goes on.
    assert_eq!(raw.call(&all_topics(), 12).await.topics.len(), 2);
}
