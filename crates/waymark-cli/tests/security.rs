//! The gRPC port secured, with real handshakes: TLS, mutual TLS, static
//! tokens, JWTs and roles, certificate reload, the `waymark` client flags,
//! and the refusal to serve beyond loopback unsecured.
//!
//! Certificates and keys are made here (`waymark_testenv::certs`); JWTs are signed with
//! `jsonwebtoken` by a key whose public half is the server's JWKS file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::replay::{text, waymark};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use tonic::Code;
use waymark_cli::connect::{connect, ClientTls, Connection, Endpoint};
use waymark_cli::dev::{Dev, DevOptions};
use waymark_cli::security::GrpcSecurityOptions;
use waymark_proto::v1 as pb;
use waymark_proto::v1::admin_client::AdminClient;
use waymark_proto::v1::ingest_client::IngestClient;
use waymark_proto::v1::query_client::QueryClient;
use waymark_server::auth::{token_digest, AuthConfig, JwtConfig, Roles};
use waymark_testenv::certs::{write_pem as write, TestCa as Ca};

/// Files of a secured server.
struct Material {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    jwt_key: EncodingKey,
    jwks: PathBuf,
    tokens: PathBuf,
}

const READER: &str = "wmk_reader-token";
const PUBLISHER: &str = "wmk_publisher-token";
const OPERATOR: &str = "wmk_operator-token";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "waymark";

