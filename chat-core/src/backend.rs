//! The error every backend role answers with.

/// A backend operation failed; the client gets `unavailable` and may retry.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend is unreachable or refused the operation.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time (the operation may still have taken effect).
    #[error("backend did not answer in time")]
    Timeout,
    /// The backend is shutting down.
    #[error("backend stopped")]
    Stopped,
}
