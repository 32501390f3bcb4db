//! `waymark run` and `waymark serve` on secured engines
//! (`scripts/dev-services up --secure`): Kafka through its SASL_SSL
//! listener with SCRAM-SHA-512, Cassandra with password authentication and
//! TLS only. The full contract workload passes; a wrong SCRAM password and
//! a wrong CQL password each stop the process at once with a message that
//! says which. Under `CI=true` missing engines fail these tests; elsewhere
//! they skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::contract::contract_workload;
use common::engines::{wait_for_grpc, Deployment, Proc};
use waymark_testenv::SecureEngines;

/// The plaintext listener of the same Kafka cluster: the workload's own
/// producer uses it (the processes under test use the SASL_SSL one).
fn plain_kafka() -> Option<String> {
    waymark_testenv::kafka()
}

fn secured_env(e: &SecureEngines) -> Vec<(&'static str, String)> {
    vec![
        (
            "WAYMARK_KAFKA_PROPERTIES_FILE",
            e.kafka_properties_file.clone(),
        ),
        ("WAYMARK_CQL_USERNAME", e.cql_username.clone()),
        ("WAYMARK_CQL_PASSWORD_FILE", e.cql_password_file.clone()),
        ("WAYMARK_CQL_TLS_CA", e.ca.clone()),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Waits for `proc` to exit by itself, at most `limit`.
fn exits_within(proc: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {limit:?}; log:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_workload_on_sasl_ssl_kafka_and_authenticated_tls_cassandra() {
    let Some(secure) = waymark_testenv::secure() else {
        return;
    };
    let Some(plain) = plain_kafka() else {
        return;
    };
    let d = Deployment::new(secure.kafka_bootstrap.clone(), secure.cql_nodes.clone());
    let env = secured_env(&secure);
    let run = d.run_with(&[], &borrowed(&env));
    let (serve, addr) = d.serve_with(&borrowed(&env));
    wait_for_grpc(&addr).await;
    contract_workload(&addr, &plain, &d.inputs).await;

    // `waymark publish --bootstrap` through the SASL_SSL listener too.
    let events = d.path().join("events.jsonl");
    std::fs::write(
        &events,
        common::event(
            "secure-publish-1",
            "interaction.recorded",
            "2026-03-01T11:00:00Z",
            ("web", "secure-publisher"),
            serde_json::json!({"kind": "message", "content_type": "text", "content": "hi"}),
        ),
    )
    .unwrap();
    let out = common::replay::waymark(&[
        "publish",
        "--bootstrap",
        &secure.kafka_bootstrap,
        "--topic",
        &d.inputs,
        "--kafka-properties-file",
        &secure.kafka_properties_file,
        events.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::replay::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("published 1 events"),
        "{}",
        common::replay::text(&out)
    );
    for p in [&run, &serve] {
        let log = p.log();
        assert!(
            !log.contains("sasl.password"),
            "a secret name in the log:\n{log}"
        );
        let password = std::fs::read_to_string(&secure.cql_password_file).unwrap();
        assert!(
            !log.contains(password.trim()),
            "the CQL password was logged"
        );
    }
}

#[test]
fn a_wrong_scram_password_stops_run_at_once_and_says_so() {
    let Some(secure) = waymark_testenv::secure() else {
        return;
    };
    let d = Deployment::new(secure.kafka_bootstrap.clone(), secure.cql_nodes.clone());
    let properties = std::fs::read_to_string(&secure.kafka_properties_file).unwrap();
    let wrong: String = properties
        .lines()
        .map(|l| {
            if l.starts_with("sasl.password=") {
                "sasl.password=not-the-password".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let wrong_file = d.path().join("wrong.properties");
    std::fs::write(&wrong_file, wrong).unwrap();
    let mut env = secured_env(&secure);
    env[0].1 = wrong_file.to_str().unwrap().to_owned();
    let mut run = d.run_with(&[], &borrowed(&env));
    let status = exits_within(&mut run, Duration::from_secs(60));
    assert!(!status.success());
    let log = run.log();
    assert!(log.contains("kafka refused the connection"), "{log}");
    assert!(log.to_lowercase().contains("authentication"), "{log}");
    assert!(
        !log.contains("not-the-password"),
        "the password was logged:\n{log}"
    );
}

#[test]
fn a_wrong_cql_password_stops_serve_at_once_and_says_so() {
    let Some(secure) = waymark_testenv::secure() else {
        return;
    };
    let d = Deployment::new(secure.kafka_bootstrap.clone(), secure.cql_nodes.clone());
    let wrong_file = d.path().join("wrong-cql-password");
    std::fs::write(&wrong_file, "not-the-password").unwrap();
    let mut env = secured_env(&secure);
    env[2].1 = wrong_file.to_str().unwrap().to_owned();
    let (mut serve, _) = d.serve_with(&borrowed(&env));
    let status = exits_within(&mut serve, Duration::from_secs(60));
    assert!(!status.success());
    let log = serve.log();
    assert!(
        log.contains("cql cluster refused the connection: authentication failed"),
        "{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "the password was logged:\n{log}"
    );
}

/// SCRAM-SHA-256, SCRAM-SHA-512, PLAIN and OAUTHBEARER (unsecured JWS)
/// each log in through the librdkafka Waymark is built with; a wrong
/// password is refused, not waited for.
#[test]
fn every_sasl_mechanism_logs_in() {
    let Some(secure) = waymark_testenv::secure() else {
        return;
    };
    let password = std::fs::read_to_string(&secure.kafka_password_file).unwrap();
    let config = |mechanism: &str, password: &str| {
        let mut c = waymark_kafka::KafkaConfig::new(secure.kafka_bootstrap.clone())
            .property("security.protocol", "SASL_SSL")
            .property("ssl.ca.location", secure.ca.clone())
            .property("sasl.mechanism", mechanism);
        if mechanism == "OAUTHBEARER" {
            c = c
                .property("enable.sasl.oauthbearer.unsecure.jwt", "true")
                .property("sasl.oauthbearer.config", "principal=waymark");
        } else {
            c = c
                .property("sasl.username", secure.kafka_username.clone())
                .property("sasl.password", password.trim().to_owned());
        }
        c
    };
    for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN", "OAUTHBEARER"] {
        waymark_kafka::probe(&config(mechanism, &password), Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{mechanism}: {e}"));
    }
    for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] {
        let e = waymark_kafka::probe(&config(mechanism, "wrong"), Duration::from_secs(20))
            .expect_err(mechanism);
        assert!(
            matches!(e, waymark_kafka::KafkaLogError::Refused { .. }),
            "{mechanism}: {e}"
        );
    }
    // An untrusted CA: the TLS handshake fails, and that is a refusal too.
    let dir = tempfile::tempdir().unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    let ca = waymark_testenv::certs::TestCa::new("another ca");
    std::fs::write(&other_ca, ca.pem()).unwrap();
    let untrusted = config("SCRAM-SHA-512", &password)
        .property("ssl.ca.location", other_ca.to_str().unwrap().to_owned());
    let e = waymark_kafka::probe(&untrusted, Duration::from_secs(20)).expect_err("untrusted CA");
    assert!(
        matches!(e, waymark_kafka::KafkaLogError::Refused { .. }),
        "{e}"
    );
}
