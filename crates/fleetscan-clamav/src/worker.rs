//! [`run_worker`]: a complete clamd worker, re-registered whenever clamd's versions change.
//!
//! The SDK registers a scanner's identity once per [`fleetscan_worker::run`], so a clamd
//! database reload reaches the broker only through a new registration. This loop watches
//! clamd's `VERSION` and, on a change, stops the SDK (which drains the scans in flight and
//! answers them with the old, then still true, versions) and runs it again with a new
//! [`ClamdScanner`]. Between the two, for the length of the drain and one attach, the pool has
//! one worker less; the broker's fail mode covers a pool left with none.
//!
//! This module must never let a failed version check end the worker: clamd may be restarting,
//! and its scans already answer "error, retryable" meanwhile.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetscan_core::Backoff;
use fleetscan_worker::{WorkerConfig, WorkerError};
use tracing::{debug, info, warn};

use crate::client::{ClamdAddr, ClamdError};
use crate::protocol::ClamdVersion;
use crate::scanner::{ClamdOptions, ClamdScanner};

/// Reconnect delays to a clamd that went away during a re-registration (doubling, jittered):
/// quick to notice a restart, capped so an outage costs one attempt every few seconds.
const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Why [`run_worker`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ClamdWorkerError {
    /// clamd could not be reached, or did not speak the protocol, at start.
    #[error("clamd: {0}")]
    Clamd(#[from] ClamdError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// Serves a broker's jobs with clamd until `shutdown` resolves.
///
/// Connects to clamd first and fails at once if it cannot (a wrong path should be seen at
/// start, not as a stream of failed scans). Then runs the SDK's worker with a
/// [`ClamdScanner`]; every `options.version_check_interval` it asks clamd for its version, and
/// when that changed it stops the SDK and starts it again with the new versions, retrying the
/// connect to clamd with backoff if it is restarting. Returns Ok(()) after shutdown.
pub async fn run_worker(
    config: WorkerConfig,
    clamd: ClamdAddr,
    scanner_name: &str,
    options: ClamdOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ClamdWorkerError> {
    let mut shutdown = pin!(shutdown);
    let mut scanner = tokio::select! {
        () = shutdown.as_mut() => return Ok(()),
        connected = connect(clamd.clone(), scanner_name, options.clone()) => connected?,
    };
    loop {
        let scanner_arc = Arc::new(scanner);
        let stop_asked = AtomicBool::new(false);
        let stopped = async {
            tokio::select! {
                () = shutdown.as_mut() => stop_asked.store(true, Ordering::SeqCst),
                new = version_change(&scanner_arc) => info!(
                    clamd = %clamd,
                    from = %scanner_arc.version(),
                    to = %new,
                    "clamd versions changed; registering again"
                ),
            }
        };
        fleetscan_worker::run(config.clone(), scanner_arc.clone(), stopped).await?;
        if stop_asked.load(Ordering::SeqCst) {
            return Ok(());
        }
        scanner = tokio::select! {
            () = shutdown.as_mut() => return Ok(()),
            connected = reconnect(&clamd, scanner_name, &options) => connected,
        };
    }
}

/// Resolves with clamd's new version once it differs from the scanner's; never when the
/// check interval is zero.
async fn version_change(scanner: &Arc<ClamdScanner>) -> ClamdVersion {
    let every = scanner.options().version_check_interval;
    if every.is_zero() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(every).await;
        let asked = Arc::clone(scanner);
        match tokio::task::spawn_blocking(move || asked.changed_version()).await {
            Ok(Ok(Some(new))) => return new,
            Ok(Ok(None)) => {}
            Ok(Err(err)) => {
                debug!(clamd = %scanner.addr(), error = %err, "clamd version check failed")
            }
            Err(err) => warn!(error = %err, "clamd version check task failed"),
        }
    }
}

async fn connect(
    clamd: ClamdAddr,
    scanner_name: &str,
    options: ClamdOptions,
) -> Result<ClamdScanner, ClamdError> {
    let name = scanner_name.to_owned();
    match tokio::task::spawn_blocking(move || ClamdScanner::connect_with(clamd, &name, options))
        .await
    {
        Ok(connected) => connected,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Cancelled: only when the runtime shuts down, which ends this task as well.
        Err(_) => std::future::pending().await,
    }
}

async fn reconnect(clamd: &ClamdAddr, scanner_name: &str, options: &ClamdOptions) -> ClamdScanner {
    // A new backoff per reconnect: it ends at the first connect that works, so nothing resets
    // it by time.
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX, Duration::MAX);
    loop {
        match connect(clamd.clone(), scanner_name, options.clone()).await {
            Ok(scanner) => return scanner,
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(
                    clamd = %clamd,
                    error = %err,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot reach clamd to register again"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}
