//! Dead letters (contract §5): the original key and value, plus headers
//! saying what was wrong and where the record came from.

use waymark_core::Rejection;

use crate::log::{OutRecord, Record};

/// Header: the rejection kind, e.g. `malformed_json`.
pub const HEADER_ERROR: &str = "waymark.error";
/// Header: human-readable reason.
pub const HEADER_MESSAGE: &str = "waymark.error.message";
/// Header: topic of the original record.
pub const HEADER_TOPIC: &str = "waymark.source.topic";
/// Header: partition of the original record.
pub const HEADER_PARTITION: &str = "waymark.source.partition";
/// Header: offset of the original record.
pub const HEADER_OFFSET: &str = "waymark.source.offset";
/// Header: the processor that rejected it.
pub const HEADER_PROCESSOR: &str = "waymark.processor";
/// Header, only on a dead letter whose value had to be cut to fit the
/// dead-letter topic: the original value's length in bytes (ASCII).
pub const HEADER_TRUNCATED: &str = "waymark.truncated";

/// The dead-letter record for `record` read from `topic`.
pub fn dead_letter(
    dlq_topic: &str,
    topic: &str,
    record: &Record,
    rejection: &Rejection,
    processor: &str,
) -> OutRecord {
    OutRecord {
        topic: dlq_topic.to_owned(),
        partition: None,
        key: record.key.clone(),
        value: record.value.clone().unwrap_or_default(),
        headers: vec![
            (
                HEADER_ERROR.into(),
                rejection.kind.as_str().as_bytes().to_vec(),
            ),
            (HEADER_MESSAGE.into(), rejection.message.as_bytes().to_vec()),
            (HEADER_TOPIC.into(), topic.as_bytes().to_vec()),
            (
                HEADER_PARTITION.into(),
                record.partition.to_string().into_bytes(),
            ),
            (HEADER_OFFSET.into(), record.offset.to_string().into_bytes()),
            (HEADER_PROCESSOR.into(), processor.as_bytes().to_vec()),
        ],
    }
}

/// A dead letter as read back from the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Topic of the original record.
    pub topic: String,
    /// Partition of the original record.
    pub partition: i32,
    /// Offset of the original record.
    pub offset: i64,
    /// Original key.
    pub key: Vec<u8>,
    /// Original value.
    pub value: Vec<u8>,
    /// Rejection kind.
    pub error: String,
    /// Reason.
    pub message: String,
    /// Rejecting processor.
    pub processor: String,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// The original value's length when the value was cut to fit the
    /// dead-letter topic ([`HEADER_TRUNCATED`]).
    pub truncated_from: Option<u64>,
}

impl DeadLetter {
    /// Reads the headers of a dead-letter record.
    pub fn from_record(record: &Record) -> Self {
        let text = |name: &str| {
            record
                .header(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        Self {
            topic: text(HEADER_TOPIC),
            partition: text(HEADER_PARTITION).parse().unwrap_or(-1),
            offset: text(HEADER_OFFSET).parse().unwrap_or(-1),
            key: record.key.clone().unwrap_or_default(),
            value: record.value.clone().unwrap_or_default(),
            error: text(HEADER_ERROR),
            message: text(HEADER_MESSAGE),
            processor: text(HEADER_PROCESSOR),
            timestamp_ms: record.timestamp_ms,
            truncated_from: text(HEADER_TRUNCATED).parse().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_core::RejectKind;

    #[test]
    fn dead_letters_round_trip_through_headers() {
        let record = Record {
            partition: 3,
            offset: 17,
            key: Some(b"web:1".to_vec()),
            value: Some(b"{oops".to_vec()),
            headers: vec![],
            timestamp_ms: 5,
        };
        let rejection = Rejection::new(RejectKind::MalformedJson, "expected value");
        let out = dead_letter(
            "waymark.dlq",
            "waymark.inputs",
            &record,
            &rejection,
            "identity",
        );
        assert_eq!(out.key.as_deref(), Some(&b"web:1"[..]));
        assert_eq!(out.value, b"{oops");
        let read = Record {
            partition: 0,
            offset: 0,
            key: out.key.clone(),
            value: Some(out.value.clone()),
            headers: out.headers.clone(),
            timestamp_ms: 9,
        };
        let dl = DeadLetter::from_record(&read);
        assert_eq!(dl.topic, "waymark.inputs");
        assert_eq!((dl.partition, dl.offset), (3, 17));
        assert_eq!(dl.error, "malformed_json");
        assert_eq!(dl.message, "expected value");
        assert_eq!(dl.processor, "identity");
        assert_eq!(dl.timestamp_ms, 9);
        assert_eq!(dl.truncated_from, None);
    }
}
