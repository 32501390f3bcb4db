//! Projection versions at run time.
//!
//! The catalog ([`waymark_runtime::catalog`]) lives in the projection
//! store, so every process sees the same versions: `waymark dev` runs all of
//! this in one process; at scale `waymark run` processes run controllers for
//! their processors and `waymark serve` serves `Admin`, all meeting in the
//! catalog (controllers and trackers re-read it every
//! [`CATALOG_POLL`]).
//!
//! # Layout
//! - [`controller`]: the [`Controller`] that runs, per processor, every
//!   version the catalog wants running (the active one, building ones, and
//!   the retired predecessor until it has handed off), each as a
//!   [`waymark_runtime::Runner`] with its [`VersionGate`]; performs the
//!   automatic switches; [`track_active`] points queries at the active
//!   versions.
//! - [`operator`]: the [`PlatformOperator`] behind the `Admin` projection
//!   rpcs (list, rebuild, switch, drop, verify).
//! - [`partitions`]: a topic's partition count is fixed for the life of a
//!   deployment; a start-up that finds it changed is refused with the
//!   remedy.
//! - `verify.rs`: recomputes a projection from the log into a scratch store
//!   and compares it row by row, using each table's declared position
//!   ([`waymark_runtime::plugin::TableSpec`]) to skip rows live processing
//!   moved on meanwhile.
//!
//! Nothing here names a processor: names, tables and handlers come from
//! the [`Registry`](waymark_runtime::plugin::Registry).
//!
//! [`VersionGate`]: waymark_runtime::catalog::VersionGate

pub mod controller;
pub mod operator;
pub mod partitions;
mod verify;

pub use controller::{
    configured_versions, refresh, track_active, unapplied_floor, Controller, ControllerHandle,
    CATALOG_POLL,
};
pub use operator::PlatformOperator;
