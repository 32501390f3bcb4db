//! CQL text: validated names, the schema files and the statements the store
//! prepares. Nothing but a validated [`Ident`] or a validated replication map
//! is ever put into CQL text; keys, values and numbers are always bound.

use std::fmt;

/// The longest keyspace or table name accepted (ScyllaDB and Cassandra both
/// accept at least this many characters).
pub const MAX_NAME_LEN: usize = 48;

/// Table names the store uses itself, which projections cannot take.
pub const RESERVED_TABLES: &[&str] = &[POSITIONS_TABLE, MIGRATIONS_TABLE];

/// The positions table.
pub(crate) const POSITIONS_TABLE: &str = "positions";
/// The table recording applied schema versions.
pub(crate) const MIGRATIONS_TABLE: &str = "schema_migrations";

/// What a name names, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A keyspace.
    Keyspace,
    /// A projection table.
    Table,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Keyspace => "keyspace",
            NameKind::Table => "table",
        })
    }
}

/// A keyspace or table name that is not `[a-z0-9_]{1,48}` or is reserved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("invalid {kind} name: empty")]
    Empty {
        /// Keyspace or table.
        kind: NameKind,
    },
    /// The name is too long.
    #[error("invalid {kind} name {name:?}: longer than {max} characters", max = MAX_NAME_LEN)]
    TooLong {
        /// Keyspace or table.
        kind: NameKind,
        /// The name.
        name: String,
    },
    /// The name has a character outside `[a-z0-9_]`.
    #[error("invalid {kind} name {name:?}: character {found:?} is not one of a-z, 0-9, _")]
    InvalidCharacter {
        /// Keyspace or table.
        kind: NameKind,
        /// The name.
        name: String,
        /// The first offending character.
        found: char,
    },
    /// The name is one the store uses itself ([`RESERVED_TABLES`]).
    #[error("invalid {kind} name {name:?}: reserved for the store itself")]
    Reserved {
        /// Keyspace or table.
        kind: NameKind,
        /// The name.
        name: String,
    },
}

/// A validated keyspace or table name, written into CQL double-quoted (so a
/// name that is a CQL keyword or starts with a digit works too; quoting an
/// all-lowercase name changes nothing else).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Ident(String);

impl Ident {
    /// A keyspace name.
    pub(crate) fn keyspace(name: &str) -> Result<Self, NameError> {
        check_name(NameKind::Keyspace, name)?;
        Ok(Self(name.to_owned()))
    }

    /// A projection table name.
    pub(crate) fn table(name: &str) -> Result<Self, NameError> {
        check_name(NameKind::Table, name)?;
        if RESERVED_TABLES.contains(&name) {
            return Err(NameError::Reserved {
                kind: NameKind::Table,
                name: name.to_owned(),
            });
        }
        Ok(Self(name.to_owned()))
    }

    /// One of the store's own tables.
    pub(crate) fn internal(name: &'static str) -> Self {
        Self(name.to_owned())
    }

    /// The bare name.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Validated to [a-z0-9_]+: nothing to escape.
        write!(f, "\"{}\"", self.0)
    }
}

/// Checks that `name` is a valid projection table name: `[a-z0-9_]{1,48}`
/// and not one of [`RESERVED_TABLES`].
pub fn validate_table_name(name: &str) -> Result<(), NameError> {
    Ident::table(name).map(|_| ())
}

/// Checks that `name` is a valid keyspace name: `[a-z0-9_]{1,48}`.
pub fn validate_keyspace_name(name: &str) -> Result<(), NameError> {
    Ident::keyspace(name).map(|_| ())
}

