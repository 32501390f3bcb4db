//! The Kafka edge of Waymark.
//!
//! # Layout
//! - [`frontdoor`]: the Kafka-protocol endpoint of `waymark dev` — an
//!   in-process librdkafka mock cluster plus a bridge into the durable log,
//!   with loss detection.
//!
//! # Guarantees
//! - The front door preserves per-key order: records of one key land in one
//!   door partition, are bridged in offset order, and are re-partitioned by
//!   key with the same partitioner as every other producer.
//! - Any gap between door offsets is detected and reported, never silent.

pub mod frontdoor;

pub use frontdoor::{FrontDoor, FrontDoorError, FrontDoorStatus};
