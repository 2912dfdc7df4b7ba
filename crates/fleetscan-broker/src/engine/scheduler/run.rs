//! One job through its tries: a try queued ([`Scheduler::enqueue`], a [`Ticket`] that withdraws
//! it when dropped), withdrawn or cancelled on its worker, and [`Scheduler::run`], which drives
//! a job through at most `max_tries` tries, each ending with the worker's result, the worker's
//! disconnection, or the try's deadline.
//!
//! Must never: hold the scheduler's lock across an await (every await here is on a try's own
//! channels), or retry without bound.

use std::sync::Arc;
use std::time::Duration;

use fleetscan_core::VerdictKind;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{
    EnqueueError, JobEntry, JobId, JobPayload, JobState, RunOutcome, Scheduler, ToWorker, WorkerId,
    WorkerReport, dispatch,
};

impl Scheduler {
    /// Queues one try of a job. With `require_live`, refuses at once when no worker of the pool
    /// could take it (a retry may instead wait for a worker to come back).
    pub fn enqueue(
        self: &Arc<Self>,
        pool_name: &str,
        payload: Arc<JobPayload>,
        attempt: u32,
        avoid: &[WorkerId],
        require_live: bool,
    ) -> Result<Ticket, EnqueueError> {
        let mut inner = self.inner.lock();
        if require_live
            && !inner
                .pools
                .get(pool_name)
                .is_some_and(|p| p.is_live(&payload.tenant, payload.content.len() as u64))
        {
            return Err(EnqueueError::NoLiveWorker);
        }
        if inner.queued >= self.max_queued {
            return Err(EnqueueError::QueueFull);
        }
        let job_id = self.next_id();
        let (assigned_tx, assigned_rx) = oneshot::channel();
        let (result_tx, result_rx) = oneshot::channel();
        let pool = inner.pools.entry(pool_name.to_owned()).or_default();
        let tenant = payload.tenant.clone();
        if pool.queue.push(&tenant, job_id).is_err() {
            return Err(EnqueueError::QueueFull);
        }
        pool.jobs.insert(
            job_id,
            JobEntry {
                payload,
                attempt,
                avoid: avoid.to_vec(),
                state: JobState::Queued,
                assigned: Some(assigned_tx),
                result: Some(result_tx),
            },
        );
        inner.queued += 1;
        dispatch(&mut inner, pool_name);
        Ok(Ticket {
            scheduler: self.clone(),
            pool: pool_name.to_owned(),
            job_id,
            assigned: assigned_rx,
            result: result_rx,
        })
    }

    /// Withdraws a job try, queued or running; a running one is cancelled on its worker. The
    /// worker's credit for it is not given back (it is the worker's to grant again).
    fn cancel(&self, pool_name: &str, job_id: JobId, reason: &'static str) {
        let mut inner = self.inner.lock();
        let Some(pool) = inner.pools.get_mut(pool_name) else {
            return;
        };
        let Some(job) = pool.jobs.remove(&job_id) else {
            return;
        };
        match job.state {
            JobState::Queued => {
                if pool
                    .queue
                    .remove(&job.payload.tenant, |id| *id == job_id)
                    .is_some()
                {
                    inner.queued -= 1;
                }
            }
            JobState::Running(worker) => {
                if let Some(w) = pool.workers.get_mut(&worker) {
                    w.in_flight.remove(&job_id);
                    // Best effort: a full or closed channel means the worker is going anyway.
                    let _ = w.tx.try_send(ToWorker::Cancel { job_id, reason });
                }
            }
        }
    }

    /// Runs a job to its end: at most `max_tries` tries of at most `job_deadline` each (counted
    /// from the hand-over to a worker). The first try is refused at once when the pool is not
    /// live; later ones wait in the queue for a worker, bounded by the caller's own deadline
    /// (dropping this future withdraws the job).
    pub async fn run(
        self: &Arc<Self>,
        pool: &str,
        payload: Arc<JobPayload>,
        max_tries: u32,
        job_deadline: Duration,
    ) -> RunOutcome {
        let max_tries = max_tries.max(1);
        let mut avoid = Vec::new();
        let mut last_failure = String::new();
        for attempt in 1..=max_tries {
            let mut ticket =
                match self.enqueue(pool, payload.clone(), attempt, &avoid, attempt == 1) {
                    Ok(ticket) => ticket,
                    Err(e) if attempt == 1 => return RunOutcome::Refused(e),
                    Err(e) => return RunOutcome::Failed(format!("retry refused: {e}")),
                };
            let Ok(worker) = (&mut ticket.assigned).await else {
                return RunOutcome::Failed("job withdrawn".into());
            };
            avoid.push(worker);
            match tokio::time::timeout(job_deadline, &mut ticket.result).await {
                Ok(Ok(report)) => {
                    if report.kind == VerdictKind::Error && report.retryable && attempt < max_tries
                    {
                        debug!(sha256 = %payload.sha256, attempt, worker, detail = ?report.detail, "retryable scan error; retrying");
                        continue;
                    }
                    return RunOutcome::Report(report);
                }
                Ok(Err(_)) => {
                    warn!(sha256 = %payload.sha256, attempt, worker, "worker went away during a job; retrying");
                    last_failure = "worker disconnected".into();
                }
                Err(_) => {
                    warn!(sha256 = %payload.sha256, attempt, worker, deadline_ms = job_deadline.as_millis() as u64, "job deadline exceeded; retrying");
                    ticket.cancel_with("job deadline exceeded");
                    last_failure = "job deadline exceeded".into();
                }
            }
        }
        RunOutcome::Failed(format!(
            "no verdict after {max_tries} tries: {last_failure}"
        ))
    }
}

