//! API errors and their gRPC status codes — the one place where errors
//! become statuses.

use tonic::{Code, Status};
use waymark_runtime::{HandleError, LogError, StoreError};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed (bad UUID, empty id, page size over the max…).
    #[error("{0}")]
    InvalidArgument(String),
    /// The person, identity, journey or course is unknown.
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but does not fit the current state (e.g.
    /// switching to a version that has not caught up).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operation is not available in this process.
    #[error("{0}")]
    Unimplemented(String),
    /// The store cannot be reached.
    #[error("projection store unavailable: {0}")]
    Store(#[from] StoreError),
    /// The log cannot be reached.
    #[error("log unavailable: {0}")]
    Log(#[from] LogError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Unimplemented(_) => Code::Unimplemented,
            // Not the client's doing, and not going away by retrying.
            ApiError::Store(StoreError::Corrupt { .. }) => Code::DataLoss,
            ApiError::Store(_) | ApiError::Log(_) => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

impl From<HandleError> for ApiError {
    /// A handler run by the service itself (`verify`) failed: its store
    /// error, as is.
    fn from(e: HandleError) -> Self {
        match e {
            HandleError::Store(e) => ApiError::Store(e),
            other => ApiError::Store(StoreError::Unavailable(other.to_string())),
        }
    }
}

/// Parses a person id.
pub fn parse_person_id(person_id: &str) -> Result<uuid::Uuid, ApiError> {
    if person_id.is_empty() {
        return Err(ApiError::InvalidArgument("person_id is required".into()));
    }
    uuid::Uuid::parse_str(person_id).map_err(|e| {
        ApiError::InvalidArgument(format!("person_id {person_id:?} is not a uuid: {e}"))
    })
}

/// Checks a required id field (1..128 chars).
pub(crate) fn require_id(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{field} is required")));
    }
    if value.chars().count() > 256 {
        return Err(ApiError::InvalidArgument(format!(
            "{field} is longer than 256 characters"
        )));
    }
    Ok(())
}

/// Default and maximum page sizes (contract §6).
pub(crate) const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size a client may ask for.
pub(crate) const MAX_PAGE_SIZE: usize = 1000;

/// Validates a page size: 0 means the default.
pub(crate) fn page_size(requested: i32) -> Result<usize, ApiError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(ApiError::InvalidArgument(format!(
            "page_size {n} is negative"
        ))),
        n if n as usize > MAX_PAGE_SIZE => Err(ApiError::InvalidArgument(format!(
            "page_size {n} is over the maximum of {MAX_PAGE_SIZE}"
        ))),
        n => Ok(n as usize),
    }
}
