//! Errors of [`CqlStore::connect`](crate::CqlStore::connect), and how
//! driver errors become [`StoreError`]s.

use scylla::errors::{DbError, ExecutionError, PrepareError, RequestAttemptError};
use waymark_runtime::StoreError;

use crate::cql::NameError;

/// Why [`CqlStore::connect`](crate::CqlStore::connect) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The configuration is invalid; every problem is listed (not retryable).
    #[error("invalid cql store config: {}", problems.join("; "))]
    Config {
        /// Each problem found.
        problems: Vec<String>,
    },
    /// No node could be reached, or a request timed out or found too few
    /// replicas (retryable).
    #[error("cql cluster unavailable: {reason}")]
    Unavailable {
        /// The driver's error.
        reason: String,
    },
    /// The cluster refused a schema statement: e.g. the replication map
    /// names an unknown strategy, or permissions are missing (not retryable).
    #[error("cql schema statement refused: {reason} (statement: {statement})")]
    Schema {
        /// The statement.
        statement: String,
        /// The server's error.
        reason: String,
    },
    /// A node answered but refused the credentials, or the TLS handshake
    /// failed (an untrusted certificate, TLS to a plaintext port or the
    /// other way round): retrying cannot help (not retryable).
    #[error("cql cluster refused the connection: {reason}")]
    Refused {
        /// What failed, and the driver's error.
        reason: String,
    },
}

impl ConnectError {
    /// Classifies an error of opening the session: credentials refused or
    /// a failed TLS handshake are [`ConnectError::Refused`], anything else
    /// [`ConnectError::Unavailable`].
    pub(crate) fn opening(e: &impl std::fmt::Display, username: Option<&str>) -> Self {
        let reason = e.to_string();
        let lower = reason.to_ascii_lowercase();
        if lower.contains("authenticat") || lower.contains("credentials") {
            ConnectError::Refused {
                reason: format!(
                    "authentication failed{}: {reason}",
                    username.map_or(String::new(), |u| format!(" for {u:?}"))
                ),
            }
        } else if lower.contains("ssl") || lower.contains("tls") || lower.contains("certificate") {
            ConnectError::Refused {
                reason: format!("tls handshake failed: {reason}"),
            }
        } else {
            ConnectError::Unavailable { reason }
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConnectError::Unavailable { .. })
    }
}

/// The server's error inside a driver error, if the server answered.
fn db_error(e: &ExecutionError) -> Option<(&DbError, &str)> {
    let attempt = match e {
        ExecutionError::LastAttemptError(a) => a,
        ExecutionError::PrepareError(p) => return prepare_db_error(p),
        _ => return None,
    };
    match attempt {
        RequestAttemptError::DbError(db, msg) => Some((db, msg.as_str())),
        _ => None,
    }
}

fn prepare_db_error(e: &PrepareError) -> Option<(&DbError, &str)> {
    match e {
        PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(db, msg),
        } => Some((db, msg.as_str())),
        _ => None,
    }
}

/// Whether the server said the table (or its keyspace) does not exist.
/// ScyllaDB and Cassandra 4 say "unconfigured table t"; Cassandra 5 says
/// "table t does not exist" in places.
fn is_unknown_table(db: &DbError, msg: &str) -> bool {
    let msg = msg.to_ascii_lowercase();
    matches!(db, DbError::Invalid)
        && (msg.contains("unconfigured table") || msg.contains("does not exist"))
}

/// Whether the server refused the statement itself (so retrying the same
/// statement cannot help).
fn is_refusal(db: &DbError) -> bool {
    matches!(
        db,
        DbError::SyntaxError
            | DbError::Invalid
            | DbError::ConfigError
            | DbError::Unauthorized
            | DbError::AuthenticationError
    )
}

/// Whether the server refused the request as it is, for good: an invalid
/// request (a mutation over the size limit, a batch over
/// `batch_size_fail_threshold`, a value the schema refuses) or a syntax
/// error. Access errors are not: an operator can grant access without
/// changing the request.
fn is_permanent_refusal(db: &DbError) -> bool {
    matches!(db, DbError::SyntaxError | DbError::Invalid)
}

