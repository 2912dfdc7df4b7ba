//! [`run`]: one task per broker of the configuration, each attaching, serving, and on a lost
//! stream backing off (`fleetscan_core::Backoff`) and attaching again, on its own; shutdown
//! reaches every one of them, and a broker's refusal stops them all.
//!
//! It must never let one broker's troubles delay another's session, and never retry what
//! retrying cannot fix (a refused registration).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use fleetscan_core::Backoff;
use fleetscan_proto::v1;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::sleep;
use tonic::transport::Endpoint;
use tracing::{error, info, warn};

use super::stream::Session;
use super::timing::Timing;
use super::{End, RunContext};
use crate::slots::ScanSlots;
use crate::{Scanner, WorkerConfig, WorkerError};

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
    let shared = Arc::new(RunContext {
        // One set of slots for the life of `run`, shared by every broker's session: scans
        // abandoned by a lost session keep their slots until they finish, so neither a
        // reconnect nor a second broker ever makes more than `credits` scans run at once.
        slots: ScanSlots::new(scanner, config.credits as usize),
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
    shared: Arc<RunContext>,
    broker: String,
    endpoint: Endpoint,
    stopping: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let mut shutdown = pin!(async move {
        let mut stopping = stopping;
        // An error means `run` is gone: stop as well.
        let _ = stopping.wait_for(|stop| *stop).await;
    });
    // Back to the floor once the broker registered the worker again (below), however short
    // the session then was: a registration shows the broker is back.
    let mut backoff = Backoff::new(
        shared.timing.backoff_initial,
        shared.timing.backoff_max,
        Duration::MAX,
    );
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
