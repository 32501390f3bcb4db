//! The `waymark` command line and the assembly of a Waymark process.
//!
//! # Layout
//! - [`registry`]: the explicit processor table (name → handler).
//! - [`dev`]: `waymark dev` — embedded log and store, every processor, the
//!   gRPC services, metrics and the Kafka-protocol front door in one process.
//! - [`platform`]: assembly shared by `dev`, `run` and `serve`.
//! - [`scale`]: `waymark run` and `waymark serve` on Kafka and ScyllaDB/Cassandra.
//! - [`publish`]: `waymark publish`.
//! - [`connect`]: how the client commands reach a server (TLS, token).
//! - [`security`]: how `dev` and `serve` secure their ports (TLS, tokens,
//!   JWTs, client certificates) and refuse to expose them unsecured.
//! - [`ops`]: `waymark replay`, `projections`, `verify` and `inspect` (gRPC
//!   clients of `Admin` and `Query`).
//! - [`versions`]: projection versions at run time — the controller that
//!   runs them, the query-side tracker, and the `Admin` operator (rebuild,
//!   switch, drop, verify).
//! - [`metrics_http`]: the Prometheus endpoint.
//!
//! # Guarantees
//! See `waymark-runtime` for processing guarantees. `waymark dev` keeps
//! every acknowledged event and every projection across restarts (including
//! `kill -9`): the log (`log.redb`, redb) and the projection store (`store/`,
//! fjall) are crash-safe embedded databases in `--data-dir`.

pub mod connect;
pub mod dev;
pub mod k8s;
pub mod metrics_http;
pub mod ops;
pub mod platform;
pub mod publish;
pub mod recovery;
pub mod registry;
pub mod scale;
pub mod security;
pub mod status;
