//! The Waymark log on Apache Kafka.
//!
//! # Layout
//! - [`log`]: [`KafkaLog`], the [`waymark_runtime::Log`] on a Kafka cluster
//!   through rdkafka — an idempotent producer, consumer-group members on
//!   their own threads, topic creation, watermarks and random reads.
//!
//! The Kafka-protocol endpoint of `waymark dev` is not here: it is a broker
//! served on the embedded log itself (`waymark-broker`).
//!
//! # Guarantees
//! - A [`KafkaLog`] produce returns once every record is acknowledged by all
//!   in-sync replicas (`acks=all`); records of one partition keep their order
//!   (idempotent producer). Keyed records are partitioned with
//!   [`waymark_runtime::partition_for`], like Kafka's Java client.
//! - Every client takes the same librdkafka properties
//!   ([`KafkaConfig::property`]): TLS and SASL (SCRAM-SHA-256/512, PLAIN,
//!   OAUTHBEARER) work, librdkafka being built with OpenSSL from source.
//!   Properties that hold secrets are printed `<redacted>`. [`probe`] tells
//!   a cluster that refuses the credentials or the TLS handshake
//!   ([`KafkaLogError::Refused`], not worth retrying) from one that does
//!   not answer yet ([`KafkaLogError::Unreachable`]).
//! - A group member hands out `Assigned` before any record of a newly
//!   assigned partition, and those records start exactly at the offset the
//!   runner seeks to. A revocation takes effect only while the runner waits
//!   in `next` (every record handed out before has been applied), and no
//!   record of a revoked partition is handed out after it. Records of a
//!   partition come in offset order. Offsets are committed only when asked
//!   (no auto-commit): the projection store holds the positions.

pub mod log;

pub use log::{probe, KafkaConfig, KafkaLog, KafkaLogError, PRODUCER_DEFAULTS, PRODUCER_FORCED};
