//! Why a record could not be processed (contract §5).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The value of the `waymark.error` dead-letter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// The value is not JSON (or not UTF-8).
    MalformedJson,
    /// The envelope breaks a rule of contract §2.
    InvalidEnvelope,
    /// `type` is not one of contract §3.
    UnknownType,
    /// `version` is not a known version of that type.
    UnsupportedVersion,
    /// `data` breaks its type's schema.
    InvalidData,
    /// The record is larger than 1 MiB.
    TooLarge,
    /// A processor failed on the record for good (e.g. its person's stored
    /// state cannot be read, or the store refuses the write), and it could
    /// not be parked, or an operator skipped it (see
    /// `waymark_runtime::park`). Never a verdict on the record itself:
    /// `waymark dlq replay` can publish it again once the cause is fixed.
    ProcessingFailed,
}

impl RejectKind {
    /// Every kind input validation produces, in contract order
    /// ([`RejectKind::ProcessingFailed`] is a processor's, not a verdict on
    /// the input).
    pub const ALL: [RejectKind; 6] = [
        RejectKind::MalformedJson,
        RejectKind::InvalidEnvelope,
        RejectKind::UnknownType,
        RejectKind::UnsupportedVersion,
        RejectKind::InvalidData,
        RejectKind::TooLarge,
    ];

    /// The header value, e.g. `malformed_json`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::MalformedJson => "malformed_json",
            RejectKind::InvalidEnvelope => "invalid_envelope",
            RejectKind::UnknownType => "unknown_type",
            RejectKind::UnsupportedVersion => "unsupported_version",
            RejectKind::InvalidData => "invalid_data",
            RejectKind::TooLarge => "too_large",
            RejectKind::ProcessingFailed => "processing_failed",
        }
    }
}

impl fmt::Display for RejectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that is bad input: its kind and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Rejection {
    /// Which rule it broke.
    pub kind: RejectKind,
    /// Lowercase, human-readable reason, e.g. `/data/stage: "" is shorter than 1 character`.
    pub message: String,
}

impl Rejection {
    /// Builds a rejection.
    pub fn new(kind: RejectKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}
