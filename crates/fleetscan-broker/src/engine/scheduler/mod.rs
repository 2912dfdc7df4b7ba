//! Worker pools and the job scheduler: the bookkeeping of pools, workers, credits and queued or
//! running tries, and the dispatch of queued tries to workers. Driving one job through its
//! tries is [`run`]'s.
//!
//! Workers attach to a pool and grant credits; the scheduler never has more jobs outstanding on a
//! worker than the credits it granted (a finished job does not return its credit). Jobs wait in
//! one bounded [`FairQueue`] per pool, a lane per tenant served round-robin, and go to a worker
//! that serves the job's tenant, has credit, scans with the pool's current identity, and — on a
//! retry — preferably has not tried the job yet.
//!
//! All state sits behind one short mutex that is never held across an await and never does I/O:
//! commands to a worker go through its bounded channel with `try_send`, whose capacity is above
//! the most jobs a worker may hold, so a send only fails when the worker is gone. Must never:
//! send a worker more jobs than it granted credits for, or call back into the engine.

mod run;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use fleetscan_core::{ScannerIdentity, Sha256, VerdictKind};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

pub use self::run::Ticket;
use super::queue::FairQueue;

pub type WorkerId = u64;
pub type JobId = u64;

/// Jobs queued across all pools, at most; beyond, a scan is refused at once (fail mode).
pub const MAX_QUEUED_JOBS: usize = 10_000;
/// Jobs one worker may hold at once, whatever credits it grants: bounds its command channel.
pub const MAX_WORKER_JOBS: u32 = 1024;
/// Capacity of a worker's command channel: every job it may hold plus room for cancellations.
pub const WORKER_CHANNEL: usize = MAX_WORKER_JOBS as usize + 64;

/// What a job scans.
#[derive(Debug)]
pub struct JobPayload {
    pub sha256: Sha256,
    pub tenant: String,
    pub content: Bytes,
    pub path_hint: String,
}

/// A command for a worker's stream.
#[derive(Debug)]
pub enum ToWorker {
    Job {
        job_id: JobId,
        attempt: u32,
        payload: Arc<JobPayload>,
    },
    Cancel {
        job_id: JobId,
        reason: &'static str,
    },
}

/// What a worker answered for one try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerReport {
    pub kind: VerdictKind,
    pub threat_name: Option<String>,
    pub detail: Option<String>,
    pub retryable: bool,
    pub scan_micros: u64,
    /// The identity the verdict was made with.
    pub identity: ScannerIdentity,
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The worker's answer of the last try: conclusive, a non-retryable error, or the retryable
    /// error of the last allowed try.
    Report(WorkerReport),
    /// No answer; the reason says why.
    Failed(String),
    /// The first try was refused at once: no live worker, or the queue is full.
    Refused(EnqueueError),
}

/// A worker as it attaches.
#[derive(Clone, Debug)]
pub struct Attach {
    pub name: String,
    pub identity: ScannerIdentity,
    pub pool: String,
    pub tenants: Vec<String>,
    /// Largest content accepted; 0 means no limit.
    pub max_file_size: u64,
    pub attached_at_unix_ms: i64,
}

/// A worker, for the admin API.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub attach: Attach,
    pub credits: u32,
    pub in_flight: u32,
    pub jobs_done: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    #[error("no live scanner")]
    NoLiveWorker,
    #[error("scan queue full")]
    QueueFull,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("no job {0} outstanding on this worker")]
pub struct UnknownJob(pub JobId);

struct Worker {
    attach: Attach,
    credits: u32,
    /// Whether it ever asked for work: only then does its pool count as live.
    asked_for_work: bool,
    /// Its command channel failed: it is going away.
    broken: bool,
    in_flight: HashSet<JobId>,
    jobs_done: u64,
    tx: mpsc::Sender<ToWorker>,
}

impl Worker {
    fn serves(&self, tenant: &str, size: u64) -> bool {
        self.attach.tenants.iter().any(|t| t == tenant)
            && (self.attach.max_file_size == 0 || size <= self.attach.max_file_size)
    }

    fn can_take(&self) -> bool {
        !self.broken && self.credits > 0 && self.in_flight.len() < MAX_WORKER_JOBS as usize
    }
}

enum JobState {
    Queued,
    Running(WorkerId),
}

