//! `WorkerService.Attach`: one stream per scanner worker.
//!
//! The first message must be the Register; the worker then grants credits and gets at most that
//! many jobs (each a `Job` followed by its `JobChunk`s). Results are matched to the worker's own
//! outstanding jobs; a result for any other job id is logged and ignored, an unknown result
//! value is an error verdict (never clean), and neither ends the stream. A worker silent for
//! 30 s is gone: its jobs are retried elsewhere. The pools, credits and jobs are the engine's
//! scheduler's; this module converts and keeps the stream. Must never: let a worker into a pool
//! the tenancy does not route it to, or trust a result for a job it does not hold.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleetscan_core::{ScannerIdentity, now_unix_ms};
use fleetscan_proto::v1::{self, worker_command, worker_message};
use fleetscan_proto::{CHUNK_SIZE, convert};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::engine::Engine;
use crate::engine::scheduler::{Attach, ToWorker, WORKER_CHANNEL, WorkerId, WorkerReport};
use crate::error::BrokerError;
use crate::services::stream::{HEARTBEAT_PERIOD, first_message};
use crate::shutdown::Shutdown;

/// A worker silent for this long is gone (the protocol's heartbeat rule).
pub const WORKER_SILENCE: Duration = Duration::from_secs(30);
/// How often a worker's silence is checked: a worker is detached between 30 and 31 s after its
/// last message.
const SILENCE_CHECK: Duration = Duration::from_secs(1);

pub type AttachStream = Pin<Box<dyn Stream<Item = Result<v1::WorkerCommand, Status>> + Send>>;

pub struct WorkerSvc {
    engine: Arc<Engine>,
    shutdown: Shutdown,
}

impl WorkerSvc {
    pub fn new(engine: Arc<Engine>, shutdown: Shutdown) -> WorkerSvc {
        WorkerSvc { engine, shutdown }
    }
}

#[tonic::async_trait]
impl v1::worker_service_server::WorkerService for WorkerSvc {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let register = first_message(&mut inbound, "a Register", |m| match m.msg {
            Some(worker_message::Msg::Register(register)) => Some(register),
            _ => None,
        })
        .await?;
        let identity: ScannerIdentity = register
            .scanner
            .ok_or_else(|| BrokerError::InvalidArgument("Register without a scanner".into()))?
            .into();
        if identity.scanner.is_empty() {
            return Err(
                BrokerError::InvalidArgument("Register with an empty scanner name".into()).into(),
            );
        }
        // The tenancy places the worker: a tenant's own pool serves that tenant alone, a shared
        // pool the tenants that opted in; a pool or tenant it does not know is refused.
        let route = self
            .engine
            .route_worker(&register.pool, &register.tenants)
            .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        let pool = route.pool.key();
        let tenants = route.tenants;
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel(WORKER_CHANNEL);
        let attach = Attach {
            name: register.worker_name,
            identity: identity.clone(),
            pool: pool.clone(),
            tenants,
            max_file_size: register.max_file_size,
            attached_at_unix_ms: now_unix_ms(),
        };
        info!(worker = %attach.name, pool = %pool, scanner = %identity.scanner, engine = %identity.engine, engine_version = %identity.engine_version, ruleset_version = %identity.ruleset_version, "worker attached");
        // The fleet settles the pool's identity before the worker can ask for work.
        let worker = engine.attach_worker(attach.clone(), tx).await;
        let registered = v1::WorkerCommand {
            msg: Some(worker_command::Msg::Registered(v1::Registered {
                broker_id: engine.config().broker_id.clone(),
                chunk_size: CHUNK_SIZE as u32,
            })),
        };
        let deadline_ms =
            u32::try_from(engine.config().job_deadline.as_millis()).unwrap_or(u32::MAX);
        tokio::spawn(read_loop(
            engine,
            worker,
            attach,
            inbound,
            self.shutdown.clone(),
        ));
        Ok(Response::new(outbound(
            registered,
            rx,
            self.shutdown.clone(),
            deadline_ms,
        )))
    }
}

/// The broker's side: Registered, then jobs with their chunks, cancellations and heartbeats.
/// Ends when the scheduler drops the worker (its reader ended) or the broker stops.
fn outbound(
    registered: v1::WorkerCommand,
    mut rx: mpsc::Receiver<ToWorker>,
    mut shutdown: Shutdown,
    deadline_ms: u32,
) -> AttachStream {
    Box::pin(async_stream::stream! {
        yield Ok(registered);
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + HEARTBEAT_PERIOD, HEARTBEAT_PERIOD);
        loop {
            tokio::select! {
                biased;
                () = shutdown.recv() => break,
                command = rx.recv() => match command {
                    None => break,
                    Some(ToWorker::Cancel { job_id, reason }) => yield Ok(v1::WorkerCommand {
                        msg: Some(worker_command::Msg::Cancel(v1::CancelJob {
                            job_id,
                            reason: reason.into(),
                        })),
                    }),
                    Some(ToWorker::Job { job_id, attempt, payload }) => {
                        yield Ok(v1::WorkerCommand {
                            msg: Some(worker_command::Msg::Job(v1::Job {
                                job_id,
                                sha256: payload.sha256.to_hex(),
                                size: payload.content.len() as u64,
                                tenant: payload.tenant.clone(),
                                deadline_ms,
                                attempt,
                                path_hint: payload.path_hint.clone(),
                            })),
                        });
                        // One chunk even for empty content, so that `last` is always sent.
                        let content = &payload.content;
                        let mut offset = 0;
                        loop {
                            let end = (offset + CHUNK_SIZE).min(content.len());
                            yield Ok(v1::WorkerCommand {
                                msg: Some(worker_command::Msg::Chunk(v1::JobChunk {
                                    job_id,
                                    offset: offset as u64,
                                    // A slice of the content, not a copy.
                                    data: content.slice(offset..end),
                                    last: end == content.len(),
                                })),
                            });
                            offset = end;
                            if offset == content.len() {
                                break;
                            }
                        }
                    }
                },
                _ = heartbeat.tick() => yield Ok(v1::WorkerCommand {
                    msg: Some(worker_command::Msg::Heartbeat(v1::Heartbeat {
                        sent_at_unix_ms: now_unix_ms(),
                    })),
                }),
            }
        }
    })
}

