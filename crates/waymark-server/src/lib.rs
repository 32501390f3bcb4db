//! gRPC services Query, Ingest and Admin
