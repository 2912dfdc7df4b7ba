//! The broker's errors, and the one place they become gRPC statuses: nothing else in the broker
//! makes a `Status` from an error.

use fleetscan_store::StoreError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The store was not asked: it is marked unavailable, or the call timed out.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The peer broke the protocol (e.g. a stream not starting with its hello).
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let message = e.to_string();
        match e {
            BrokerError::Store(s) if s.is_unavailable() => Status::unavailable(message),
            BrokerError::Store(_) => Status::internal(message),
            BrokerError::Unavailable(_) => Status::unavailable(message),
            BrokerError::InvalidArgument(_) | BrokerError::Protocol(_) => {
                Status::invalid_argument(message)
            }
            BrokerError::Timeout(_) => Status::deadline_exceeded(message),
            BrokerError::Transport(_) | BrokerError::Reflection(_) | BrokerError::Join(_) => {
                Status::internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn errors_map_to_the_right_codes() {
        assert_eq!(
            Status::from(BrokerError::InvalidArgument("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            Status::from(BrokerError::Protocol(
                "first message must be a hello".into()
            ))
            .code(),
            Code::InvalidArgument
        );
        assert_eq!(
            Status::from(BrokerError::Timeout("no hello")).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            Status::from(BrokerError::Unavailable("store call timed out".into())).code(),
            Code::Unavailable
        );
    }
}
