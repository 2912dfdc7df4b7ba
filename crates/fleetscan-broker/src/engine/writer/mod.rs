//! Write-behind persistence of verdicts (the fleet's and tenants' own), access records and host
//! rows.
//!
//! The decision path only ever calls [`WriteBehind::submit`], which never waits: it puts the
//! record in a bounded queue, or — when the queue is full — drops it and counts the loss
//! (`records_lost`, logged). One writer task drains the queue in batches (up to
//! [`MAX_BATCH`] records or [`LINGER`]) into a [`Sink`] (the store). On a store error it keeps
//! the batch and retries with [`Backoff`] (from 50 ms, doubling up to 5 s, jittered, back to
//! the floor once a batch is done with), resuming where the batch stopped, so nothing is lost
//! while the queue has room. On shutdown the queue is closed and drained within a deadline;
//! whatever is left then is counted as lost and logged. Never lose a record silently.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use fleetscan_core::{AccessRecord, Backoff, Verdict, now_unix_ms};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Largest number of records written in one batch (one transaction). A writer that falls behind
/// catches up in large batches: a SQLite file whose keys are random digests takes about twice as
/// many verdicts a second in batches of 10,000 as in batches of 1,000 (each batch rewrites the
/// B-tree pages it touches).
pub const MAX_BATCH: usize = 10_000;
/// How long the writer waits for more records before writing a partial batch.
pub const LINGER: Duration = Duration::from_millis(50);
/// The first wait before a failed batch is tried again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Tries of a batch that fails with a non-retryable error before it is given up (and counted).
const MAX_PERMANENT_FAILURES: u32 = 3;

/// A host's presence, as `Store::host_seen` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSeen {
    pub tenant: String,
    pub node: String,
    pub cluster: String,
    pub agent_version: String,
    pub at_unix_ms: i64,
}

/// One record to persist.
#[derive(Clone, Debug)]
pub enum WriteOp {
    /// A verdict of the fleet (shared and fleet operator's pools).
    Verdict(Arc<Verdict>),
    /// A verdict of `tenant`'s own pool: stored within that tenant's scope only.
    TenantVerdict {
        tenant: String,
        verdict: Arc<Verdict>,
    },
    Access(Box<AccessRecord>),
    HostSeen(HostSeen),
    HostCounts {
        tenant: String,
        node: String,
        allowed: u64,
        denied: u64,
    },
}

/// A failed write, classified so that the writer knows whether waiting may help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// The store is unreachable (connection lost, pool timeout): retry until it is back.
    pub retryable: bool,
    pub message: String,
}

