//! The worker's scan slots: every scan of every broker session runs here, at most `credits`
//! at once in total, on blocking threads.
//!
//! A job ready to scan is queued; a runner (a blocking task) takes jobs off the queue one after
//! the other until it is empty. A runner is started only when no runner is free to look at the
//! queue, and a runner that takes a job while more wait starts the next one (up to `credits`
//! runners): one thread wake for a burst of quick scans, as many runners as slow scans need.
//! Under load a runner goes from one job to the next without a thread hand-off, which matters
//! when scans are quick: waking a thread per job cost more than the scan.
//!
//! It must never run more than `credits` scans at once, never scan content whose SHA-256 is not
//! the job's, and never let a scanner's panic take a runner (and its slot) away. A job whose
//! session is gone or that was cancelled before its turn is not scanned.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use fleetscan_core::Sha256;
use tokio::sync::mpsc;
use tracing::warn;

use crate::{ScanOutcome, Scanner};

/// One job's content, ready to verify and scan.
pub(crate) struct ScanJob {
    pub(crate) job_id: u64,
    pub(crate) expected: Sha256,
    pub(crate) content: Bytes,
    /// Set by the session when the broker cancels the job.
    pub(crate) cancelled: Arc<AtomicBool>,
    /// The session's inbox of finished scans. Unbounded, yet bounded by the session: it holds
    /// at most `credits` jobs, and each job sends exactly one `Done`.
    pub(crate) done: mpsc::UnboundedSender<Done>,
}

/// A job the slots are finished with.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) job_id: u64,
    /// The outcome and the scan time in microseconds; None when the job was not scanned
    /// (cancelled before its turn).
    pub(crate) scanned: Option<(ScanOutcome, u64)>,
}

/// The scan slots every session of one `run` shares. (Not a pool: in fleetscan a pool is a
/// group of workers the broker routes jobs to.)
pub(crate) struct ScanSlots {
    scanner: Arc<dyn Scanner>,
    limit: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<ScanJob>,
    /// Runners started and not yet ended; each scans at most one job at a time.
    runners: usize,
    /// Runners not scanning: started and not yet running, or between two jobs. Each of them
    /// looks at the queue before it ends, so a job queued meanwhile needs no new runner.
    free: usize,
    /// Runners ever started, for tests to see how many a burst cost.
    #[cfg(test)]
    started: usize,
}

impl State {
    /// Counts one more runner when a queued job has no free runner to take it and the limit
    /// allows; the caller starts it.
    fn needs_runner(&mut self, limit: usize) -> bool {
        let start = !self.queue.is_empty() && self.free == 0 && self.runners < limit;
        if start {
            self.runners += 1;
            self.free += 1;
            #[cfg(test)]
            {
                self.started += 1;
            }
        }
        start
    }
}

impl ScanSlots {
    /// Slots for at most `limit` (at least 1) scans at once.
    pub(crate) fn new(scanner: Arc<dyn Scanner>, limit: usize) -> Arc<ScanSlots> {
        Arc::new(ScanSlots {
            scanner,
            limit: limit.max(1),
            state: Mutex::new(State::default()),
        })
    }

    /// Queues a job; it is scanned as soon as a slot is free. Must be called within a tokio
    /// runtime (runners are blocking tasks).
    #[cfg(test)]
    pub(crate) fn submit(self: &Arc<Self>, job: ScanJob) {
        self.submit_all(std::iter::once(job));
    }

    /// Queues jobs, all under one lock and with at most one runner started. Must be called
    /// within a tokio runtime (runners are blocking tasks).
    pub(crate) fn submit_all(self: &Arc<Self>, jobs: impl IntoIterator<Item = ScanJob>) {
        let start_runner = {
            let mut state = self.lock();
            state.queue.extend(jobs);
            state.needs_runner(self.limit)
        };
        if start_runner {
            self.start_runner();
        }
    }

    fn start_runner(self: &Arc<Self>) {
        let slots = Arc::clone(self);
        // Detached: the runner reports through each job's `done` channel.
        drop(tokio::task::spawn_blocking(move || slots.run_queue()));
    }