async fn read_loop(
    engine: Arc<Engine>,
    worker: WorkerId,
    attach: Attach,
    mut inbound: Streaming<v1::WorkerMessage>,
    mut shutdown: Shutdown,
) {
    let mut identity = attach.identity.clone();
    // Silence is checked on a coarse timer rather than with a timeout per message: a timer
    // armed and dropped for every message costs more than the message at high job rates.
    let mut last_heard = Instant::now();
    let mut silence = tokio::time::interval(SILENCE_CHECK);
    silence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            biased;
            () = shutdown.recv() => break,
            message = inbound.message() => message,
            _ = silence.tick() => {
                if last_heard.elapsed() >= WORKER_SILENCE {
                    warn!(worker = %attach.name, "worker silent for 30 s; detaching it");
                    break;
                }
                continue;
            }
        };
        let message = match message {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) => {
                debug!(worker = %attach.name, %status, "worker stream failed");
                break;
            }
        };
        last_heard = Instant::now();
        match message.msg {
            Some(worker_message::Msg::Credit(credit)) => {
                engine.grant_credits(worker, credit.credits);
            }
            Some(worker_message::Msg::Result(result)) => {
                let job_id = result.job_id;
                let changed = versions_change(&identity, &result);
                let report = report(&mut identity, result);
                if changed {
                    // The worker's engine or rules changed under it: its verdicts are the pool's
                    // current ones from now on.
                    engine
                        .worker_identity_changed(worker, &attach.pool, &identity)
                        .await;
                }
                if let Err(e) = engine.complete_job(worker, job_id, report) {
                    warn!(worker = %attach.name, job_id, error = %e, "result for an unknown job ignored");
                }
            }
            Some(worker_message::Msg::Register(_)) => {
                warn!(worker = %attach.name, "second Register ignored");
            }
            Some(worker_message::Msg::Heartbeat(_)) | None => {}
        }
    }
    engine.detach_worker(worker);
    info!(worker = %attach.name, pool = %attach.pool, "worker detached");
}

/// Whether the versions a result carries differ from the worker's identity (empty ones mean
/// unchanged).
fn versions_change(identity: &ScannerIdentity, result: &v1::ScanResult) -> bool {
    (!result.engine_version.is_empty() && result.engine_version != identity.engine_version)
        || (!result.ruleset_version.is_empty()
            && result.ruleset_version != identity.ruleset_version)
}

/// The worker's result as a report; empty versions mean those in force for the worker, other
/// ones become the worker's identity from now on.
fn report(identity: &mut ScannerIdentity, result: v1::ScanResult) -> WorkerReport {
    if !result.engine_version.is_empty() {
        identity.engine_version = result.engine_version;
    }
    if !result.ruleset_version.is_empty() {
        identity.ruleset_version = result.ruleset_version;
    }
    let kind = convert::verdict_kind_from_proto(result.result);
    WorkerReport {
        kind,
        threat_name: (!result.threat_name.is_empty()).then_some(result.threat_name),
        detail: if result.detail.is_empty() {
            // An unknown result value from a newer or broken worker is an error: say so.
            (kind == fleetscan_core::VerdictKind::Error
                && v1::VerdictResult::try_from(result.result).is_err())
            .then(|| format!("unknown scan result value {}", result.result))
        } else {
            Some(result.detail)
        },
        retryable: result.retryable,
        scan_micros: result.scan_micros,
        identity: identity.clone(),
    }
}

#[cfg(test)]
mod tests {
    use fleetscan_core::VerdictKind;

    use super::*;

    fn identity() -> ScannerIdentity {
        ScannerIdentity {
            scanner: "reference".into(),
            engine: "yara-x".into(),
            engine_version: "1".into(),
            ruleset_version: "r1".into(),
        }
    }

    #[test]
    fn versions_in_a_result_update_the_identity() {
        let mut id = identity();
        let r = report(
            &mut id,
            v1::ScanResult {
                result: v1::VerdictResult::Clean as i32,
                ruleset_version: "r2".into(),
                ..Default::default()
            },
        );
        assert_eq!(r.identity.ruleset_version, "r2");
        assert_eq!(id.ruleset_version, "r2");
        assert_eq!(id.engine_version, "1", "empty means unchanged");
    }

    #[test]
    fn only_new_non_empty_versions_change_the_identity() {
        let id = identity();
        let result = |engine: &str, ruleset: &str| v1::ScanResult {
            engine_version: engine.into(),
            ruleset_version: ruleset.into(),
            ..Default::default()
        };
        assert!(!versions_change(&id, &result("", "")));
        assert!(!versions_change(&id, &result("1", "r1")));
        assert!(versions_change(&id, &result("", "r2")));
        assert!(versions_change(&id, &result("2", "")));
    }

    #[test]
    fn an_unknown_result_is_an_error_never_clean() {
        let mut id = identity();
        let r = report(
            &mut id,
            v1::ScanResult {
                result: 42,
                ..Default::default()
            },
        );
        assert_eq!(r.kind, VerdictKind::Error);
        assert!(r.detail.unwrap().contains("42"));
    }
}