/// Where the writer puts records; the store in production, a fake in tests.
pub trait Sink: Send + Sync + 'static {
    fn host_seen(&self, host: &HostSeen) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// All or nothing, idempotent (a verdict replaces the stored one of its key), the later of
    /// two verdicts of one key wins.
    fn put_verdicts(
        &self,
        verdicts: &[Arc<Verdict>],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// [`Sink::put_verdicts`] within `tenant`'s own scope.
    fn put_tenant_verdicts(
        &self,
        tenant: &str,
        verdicts: &[Arc<Verdict>],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
    fn record_accesses(
        &self,
        records: &[AccessRecord],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
    fn add_host_counts(
        &self,
        tenant: &str,
        node: &str,
        allowed: u64,
        denied: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// What the writer task and the queue's handles both count: records lost, records taken into
/// the batch being written, and when a loss was last logged.
#[derive(Default)]
struct WriterCounters {
    lost: AtomicU64,
    /// Records taken off the queue but not yet written.
    in_batch: AtomicU64,
    last_loss_log_ms: AtomicI64,
}

impl WriterCounters {
    fn lose(&self, n: u64, why: &'static str) {
        if n == 0 {
            return;
        }
        let total = self.lost.fetch_add(n, Ordering::Relaxed) + n;
        // Log at most once a second: a full queue can drop thousands of records a second.
        let now = now_unix_ms();
        let last = self.last_loss_log_ms.load(Ordering::Relaxed);
        if now - last >= 1000
            && self
                .last_loss_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            error!(lost = n, records_lost = total, why, "records lost");
        }
    }
}

/// The submitting side of the write-behind queue. Cheap to clone.
#[derive(Clone)]
pub struct WriteBehind {
    tx: mpsc::Sender<WriteOp>,
    shared: Arc<WriterCounters>,
}

/// The receiving side, until [`spawn_writer`] runs it.
pub struct WriteQueue {
    rx: mpsc::Receiver<WriteOp>,
    shared: Arc<WriterCounters>,
}

/// A write-behind queue of `capacity` records (at least one).
pub fn write_behind(capacity: usize) -> (WriteBehind, WriteQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let shared = Arc::new(WriterCounters::default());
    (
        WriteBehind {
            tx,
            shared: shared.clone(),
        },
        WriteQueue { rx, shared },
    )
}

impl WriteBehind {
    /// Queues a record without waiting. When the queue is full (or closed by shutdown) the record
    /// is dropped, counted in `records_lost` and logged; returns whether it was queued.
    pub fn submit(&self, op: WriteOp) -> bool {
        match self.tx.try_send(op) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.lose(1, "write queue full");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.lose(1, "write queue closed");
                false
            }
        }
    }

    /// Records given up on since start.
    pub fn records_lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// Records waiting to be written: queued plus taken into the current batch.
    pub fn backlog(&self) -> u64 {
        let queued = self.tx.max_capacity() - self.tx.capacity();
        queued as u64 + self.shared.in_batch.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Shutdown: take no new records, write what is queued.
    Draining,
    /// The drain deadline passed: count what is left as lost and stop.
    Abort,
}

/// The running writer task.
pub struct WriterHandle {
    phase: watch::Sender<Phase>,
    task: JoinHandle<()>,
    shared: Arc<WriterCounters>,
}

/// Starts the writer task draining `queue` into `sink`.
pub fn spawn_writer<S: Sink>(queue: WriteQueue, sink: S) -> WriterHandle {
    let (phase, phase_rx) = watch::channel(Phase::Running);
    let shared = queue.shared.clone();
    let writer = Writer {
        rx: queue.rx,
        shared: queue.shared,
        sink,
        phase: phase_rx,
        // Reset by hand once a batch is done with (see `Writer::write`), not by time.
        backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF, Duration::MAX),
    };
    WriterHandle {
        phase,
        task: tokio::spawn(writer.run()),
        shared,
    }
}

impl WriterHandle {
    /// Closes the queue and writes what is in it, for at most `deadline`; what is left then is
    /// counted as lost and logged. Returns the total of records lost since start.
    pub async fn shutdown(mut self, deadline: Duration) -> u64 {
        self.phase.send_replace(Phase::Draining);
        if tokio::time::timeout(deadline, &mut self.task)
            .await
            .is_err()
        {
            warn!(
                deadline_ms = deadline.as_millis() as u64,
                "write-behind queue not drained in time; giving up on the rest"
            );
            self.phase.send_replace(Phase::Abort);
            // The writer notices the abort at its next await; it counts what it drops.
            let _ = (&mut self.task).await;
        }
        let lost = self.shared.lost.load(Ordering::Relaxed);
        info!(records_lost = lost, "write-behind queue closed");
        lost
    }
}

/// Records taken off the queue, merged by kind.
#[derive(Default)]
struct Batch {
    hosts: HashMap<(String, String), HostSeen>,
    host_ops: u64,
    verdicts: Vec<Arc<Verdict>>,
    /// Tenants' own verdicts, by tenant, each in the order it came.
    tenant_verdicts: BTreeMap<String, Vec<Arc<Verdict>>>,
    tenant_verdict_ops: u64,
    accesses: Vec<AccessRecord>,
    counts: HashMap<(String, String), (u64, u64)>,
    count_ops: u64,
}

impl Batch {
    fn add(&mut self, op: WriteOp) {
        match op {
            WriteOp::Verdict(v) => self.verdicts.push(v),
            WriteOp::TenantVerdict { tenant, verdict } => {
                self.tenant_verdict_ops += 1;
                self.tenant_verdicts
                    .entry(tenant)
                    .or_default()
                    .push(verdict);
            }
            WriteOp::Access(a) => self.accesses.push(*a),
            WriteOp::HostSeen(h) => {
                self.host_ops += 1;
                // Only the latest sighting of a host matters.
                self.hosts.insert((h.tenant.clone(), h.node.clone()), h);
            }
            WriteOp::HostCounts {
                tenant,
                node,
                allowed,
                denied,
            } => {
                self.count_ops += 1;
                let c = self.counts.entry((tenant, node)).or_default();
                c.0 += allowed;
                c.1 += denied;
            }
        }
    }

    /// Records not yet written.
    fn pending(&self) -> u64 {
        self.host_ops
            + self.verdicts.len() as u64
            + self.tenant_verdict_ops
            + self.accesses.len() as u64
            + self.count_ops
    }
}

struct Writer<S> {
    rx: mpsc::Receiver<WriteOp>,
    shared: Arc<WriterCounters>,
    sink: S,
    phase: watch::Receiver<Phase>,
    backoff: Backoff,
}

impl<S: Sink> Writer<S> {
    async fn run(mut self) {
        let mut closed = false;
        loop {
            let first = if closed {
                self.rx.recv().await
            } else {
                tokio::select! {
                    op = self.rx.recv() => op,
                    _ = self.phase.wait_for(|p| *p != Phase::Running) => {
                        // New records are refused (and counted) from here on.
                        self.rx.close();
                        closed = true;
                        continue;
                    }
                }
            };
            let Some(first) = first else { break };
            let mut batch = Batch::default();
            batch.add(first);
            // Counted as backlog from the moment it leaves the queue: a record being gathered
            // into a batch is not written yet.
            self.shared
                .in_batch
                .store(batch.pending(), Ordering::Relaxed);
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while batch.pending() < MAX_BATCH as u64 {
                tokio::select! {
                    op = self.rx.recv() => match op {
                        Some(op) => {
                            batch.add(op);
                            self.shared.in_batch.store(batch.pending(), Ordering::Relaxed);
                        }
                        None => break,
                    },
                    _ = &mut linger => break,
                }
            }
            if !self.write(&mut batch).await {
                // Aborted: count the batch's rest and everything still queued as lost.
                self.rx.close();
                let mut left = batch.pending();
                while self.rx.try_recv().is_ok() {
                    left += 1;
                }
                self.shared.in_batch.store(0, Ordering::Relaxed);
                self.shared
                    .lose(left, "shutdown before the store took them");
                return;
            }
        }
    }

    /// Writes the batch, retrying store errors with backoff. Returns false when aborted.
    async fn write(&mut self, batch: &mut Batch) -> bool {
        let done = self.write_until_done(batch).await;
        // The next batch starts from the floor again: only a store that keeps failing backs
        // off further.
        self.backoff.reset();
        done
    }

    async fn write_until_done(&mut self, batch: &mut Batch) -> bool {
        let mut permanent_failures = 0;
        loop {
            self.shared
                .in_batch
                .store(batch.pending(), Ordering::Relaxed);
            let attempt = tokio::select! {
                r = write_batch(&self.sink, batch) => r,
                _ = self.phase.wait_for(|p| *p == Phase::Abort) => return false,
            };
            match attempt {
                Ok(()) => {
                    self.shared.in_batch.store(0, Ordering::Relaxed);
                    debug!("batch written");
                    return true;
                }
                Err(e) if !e.retryable => {
                    permanent_failures += 1;
                    if permanent_failures >= MAX_PERMANENT_FAILURES {
                        error!(error = %e, pending = batch.pending(), "store refused a batch; giving up on it");
                        self.shared.lose(batch.pending(), "store refused the batch");
                        self.shared.in_batch.store(0, Ordering::Relaxed);
                        return true;
                    }
                    warn!(error = %e, pending = batch.pending(), "store write failed; retrying");
                }
                Err(e) => {
                    warn!(error = %e, pending = batch.pending(), "store unavailable; retrying");
                }
            }
            let delay = self.backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.phase.wait_for(|p| *p == Phase::Abort) => return false,
            }
        }
    }
}

