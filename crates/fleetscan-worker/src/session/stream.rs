//! One attached stream ([`Session`]): its event loop over the broker's commands, finished
//! scans, heartbeats and housekeeping; the credits it grants; its drain and close.
//!
//! It must never hold more jobs than it granted credits for, never let a silent broker keep
//! it (the silence limit), and never wait past the drain deadline for scans at shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use fleetscan_core::now_unix_ms;
use fleetscan_proto::convert;
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::worker_service_client::WorkerServiceClient;
use fleetscan_proto::v1::{self, WorkerCommand, WorkerMessage};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval, timeout_at};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};
use tracing::{info, warn};

use super::attach::attach;
use super::{End, RunContext, lost};
use crate::ScanOutcome;
use crate::assembly::Assembly;
use crate::slots::{Done, ScanJob};

/// Commands already received that one turn of the session handles before it hands the scans
/// they made ready to the scan slots together (and grants the credits they freed in one
/// message).
const MAX_BATCH: usize = 256;

/// One attached stream and the jobs taken on it.
pub(super) struct Session<'a> {
    pub(super) shared: &'a RunContext,
    pub(super) broker: &'a str,
    /// Kept for the life of the session, so the connection under the stream is never torn
    /// down while results are still being sent.
    _client: WorkerServiceClient<Channel>,
    tx: mpsc::Sender<WorkerMessage>,
    pub(super) assembling: HashMap<u64, Assembly>,
    /// Job id → cancelled, for jobs handed to the scan slots. A cancelled scan still runs to
    /// its end (a blocking scan cannot be interrupted) and still holds its credit until then,
    /// but its result is not sent; one cancelled before its turn is not scanned at all.
    pub(super) scanning: HashMap<u64, Arc<AtomicBool>>,
    /// Contents complete and verified to be wanted, not yet handed to the slots: they go
    /// together at the end of the session's turn (see `MAX_BATCH`).
    pub(super) ready: Vec<ScanJob>,
    /// Finished scans, from the slots.
    pub(super) done_tx: mpsc::UnboundedSender<Done>,
    pub(super) done_rx: mpsc::UnboundedReceiver<Done>,
    /// Credits granted on this stream and not yet used by a job.
    pub(super) outstanding: u32,
    /// Slots freed since the last grant: granted together once the event that freed them is
    /// handled, one `Credit` for many.
    freed: u32,
    /// Set once shutdown was asked: when the drain gives up.
    pub(super) drain_deadline: Option<Instant>,
    last_heard: Instant,
}

impl<'a> Session<'a> {
    pub(super) async fn run<S: Future<Output = ()>>(
        shared: &'a RunContext,
        broker: &'a str,
        endpoint: &Endpoint,
        mut shutdown: Pin<&mut S>,
    ) -> End {
        let attached = tokio::select! {
            () = shutdown.as_mut() => return End::Shutdown,
            attached = attach(shared, endpoint) => attached,
        };
        let (client, tx, inbound, registered) = match attached {
            Ok(attached) => attached,
            Err(end) => return end,
        };
        info!(
            broker = %broker,
            broker_id = %registered.broker_id,
            scanner = %shared.identity.scanner,
            engine = %shared.identity.engine,
            ruleset_version = %shared.identity.ruleset_version,
            credits = shared.config.credits,
            "worker registered"
        );
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut session = Session {
            shared,
            broker,
            _client: client,
            tx,
            assembling: HashMap::new(),
            scanning: HashMap::new(),
            ready: Vec::new(),
            done_tx,
            done_rx,
            outstanding: 0,
            freed: 0,
            drain_deadline: None,
            last_heard: Instant::now(),
        };
        if let Err(end) = session.grant(shared.config.credits) {
            return end;
        }
        session.serve(inbound, shutdown).await
    }

    async fn serve<S: Future<Output = ()>>(
        mut self,
        mut inbound: Streaming<WorkerCommand>,
        mut shutdown: Pin<&mut S>,
    ) -> End {
        let timing = &self.shared.timing;
        let mut heartbeat = interval(timing.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut housekeeping = interval(timing.housekeeping);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let draining = self.drain_deadline.is_some();
            let step = tokio::select! {
                () = shutdown.as_mut(), if !draining => self.start_drain(),
                msg = inbound.next() => self.on_received(msg),
                Some(done) = self.done_rx.recv() => self.on_done(done),
                _ = heartbeat.tick() => self.send(Message::Heartbeat(v1::Heartbeat {
                    sent_at_unix_ms: now_unix_ms(),
                })),
                _ = housekeeping.tick() => self.housekeeping(),
            };
            let step = match step {
                Ok(()) => self.take_received(&mut inbound).await,
                Err(end) => Err(end),
            };
            if !self.ready.is_empty() {
                self.shared.slots.submit_all(self.ready.drain(..));
            }
            if let Err(end) = step.and_then(|()| self.grant_freed()) {
                return end;
            }
            if self.drain_is_over() {
                return self.close(inbound).await;
            }
        }
    }

