//! The kit's own `WorkerService`: it accepts a worker's `Attach`, reads the first message the
//! way the broker does (before answering), and hands the stream to the check being run.
//!
//! It decides nothing: every judgement is the check's. It never holds more than a few attaches
//! (a worker that keeps attaching is refused with RESOURCE_EXHAUSTED) and never buffers more
//! than [`OUTBOUND`] commands per stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleetscan_proto::MAX_MESSAGE_SIZE;
use fleetscan_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use fleetscan_proto::v1::{WorkerCommand, WorkerMessage};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

/// Commands queued towards one worker. A job of 5 MiB is 6 messages; when the worker stops
/// reading, sends block and the check's send timeout ends it.
pub(crate) const OUTBOUND: usize = 16;
/// Attaches waiting for the check to take them; beyond, an attach is refused.
pub(crate) const PENDING_ATTACHES: usize = 4;
/// How long a graceful stop may take before the server task is aborted.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// One attach, its first message read.
pub(crate) struct Attached {
    pub(crate) first: WorkerMessage,
    pub(crate) inbound: Streaming<WorkerMessage>,
    pub(crate) tx: mpsc::Sender<Result<WorkerCommand, Status>>,
}

/// What the service hands to the check.
pub(crate) enum Incoming {
    Attached(Box<Attached>),
    /// The worker opened `Attach` but it ended before a first message arrived.
    Failed(String),
}

struct KitService {
    incoming: mpsc::Sender<Incoming>,
    first_wait: Duration,
    /// Attaches whose first message is still awaited, so that a check can tell "never dialled"
    /// from "dialled and sent nothing".
    opening: Arc<AtomicUsize>,
}

impl KitService {
    fn failed(&self, detail: String) {
        debug!(detail = %detail, "attach failed before its first message");
        // A full queue already holds something for the check to report.
        let _ = self.incoming.try_send(Incoming::Failed(detail));
    }
}

/// Decrements the opening count however the first read ends.
struct Opening(Arc<AtomicUsize>);

impl Drop for Opening {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl WorkerService for KitService {
    type AttachStream = ReceiverStream<Result<WorkerCommand, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        self.opening.fetch_add(1, Ordering::SeqCst);
        let opening = Opening(self.opening.clone());
        // Like the broker: no response (not even headers) until the first message is in.
        let first = tokio::time::timeout(self.first_wait, inbound.message()).await;
        let first = match first {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => {
                self.failed("the worker opened Attach and closed it without a message".into());
                return Err(Status::invalid_argument(
                    "the first message must be a Register",
                ));
            }
            Ok(Err(status)) => {
                self.failed(format!(
                    "the worker's Attach stream failed before its first message: {status}"
                ));
                return Err(status);
            }
            Err(_) => {
                self.failed(silent_attach(self.first_wait));
                return Err(Status::deadline_exceeded("no Register in time"));
            }
        };
        drop(opening);
        let (tx, rx) = mpsc::channel(OUTBOUND);
        let attached = Attached { first, inbound, tx };
        if self
            .incoming
            .try_send(Incoming::Attached(Box::new(attached)))
            .is_err()
        {
            warn!("too many attaches waiting for the check; refused");
            return Err(Status::resource_exhausted(
                "the conformance kit takes one attach at a time",
            ));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Why a worker that opened `Attach` but sent nothing fails.
pub(crate) fn silent_attach(waited: Duration) -> String {
    format!(
        "the worker opened Attach but sent no message within {}: the broker reads the Register \
         before it answers (no response headers until then), so a worker must send it without \
         waiting for them",
        crate::report::human(waited)
    )
}

/// A running kit server.
pub(crate) struct KitServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl KitServer {
    /// Listens on `addr` (port 0 picks one) and serves until [`KitServer::stop`].
    pub(crate) async fn start(
        addr: SocketAddr,
        incoming: mpsc::Sender<Incoming>,
        opening: Arc<AtomicUsize>,
        first_wait: Duration,
    ) -> std::io::Result<(KitServer, SocketAddr)> {
        let socket = TcpSocket::new_v4()?;
        // A restart binds the port again while connections of the old server may linger.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(64)?;
        let local = listener.local_addr()?;
        let service = WorkerServiceServer::new(KitService {
            incoming,
            first_wait,
            opening,
        })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stopped.await;
                }),
        );
        debug!(addr = %local, "kit server listening");
        Ok((KitServer { stop, task }, local))
    }

    /// Stops listening and closes the connections (gracefully when the streams on them are
    /// over, which the caller ensures by dropping its sessions first; else by force).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(STOP_WAIT, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!(error = %e, "kit server ended with an error"),
            Ok(Err(e)) => warn!(error = %e, "kit server task failed"),
            Err(_) => {
                debug!("kit server did not stop gracefully in time; aborted");
                task.abort();
            }
        }
    }
}