fn check_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if let Some(found) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_'))
    {
        return Err(NameError::InvalidCharacter {
            kind,
            name: name.to_owned(),
            found,
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// A replication map such as `{'class': 'SimpleStrategy',
/// 'replication_factor': 1}`, checked to be one flat map literal of quoted
/// words and numbers, so it cannot carry another statement into CQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replication(String);

impl Replication {
    /// Checks `text`; the error says why it is rejected.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let inner = text
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .ok_or_else(|| format!("replication {text:?} is not a {{...}} map"))?;
        if let Some(c) = inner.chars().find(|c| {
            !(c.is_ascii_alphanumeric() || matches!(c, '\'' | '_' | '-' | '.' | ':' | ',' | ' '))
        }) {
            return Err(format!(
                "replication {text:?} has character {c:?}; only letters, digits, quotes and _ - . : , are allowed"
            ));
        }
        if inner.matches('\'').count() % 2 != 0 {
            return Err(format!("replication {text:?} has an unclosed quote"));
        }
        if !inner.contains("'class'") {
            return Err(format!("replication {text:?} names no 'class'"));
        }
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Display for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The keyspace, created when missing (`schema/keyspace.cql`).
const KEYSPACE_TEMPLATE: &str = include_str!("../schema/keyspace.cql");
/// The migrations table (`schema/schema_migrations.cql`).
const MIGRATIONS_TEMPLATE: &str = include_str!("../schema/schema_migrations.cql");
/// One projection table (`schema/projection_table.cql`).
const PROJECTION_TEMPLATE: &str = include_str!("../schema/projection_table.cql");

/// A versioned schema file, `schema/NNNN_name.cql`, applied once per
/// keyspace and recorded in `schema_migrations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// The version, `NNNN` in the file name.
    pub version: i32,
    /// The name, the rest of the file name.
    pub name: &'static str,
    /// The file's text, with `{keyspace}` for the keyspace.
    pub template: &'static str,
}

/// Every versioned schema file, in order. A new file is added here too (a
/// unit test checks that this list and `schema/` agree).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "positions",
    template: include_str!("../schema/0001_positions.cql"),
}];

/// Fills `{name}` placeholders with already validated values and splits the
/// text into statements: `--` comment lines dropped, split on `;`.
fn render(template: &str, vars: &[(&str, &dyn fmt::Display)]) -> Vec<String> {
    let mut text: String = template
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for (name, value) in vars {
        text = text.replace(&format!("{{{name}}}"), &value.to_string());
    }
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The DDL creating the keyspace.
pub(crate) fn keyspace_ddl(keyspace: &Ident, replication: &Replication) -> Vec<String> {
    render(
        KEYSPACE_TEMPLATE,
        &[("keyspace", keyspace), ("replication", replication)],
    )
}

/// The DDL creating the migrations table.
pub(crate) fn migrations_table_ddl(keyspace: &Ident) -> Vec<String> {
    render(MIGRATIONS_TEMPLATE, &[("keyspace", keyspace)])
}

/// The statements of one versioned schema file.
pub(crate) fn migration_ddl(keyspace: &Ident, migration: &Migration) -> Vec<String> {
    render(migration.template, &[("keyspace", keyspace)])
}

/// The DDL creating one projection table.
pub(crate) fn projection_table_ddl(keyspace: &Ident, table: &Ident) -> Vec<String> {
    render(
        PROJECTION_TEMPLATE,
        &[("keyspace", keyspace), ("table", table)],
    )
}

/// How a projection table stores its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `PRIMARY KEY (head, sub)` (`schema/projection_table.cql`): a key is
    /// split by [`split_key`], so a head and its sub rows are one
    /// partition.
    Partitioned,
    /// `key text PRIMARY KEY`: every key its own partition. Tables created
    /// by Waymark before the partitioned layout keep it; their rows are
    /// written one statement each (sub rows before heads).
    KeyPerPartition,
}

/// Splits a row key at its first `/` into its partition (`head`) and the
/// rest (`sub`, starting with the `/`; empty for a key without one), so
/// that `head + sub` is the key again and no two keys share a pair.
pub(crate) fn split_key(key: &str) -> (&str, &str) {
    match key.find('/') {
        Some(at) => key.split_at(at),
        None => (key, ""),
    }
}

/// Reads the columns of a table, to tell its [`Layout`]:
/// `(keyspace_name, table_name) -> (column_name)*`. `system_schema` has
/// the same shape on ScyllaDB and Cassandra.
pub(crate) const SELECT_COLUMNS: &str =
    "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?";

/// The statements prepared for one projection table. Every write carries
/// its own timestamp (`USING TIMESTAMP ?`), so a retried statement writes
/// exactly the same cell again. `K` below is the key: `head, sub` in the
/// partitioned layout, `key` in the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableCql {
    /// `(K) -> value`.
    pub(crate) select: String,
    /// `(K, value, timestamp)`.
    pub(crate) upsert: String,
    /// `(timestamp, K)`.
    pub(crate) delete: String,
    /// `(K, value)`, a lightweight transaction: writes only when absent.
    pub(crate) insert_if_absent: String,
    /// `(value, K, expected)`, a lightweight transaction: writes only
    /// over `expected`.
    pub(crate) update_if: String,
    /// `(limit) -> (K, value)*`: the first rows in token order.
    pub(crate) scan_first: String,
    /// `(key or head, limit) -> (K, value)*`: the rows of the partitions
    /// after that one, in token order.
    pub(crate) scan_after: String,
    /// `(head, sub, limit) -> (head, sub, value)*`: the rest of one
    /// partition after `sub` (partitioned layout only).
    pub(crate) scan_within: Option<String>,
}

