//! The processor runtime: log and projection-store seams, batching, offsets, dead letters, shutdown
