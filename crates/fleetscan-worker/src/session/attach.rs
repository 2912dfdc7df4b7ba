//! Connecting to a broker and registering: the handshake before a stream carries jobs.
//!
//! It must never wait on the broker without the registration deadline, and never retry a
//! refusal that retrying cannot fix (see [`refused`]).

use fleetscan_proto::MAX_MESSAGE_SIZE;
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::worker_service_client::WorkerServiceClient;
use fleetscan_proto::v1::{self, WorkerCommand, WorkerMessage};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use super::{End, RunContext, lost};
use crate::WorkerError;

pub(super) type Attached = (
    WorkerServiceClient<Channel>,
    mpsc::Sender<WorkerMessage>,
    Streaming<WorkerCommand>,
    v1::Registered,
);

/// Connects, opens the stream, registers and waits for `Registered`.
pub(super) async fn attach(shared: &RunContext, endpoint: &Endpoint) -> Result<Attached, End> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| lost(false, format!("connect failed: {e}")))?;
    let mut client = WorkerServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // Per credit a result and a credit, plus heartbeats and refusals.
    let capacity = (shared.config.credits as usize)
        .saturating_mul(2)
        .saturating_add(16)
        .min(65_536);
    let (tx, rx) = mpsc::channel(capacity);
    tx.try_send(WorkerMessage {
        msg: Some(Message::Register(shared.register.clone())),
    })
    .map_err(|_| lost(false, "outbound stream closed"))?;
    let deadline = Instant::now() + shared.timing.register;
    let response = timeout_at(deadline, client.attach(ReceiverStream::new(rx)))
        .await
        .map_err(|_| lost(false, "broker did not answer the attach in time"))?
        .map_err(refused)?;
    let mut inbound = response.into_inner();
    let first = timeout_at(deadline, inbound.next())
        .await
        .map_err(|_| lost(false, "broker did not confirm the registration in time"))?;
    match first {
        Some(Ok(WorkerCommand {
            msg: Some(Command::Registered(registered)),
        })) => Ok((client, tx, inbound, registered)),
        Some(Ok(other)) => Err(lost(
            false,
            format!("expected registered, broker sent {other:?}"),
        )),
        Some(Err(status)) => Err(refused(status)),
        None => Err(lost(false, "broker closed the stream before registered")),
    }
}

/// Maps a status ending the attach: configuration errors are fatal, the rest is retried.
fn refused(status: Status) -> End {
    match status.code() {
        Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => End::Fatal(WorkerError::Rejected {
            code: format!("{:?}", status.code()),
            message: status.message().to_owned(),
        }),
        _ => lost(false, format!("attach failed: {status}")),
    }
}
