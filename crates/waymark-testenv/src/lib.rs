//! Where tests find the real engines: one policy for every test crate.
//!
//! - The address is the environment variable (`WAYMARK_KAFKA_BOOTSTRAP`,
//!   `WAYMARK_CQL_NODES`: comma-separated `host:port`), else what
//!   `scripts/dev-services` listens on (`127.0.0.1:9092`, `127.0.0.1:9042`).
//! - An engine that accepts connections there is used: the test runs.
//!   `scripts/test` starts both, so it runs every real-engine test.
//! - An engine that does not, when it is **required** (`CI=true`, or its
//!   variable set), fails the test with the remedy.
//! - Otherwise the test is skipped: a `SKIPPED <test>: <why>` line is
//!   written straight to the process's stderr, past the test harness's
//!   output capture, so a skip is visible in every run, and the test
//!   returns.
//!
//! [`certs`] makes the certificates of the TLS tests.

pub mod certs;

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Kafka's default address (`scripts/dev-services up kafka`).
pub const DEFAULT_KAFKA: &str = "127.0.0.1:9092";

/// Cassandra's default address (`scripts/dev-services up cassandra`).
pub const DEFAULT_CASSANDRA: &str = "127.0.0.1:9042";

/// The Kafka bootstrap servers to test against, or `None` when the calling
/// test is skipped (see the crate docs).
///
/// # Panics
/// When Kafka is required and does not answer.
pub fn kafka() -> Option<String> {
    find("kafka", "WAYMARK_KAFKA_BOOTSTRAP", DEFAULT_KAFKA)
}

/// The Cassandra contact points (comma-separated) to test against, or
/// `None` when the calling test is skipped (see the crate docs).
///
/// # Panics
/// When Cassandra is required and does not answer.
pub fn cassandra() -> Option<String> {
    find("cassandra", "WAYMARK_CQL_NODES", DEFAULT_CASSANDRA)
}

/// Both engines, or `None` when the calling test is skipped.
///
/// # Panics
/// When an engine is required and does not answer.
pub fn engines() -> Option<(String, String)> {
    Some((kafka()?, cassandra()?))
}

/// The secured engines of `scripts/dev-services up --secure`: Kafka's
/// SASL_SSL listener and `cassandra-secure` (password authentication, TLS
/// only), with the files that reach them.
#[derive(Debug, Clone)]
pub struct SecureEngines {
    /// The SASL_SSL listener, e.g. `127.0.0.1:9094`.
    pub kafka_bootstrap: String,
    /// librdkafka client properties (SASL_SSL, SCRAM-SHA-512, the CA).
    pub kafka_properties_file: String,
    /// The SCRAM user.
    pub kafka_username: String,
    /// A file holding its password.
    pub kafka_password_file: String,
    /// The CA (PEM) of both engines' certificates.
    pub ca: String,
    /// The CQL contact points of `cassandra-secure`.
    pub cql_nodes: String,
    /// The CQL role.
    pub cql_username: String,
    /// A file holding its password.
    pub cql_password_file: String,
}

/// The secured engines, or `None` when the calling test is skipped: from
/// the `WAYMARK_SECURE_*` variables (`scripts/test` exports them), else
/// from `.services/secure/secure.env`, which `scripts/dev-services up
/// --secure` writes once they are ready.
///
/// # Panics
/// When they are required (`CI=true`) and missing or not answering.
pub fn secure() -> Option<SecureEngines> {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.services/secure/secure.env");
    let from_file: std::collections::HashMap<String, String> = std::fs::read_to_string(&file)
        .map(|text| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let get = |key: &str| {
        std::env::var(key)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| from_file.get(key).cloned())
    };
    let engines = (|| {
        Some(SecureEngines {
            kafka_bootstrap: get("WAYMARK_SECURE_KAFKA_BOOTSTRAP")?,
            kafka_properties_file: get("WAYMARK_SECURE_KAFKA_PROPERTIES_FILE")?,
            kafka_username: get("WAYMARK_SECURE_KAFKA_USERNAME")?,
            kafka_password_file: get("WAYMARK_SECURE_KAFKA_PASSWORD_FILE")?,
            ca: get("WAYMARK_SECURE_CA")?,
            cql_nodes: get("WAYMARK_SECURE_CQL_NODES")?,
            cql_username: get("WAYMARK_SECURE_CQL_USERNAME")?,
            cql_password_file: get("WAYMARK_SECURE_CQL_PASSWORD_FILE")?,
        })
    })();
    let problem = match &engines {
        None => "no WAYMARK_SECURE_* variables and no .services/secure/secure.env".to_owned(),
        Some(e) if !answers(&e.kafka_bootstrap) || !answers(&e.cql_nodes) => format!(
            "nothing answers at {} or {}",
            e.kafka_bootstrap, e.cql_nodes
        ),
        Some(_) => return engines,
    };
    assert!(
        !in_ci(),
        "the secured engines are required here (CI=true) but {problem}; start them with \
         `scripts/dev-services up --secure`"
    );
    skip(&format!(
        "{problem} (start them with `scripts/dev-services up --secure`; under CI=true this fails)"
    ));
    None
}

/// Whether `CI=true`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Writes `SKIPPED <test>: <why>` past the harness's capture.
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    // Straight to the file descriptor: `eprintln!` would be captured.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

fn find(engine: &str, var: &str, default: &str) -> Option<String> {
    let configured = std::env::var(var).ok().filter(|v| !v.trim().is_empty());
    let address = configured.clone().unwrap_or_else(|| default.to_owned());
    if answers(&address) {
        return Some(address);
    }
    let required = in_ci() || configured.is_some();
    assert!(
        !required,
        "{engine} is required here ({}) but nothing answers at {address}; start it with \
         `scripts/dev-services up {engine}`",
        if configured.is_some() {
            format!("{var} is set")
        } else {
            "CI=true".to_owned()
        }
    );
    skip(&format!(
        "no {engine} at {address} (start it with `scripts/dev-services up {engine}`, or set {var}; \
         under CI=true this fails)"
    ));
    None
}

/// Whether every node of a comma-separated list accepts a TCP connection
/// within 2 s (Cassandra opens its CQL port only once it serves CQL).
fn answers(nodes: &str) -> bool {
    let mut any = false;
    for node in nodes.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        any = true;
        let reachable = node.to_socket_addrs().ok().is_some_and(|addrs| {
            addrs
                .into_iter()
                .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        });
        if !reachable {
            return false;
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_does_not_answer_and_an_open_one_does() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap().to_string();
        assert!(answers(&open));
        drop(listener);
        assert!(!answers(&open), "closed again");
        assert!(!answers(""));
        assert!(!answers("not an address"));
    }
}