/// One queued or running try; dropping it withdraws the try.
pub struct Ticket {
    scheduler: Arc<Scheduler>,
    pool: String,
    job_id: JobId,
    assigned: oneshot::Receiver<WorkerId>,
    result: oneshot::Receiver<WorkerReport>,
}

impl Ticket {
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    fn cancel_with(&self, reason: &'static str) {
        self.scheduler.cancel(&self.pool, self.job_id, reason);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancel_with("no longer needed");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use fleetscan_core::VerdictKind;

    use super::super::tests::{attach, job_id, payload, report};
    use super::*;

    /// Runs a job of the default pool with `tries` tries of 10 s each, on a task of its own.
    fn spawn_run(s: &Arc<Scheduler>, tries: u32) -> tokio::task::JoinHandle<RunOutcome> {
        let s = s.clone();
        tokio::spawn(async move {
            s.run(
                "default",
                payload("default", b"x"),
                tries,
                Duration::from_secs(10),
            )
            .await
        })
    }

    #[tokio::test]
    async fn a_job_of_a_worker_that_disconnects_is_retried_on_another() {
        let s = Arc::new(Scheduler::default());
        let (w1, mut rx1) = attach(&s, "w1", &["default"]);
        s.grant(w1, 1);
        let run = spawn_run(&s, 3);
        let first = job_id(rx1.recv().await.unwrap());
        let (w2, mut rx2) = attach(&s, "w2", &["default"]);
        s.grant(w2, 1);
        s.detach(w1);
        let ToWorker::Job {
            job_id: second,
            attempt,
            ..
        } = rx2.recv().await.unwrap()
        else {
            panic!("expected the retried job")
        };
        assert_ne!(first, second);
        assert_eq!(attempt, 2);
        s.complete(w2, second, report(VerdictKind::Malicious, false))
            .unwrap();
        assert_eq!(
            run.await.unwrap(),
            RunOutcome::Report(report(VerdictKind::Malicious, false))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tries_are_bounded_and_deadlines_cancel_on_the_worker() {
        let s = Arc::new(Scheduler::default());
        let (w, mut rx) = attach(&s, "w1", &["default"]);
        s.grant(w, 10);
        let run = spawn_run(&s, 3);
        let mut jobs = Vec::new();
        let mut cancels = Vec::new();
        // The hung worker never answers: every try times out and is cancelled.
        while cancels.len() < 3 {
            match rx.recv().await.unwrap() {
                ToWorker::Job { job_id, .. } => jobs.push(job_id),
                ToWorker::Cancel { job_id, .. } => cancels.push(job_id),
            }
        }
        assert_eq!(jobs, cancels);
        let RunOutcome::Failed(why) = run.await.unwrap() else {
            panic!("expected a failure")
        };
        assert!(why.contains("3 tries") && why.contains("deadline"), "{why}");
        assert!(rx.try_recv().is_err(), "no fourth try");
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_then_reported() {
        let s = Arc::new(Scheduler::default());
        let (w, mut rx) = attach(&s, "w1", &["default"]);
        s.grant(w, 10);
        let run = spawn_run(&s, 2);
        for _ in 0..2 {
            let id = job_id(rx.recv().await.unwrap());
            s.complete(w, id, report(VerdictKind::Error, true)).unwrap();
        }
        assert_eq!(
            run.await.unwrap(),
            RunOutcome::Report(report(VerdictKind::Error, true))
        );
        // A non-retryable error is final at once.
        let run = tokio::spawn({
            let s = s.clone();
            async move {
                s.run(
                    "default",
                    payload("default", b"y"),
                    3,
                    Duration::from_secs(10),
                )
                .await
            }
        });
        let id = job_id(rx.recv().await.unwrap());
        s.complete(w, id, report(VerdictKind::Error, false))
            .unwrap();
        assert_eq!(
            run.await.unwrap(),
            RunOutcome::Report(report(VerdictKind::Error, false))
        );
    }
}