impl TableCql {
    pub(crate) fn new(keyspace: &Ident, table: &Ident, layout: Layout) -> Self {
        match layout {
            Layout::Partitioned => Self {
                insert_if_absent: format!(
                    "INSERT INTO {keyspace}.{table} (head, sub, value) VALUES (?, ?, ?) IF NOT EXISTS"
                ),
                update_if: format!(
                    "UPDATE {keyspace}.{table} SET value = ? WHERE head = ? AND sub = ? IF value = ?"
                ),
                select: format!(
                    "SELECT value FROM {keyspace}.{table} WHERE head = ? AND sub = ?"
                ),
                upsert: format!(
                    "INSERT INTO {keyspace}.{table} (head, sub, value) VALUES (?, ?, ?) USING TIMESTAMP ?"
                ),
                delete: format!(
                    "DELETE FROM {keyspace}.{table} USING TIMESTAMP ? WHERE head = ? AND sub = ?"
                ),
                scan_first: format!("SELECT head, sub, value FROM {keyspace}.{table} LIMIT ?"),
                scan_after: format!(
                    "SELECT head, sub, value FROM {keyspace}.{table} WHERE token(head) > token(?) LIMIT ?"
                ),
                scan_within: Some(format!(
                    "SELECT head, sub, value FROM {keyspace}.{table} WHERE head = ? AND sub > ? LIMIT ?"
                )),
            },
            Layout::KeyPerPartition => Self {
                insert_if_absent: format!(
                    "INSERT INTO {keyspace}.{table} (key, value) VALUES (?, ?) IF NOT EXISTS"
                ),
                update_if: format!(
                    "UPDATE {keyspace}.{table} SET value = ? WHERE key = ? IF value = ?"
                ),
                select: format!("SELECT value FROM {keyspace}.{table} WHERE key = ?"),
                upsert: format!(
                    "INSERT INTO {keyspace}.{table} (key, value) VALUES (?, ?) USING TIMESTAMP ?"
                ),
                delete: format!("DELETE FROM {keyspace}.{table} USING TIMESTAMP ? WHERE key = ?"),
                scan_first: format!("SELECT key, value FROM {keyspace}.{table} LIMIT ?"),
                scan_after: format!(
                    "SELECT key, value FROM {keyspace}.{table} WHERE token(key) > token(?) LIMIT ?"
                ),
                scan_within: None,
            },
        }
    }
}

/// The statements on the store's own tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InternalCql {
    /// `(consumer, topic) -> (partition, next_offset)*`.
    pub(crate) select_positions: String,
    /// `(consumer, topic, partition, next_offset, timestamp)`.
    pub(crate) upsert_position: String,
    /// `() -> (version)*`.
    pub(crate) select_migrations: String,
    /// `(version, name)`.
    pub(crate) record_migration: String,
}