fn material() -> Material {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("waymark test ca");
    let ca_file = write(dir.path(), "ca.pem", ca.pem());
    let (cert, key) = ca.leaf("localhost", &["localhost", "127.0.0.1"], false);
    let cert = write(dir.path(), "server.pem", &cert);
    let key = write(dir.path(), "server.key", &key);

    let signing = KeyPair::generate().unwrap();
    let jwt_key = EncodingKey::from_ec_pem(signing.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&jwt_key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".to_owned());
    let jwks = write(
        dir.path(),
        "jwks.json",
        &serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
    );
    let tokens = write(
        dir.path(),
        "tokens",
        &format!(
            "# name roles\n{} reader query\n{} publisher ingest\n{} operator admin,query\n",
            token_digest(READER),
            token_digest(PUBLISHER),
            token_digest(OPERATOR)
        ),
    );
    Material {
        dir,
        ca,
        ca_file,
        cert,
        key,
        jwt_key,
        jwks,
        tokens,
    }
}

async fn start(dir: &Path, options: GrpcSecurityOptions) -> Dev {
    let grpc_addr = "127.0.0.1:0".parse().unwrap();
    let grpc_security = options.load(grpc_addr).expect("security loads");
    Dev::start(DevOptions {
        data_dir: dir.to_path_buf(),
        grpc_addr,
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        topology: waymark_cli::registry::default_topology().unwrap(),
        kafka_addr: None,
        kafka_limits: Default::default(),
        kafka_advertised: None,
        grpc_security,
        kafka_tls: None,
        kafka_sasl: None,
        metrics_security: Default::default(),
    })
    .await
    .expect("waymark dev starts")
}

fn endpoint(addr: &str, m: &Material, token: Option<&str>) -> Endpoint {
    Endpoint {
        addr: addr.to_owned(),
        token: token.map(str::to_owned),
        tls: Some(ClientTls {
            ca: Some(m.ca_file.clone()),
            identity: None,
            domain: Some("localhost".to_owned()),
        }),
    }
}

async fn conn(endpoint: &Endpoint) -> Connection {
    connect(endpoint).await.expect("connects")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A JWT with these claims, signed by `key` as key `k1`.
fn signed(claims: serde_json::Value, key: &EncodingKey) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".to_owned());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn jwt(roles: &[&str], audience: &str, expires_in: i64, key: &EncodingKey) -> String {
    signed(
        serde_json::json!({
            "sub": "svc-1", "iss": ISSUER, "aud": audience,
            "iat": now(), "exp": now() + expires_in, "roles": roles,
        }),
        key,
    )
}

async fn status_of(endpoint: &Endpoint) -> Result<(), tonic::Status> {
    AdminClient::new(conn(endpoint).await)
        .get_status(pb::GetStatusRequest {})
        .await
        .map(|_| ())
}

/// A query that passes authentication answers NOT_FOUND (nobody is there).
async fn person_of(endpoint: &Endpoint) -> Code {
    match QueryClient::new(conn(endpoint).await)
        .get_person(pb::GetPersonRequest {
            person_id: "0b9f5a2e-3a47-4f1d-9c61-3f0d8f1e2a11".to_owned(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn tls_and_auth(m: &Material) -> GrpcSecurityOptions {
    GrpcSecurityOptions {
        tls_cert: Some(m.cert.clone()),
        tls_key: Some(m.key.clone()),
        tls_client_ca: None,
        auth: AuthConfig {
            tokens: Some(m.tokens.clone()),
            jwt: Some(JwtConfig {
                jwks: m.jwks.clone(),
                issuer: ISSUER.to_owned(),
                audience: AUDIENCE.to_owned(),
            }),
            ..AuthConfig::default()
        },
        insecure: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_over_tls() {
    let m = material();
    let data = tempfile::tempdir().unwrap();
    let dev = start(data.path(), tls_and_auth(&m)).await;
    let addr = dev.info.grpc_addr.clone();

    // Plaintext to the TLS port: no connection.
    let plain = connect(&Endpoint::plain(addr.clone())).await;
    let refused = match plain {
        Err(e) => e.to_string(),
        Ok(c) => AdminClient::new(c)
            .get_status(pb::GetStatusRequest {})
            .await
            .expect_err("plaintext must not be served")
            .to_string(),
    };
    assert!(!refused.is_empty());
    // TLS trusting another CA: the handshake fails.
    let stranger_ca = Ca::new("another ca");
    let other = write(m.dir.path(), "other-ca.pem", stranger_ca.pem());
    let mut wrong_ca = endpoint(&addr, &m, Some(OPERATOR));
    wrong_ca.tls.as_mut().unwrap().ca = Some(other);
    let Err(e) = connect(&wrong_ca).await else {
        panic!("a server with an untrusted certificate was accepted");
    };
    assert!(e.to_string().contains("cannot connect"), "{e:#}");

    // No credentials: UNAUTHENTICATED; health and reflection stay open.
    let anonymous = endpoint(&addr, &m, None);
    let e = status_of(&anonymous).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("Bearer"), "{}", e.message());
    let mut health = tonic_health::pb::health_client::HealthClient::new(conn(&anonymous).await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status, 1, "SERVING");
    // An unknown token.
    let e = status_of(&endpoint(&addr, &m, Some("wmk_guess")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Each role opens its service only.
    let reader = endpoint(&addr, &m, Some(READER));
    assert_eq!(person_of(&reader).await, Code::NotFound);
    let e = status_of(&reader).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("\"admin\""), "{}", e.message());
    let publisher = endpoint(&addr, &m, Some(PUBLISHER));
    assert_eq!(person_of(&publisher).await, Code::PermissionDenied);
    let published = IngestClient::new(conn(&publisher).await)
        .publish(pb::PublishRequest {
            events: vec![common::event(
                "sec-1",
                "message.received",
                "2026-12-07T10:00:00Z",
                ("web", "sec-user"),
                serde_json::json!({"channel": "web", "text": "hi"}),
            )],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.results.len(), 1);
    let e = status_of(&publisher).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let operator = endpoint(&addr, &m, Some(OPERATOR));
    status_of(&operator).await.unwrap();
    assert_eq!(person_of(&operator).await, Code::NotFound);

    // JWTs: roles from the claim; expiry, audience and signature checked.
    let good = jwt(&["admin"], AUDIENCE, 300, &m.jwt_key);
    status_of(&endpoint(&addr, &m, Some(&good))).await.unwrap();
    let e = status_of(&endpoint(
        &addr,
        &m,
        Some(&jwt(&["query"], AUDIENCE, 300, &m.jwt_key)),
    ))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let expired = jwt(&["admin"], AUDIENCE, -3600, &m.jwt_key);
    let e = status_of(&endpoint(&addr, &m, Some(&expired)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());
    let elsewhere = jwt(&["admin"], "another-service", 300, &m.jwt_key);
    let e = status_of(&endpoint(&addr, &m, Some(&elsewhere)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("audience"), "{}", e.message());
    // Roles from the `scope` claim; `sub` is required.
    let scoped = signed(
        serde_json::json!({"sub": "svc-2", "iss": ISSUER, "aud": AUDIENCE,
            "exp": now() + 300, "scope": "openid admin"}),
        &m.jwt_key,
    );
    status_of(&endpoint(&addr, &m, Some(&scoped)))
        .await
        .unwrap();
    let anonymous_jwt = signed(
        serde_json::json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() + 300, "roles": ["admin"]}),
        &m.jwt_key,
    );
    let e = status_of(&endpoint(&addr, &m, Some(&anonymous_jwt)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("sub"), "{}", e.message());
    let forger = KeyPair::generate().unwrap();
    let forged_key = EncodingKey::from_ec_pem(forger.serialize_pem().as_bytes()).unwrap();
    let forged = jwt(&["admin"], AUDIENCE, 300, &forged_key);
    let e = status_of(&endpoint(&addr, &m, Some(&forged)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("signature"), "{}", e.message());

    // The command line: --tls-ca and --token or --token-file.
    let ca = m.ca_file.to_str().unwrap();
    let projections = |credentials: &[&str]| {
        let mut args = vec![
            "projections",
            "--grpc-addr",
            &addr,
            "--tls-ca",
            ca,
            "--tls-domain",
            "localhost",
        ];
        args.extend_from_slice(credentials);
        waymark(&args)
    };
    let out = projections(&["--token", OPERATOR]);
    assert!(out.status.success(), "{}", text(&out));
    let out = projections(&[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not authenticated"), "{}", text(&out));
    let token_file = write(m.dir.path(), "reader-token", &format!("{READER}\n"));
    let out = projections(&["--token-file", token_file.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("permission denied"), "{}", text(&out));

    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_and_a_renewed_server_certificate() {
    let m = material();
    let (client_cert, client_key) = m.ca.leaf("replayer", &["replayer.ops.example"], true);
    let client_cert = write(m.dir.path(), "client.pem", &client_cert);
    let client_key = write(m.dir.path(), "client.key", &client_key);
    let (nobody_cert, nobody_key) = m.ca.leaf("nobody", &["nobody.example"], true);
    let nobody_cert = write(m.dir.path(), "nobody.pem", &nobody_cert);
    let nobody_key = write(m.dir.path(), "nobody.key", &nobody_key);
    let rogue = Ca::new("rogue ca");
    let (rogue_cert, rogue_key) = rogue.leaf("replayer", &["replayer.ops.example"], true);
    let rogue_cert = write(m.dir.path(), "rogue.pem", &rogue_cert);
    let rogue_key = write(m.dir.path(), "rogue.key", &rogue_key);

    let data = tempfile::tempdir().unwrap();
    let options = GrpcSecurityOptions {
        tls_client_ca: Some(m.ca_file.clone()),
        auth: AuthConfig {
            certificate_roles: vec![("replayer".to_owned(), Roles::parse("admin").unwrap())],
            ..AuthConfig::default()
        },
        ..tls_and_auth(&m)
    };
    let dev = start(data.path(), options).await;
    let addr = dev.info.grpc_addr.clone();
    let with_cert = |cert: &Path, key: &Path| {
        let mut e = endpoint(&addr, &m, None);
        e.tls.as_mut().unwrap().identity = Some((cert.to_owned(), key.to_owned()));
        e
    };

    // The granted certificate: admin, not query.
    let replayer = with_cert(&client_cert, &client_key);
    status_of(&replayer).await.unwrap();
    assert_eq!(person_of(&replayer).await, Code::PermissionDenied);
    // A certificate of the CA without a role, and no token.
    let e = status_of(&with_cert(&nobody_cert, &nobody_key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("nobody"), "{}", e.message());
    // No certificate, or one of another CA: the handshake fails.
    for refused in [
        endpoint(&addr, &m, Some(OPERATOR)),
        with_cert(&rogue_cert, &rogue_key),
    ] {
        let outcome = match connect(&refused).await {
            Err(_) => Err(()),
            Ok(c) => AdminClient::new(c)
                .get_status(pb::GetStatusRequest {})
                .await
                .map(|_| ())
                .map_err(|_| ()),
        };
        assert!(
            outcome.is_err(),
            "a client without a valid certificate was served"
        );
    }

    // Renew the server certificate under a new CA: new connections get it
    // without a restart; clients trusting only the old CA are refused.
    let renewed_ca = Ca::new("renewed ca");
    let renewed_ca_file = write(m.dir.path(), "renewed-ca.pem", renewed_ca.pem());
    let (cert, key) = renewed_ca.leaf("localhost", &["localhost", "127.0.0.1", "renewed"], false);
    write(m.dir.path(), "server.key", &key);
    write(m.dir.path(), "server.pem", &cert);
    let mut renewed = with_cert(&client_cert, &client_key);
    renewed.tls.as_mut().unwrap().ca = Some(renewed_ca_file);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = connect(&renewed).await {
            if AdminClient::new(c)
                .get_status(pb::GetStatusRequest {})
                .await
                .is_ok()
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(connect(&replayer).await.is_err() || status_of(&replayer).await.is_err());

    dev.stop().await.unwrap();
}

#[test]
fn serving_beyond_loopback_unsecured_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["dev", "serve"] {
        let mut args = vec![command, "--grpc-addr", "0.0.0.0:0"];
        if command == "dev" {
            args.extend(["--data-dir", dir.path().to_str().unwrap()]);
        }
        let out = waymark(&args);
        assert!(!out.status.success(), "{}", text(&out));
        let all = text(&out);
        assert!(
            all.contains("refusing to serve gRPC on 0.0.0.0:0 without TLS and authentication"),
            "{all}"
        );
        assert!(
            all.contains("--grpc-tls-cert") && all.contains("--insecure"),
            "{all}"
        );
    }
    // The Kafka endpoint of `dev` follows the same rule.
    let out = waymark(&[
        "dev",
        "--grpc-addr",
        "127.0.0.1:0",
        "--kafka-addr",
        "0.0.0.0:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains(
            "refusing to serve the Kafka endpoint on 0.0.0.0:0 without TLS and authentication"
        ),
        "{all}"
    );
    assert!(all.contains("--kafka-sasl-users"), "{all}");
    // And the metrics endpoint of every command that has one.
    for args in [
        vec!["run", "--metrics-addr", "0.0.0.0:0"],
        vec!["serve", "--metrics-addr", "0.0.0.0:0"],
        vec![
            "dev",
            "--metrics-addr",
            "0.0.0.0:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
    ] {
        let out = waymark(&args);
        assert!(!out.status.success(), "{}", text(&out));
        let all = text(&out);
        assert!(
            all.contains("refusing to serve metrics on 0.0.0.0:0 without TLS and authentication"),
            "{all}"
        );
        assert!(all.contains("--metrics-token-file"), "{all}");
    }
    // Nothing was created: the check comes before anything starts.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `waymark dev`'s Kafka endpoint with TLS and SASL, as `DevOptions`
/// passes them on: librdkafka logs in with SCRAM over TLS; a wrong
/// password and plaintext are refused (the handshakes themselves are
/// tested in `waymark-broker`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_kafka_endpoint_takes_tls_and_sasl() {
    let m = material();
    let data = tempfile::tempdir().unwrap();
    let dev = Dev::start(DevOptions {
        data_dir: data.path().to_path_buf(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        topology: waymark_cli::registry::default_topology().unwrap(),
        kafka_addr: Some("127.0.0.1:0".parse().unwrap()),
        kafka_limits: Default::default(),
        kafka_advertised: None,
        grpc_security: waymark_server::Security::open(),
        kafka_tls: Some(
            waymark_tls::ServerTls::load(
                waymark_tls::TlsFiles {
                    cert: m.cert.clone(),
                    key: m.key.clone(),
                    client_ca: None,
                },
                vec![],
            )
            .unwrap(),
        ),
        kafka_sasl: Some(waymark_broker::SaslConfig::parse_users("alice:s3cret\n").unwrap()),
        metrics_security: Default::default(),
    })
    .await
    .expect("waymark dev starts");
    let bootstrap = dev.info.kafka_bootstrap.clone();
    let config = |protocol: &str, password: &str| {
        waymark_kafka::KafkaConfig::new(bootstrap.clone())
            .property("security.protocol", protocol)
            .property("ssl.ca.location", m.ca_file.to_str().unwrap().to_owned())
            .property("ssl.endpoint.identification.algorithm", "none")
            .property("sasl.mechanism", "SCRAM-SHA-256")
            .property("sasl.username", "alice")
            .property("sasl.password", password.to_owned())
    };
    let probe = |c: waymark_kafka::KafkaConfig| {
        tokio::task::spawn_blocking(move || waymark_kafka::probe(&c, Duration::from_secs(10)))
    };
    probe(config("SASL_SSL", "s3cret"))
        .await
        .unwrap()
        .expect("SCRAM over TLS logs in");
    let e = probe(config("SASL_SSL", "wrong"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(e, waymark_kafka::KafkaLogError::Refused { .. }),
        "{e}"
    );
    assert!(probe(config("SASL_PLAINTEXT", "s3cret"))
        .await
        .unwrap()
        .is_err());
    dev.stop().await.unwrap();
}

#[test]
fn token_new_prints_a_token_and_its_line() {
    let out = waymark(&["token", "new", "--name", "ci", "--roles", "ingest,query"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("a token line");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("line for the --grpc-tokens file: "))
        .expect("a file line");
    assert_eq!(line, format!("{} ci query,ingest", token_digest(token)));
    let out = waymark(&["token", "new", "--name", "ci", "--roles", "root"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown role"), "{}", text(&out));
}

/// `GET path` on the metrics port with an optional bearer token: the
/// status line and the body.
async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.lines().next().unwrap_or_default().to_owned();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The status page's API asks for the gRPC port's credentials and roles:
/// the page is open, its data is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_api_needs_the_grpc_credentials_and_roles() {
    let m = material();
    let data = tempfile::tempdir().unwrap();
    let dev = start(data.path(), tls_and_auth(&m)).await;
    let addr = dev.info.metrics_addr.clone();
    let (page, html) = http_get(&addr, "/", None).await;
    assert!(page.contains("200"), "{page}");
    assert!(html.contains("<title>Waymark status</title>"));
    for (token, path, want) in [
        (None, "/api/status", "401"),
        (Some("wmk_guess"), "/api/status", "401"),
        (Some(READER), "/api/status", "403"),
        (Some(OPERATOR), "/api/status", "200"),
        (None, "/api/person?q=telegram:1", "401"),
        (Some(PUBLISHER), "/api/person?q=telegram:1", "403"),
        // Authorized, and nobody is there.
        (Some(READER), "/api/person?q=telegram:1", "404"),
    ] {
        let (status, body) = http_get(&addr, path, token).await;
        assert!(
            status.contains(want),
            "{path} with {token:?}: {status} {body}, want {want}"
        );
        if want != "200" {
            assert!(body.contains("\"error\""), "{body}");
            assert!(
                !body.contains("projections"),
                "no data when refused: {body}"
            );
        }
    }
    dev.stop().await.unwrap();
}