    /// Scans queued jobs until there are none; the runner count drops under the same lock that
    /// `submit_all` queues under, so a job is never left without a runner.
    fn run_queue(self: Arc<Self>) {
        let mut scanned = false;
        loop {
            let (job, start_another) = {
                let mut state = self.lock();
                if scanned {
                    // Free again, under the same lock as the next look at the queue.
                    state.free += 1;
                }
                match state.queue.pop_front() {
                    Some(job) => {
                        state.free -= 1;
                        // More jobs wait and nobody else is free to take them: another runner
                        // takes the next while this one scans.
                        (job, state.needs_runner(self.limit))
                    }
                    None => {
                        state.runners -= 1;
                        state.free -= 1;
                        return;
                    }
                }
            };
            if start_another {
                self.start_runner();
            }
            self.run_one(job);
            scanned = true;
        }
    }

    fn run_one(&self, job: ScanJob) {
        let ScanJob {
            job_id,
            expected,
            content,
            cancelled,
            done,
        } = job;
        let scanned = if cancelled.load(Ordering::Acquire) || done.is_closed() {
            // Nobody would read the answer: the slot is better spent on a job that matters.
            None
        } else if Sha256::of(&content) != expected {
            Some((ScanOutcome::error("sha256 mismatch", false), 0))
        } else {
            let started = std::time::Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| self.scanner.scan(&content)))
                .unwrap_or_else(|_| {
                    // A panic on hostile input will likely repeat on the next try.
                    warn!(job_id, "scanner panicked");
                    ScanOutcome::error("scanner panicked", false)
                });
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            Some((outcome, micros))
        };
        drop(content);
        // A session that ended meanwhile dropped its inbox: the result has nowhere to go.
        let _ = done.send(Done { job_id, scanned });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding the lock (scans run outside it): never poisoned in
        // practice, and the state stays consistent if it were.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Condvar;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use fleetscan_core::{ScannerIdentity, VerdictKind};

    use super::*;

    /// How long a test waits for scans or runners before it fails rather than hangs.
    const PATIENCE: Duration = Duration::from_secs(30);

    /// Counts scans running at once; panics on "boom". While the gate is held, every scan waits
    /// at it: a test sees the peak of scans at once however slow the machine, not by timing.
    #[derive(Default)]
    struct Counting {
        active: AtomicUsize,
        max_active: AtomicUsize,
        gate: Mutex<Gate>,
        changed: Condvar,
    }

    #[derive(Default)]
    struct Gate {
        held: bool,
        /// Scans waiting at the gate.
        waiting: usize,
    }

    impl Counting {
        /// A scanner whose scans wait until [`Counting::release`].
        fn held() -> Arc<Counting> {
            let scanner = Counting::default();
            scanner.gate.lock().unwrap().held = true;
            Arc::new(scanner)
        }

        /// Blocks until `n` scans wait at the gate; panics after [`PATIENCE`].
        fn wait_for_waiting(&self, n: usize) {
            let gate = self.gate.lock().unwrap();
            let (gate, timeout) = self
                .changed
                .wait_timeout_while(gate, PATIENCE, |g| g.waiting < n)
                .unwrap();
            assert!(
                !timeout.timed_out(),
                "{} scans at the gate after {PATIENCE:?}, expected {n}",
                gate.waiting
            );
        }

        /// Lets every scan through, now and later.
        fn release(&self) {
            self.gate.lock().unwrap().held = false;
            self.changed.notify_all();
        }
    }

    impl Scanner for Counting {
        fn identity(&self) -> ScannerIdentity {
            ScannerIdentity::default()
        }

        fn scan(&self, content: &[u8]) -> ScanOutcome {
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(now, Ordering::SeqCst);
            {
                let mut gate = self.gate.lock().unwrap();
                gate.waiting += 1;
                self.changed.notify_all();
                let mut gate = self.changed.wait_while(gate, |g| g.held).unwrap();
                gate.waiting -= 1;
            }
            self.active.fetch_sub(1, Ordering::SeqCst);
            assert!(content != b"boom", "scanner bug");
            ScanOutcome::clean()
        }
    }

    fn job(
        job_id: u64,
        content: &[u8],
        done: &mpsc::UnboundedSender<Done>,
    ) -> (ScanJob, Arc<AtomicBool>) {
        let cancelled = Arc::new(AtomicBool::new(false));
        let job = ScanJob {
            job_id,
            expected: Sha256::of(content),
            content: Bytes::copy_from_slice(content),
            cancelled: cancelled.clone(),
            done: done.clone(),
        };
        (job, cancelled)
    }

    /// Waits until every runner has ended (a runner ends after sending its last `Done`).
    async fn idle(slots: &ScanSlots) {
        let start = Instant::now();
        loop {
            {
                let state = slots.lock();
                if state.runners == 0 {
                    return;
                }
                assert!(
                    start.elapsed() < PATIENCE,
                    "{} runners still running after {PATIENCE:?}",
                    state.runners
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_scans_at_once_than_the_limit_and_every_job_is_answered() {
        let scanner = Counting::held();
        let slots = ScanSlots::new(scanner.clone(), 3);
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..40 {
            slots.submit(job(i, format!("content {i}").as_bytes(), &tx).0);
        }
        // The first three jobs hold every slot; the other 37 wait in the queue.
        tokio::task::block_in_place(|| scanner.wait_for_waiting(3));
        scanner.release();
        let mut ids = Vec::new();
        for _ in 0..40 {
            let done = rx.recv().await.unwrap();
            assert_eq!(done.scanned.unwrap().0.kind, VerdictKind::Clean);
            ids.push(done.job_id);
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..40).collect::<Vec<_>>());
        assert_eq!(scanner.max_active.load(Ordering::SeqCst), 3);
        // Every runner ended once the queue was empty.
        idle(&slots).await;
        assert_eq!(slots.lock().runners, 0);
    }

    /// A burst handed over at once starts one runner; each runner that takes a job while more
    /// wait starts the next, so slow scans still run `limit` at once, and never more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_starts_runners_one_by_one_up_to_the_limit() {
        let scanner = Counting::held();
        let slots = ScanSlots::new(scanner.clone(), 4);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let burst: Vec<_> = (0..30)
            .map(|i| job(i, format!("burst {i}").as_bytes(), &tx).0)
            .collect();
        slots.submit_all(burst);
        // Held scans keep their runners: the peak of four is reached and stays until release.
        tokio::task::block_in_place(|| scanner.wait_for_waiting(4));
        assert_eq!(scanner.max_active.load(Ordering::SeqCst), 4);
        scanner.release();
        let mut ids = Vec::new();
        for _ in 0..30 {
            ids.push(rx.recv().await.unwrap().job_id);
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..30).collect::<Vec<_>>());
        assert_eq!(scanner.max_active.load(Ordering::SeqCst), 4);
        idle(&slots).await;
        let state = slots.lock();
        assert_eq!((state.runners, state.free), (0, 0));
        // No runner ends while jobs wait, so the whole burst cost exactly `limit` runners.
        assert_eq!(
            state.started, 4,
            "one runner for the burst, then one per runner up to the limit, not one per job"
        );
    }

    #[tokio::test]
    async fn mismatches_panics_and_cancellations_are_answered_without_losing_a_slot() {
        let slots = ScanSlots::new(Arc::new(Counting::default()), 1);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (mut bad, _) = job(1, b"content", &tx);
        bad.expected = Sha256::of(b"other content");
        slots.submit(bad);
        let done = rx.recv().await.unwrap();
        let (outcome, _) = done.scanned.unwrap();
        assert_eq!(outcome.detail.as_deref(), Some("sha256 mismatch"));
        assert!(!outcome.retryable);

        slots.submit(job(2, b"boom", &tx).0);
        let (outcome, _) = rx.recv().await.unwrap().scanned.unwrap();
        assert_eq!(outcome.detail.as_deref(), Some("scanner panicked"));

        let (cancelled, flag) = job(3, b"never scanned", &tx);
        flag.store(true, Ordering::Release);
        slots.submit(cancelled);
        let done = rx.recv().await.unwrap();
        assert_eq!(done.job_id, 3);
        assert!(done.scanned.is_none());

        // The one slot is still there.
        slots.submit(job(4, b"fine", &tx).0);
        let done = rx.recv().await.unwrap();
        assert_eq!(done.job_id, 4);
        assert_eq!(done.scanned.unwrap().0.kind, VerdictKind::Clean);
    }
}
