//! What every long-lived stream shares: its first message, which must come in time and be the
//! one expected, and the period of the broker's heartbeats.

use std::time::Duration;

use tonic::{Status, Streaming};

use crate::error::BrokerError;

/// How long a new stream may take to send its first message (an agent's hello, a worker's
/// registration).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the broker sends a heartbeat on an idle stream.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(10);

/// The first message of a stream (agents' and workers' alike), which must come within
/// [`HELLO_TIMEOUT`] and be the one `extract` accepts; anything else ends the stream with an
/// error naming what was expected.
pub async fn first_message<M, T>(
    inbound: &mut Streaming<M>,
    what: &'static str,
    extract: impl FnOnce(M) -> Option<T>,
) -> Result<T, Status> {
    match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Err(_) => Err(BrokerError::Timeout("no first message within 10 s").into()),
        Ok(Err(status)) => Err(status),
        Ok(Ok(message)) => message.and_then(extract).ok_or_else(|| {
            BrokerError::Protocol(format!("the first message must be {what}")).into()
        }),
    }
}
