//! The store's configuration: passed in by the binary, which owns the file
//! format and the `WAYMARK_…` overrides; defaults live here.

use std::path::PathBuf;
use std::time::Duration;

use crate::cql::{validate_keyspace_name, Replication};

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CqlConfig {
    /// Contact points, `host:port`. Use port 19042 (the shard-aware port)
    /// on ScyllaDB when it is open; the driver finds the other nodes itself.
    pub nodes: Vec<String>,
    /// Keyspace of the projection tables, `[a-z0-9_]{1,48}`; created when
    /// missing.
    pub keyspace: String,
    /// The replication map used when the keyspace has to be created, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    pub replication: String,
    /// Client-side timeout of one request (each attempt of a statement).
    pub request_timeout: Duration,
    /// Timeout of opening one connection.
    pub connect_timeout: Duration,
    /// The local datacenter: requests go to its replicas first and
    /// `LOCAL_QUORUM` counts in it. `None` treats all nodes alike (one-DC
    /// clusters and development).
    pub local_datacenter: Option<String>,
    /// How many statements one `get_many` or `write` call keeps in flight.
    pub concurrency: usize,
    /// Bytes of rows each fold runner keeps cached across batches
    /// (`waymark_runtime::cache::RowCache`), so that it reads from the
    /// cluster only rows it has not seen; 0 turns the cache off.
    pub row_cache_bytes: usize,
    /// The role to log in as (`PasswordAuthenticator`); with `password`.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<Secret>,
    /// TLS to the nodes (client encryption); plaintext when `None`.
    pub tls: Option<CqlTls>,
}

/// A secret string: compared and cloned, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// TLS to the CQL nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CqlTls {
    /// PEM CA certificates the nodes' certificates must chain to. Each
    /// node's certificate must also name the node's IP address (the
    /// driver checks it).
    pub ca: PathBuf,
    /// A client certificate and key (PEM), for clusters that require them
    /// (`require_client_auth`).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// The replication of a keyspace the store creates when none is configured.
pub const DEFAULT_REPLICATION: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";

/// Default row cache of each fold runner: 64 MiB.
pub const DEFAULT_ROW_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The most statements one call may keep in flight.
pub const MAX_CONCURRENCY: usize = 4096;

impl Default for CqlConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".to_owned()],
            keyspace: "waymark".to_owned(),
            replication: DEFAULT_REPLICATION.to_owned(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            local_datacenter: None,
            concurrency: 64,
            row_cache_bytes: DEFAULT_ROW_CACHE_BYTES,
            username: None,
            password: None,
            tls: None,
        }
    }
}

impl CqlConfig {
    /// Every problem of the configuration, empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.nodes.is_empty() {
            problems.push("nodes: no contact point".to_owned());
        }
        for node in &self.nodes {
            let port_ok = node
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                problems.push(format!("nodes: {node:?} is not host:port"));
            }
        }
        if let Err(e) = validate_keyspace_name(&self.keyspace) {
            problems.push(format!("keyspace: {e}"));
        }
        if let Err(e) = Replication::parse(&self.replication) {
            problems.push(format!("replication: {e}"));
        }
        if self.request_timeout.is_zero() {
            problems.push("request_timeout: must be more than zero".to_owned());
        }
        if self.connect_timeout.is_zero() {
            problems.push("connect_timeout: must be more than zero".to_owned());
        }
        if self.local_datacenter.as_deref() == Some("") {
            problems.push("local_datacenter: empty; leave it unset instead".to_owned());
        }
        match (&self.username, &self.password) {
            (Some(u), Some(_)) if u.is_empty() => problems.push("username: empty".to_owned()),
            (Some(_), None) => problems.push("username: given without a password".to_owned()),
            (None, Some(_)) => problems.push("password: given without a username".to_owned()),
            _ => {}
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            problems.push(format!(
                "concurrency: {} is not in 1..={MAX_CONCURRENCY}",
                self.concurrency
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(CqlConfig::default().problems(), Vec::<String>::new());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let config = CqlConfig {
            nodes: vec![
                "localhost".to_owned(),
                "h:99999".to_owned(),
                ":9042".to_owned(),
            ],
            keyspace: "Waymark".to_owned(),
            replication: "{'class': 'SimpleStrategy'}; DROP TABLE x".to_owned(),
            request_timeout: Duration::ZERO,
            connect_timeout: Duration::ZERO,
            local_datacenter: Some(String::new()),
            concurrency: 0,
            row_cache_bytes: 0,
            username: Some("waymark".to_owned()),
            password: None,
            tls: None,
        };
        let problems = config.problems();
        assert_eq!(problems.len(), 10, "{problems:#?}");
        assert!(problems[0].contains("\"localhost\""));
        assert!(problems[3].starts_with("keyspace: invalid keyspace name \"Waymark\""));
    }

    #[test]
    fn a_password_is_never_printed() {
        let config = CqlConfig {
            username: Some("waymark".to_owned()),
            password: Some(Secret::new("hunter2")),
            ..CqlConfig::default()
        };
        assert!(config.problems().is_empty());
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("hunter2") && printed.contains("<redacted>"),
            "{printed}"
        );
    }

    #[test]
    fn ipv6_and_names_are_host_port() {
        let config = CqlConfig {
            nodes: vec!["[::1]:9042".to_owned(), "scylla-0.scylla:19042".to_owned()],
            ..CqlConfig::default()
        };
        assert_eq!(config.problems(), Vec::<String>::new());
    }
}