impl InternalCql {
    pub(crate) fn new(keyspace: &Ident) -> Self {
        let positions = Ident::internal(POSITIONS_TABLE);
        let migrations = Ident::internal(MIGRATIONS_TABLE);
        Self {
            select_positions: format!(
                "SELECT partition, next_offset FROM {keyspace}.{positions} \
                 WHERE consumer = ? AND topic = ?"
            ),
            upsert_position: format!(
                "INSERT INTO {keyspace}.{positions} (consumer, topic, partition, next_offset) \
                 VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ),
            select_migrations: format!("SELECT version FROM {keyspace}.{migrations}"),
            record_migration: format!(
                "INSERT INTO {keyspace}.{migrations} (version, name, applied_at) \
                 VALUES (?, ?, toTimestamp(now()))"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_line(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn table_names() {
        for ok in [
            "journey_v1",
            "identity_v1_links",
            "a",
            "0abc",
            "x".repeat(48).as_str(),
        ] {
            assert_eq!(validate_table_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            validate_table_name(""),
            Err(NameError::Empty {
                kind: NameKind::Table
            })
        );
        for (bad, found) in [
            ("Journey_v1", 'J'),
            ("journey-v1", '-'),
            ("journey v1", ' '),
            ("t;DROP", ';'),
            ("t\"x", '"'),
            ("ks.t", '.'),
            ("é", 'é'),
        ] {
            assert_eq!(
                validate_table_name(bad),
                Err(NameError::InvalidCharacter {
                    kind: NameKind::Table,
                    name: bad.to_owned(),
                    found
                }),
                "{bad}"
            );
        }
        assert!(matches!(
            validate_table_name(&"x".repeat(49)),
            Err(NameError::TooLong { .. })
        ));
        for reserved in RESERVED_TABLES {
            assert!(matches!(
                validate_table_name(reserved),
                Err(NameError::Reserved { .. })
            ));
            // A keyspace may have any valid name.
            assert_eq!(validate_keyspace_name(reserved), Ok(()));
        }
    }

    #[test]
    fn name_errors_read_well() {
        let e = validate_table_name("journey-v1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid table name \"journey-v1\": character '-' is not one of a-z, 0-9, _"
        );
        let e = validate_keyspace_name("").unwrap_err();
        assert_eq!(e.to_string(), "invalid keyspace name: empty");
    }

    #[test]
    fn replication_maps() {
        for ok in [
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            "{'class': 'NetworkTopologyStrategy', 'dc-1': 3, 'eu.west': '3'}",
            " {'class':'SimpleStrategy','replication_factor':'3'} ",
        ] {
            assert!(Replication::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "'class': 'SimpleStrategy'",
            "{'class': 'SimpleStrategy', 'replication_factor': 1}; DROP KEYSPACE x",
            "{'class': 'SimpleStrategy'} AND durable_writes = false",
            "{'class': 'SimpleStrategy', 'x': {'y': 1}}",
            "{'class: 'SimpleStrategy'}",
            "{'replication_factor': 1}",
            "{'class': \"SimpleStrategy\"}",
        ] {
            assert!(Replication::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn projection_table_ddl_text() {
        let ks = Ident::keyspace("wm").unwrap();
        let t = Ident::table("journey_v1").unwrap();
        let ddl = projection_table_ddl(&ks, &t);
        assert_eq!(ddl.len(), 1);
        assert_eq!(
            one_line(&ddl[0]),
            "CREATE TABLE IF NOT EXISTS \"wm\".\"journey_v1\" ( head text, sub text, value blob, PRIMARY KEY (head, sub) )"
        );
    }

    #[test]
    fn keyspace_and_migration_ddl_text() {
        let ks = Ident::keyspace("wm").unwrap();
        let r = Replication::parse("{'class': 'SimpleStrategy', 'replication_factor': 1}").unwrap();
        let ddl = keyspace_ddl(&ks, &r);
        assert_eq!(
            ddl.iter().map(|s| one_line(s)).collect::<Vec<_>>(),
            ["CREATE KEYSPACE IF NOT EXISTS \"wm\" WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"]
        );
        let ddl = migrations_table_ddl(&ks);
        assert_eq!(
            ddl.iter().map(|s| one_line(s)).collect::<Vec<_>>(),
            ["CREATE TABLE IF NOT EXISTS \"wm\".schema_migrations ( version int PRIMARY KEY, name text, applied_at timestamp )"]
        );
        let ddl = migration_ddl(&ks, &MIGRATIONS[0]);
        assert_eq!(
            ddl.iter().map(|s| one_line(s)).collect::<Vec<_>>(),
            ["CREATE TABLE IF NOT EXISTS \"wm\".positions ( consumer text, topic text, partition int, next_offset bigint, PRIMARY KEY ((consumer, topic), partition) )"]
        );
    }

    #[test]
    fn every_schema_statement_is_idempotent_and_fully_rendered() {
        let ks = Ident::keyspace("wm").unwrap();
        let t = Ident::table("t").unwrap();
        let r = Replication::parse("{'class': 'SimpleStrategy', 'replication_factor': 1}").unwrap();
        let mut all = keyspace_ddl(&ks, &r);
        all.extend(migrations_table_ddl(&ks));
        all.extend(projection_table_ddl(&ks, &t));
        for m in MIGRATIONS {
            let ddl = migration_ddl(&ks, m);
            assert!(!ddl.is_empty(), "{} has no statement", m.name);
            all.extend(ddl);
        }
        for s in &all {
            assert!(s.starts_with("CREATE "), "{s}");
            assert!(s.contains(" IF NOT EXISTS "), "{s}");
            assert!(!s.contains("{keyspace}") && !s.contains("{table}"), "{s}");
            assert!(!s.contains("{replication}"), "{s}");
        }
    }

    #[test]
    fn migrations_match_the_schema_dir() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schema");
        let mut files: Vec<(i32, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter_map(|f| {
                let stem = f.strip_suffix(".cql")?;
                let (version, name) = stem.split_once('_')?;
                Some((version.parse().ok()?, name.to_owned()))
            })
            .collect();
        files.sort();
        let listed: Vec<(i32, String)> = MIGRATIONS
            .iter()
            .map(|m| (m.version, m.name.to_owned()))
            .collect();
        assert_eq!(files, listed);
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
    }

    #[test]
    fn keys_split_at_their_first_slash_and_back() {
        for (key, head, sub) in [
            ("p", "p", ""),
            ("p/c/000000000001", "p", "/c/000000000001"),
            ("p/", "p", "/"),
            ("/x", "", "/x"),
            ("", "", ""),
            ("web:a/b/c", "web:a", "/b/c"),
        ] {
            assert_eq!(split_key(key), (head, sub), "{key}");
            assert_eq!(format!("{head}{sub}"), key);
        }
    }

    #[test]
    fn statement_text() {
        let ks = Ident::keyspace("wm").unwrap();
        let t = Ident::table("journey_v1").unwrap();
        let cql = TableCql::new(&ks, &t, Layout::Partitioned);
        assert_eq!(
            cql.select,
            "SELECT value FROM \"wm\".\"journey_v1\" WHERE head = ? AND sub = ?"
        );
        assert_eq!(
            cql.upsert,
            "INSERT INTO \"wm\".\"journey_v1\" (head, sub, value) VALUES (?, ?, ?) USING TIMESTAMP ?"
        );
        assert_eq!(
            cql.delete,
            "DELETE FROM \"wm\".\"journey_v1\" USING TIMESTAMP ? WHERE head = ? AND sub = ?"
        );
        let cql = TableCql::new(&ks, &t, Layout::KeyPerPartition);
        assert_eq!(
            cql.select,
            "SELECT value FROM \"wm\".\"journey_v1\" WHERE key = ?"
        );
        assert_eq!(
            cql.upsert,
            "INSERT INTO \"wm\".\"journey_v1\" (key, value) VALUES (?, ?) USING TIMESTAMP ?"
        );
        assert_eq!(
            cql.delete,
            "DELETE FROM \"wm\".\"journey_v1\" USING TIMESTAMP ? WHERE key = ?"
        );
        assert_eq!(cql.scan_within, None);
        let cql = InternalCql::new(&ks);
        assert_eq!(
            cql.select_positions,
            "SELECT partition, next_offset FROM \"wm\".\"positions\" WHERE consumer = ? AND topic = ?"
        );
        assert_eq!(
            cql.upsert_position,
            "INSERT INTO \"wm\".\"positions\" (consumer, topic, partition, next_offset) \
             VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        );
        assert_eq!(
            cql.select_migrations,
            "SELECT version FROM \"wm\".\"schema_migrations\""
        );
    }
}
