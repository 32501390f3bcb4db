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

/// Most bytes of items one page of a list rpc carries: a page holds
/// `page_size` items or as many as fit in this, whichever is fewer (always
/// at least one), and says where to go on. Half of the 4 MiB most gRPC
/// clients accept by default, so a page of large items never fails them.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// How many of `items` (in page order) make a page within
/// [`MAX_PAGE_BYTES`]: at least one.
pub(crate) fn fit_page<T: prost::Message>(items: &[T]) -> usize {
    let mut bytes = 0usize;
    for (i, item) in items.iter().enumerate() {
        bytes = bytes.saturating_add(prost::Message::encoded_len(item) + 8);
        if bytes > MAX_PAGE_BYTES && i > 0 {
            return i;
        }
    }
    items.len()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(bytes: usize) -> prost_types::Any {
        prost_types::Any {
            type_url: String::new(),
            value: vec![0; bytes],
        }
    }

    #[test]
    fn a_page_holds_what_fits_in_the_byte_budget_and_never_nothing() {
        let mib = 1024 * 1024;
        assert_eq!(fit_page::<prost_types::Any>(&[]), 0);
        assert_eq!(fit_page(&[item(10 * mib)]), 1, "one item always");
        assert_eq!(fit_page(&[item(mib - 100), item(mib - 100), item(10)]), 3);
        assert_eq!(fit_page(&[item(mib), item(mib), item(10)]), 1);
        assert_eq!(fit_page(&vec![item(100); 1000]), 1000);
    }
}
