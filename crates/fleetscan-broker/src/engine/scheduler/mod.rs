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
mod tests {
    use super::*;

    pub(super) fn identity() -> ScannerIdentity {
        ScannerIdentity {
            scanner: "reference".into(),
            engine: "test".into(),
            engine_version: "1".into(),
            ruleset_version: "r1".into(),
        }
    }

    pub(super) fn attach(
        s: &Scheduler,
        name: &str,
        tenants: &[&str],
    ) -> (WorkerId, mpsc::Receiver<ToWorker>) {
        let (tx, rx) = mpsc::channel(WORKER_CHANNEL);
        let id = s.attach(
            Attach {
                name: name.into(),
                identity: identity(),
                pool: "default".into(),
                tenants: tenants.iter().map(|t| (*t).to_owned()).collect(),
                max_file_size: 0,
                attached_at_unix_ms: 0,
            },
            tx,
        );
        (id, rx)
    }

    pub(super) fn payload(tenant: &str, content: &'static [u8]) -> Arc<JobPayload> {
        Arc::new(JobPayload {
            sha256: Sha256::of(content),
            tenant: tenant.into(),
            content: Bytes::from_static(content),
            path_hint: String::new(),
        })
    }

    pub(super) fn report(kind: VerdictKind, retryable: bool) -> WorkerReport {
        WorkerReport {
            kind,
            threat_name: None,
            detail: None,
            retryable,
            scan_micros: 1,
            identity: identity(),
        }
    }

    pub(super) fn job_id(cmd: ToWorker) -> JobId {
        match cmd {
            ToWorker::Job { job_id, .. } => job_id,
            other => panic!("expected a job, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_pool_is_live_only_once_a_worker_asks_for_work() {
        let s = Arc::new(Scheduler::default());
        assert!(!s.is_live("default", "default", 1));
        let (w, _rx) = attach(&s, "w1", &["default"]);
        assert!(!s.is_live("default", "default", 1), "attached is not live");
        assert_eq!(
            s.enqueue("default", payload("default", b"x"), 1, &[], true)
                .err(),
            Some(EnqueueError::NoLiveWorker)
        );
        s.grant(w, 1);
        assert!(s.is_live("default", "default", 1));
        assert!(!s.is_live("default", "other-tenant", 1));
        s.detach(w);
        assert!(!s.is_live("default", "default", 1));
    }

    #[tokio::test]
    async fn no_job_is_sent_without_credit() {
        let s = Arc::new(Scheduler::default());
        let (w, mut rx) = attach(&s, "w1", &["default"]);
        s.grant(w, 2);
        let tickets: Vec<_> = [b"a" as &'static [u8], b"b", b"c"]
            .into_iter()
            .map(|c| {
                s.enqueue("default", payload("default", c), 1, &[], true)
                    .unwrap()
            })
            .collect();
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "third job must wait for credit");
        assert_eq!(s.queued(), 1);
        // Finishing a job does not return its credit.
        s.complete(w, tickets[0].job_id(), report(VerdictKind::Clean, false))
            .unwrap();
        assert!(rx.try_recv().is_err());
        s.grant(w, 1);
        assert_eq!(job_id(rx.try_recv().unwrap()), tickets[2].job_id());
        assert_eq!(s.queued(), 0);
    }

    #[tokio::test]
    async fn unknown_or_foreign_job_ids_are_refused() {
        let s = Arc::new(Scheduler::default());
        let (w1, mut rx1) = attach(&s, "w1", &["default"]);
        let (w2, _rx2) = attach(&s, "w2", &["default"]);
        s.grant(w1, 1);
        let _ticket = s
            .enqueue("default", payload("default", b"x"), 1, &[], true)
            .unwrap();
        let id = job_id(rx1.try_recv().unwrap());
        assert_eq!(
            s.complete(w1, 999_999, report(VerdictKind::Clean, false)),
            Err(UnknownJob(999_999))
        );
        assert_eq!(
            s.complete(w2, id, report(VerdictKind::Clean, false)),
            Err(UnknownJob(id)),
            "a worker cannot answer another worker's job"
        );
        assert!(
            s.complete(w1, id, report(VerdictKind::Clean, false))
                .is_ok()
        );
        assert!(
            s.complete(w1, id, report(VerdictKind::Clean, false))
                .is_err(),
            "a job is answered once"
        );
    }

    #[tokio::test]
    async fn tenants_are_served_round_robin_and_only_by_their_workers() {
        let s = Arc::new(Scheduler::default());
        let (w, mut rx) = attach(&s, "w1", &["a", "b"]);
        let (other, mut other_rx) = attach(&s, "only-c", &["c"]);
        s.grant(other, 5);
        // Make the pool live for a and b without giving credit yet, then queue a burst for a.
        let mut tickets = Vec::new();
        s.grant(w, 0);
        {
            let mut inner = s.inner.lock();
            let pool = inner.pools.get_mut("default").unwrap();
            pool.workers.get_mut(&w).unwrap().asked_for_work = true;
        }
        for c in [b"a1" as &'static [u8], b"a2", b"a3"] {
            tickets.push((
                "a",
                s.enqueue("default", payload("a", c), 1, &[], true).unwrap(),
            ));
        }
        tickets.push((
            "b",
            s.enqueue("default", payload("b", b"b1"), 1, &[], true)
                .unwrap(),
        ));
        assert!(
            other_rx.try_recv().is_err(),
            "tenant c's worker takes no a/b job"
        );
        s.grant(w, 4);
        let order: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|cmd| match cmd {
                ToWorker::Job { payload, .. } => payload.tenant.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(order, vec!["a", "b", "a", "a"]);
    }

    #[tokio::test]
    async fn queue_is_bounded() {
        let s = Arc::new(Scheduler::new(2));
        let (w, _rx) = attach(&s, "w1", &["default"]);
        s.grant(w, 0);
        {
            let mut inner = s.inner.lock();
            let pool = inner.pools.get_mut("default").unwrap();
            pool.workers.get_mut(&w).unwrap().asked_for_work = true;
        }
        let _a = s
            .enqueue("default", payload("default", b"a"), 1, &[], true)
            .unwrap();
        let b = s
            .enqueue("default", payload("default", b"b"), 1, &[], true)
            .unwrap();
        assert_eq!(
            s.enqueue("default", payload("default", b"c"), 1, &[], true)
                .err(),
            Some(EnqueueError::QueueFull)
        );
        drop(b);
        assert_eq!(s.queued(), 1, "a dropped ticket leaves the queue");
        assert!(
            s.enqueue("default", payload("default", b"c"), 1, &[], true)
                .is_ok()
        );
    }
}
