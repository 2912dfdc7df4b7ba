//! The worker's side of `WorkerService.Attach`: connect, register, grant credits, take jobs,
//! answer them, reconnect when the broker goes, drain on shutdown. One session per broker,
//! each in its own task; they share the scan pool (`pool.rs`) and nothing else.
//!
//! This is the only module that speaks protocol types. It must never block the async threads
//! on a scan or a digest (both run on blocking threads), never hold more jobs than it granted
//! credits for, and never buffer more bytes of a job than the job declared or than
//! `max_file_size` allows.

use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use fleetscan_core::{ScannerIdentity, Sha256, now_unix_ms};
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::worker_service_client::WorkerServiceClient;
use fleetscan_proto::v1::{self, WorkerCommand, WorkerMessage};
use fleetscan_proto::{MAX_MESSAGE_SIZE, convert};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep, timeout_at};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::{debug, error, info, warn};

use crate::assembly::{Assembly, Push};
use crate::backoff::Backoff;
use crate::pool::{Done, ScanJob, ScanPool};
use crate::{ScanOutcome, Scanner, WorkerConfig, WorkerError};

/// The timing of the worker's side of the protocol. Operators need not tune it; tests shrink
/// it to exercise timeouts in milliseconds.
#[derive(Clone, Debug)]
pub(crate) struct Timing {
    /// Reconnect delays: quick enough to notice a broker restart at once, capped so a long
    /// outage costs one attempt every few seconds.
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    /// TCP connect plus HTTP/2 handshake.
    pub(crate) connect: Duration,
    /// From opening the stream to `Registered`: a broker that accepts but never answers is as
    /// good as gone.
    pub(crate) register: Duration,
    /// The protocol's heartbeat period and silence limit (worker.proto).
    pub(crate) heartbeat: Duration,
    pub(crate) peer_silence: Duration,
    /// How long shutdown waits for in-flight scans before abandoning them to the broker's
    /// re-queue. Scans outliving this are the broker's job deadline's problem.
    pub(crate) drain: Duration,
    /// After half-closing, how long to wait for the broker to end its side, which tells the
    /// worker that every result it sent was read.
    pub(crate) close: Duration,
    /// The deadline of a job that does not state one (`deadline_ms` 0).
    pub(crate) default_job_deadline: Duration,
    /// Granularity of job deadlines, the silence check and the drain deadline.
    pub(crate) housekeeping: Duration,
}

impl Timing {
    pub(crate) const PROTOCOL: Timing = Timing {
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        connect: Duration::from_secs(5),
        register: Duration::from_secs(10),
        heartbeat: Duration::from_secs(10),
        peer_silence: Duration::from_secs(30),
        drain: Duration::from_secs(30),
        close: Duration::from_secs(2),
        default_job_deadline: Duration::from_secs(30),
        housekeeping: Duration::from_millis(200),
    };
}

/// Attaches, registers, grants credits, scans, reconnects with backoff when the broker goes,
/// drains in-flight jobs on shutdown. Returns Ok(()) after shutdown.
pub async fn run(
    config: WorkerConfig,
    scanner: Arc<dyn Scanner>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    run_with_timing(config, scanner, shutdown, Timing::PROTOCOL).await
}