    /// Handles the commands that already arrived, without waiting for more: at high job rates
    /// one read from the broker holds many, and their scans are best handed over together.
    async fn take_received(&mut self, inbound: &mut Streaming<WorkerCommand>) -> Result<(), End> {
        for _ in 1..MAX_BATCH {
            // Polled once with the session's own context: when nothing is there, the select
            // in `serve` is woken for the next message as usual.
            let polled =
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *inbound).poll_next(cx))).await;
            match polled {
                Poll::Pending => return Ok(()),
                Poll::Ready(msg) => self.on_received(msg)?,
            }
        }
        Ok(())
    }

    /// Handles one read from the broker's stream: a command, or the end of the session.
    fn on_received(&mut self, msg: Option<Result<WorkerCommand, Status>>) -> Result<(), End> {
        match msg {
            Some(Ok(cmd)) => {
                self.last_heard = Instant::now();
                self.on_command(cmd)
            }
            Some(Err(status)) => Err(lost(true, format!("stream failed: {status}"))),
            // The broker hung up first while draining: results not yet sent are abandoned, and
            // the broker re-queues their jobs.
            None if self.drain_deadline.is_some() => Err(End::Shutdown),
            None => Err(lost(true, "broker closed the stream")),
        }
    }

    fn on_command(&mut self, cmd: WorkerCommand) -> Result<(), End> {
        match cmd.msg {
            Some(Command::Job(job)) => self.on_job(job),
            Some(Command::Chunk(chunk)) => self.on_chunk(chunk),
            Some(Command::Cancel(cancel)) => self.on_cancel(cancel),
            Some(Command::Heartbeat(_)) => Ok(()),
            Some(Command::Registered(_)) => {
                warn!("broker sent registered twice; ignored");
                Ok(())
            }
            // A command of a newer protocol revision: ignore it rather than break the stream.
            None => Ok(()),
        }
    }

    fn housekeeping(&mut self) -> Result<(), End> {
        let silence = self.shared.timing.peer_silence;
        if self.last_heard.elapsed() > silence {
            return Err(lost(
                true,
                format!("broker silent for {} ms", silence.as_millis()),
            ));
        }
        let now = Instant::now();
        let expired: Vec<u64> = self
            .assembling
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for job_id in expired {
            self.assembling.remove(&job_id);
            warn!(broker = %self.broker, job_id, "job content incomplete at its deadline; dropped");
            self.send_result(
                job_id,
                &ScanOutcome::error("content incomplete at the job deadline", true),
                0,
            )?;
            self.release_slot()?;
        }
        Ok(())
    }

    /// Stops granting credits and refuses jobs still being received (the broker can give them
    /// to another worker at once); scans already running go on and are answered.
    fn start_drain(&mut self) -> Result<(), End> {
        info!(
            broker = %self.broker,
            scanning = self.scanning.len(),
            receiving = self.assembling.len(),
            "shutdown asked; draining"
        );
        self.drain_deadline = Some(Instant::now() + self.shared.timing.drain);
        let receiving: Vec<u64> = self.assembling.keys().copied().collect();
        for job_id in receiving {
            self.assembling.remove(&job_id);
            self.send_result(
                job_id,
                &ScanOutcome::error("worker is shutting down", true),
                0,
            )?;
        }
        Ok(())
    }

    fn drain_is_over(&self) -> bool {
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        let answering = self
            .scanning
            .values()
            .any(|cancelled| !cancelled.load(Ordering::Acquire));
        if answering && Instant::now() >= deadline {
            warn!(
                broker = %self.broker,
                abandoned = self.scanning.len(),
                "drain timeout; abandoning scans in flight"
            );
        }
        !answering || Instant::now() >= deadline
    }

    /// Half-closes the stream and waits (briefly) for the broker to end its side, which means
    /// it read every result. Scans still running are abandoned: dropping the join set detaches
    /// them.
    async fn close(self, mut inbound: Streaming<WorkerCommand>) -> End {
        drop(self.tx);
        let until = Instant::now() + self.shared.timing.close;
        loop {
            match timeout_at(until, inbound.next()).await {
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) | Err(_) => return End::Shutdown,
            }
        }
    }

    /// Grants `n` more credits, unless shutting down.
    fn grant(&mut self, n: u32) -> Result<(), End> {
        if self.drain_deadline.is_some() || n == 0 {
            return Ok(());
        }
        self.outstanding = self.outstanding.saturating_add(n);
        self.send(Message::Credit(v1::Credit { credits: n }))
    }

    /// A held job is gone (answered, refused, cancelled or dropped): its slot is free again.
    /// The credit is granted once the current event is handled (see `grant_freed`).
    pub(super) fn release_slot(&mut self) -> Result<(), End> {
        self.freed = self.freed.saturating_add(1);
        Ok(())
    }

    /// Grants the slots freed since the last grant, in one `Credit`.
    fn grant_freed(&mut self) -> Result<(), End> {
        let freed = std::mem::take(&mut self.freed);
        self.grant(freed)
    }

    pub(super) fn send_result(
        &mut self,
        job_id: u64,
        outcome: &ScanOutcome,
        micros: u64,
    ) -> Result<(), End> {
        self.send(Message::Result(v1::ScanResult {
            job_id,
            result: convert::verdict_kind_to_proto(outcome.kind) as i32,
            threat_name: outcome.threat_name.clone().unwrap_or_default(),
            detail: outcome.detail.clone().unwrap_or_default(),
            retryable: outcome.retryable,
            scan_micros: micros,
            // Empty: the versions of the registration.
            engine_version: String::new(),
            ruleset_version: String::new(),
        }))
    }

    /// Queues a message for the broker. The queue holds a few messages per credit; when it is
    /// full the broker has stopped reading, and the session is given up rather than letting
    /// results pile up in memory.
    fn send(&mut self, msg: Message) -> Result<(), End> {
        self.tx
            .try_send(WorkerMessage { msg: Some(msg) })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => {
                    lost(true, "broker is not reading: outbound queue full")
                }
                mpsc::error::TrySendError::Closed(_) => lost(true, "outbound stream closed"),
            })
    }
}