struct JobEntry {
    payload: Arc<JobPayload>,
    attempt: u32,
    avoid: Vec<WorkerId>,
    state: JobState,
    assigned: Option<oneshot::Sender<WorkerId>>,
    result: Option<oneshot::Sender<WorkerReport>>,
}

struct Pool {
    workers: BTreeMap<WorkerId, Worker>,
    /// The pool's current scanner identity: only its workers get jobs (during a rolling
    /// upgrade, workers still on the old rules idle). `None` until the broker knows one; then
    /// every worker qualifies.
    current: Option<ScannerIdentity>,
    queue: FairQueue<JobId>,
    jobs: HashMap<JobId, JobEntry>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            workers: BTreeMap::new(),
            current: None,
            // Each pool's queue may hold every job; the global bound is checked in `enqueue`.
            queue: FairQueue::new(MAX_QUEUED_JOBS),
            jobs: HashMap::new(),
        }
    }
}

impl Pool {
    fn is_live(&self, tenant: &str, size: u64) -> bool {
        self.workers
            .values()
            .any(|w| w.asked_for_work && !w.broken && eligible(&self.current, w, tenant, size))
    }
}

/// Whether a worker may take a job of this tenant and size: it serves both and scans with the
/// pool's current identity.
fn eligible(current: &Option<ScannerIdentity>, w: &Worker, tenant: &str, size: u64) -> bool {
    w.serves(tenant, size)
        && current
            .as_ref()
            .is_none_or(|current| *current == w.attach.identity)
}

#[derive(Default)]
struct Inner {
    pools: HashMap<String, Pool>,
    worker_pools: HashMap<WorkerId, String>,
    queued: usize,
}

/// Pools, workers and jobs of one broker.
pub struct Scheduler {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    max_queued: usize,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new(MAX_QUEUED_JOBS)
    }
}

