//! Generated protobuf and gRPC types of waymark.v1
