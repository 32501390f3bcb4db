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