impl Scheduler {
    pub fn new(max_queued: usize) -> Self {
        Scheduler {
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            max_queued,
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a worker to its pool. It takes no job until it grants credits.
    pub fn attach(&self, attach: Attach, tx: mpsc::Sender<ToWorker>) -> WorkerId {
        let id = self.next_id();
        let mut inner = self.inner.lock();
        inner.worker_pools.insert(id, attach.pool.clone());
        let pool = inner.pools.entry(attach.pool.clone()).or_default();
        pool.workers.insert(
            id,
            Worker {
                attach,
                credits: 0,
                asked_for_work: false,
                broken: false,
                in_flight: HashSet::new(),
                jobs_done: 0,
                tx,
            },
        );
        id
    }

    /// Adds credits (capped at [`MAX_WORKER_JOBS`]); the pool goes live with the first.
    pub fn grant(&self, worker: WorkerId, credits: u32) {
        let mut inner = self.inner.lock();
        let Some(name) = inner.worker_pools.get(&worker).cloned() else {
            return;
        };
        let Some(pool) = inner.pools.get_mut(&name) else {
            return;
        };
        if let Some(w) = pool.workers.get_mut(&worker) {
            w.credits = w.credits.saturating_add(credits).min(MAX_WORKER_JOBS);
            w.asked_for_work |= credits > 0;
        }
        dispatch(&mut inner, &name);
    }

    /// Changes the identity a worker's verdicts are made with (it reported new versions).
    pub fn set_identity(&self, worker: WorkerId, identity: ScannerIdentity) {
        let mut inner = self.inner.lock();
        let Some(name) = inner.worker_pools.get(&worker).cloned() else {
            return;
        };
        if let Some(pool) = inner.pools.get_mut(&name)
            && let Some(w) = pool.workers.get_mut(&worker)
        {
            w.attach.identity = identity;
        }
        dispatch(&mut inner, &name);
    }

    /// Sets the pool's current identity: from now on only workers scanning with it get jobs.
    pub fn set_current(&self, pool_name: &str, identity: ScannerIdentity) {
        let mut inner = self.inner.lock();
        inner.pools.entry(pool_name.to_owned()).or_default().current = Some(identity);
        dispatch(&mut inner, pool_name);
    }

    /// Delivers a worker's result for one of its outstanding jobs.
    pub fn complete(
        &self,
        worker: WorkerId,
        job_id: JobId,
        report: WorkerReport,
    ) -> Result<(), UnknownJob> {
        let mut inner = self.inner.lock();
        let pool = inner
            .worker_pools
            .get(&worker)
            .cloned()
            .and_then(|name| inner.pools.get_mut(&name))
            .ok_or(UnknownJob(job_id))?;
        let w = pool.workers.get_mut(&worker).ok_or(UnknownJob(job_id))?;
        if !w.in_flight.remove(&job_id) {
            return Err(UnknownJob(job_id));
        }
        w.jobs_done += 1;
        if let Some(mut job) = pool.jobs.remove(&job_id)
            && let Some(tx) = job.result.take()
        {
            let _ = tx.send(report);
        }
        Ok(())
    }

    /// Removes a worker. Its outstanding jobs end their try as "worker disconnected" (their
    /// runners retry them elsewhere); queued jobs stay queued for the pool's other workers.
    pub fn detach(&self, worker: WorkerId) {
        let mut inner = self.inner.lock();
        let Some(name) = inner.worker_pools.remove(&worker) else {
            return;
        };
        let Some(pool) = inner.pools.get_mut(&name) else {
            return;
        };
        if let Some(w) = pool.workers.remove(&worker) {
            for job in w.in_flight {
                // Dropping the entry drops its result sender: the runner sees the disconnection.
                pool.jobs.remove(&job);
            }
        }
        dispatch(&mut inner, &name);
    }

    /// Whether a worker of the pool that serves the tenant and accepts the size asked for work.
    pub fn is_live(&self, pool: &str, tenant: &str, size: u64) -> bool {
        self.inner
            .lock()
            .pools
            .get(pool)
            .is_some_and(|p| p.is_live(tenant, size))
    }

    /// The attached workers, for the admin API.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let inner = self.inner.lock();
        let mut out: Vec<_> = inner
            .pools
            .values()
            .flat_map(|p| p.workers.values())
            .map(|w| WorkerInfo {
                attach: w.attach.clone(),
                credits: w.credits,
                in_flight: w.in_flight.len() as u32,
                jobs_done: w.jobs_done,
            })
            .collect();
        out.sort_by(|a, b| a.attach.name.cmp(&b.attach.name));
        out
    }

    /// Jobs waiting for a worker, in all pools.
    pub fn queued(&self) -> usize {
        self.inner.lock().queued
    }
}

/// Hands queued jobs to workers with credit until no more can be placed.
fn dispatch(inner: &mut Inner, pool_name: &str) {
    let Some(pool) = inner.pools.get_mut(pool_name) else {
        return;
    };
    loop {
        if pool.queue.is_empty() || !pool.workers.values().any(Worker::can_take) {
            return;
        }
        let (workers, jobs, current) = (&pool.workers, &pool.jobs, &pool.current);
        let Some((tenant, job_id)) = pool.queue.pop_where(|tenant, id| {
            let size = jobs.get(id).map_or(0, |j| j.payload.content.len() as u64);
            workers
                .values()
                .any(|w| w.can_take() && eligible(current, w, tenant, size))
        }) else {
            return;
        };
        let Some(job) = pool.jobs.get_mut(&job_id) else {
            // Withdrawn while queued without being removed: cannot happen, but never wedge.
            inner.queued -= 1;
            continue;
        };
        let size = job.payload.content.len() as u64;
        let chosen = pool
            .workers
            .iter()
            .filter(|(_, w)| w.can_take() && eligible(&pool.current, w, &tenant, size))
            // Prefer a worker that has not tried this job, then the one with most credit.
            .max_by_key(|(id, w)| (!job.avoid.contains(id), w.credits))
            .map(|(id, _)| *id);
        let Some(worker_id) = chosen else {
            pool.queue.push_front(&tenant, job_id);
            return;
        };
        let w = pool
            .workers
            .get_mut(&worker_id)
            .expect("chosen worker exists");
        let command = ToWorker::Job {
            job_id,
            attempt: job.attempt,
            payload: job.payload.clone(),
        };
        if w.tx.try_send(command).is_err() {
            // The worker's stream is gone; its reader will detach it. Keep the job.
            w.broken = true;
            pool.queue.push_front(&tenant, job_id);
            continue;
        }
        w.credits -= 1;
        w.in_flight.insert(job_id);
        job.state = JobState::Running(worker_id);
        if let Some(tx) = job.assigned.take() {
            let _ = tx.send(worker_id);
        }
        inner.queued -= 1;
    }
}

#[cfg(test)]
mod tests;
