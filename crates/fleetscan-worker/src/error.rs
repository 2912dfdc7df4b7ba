//! Errors of the worker loop. Transient failures (broker gone, stream broken) are not errors:
//! `run` retries them with backoff. Only what retrying cannot fix ends `run` with an error;
//! it must never name a transient failure.

/// Why [`crate::run`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration can never work (bad broker address, zero credits).
    #[error("invalid worker config: {0}")]
    Config(String),
    /// The broker refused this worker's registration for a reason that retrying will not fix
    /// (invalid argument, permission denied, unauthenticated, unimplemented).
    #[error("broker refused the registration: {code}: {message}")]
    Rejected { code: String, message: String },
}
