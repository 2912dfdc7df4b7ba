//! One check's world: the kit's server on a loopback port, the worker process dialling it, and
//! the attaches the server hands over. A check can also restart the server on the same port.
//!
//! The harness never judges the worker; it only says why an attach did not happen (the worker
//! exited, never dialled, or dialled and sent nothing) and adds the worker's exit and last
//! output to a failure.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::process::WorkerProcess;
use crate::report::human;
use crate::server::{Incoming, KitServer, PENDING_ATTACHES, silent_attach};
use crate::session::{Fail, Session};
use crate::{ConformanceConfig, ConformanceError};

pub(crate) struct Harness<'c> {
    pub(crate) config: &'c ConformanceConfig,
    addr: SocketAddr,
    server: Option<KitServer>,
    incoming_tx: mpsc::Sender<Incoming>,
    incoming: mpsc::Receiver<Incoming>,
    opening: Arc<AtomicUsize>,
    worker: Option<WorkerProcess>,
    /// Per-run seed for generated contents, varied per content by the caller.
    pub(crate) seed: u64,
}

impl<'c> Harness<'c> {
    /// Listens on 127.0.0.1:0, then starts the worker command against it.
    pub(crate) async fn start(
        config: &'c ConformanceConfig,
        seed: u64,
    ) -> Result<Harness<'c>, ConformanceError> {
        let (incoming_tx, incoming) = mpsc::channel(PENDING_ATTACHES);
        let opening = Arc::new(AtomicUsize::new(0));
        let (server, addr) = KitServer::start(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            incoming_tx.clone(),
            opening.clone(),
            first_wait(config),
        )
        .await
        .map_err(ConformanceError::Listen)?;
        let worker = WorkerProcess::spawn(&config.worker_command, &url(addr))
            .map_err(ConformanceError::Spawn)?;
        Ok(Harness {
            config,
            addr,
            server: Some(server),
            incoming_tx,
            incoming,
            opening,
            worker: Some(worker),
            seed,
        })
    }

    /// The deadline of one wait for the worker to act.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.config.check_timeout
    }

    /// Waits for the worker's next attach (its first message read) for at most `within`.
    pub(crate) async fn accept(&mut self, within: Duration) -> Result<Session, Fail> {
        let until = Instant::now() + within;
        let worker = self.worker.as_mut().expect("worker present until stop");
        let incoming = tokio::select! {
            incoming = self.incoming.recv() => incoming,
            // `explain` adds how it exited and what it printed.
            _ = worker.exited() => return Err("the worker did not attach".into()),
            () = sleep_until(until) => {
                return Err(if self.opening.load(Ordering::SeqCst) > 0 {
                    silent_attach(within)
                } else {
                    format!("the worker did not attach within {}", human(within))
                });
            }
        };
        match incoming {
            Some(Incoming::Attached(attached)) => {
                Session::new(*attached, self.config.check_timeout)
            }
            Some(Incoming::Failed(detail)) => Err(detail),
            None => Err("the kit's server is gone".into()),
        }
    }

    /// Accepts an attach that opens with a Register, confirms it and waits for a credit.
    pub(crate) async fn attach(&mut self, kit_heartbeats: bool) -> Result<Session, Fail> {
        let mut session = self.accept(self.config.check_timeout).await?;
        session.register()?;
        session.establish(self.deadline(), kit_heartbeats).await?;
        Ok(session)
    }

    /// Stops the server (the caller has dropped its sessions, so their streams end), keeps the
    /// port closed for `down`, and listens on the same port again. Returns when it listens.
    pub(crate) async fn restart_server(&mut self, down: Duration) -> Result<Instant, Fail> {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        // Attaches the old server handed over but no check took: their streams end here.
        while self.incoming.try_recv().is_ok() {}
        tokio::time::sleep(down).await;
        let (server, _) = KitServer::start(
            self.addr,
            self.incoming_tx.clone(),
            self.opening.clone(),
            first_wait(self.config),
        )
        .await
        .map_err(|e| format!("the kit could not listen on {} again: {e}", self.addr))?;
        self.server = Some(server);
        Ok(Instant::now())
    }

    /// Adds what the worker process did to a failure: its exit and its last output.
    pub(crate) async fn explain(&mut self, fail: Fail) -> Fail {
        let Some(worker) = self.worker.as_mut() else {
            return fail;
        };
        let Some(how) = worker.has_exited() else {
            return fail;
        };
        worker
            .finish_output(std::time::Duration::from_millis(500))
            .await;
        let tail = worker.output_tail();
        if tail.is_empty() {
            format!("{fail} (the worker process exited: {how}; it printed nothing)")
        } else {
            format!("{fail} (the worker process exited: {how}; its last output: {tail})")
        }
    }

    /// Stops the server, then kills the worker's process group.
    pub(crate) async fn stop(mut self) {
        while self.incoming.try_recv().is_ok() {}
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        if let Some(worker) = self.worker.take() {
            worker.kill().await;
        }
    }
}

/// The kit's URL as the worker dials it.
pub(crate) fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// How long the server waits for an attach's first message: past any accept of a check, so
/// the check's own timeout speaks first.
fn first_wait(config: &ConformanceConfig) -> Duration {
    config.check_timeout.max(config.reconnect_wait) + Duration::from_secs(1)
}