pub(crate) async fn run_with_timing(
    config: WorkerConfig,
    scanner: Arc<dyn Scanner>,
    shutdown: impl Future<Output = ()> + Send,
    timing: Timing,
) -> Result<(), WorkerError> {
    if config.credits == 0 {
        return Err(WorkerError::Config("credits must be at least 1".to_owned()));
    }
    if config.brokers.is_empty() {
        return Err(WorkerError::Config("no broker address".to_owned()));
    }
    let mut endpoints = Vec::with_capacity(config.brokers.len());
    for (i, broker) in config.brokers.iter().enumerate() {
        if config.brokers[..i].contains(broker) {
            // Two streams to one broker would break the protocol's one stream per broker.
            return Err(WorkerError::Config(format!(
                "broker address {broker:?} given twice"
            )));
        }
        let endpoint = Endpoint::from_shared(broker.clone())
            .map_err(|e| WorkerError::Config(format!("broker address {broker:?}: {e}")))?
            .connect_timeout(timing.connect)
            .tcp_nodelay(true)
            // Room for a few chunks in flight on the one stream that carries every job.
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(STREAM_WINDOW)
            .max_frame_size(MAX_FRAME);
        endpoints.push((broker.clone(), endpoint));
    }
    let identity = scanner.identity();
    let shared = Arc::new(Shared {
        // One pool for the life of `run`, shared by every broker's session: scans abandoned by
        // a lost session keep their slots until they finish, so neither a reconnect nor a
        // second broker ever makes more than `credits` scans run at once.
        pool: ScanPool::new(scanner, config.credits as usize),
        register: v1::Register {
            worker_name: config.worker_name.clone(),
            scanner: Some(v1::ScannerIdentity::from(&identity)),
            pool: config.pool.clone(),
            tenants: config.tenants.clone(),
            max_file_size: config.max_file_size,
            content_types: Vec::new(),
        },
        config,
        identity,
        timing,
    });
    let (stop, stopping) = watch::channel(false);
    let mut brokers = JoinSet::new();
    for (broker, endpoint) in endpoints {
        brokers.spawn(serve_broker(
            Arc::clone(&shared),
            broker,
            endpoint,
            stopping.clone(),
        ));
    }
    let mut shutdown = pin!(shutdown);
    let mut failure = None;
    let mut asked = false;
    loop {
        let ended = tokio::select! {
            () = shutdown.as_mut(), if !asked => {
                asked = true;
                stop.send_replace(true);
                continue;
            }
            ended = brokers.join_next() => ended,
        };
        match ended {
            // Every broker's session is over: after a shutdown, or a refusal.
            None => break,
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(err))) => {
                // A refusal is a configuration error: stop serving the other brokers too, so
                // that the operator sees it rather than a worker half attached.
                if failure.is_none() {
                    stop.send_replace(true);
                    failure = Some(err);
                }
            }
            Some(Err(join)) => {
                if join.is_panic() {
                    std::panic::resume_unwind(join.into_panic());
                }
            }
        }
    }
    match failure {
        Some(err) => Err(err),
        None => {
            info!(worker = %shared.config.worker_name, "worker stopped");
            Ok(())
        }
    }
}

/// Commands already received that one turn of the session handles before it hands the scans
/// they made ready to the pool together (and grants the credits they freed in one message).
const MAX_BATCH: usize = 256;

/// Largest HTTP/2 frame the broker may send the worker: a whole content chunk (1 MiB) and its
/// envelope in one frame rather than 64 frames of the default 16 KiB, each with its own header,
/// flow-control accounting and wake-up.
const MAX_FRAME: u32 = 2 * 1024 * 1024;

/// HTTP/2 receive window of the worker's streams: the broker sends a job's chunks back to
/// back, and the default window (64 KiB) would make it wait for a window update every 64 KiB.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// Serves one broker until shutdown (Ok) or until it refuses the worker (Err): attach, serve,
/// and when the stream is lost, back off and attach again, independently of other brokers.
async fn serve_broker(
    shared: Arc<Shared>,
    broker: String,
    endpoint: Endpoint,
    stopping: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let mut shutdown = pin!(async move {
        let mut stopping = stopping;
        // An error means `run` is gone: stop as well.
        let _ = stopping.wait_for(|stop| *stop).await;
    });
    let mut backoff = Backoff::new(shared.timing.backoff_initial, shared.timing.backoff_max);
    loop {
        match Session::run(&shared, &broker, &endpoint, shutdown.as_mut()).await {
            End::Shutdown => return Ok(()),
            End::Fatal(err) => {
                error!(broker = %broker, error = %err, "broker refused the worker");
                return Err(err);
            }
            End::Lost { registered, reason } => {
                if registered {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                warn!(
                    broker = %broker,
                    reason = %reason,
                    retry_in_ms = delay.as_millis() as u64,
                    "broker connection lost"
                );
                tokio::select! {
                    () = shutdown.as_mut() => return Ok(()),
                    () = sleep(delay) => {}
                }
            }
        }
    }
}

/// What every session of one `run` shares, over all brokers.
struct Shared {
    config: WorkerConfig,
    identity: ScannerIdentity,
    register: v1::Register,
    pool: Arc<ScanPool>,
    timing: Timing,
}

/// How a session ended.
enum End {
    /// Shutdown was asked and the drain is over: `run` returns.
    Shutdown,
    /// Retrying cannot help.
    Fatal(WorkerError),
    /// The broker went or broke the protocol: reconnect.
    Lost { registered: bool, reason: String },
}

fn lost(registered: bool, reason: impl Into<String>) -> End {
    End::Lost {
        registered,
        reason: reason.into(),
    }
}

/// One attached stream and the jobs taken on it.
struct Session<'a> {
    shared: &'a Shared,
    broker: &'a str,
    /// Kept for the life of the session, so the connection under the stream is never torn
    /// down while results are still being sent.
    _client: WorkerServiceClient<Channel>,
    tx: mpsc::Sender<WorkerMessage>,
    assembling: HashMap<u64, Assembly>,
    /// Job id → cancelled, for jobs handed to the scan pool. A cancelled scan still runs to
    /// its end (a blocking scan cannot be interrupted) and still holds its credit until then,
    /// but its result is not sent; one cancelled before its turn is not scanned at all.
    scanning: HashMap<u64, Arc<AtomicBool>>,
    /// Contents complete and verified to be wanted, not yet handed to the pool: they go
    /// together at the end of the session's turn (see `MAX_BATCH`).
    ready: Vec<ScanJob>,
    /// Finished scans, from the pool.
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Credits granted on this stream and not yet used by a job.
    outstanding: u32,
    /// Slots freed since the last grant: granted together once the event that freed them is
    /// handled, one `Credit` for many.
    freed: u32,
    /// Set once shutdown was asked: when the drain gives up.
    drain_deadline: Option<Instant>,
    last_heard: Instant,
}