/// A driver error on `table` as a [`StoreError`]: an unknown table is
/// [`StoreError::UnknownTable`]; a request the server refuses as it is
/// ([`is_permanent_refusal`]) is [`StoreError::Refused`], which the runtime
/// does not retry as it is (it parks the record's key, see
/// `waymark_runtime::park`); everything else (connections, timeouts, too
/// few replicas, overload, access) is [`StoreError::Unavailable`], which
/// the runtime retries with backoff.
pub(crate) fn execution_to_store(table: &str, e: &ExecutionError) -> StoreError {
    match db_error(e) {
        Some((db, msg)) if is_unknown_table(db, msg) => StoreError::UnknownTable(table.to_owned()),
        Some((db, msg)) if is_permanent_refusal(db) => StoreError::Refused {
            table: table.to_owned(),
            reason: format!("{db}: {msg}"),
        },
        _ => StoreError::Unavailable(format!("{table}: {e}")),
    }
}

/// Like [`execution_to_store`], for preparing a statement.
pub(crate) fn prepare_to_store(table: &str, e: &PrepareError) -> StoreError {
    match prepare_db_error(e) {
        Some((db, msg)) if is_unknown_table(db, msg) => StoreError::UnknownTable(table.to_owned()),
        _ => StoreError::Unavailable(format!("{table}: {e}")),
    }
}

/// A name that can never be a table, as a [`StoreError`].
pub(crate) fn name_to_store(name: &str, e: &NameError) -> StoreError {
    StoreError::UnknownTable(format!("{name} ({e})"))
}

/// A driver error while setting up the keyspace or schema.
pub(crate) fn execution_to_connect(statement: &str, e: &ExecutionError) -> ConnectError {
    match db_error(e) {
        Some((db, msg)) if is_refusal(db) => ConnectError::Schema {
            statement: statement.to_owned(),
            reason: format!("{db}: {msg}"),
        },
        _ => ConnectError::Unavailable {
            reason: e.to_string(),
        },
    }
}

/// Like [`execution_to_connect`], for preparing a statement.
pub(crate) fn prepare_to_connect(statement: &str, e: &PrepareError) -> ConnectError {
    match prepare_db_error(e) {
        Some((db, msg)) if is_refusal(db) => ConnectError::Schema {
            statement: statement.to_owned(),
            reason: format!("{db}: {msg}"),
        },
        _ => ConnectError::Unavailable {
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(db: DbError, msg: &str) -> ExecutionError {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, msg.to_owned()))
    }

    #[test]
    fn unknown_tables_are_recognised() {
        for msg in [
            "unconfigured table journey_v1",
            "table journey_v1 does not exist",
            "Keyspace wm does not exist",
        ] {
            assert!(matches!(
                execution_to_store("journey_v1", &server(DbError::Invalid, msg)),
                StoreError::UnknownTable(t) if t == "journey_v1"
            ));
        }
    }

    #[test]
    fn timeouts_and_unavailable_are_retryable() {
        let cases = [
            ExecutionError::RequestTimeout(std::time::Duration::from_secs(1)),
            ExecutionError::EmptyPlan,
            server(DbError::Overloaded, "overloaded"),
            server(
                DbError::Unavailable {
                    consistency: scylla::statement::Consistency::LocalQuorum,
                    required: 2,
                    alive: 1,
                },
                "cannot achieve consistency",
            ),
        ];
        for e in &cases {
            assert!(
                matches!(execution_to_store("t", e), StoreError::Unavailable(_)),
                "{e}"
            );
            assert!(execution_to_connect("CREATE ...", e).is_retryable(), "{e}");
        }
    }

    #[test]
    fn refused_requests_are_permanent_and_access_errors_are_not() {
        let e = execution_to_store(
            "journey_v1",
            &server(
                DbError::Invalid,
                "Mutation of 17825792 bytes is too large for the maximum size of 16777216",
            ),
        );
        assert!(matches!(e, StoreError::Refused { .. }), "{e}");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("too large"), "{e}");
        let e = execution_to_store("t", &server(DbError::Unauthorized, "no MODIFY permission"));
        assert!(e.is_retryable(), "{e}");
    }

    #[test]
    fn refused_schema_is_not_retryable() {
        let e = execution_to_connect(
            "CREATE KEYSPACE ...",
            &server(DbError::ConfigError, "unknown strategy"),
        );
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("unknown strategy"), "{e}");
    }

    #[test]
    fn bad_names_say_why() {
        let e = crate::cql::validate_table_name("Journey").unwrap_err();
        let e = name_to_store("Journey", &e);
        assert_eq!(
            e.to_string(),
            "unknown table Journey (invalid table name \"Journey\": character 'J' is not one of a-z, 0-9, _)"
        );
    }
}