/// Writes what is left of the batch, removing each part once the sink took it, so that a retry
/// resumes after the last success (access inserts are not idempotent).
async fn write_batch<S: Sink>(sink: &S, batch: &mut Batch) -> Result<(), SinkError> {
    // Host rows first: counts and accesses refer to them.
    while let Some(key) = batch.hosts.keys().next().cloned() {
        sink.host_seen(&batch.hosts[&key]).await?;
        batch.hosts.remove(&key);
    }
    batch.host_ops = 0;
    // One statement (or a few) for every verdict of the batch: one insert each kept SQLite's
    // writer busy and the queue growing under a high scan rate.
    if !batch.verdicts.is_empty() {
        sink.put_verdicts(&batch.verdicts).await?;
        batch.verdicts.clear();
    }
    // A tenant's verdicts at a time: a retry resumes with the tenants not yet written.
    while let Some(entry) = batch.tenant_verdicts.first_entry() {
        sink.put_tenant_verdicts(entry.key(), entry.get()).await?;
        batch.tenant_verdict_ops -= entry.remove().len() as u64;
    }
    if !batch.accesses.is_empty() {
        sink.record_accesses(&batch.accesses).await?;
        batch.accesses.clear();
    }
    while let Some(key) = batch.counts.keys().next().cloned() {
        let (allowed, denied) = batch.counts[&key];
        sink.add_host_counts(&key.0, &key.1, allowed, denied)
            .await?;
        batch.counts.remove(&key);
    }
    batch.count_ops = 0;
    Ok(())
}

#[cfg(test)]
mod tests;
