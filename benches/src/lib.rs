//! Waymark's benchmarks: criterion micro-benchmarks (`benches/benches/`)
//! and the end-to-end harness behind `benches/run` (`src/main.rs`).
//!
//! # Layout
//! - [`mix`]: the deterministic event mix every benchmark uses (raw input
//!   envelopes and their resolved, canonical form).
//! - [`measure`]: CPU time (`getrusage`), latency percentiles, resident
//!   memory of a process.
//! - `src/main.rs` and its modules: the harness binary `waymark-bench`,
//!   one module per scenario (S1–S5 of issue 4, and S6), each measuring its
//!   baseline in the same run.
//!
//! # Guarantees
//! - The mix is a pure function of `(tag, persons, index)`: two runs with
//!   the same parameters produce byte-identical events, so results are
//!   comparable across runs and machines.
//! - Nothing here runs under `cargo test` except the quick unit tests of the
//!   mix; no test asserts on a timing.

pub mod measure;
pub mod mix;
