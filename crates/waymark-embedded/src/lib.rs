//! The embedded default: a durable log and projection store on redb