impl<'a> Session<'a> {
    async fn run<S: Future<Output = ()>>(
        shared: &'a Shared,
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
                self.shared.pool.submit_all(self.ready.drain(..));
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

    fn on_job(&mut self, job: v1::Job) -> Result<(), End> {
        let job_id = job.job_id;
        if self.assembling.contains_key(&job_id) || self.scanning.contains_key(&job_id) {
            warn!(job_id, "broker sent a job id already held; ignored");
            return Ok(());
        }
        if self.drain_deadline.is_some() {
            self.outstanding = self.outstanding.saturating_sub(1);
            return self.send_result(
                job_id,
                &ScanOutcome::error("worker is shutting down", true),
                0,
            );
        }
        if self.outstanding == 0 {
            // The broker broke flow control. Refuse without holding the job, so the bound on
            // held content stays what the worker granted.
            warn!(broker = %self.broker, job_id, "broker sent a job beyond the credits granted");
            return self.send_result(
                job_id,
                &ScanOutcome::error("job beyond the credits granted", true),
                0,
            );
        }
        self.outstanding -= 1;
        let deadline = Instant::now()
            + match job.deadline_ms {
                0 => self.shared.timing.default_job_deadline,
                ms => Duration::from_millis(u64::from(ms)),
            };
        debug!(
            job_id,
            sha256 = %job.sha256,
            size = job.size,
            tenant = %job.tenant,
            attempt = job.attempt,
            path_hint = %job.path_hint,
            "job received"
        );
        match Assembly::start(
            &job.sha256,
            job.size,
            self.shared.config.max_file_size,
            deadline,
        ) {
            Ok(assembly) if assembly.is_empty_content() => {
                let sha256 = assembly.sha256;
                self.start_scan(job_id, sha256, assembly.into_content());
                Ok(())
            }
            Ok(assembly) => {
                self.assembling.insert(job_id, assembly);
                Ok(())
            }
            Err(refusal) => {
                self.send_result(job_id, &refusal, 0)?;
                self.release_slot()
            }
        }
    }

    fn on_chunk(&mut self, chunk: v1::JobChunk) -> Result<(), End> {
        let Some(assembly) = self.assembling.get_mut(&chunk.job_id) else {
            // A chunk of a job cancelled, refused or timed out a moment ago.
            debug!(
                job_id = chunk.job_id,
                "chunk for a job not being received; ignored"
            );
            return Ok(());
        };
        match assembly.push(chunk.offset, chunk.data, chunk.last) {
            Push::More => Ok(()),
            Push::Complete(content) => {
                let sha256 = assembly.sha256;
                self.assembling.remove(&chunk.job_id);
                self.start_scan(chunk.job_id, sha256, content);
                Ok(())
            }
            Push::Refused(refusal) => {
                self.assembling.remove(&chunk.job_id);
                warn!(
                    broker = %self.broker,
                    job_id = chunk.job_id,
                    detail = refusal.detail.as_deref().unwrap_or(""),
                    "job content refused"
                );
                self.send_result(chunk.job_id, &refusal, 0)?;
                self.release_slot()
            }
        }
    }

    fn on_cancel(&mut self, cancel: v1::CancelJob) -> Result<(), End> {
        let job_id = cancel.job_id;
        if self.assembling.remove(&job_id).is_some() {
            debug!(job_id, reason = %cancel.reason, "job cancelled while receiving");
            return self.release_slot();
        }
        if let Some(cancelled) = self.scanning.get(&job_id) {
            debug!(job_id, reason = %cancel.reason, "job cancelled while scanning");
            cancelled.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Readies the content for the scan pool, which verifies and scans it on a blocking thread,
    /// at most `credits` at once over every session of every broker; it is handed over at the
    /// end of the session's turn.
    fn start_scan(&mut self, job_id: u64, expected: Sha256, content: Bytes) {
        let cancelled = Arc::new(AtomicBool::new(false));
        self.scanning.insert(job_id, Arc::clone(&cancelled));
        self.ready.push(ScanJob {
            job_id,
            expected,
            content,
            cancelled,
            done: self.done_tx.clone(),
        });
    }

    /// A scan is over: answer unless cancelled, and free the slot. Takes every other finished
    /// scan already waiting too, so that their slots go back in one grant.
    fn on_done(&mut self, done: Done) -> Result<(), End> {
        self.finish(done)?;
        while let Ok(done) = self.done_rx.try_recv() {
            self.finish(done)?;
        }
        Ok(())
    }

    fn finish(&mut self, done: Done) -> Result<(), End> {
        let Done { job_id, scanned } = done;
        let Some(cancelled) = self.scanning.remove(&job_id) else {
            return Ok(());
        };
        match scanned {
            Some((outcome, scan_micros)) if !cancelled.load(Ordering::Acquire) => {
                debug!(
                    job_id,
                    verdict = outcome.kind.as_str(),
                    scan_micros,
                    "job scanned"
                );
                self.send_result(job_id, &outcome, scan_micros)?;
            }
            _ => debug!(job_id, "cancelled job's slot freed"),
        }
        self.release_slot()
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
    fn release_slot(&mut self) -> Result<(), End> {
        self.freed = self.freed.saturating_add(1);
        Ok(())
    }

    /// Grants the slots freed since the last grant, in one `Credit`.
    fn grant_freed(&mut self) -> Result<(), End> {
        let freed = std::mem::take(&mut self.freed);
        self.grant(freed)
    }

    fn send_result(&mut self, job_id: u64, outcome: &ScanOutcome, micros: u64) -> Result<(), End> {
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

type Attached = (
    WorkerServiceClient<Channel>,
    mpsc::Sender<WorkerMessage>,
    Streaming<WorkerCommand>,
    v1::Registered,
);

/// Connects, opens the stream, registers and waits for `Registered`.
async fn attach(shared: &Shared, endpoint: &Endpoint) -> Result<Attached, End> {
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

#[cfg(test)]
mod tests {
    //! The timeouts of the session, with the timing shrunk to milliseconds. The protocol's
    //! behaviour at its real timing is covered by `tests/run.rs`.

    use std::sync::Mutex;

    use fleetscan_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response};

    use super::*;

    const STEP: Duration = Duration::from_secs(10);

    type Conn = (
        Streaming<WorkerMessage>,
        mpsc::Sender<Result<WorkerCommand, Status>>,
    );

    struct Scripted(mpsc::Sender<Conn>);

    #[tonic::async_trait]
    impl WorkerService for Scripted {
        type AttachStream = ReceiverStream<Result<WorkerCommand, Status>>;

        async fn attach(
            &self,
            request: Request<Streaming<WorkerMessage>>,
        ) -> Result<Response<Self::AttachStream>, Status> {
            let (tx, rx) = mpsc::channel(16);
            self.0
                .send((request.into_inner(), tx))
                .await
                .map_err(|_| Status::unavailable("test over"))?;
            Ok(Response::new(ReceiverStream::new(rx)))
        }
    }

    async fn server() -> (String, mpsc::Receiver<Conn>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(Scripted(tx)))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (url, rx)
    }

    async fn accept(conns: &mut mpsc::Receiver<Conn>) -> Conn {
        tokio::time::timeout(STEP, conns.recv())
            .await
            .expect("no attach in time")
            .expect("server gone")
    }

    async fn recv(conn: &mut Conn) -> Option<Message> {
        match tokio::time::timeout(STEP, conn.0.next()).await {
            Ok(Some(Ok(msg))) => msg.msg,
            Ok(None) => None,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    async fn register(conn: &mut Conn) {
        assert!(matches!(recv(conn).await, Some(Message::Register(_))));
        conn.1
            .send(Ok(WorkerCommand {
                msg: Some(Command::Registered(v1::Registered::default())),
            }))
            .await
            .unwrap();
        assert!(matches!(recv(conn).await, Some(Message::Credit(_))));
    }

    /// Holds every scan until released.
    struct Held(Mutex<std::sync::mpsc::Receiver<()>>);

    impl Scanner for Held {
        fn identity(&self) -> ScannerIdentity {
            ScannerIdentity::default()
        }

        fn scan(&self, _content: &[u8]) -> ScanOutcome {
            let _ = self.0.lock().unwrap().recv();
            ScanOutcome::clean()
        }
    }

    fn fast() -> Timing {
        Timing {
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            connect: Duration::from_secs(2),
            register: Duration::from_millis(300),
            heartbeat: Duration::from_millis(100),
            peer_silence: Duration::from_millis(600),
            drain: Duration::from_millis(300),
            close: Duration::from_millis(200),
            default_job_deadline: Duration::from_secs(5),
            housekeeping: Duration::from_millis(20),
        }
    }

    struct Started {
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), WorkerError>>,
        release: std::sync::mpsc::Sender<()>,
    }

    fn start(url: String) -> Started {
        let (release, held) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let config = WorkerConfig {
            brokers: vec![url],
            credits: 1,
            ..WorkerConfig::default()
        };
        let scanner = Arc::new(Held(Mutex::new(held)));
        let task = tokio::spawn(run_with_timing(
            config,
            scanner,
            async move {
                let _ = stopped.await;
            },
            fast(),
        ));
        Started {
            stop,
            task,
            release,
        }
    }

    #[tokio::test]
    async fn heartbeats_flow_and_a_silent_broker_is_left() {
        let (url, mut conns) = server().await;
        let worker = start(url);
        let mut conn = accept(&mut conns).await;
        register(&mut conn).await;
        let registered = Instant::now();
        let mut beats = 0;
        // The broker stays silent: the worker heartbeats, then gives the stream up.
        while let Some(msg) = recv(&mut conn).await {
            assert!(matches!(msg, Message::Heartbeat(_)), "{msg:?}");
            beats += 1;
        }
        let left_after = registered.elapsed();
        assert!(beats >= 3, "only {beats} heartbeats");
        assert!(
            left_after >= fast().peer_silence,
            "left after {left_after:?}"
        );
        let mut again = accept(&mut conns).await;
        register(&mut again).await;
        worker.task.abort();
    }

    #[tokio::test]
    async fn a_broker_that_heartbeats_is_kept() {
        let (url, mut conns) = server().await;
        let worker = start(url);
        let mut conn = accept(&mut conns).await;
        register(&mut conn).await;
        let beat = WorkerCommand {
            msg: Some(Command::Heartbeat(v1::Heartbeat::default())),
        };
        let until = Instant::now() + fast().peer_silence * 3;
        while Instant::now() < until {
            conn.1.send(Ok(beat.clone())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(conns.try_recv().is_err(), "the worker reattached");
        worker.task.abort();
    }

    #[tokio::test]
    async fn a_broker_that_never_confirms_the_registration_is_left() {
        let (url, mut conns) = server().await;
        let worker = start(url);
        let mut conn = accept(&mut conns).await;
        let opened = Instant::now();
        assert!(matches!(recv(&mut conn).await, Some(Message::Register(_))));
        let mut again = accept(&mut conns).await;
        assert!(opened.elapsed() >= fast().register);
        register(&mut again).await;
        worker.task.abort();
    }

    #[tokio::test]
    async fn the_drain_gives_up_on_a_hung_scan_at_its_timeout() {
        let (url, mut conns) = server().await;
        let worker = start(url);
        let mut conn = accept(&mut conns).await;
        register(&mut conn).await;
        let content = Bytes::from_static(b"hangs");
        for msg in [
            Command::Job(v1::Job {
                job_id: 1,
                sha256: Sha256::of(&content).to_hex(),
                size: content.len() as u64,
                ..v1::Job::default()
            }),
            Command::Chunk(v1::JobChunk {
                job_id: 1,
                offset: 0,
                data: content,
                last: true,
            }),
        ] {
            conn.1
                .send(Ok(WorkerCommand { msg: Some(msg) }))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = Instant::now();
        worker.stop.send(()).unwrap();
        // No result: the scan never ends; the worker closes its side at the drain timeout.
        loop {
            match recv(&mut conn).await {
                Some(Message::Heartbeat(_)) => continue,
                None => break,
                Some(other) => panic!("expected the stream to end, got {other:?}"),
            }
        }
        drop(conn);
        let result = tokio::time::timeout(STEP, worker.task)
            .await
            .unwrap()
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
        let took = asked.elapsed();
        assert!(took >= fast().drain, "drained in {took:?}");
        assert!(took < fast().drain + fast().close + Duration::from_secs(1));
        let _ = worker.release.send(());
    }
}
