//! Conversions shared by the query modules (each processor's own are in
//! its module under `query/`). gRPC types stop at the service.

use chrono::{DateTime, Utc};
use waymark_core::Identity;
use waymark_proto::v1 as pb;

pub(crate) fn timestamp(time: &DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

pub(crate) fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

pub(crate) fn identity(id: &Identity) -> pb::Identity {
    pb::Identity {
        platform: id.platform.clone(),
        platform_id: id.platform_id.clone(),
    }
}
