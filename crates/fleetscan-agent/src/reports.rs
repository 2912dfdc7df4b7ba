//! The queue of accesses the agent decided itself, on their way to the broker.
//!
//! It belongs to the agent, not to a session, so it survives reconnects. It is bounded: when
//! full, a new report is dropped and counted, and the count travels with a later batch
//! (`dropped`) so the loss is visible. Allowed accesses decided from the cache are only
//! counted (`allowed`). Pushing never blocks and needs no runtime: the reader thread, the
//! deadline thread and the hashing threads all push.
//!
//! Domain values only: how a batch and its counters travel on the wire is the session's
//! business.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetscan_core::LocalReport;
use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct ReportQueue {
    queue: Mutex<VecDeque<LocalReport>>,
    capacity: usize,
    allowed: AtomicU64,
    dropped: AtomicU64,
    /// Total ever dropped (for stats; `dropped` is reset when taken).
    dropped_total: AtomicU64,
    ready: Notify,
}

/// What [`ReportQueue::take`] hands over: reports, and the counters accumulated since the last
/// batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    pub reports: Vec<LocalReport>,
    /// Allowed accesses not reported one by one.
    pub allowed: u64,
    /// Reports dropped because the queue was full.
    pub dropped: u64,
}

impl ReportQueue {
    pub fn new(capacity: usize) -> Self {
        ReportQueue {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            allowed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
            ready: Notify::new(),
        }
    }

    /// Queues a report, or drops and counts it when the queue is full.
    pub fn push(&self, report: LocalReport) {
        let mut q = self.queue.lock();
        if q.len() >= self.capacity {
            drop(q);
            self.count_dropped();
        } else {
            q.push_back(report);
            drop(q);
        }
        self.ready.notify_one();
    }

    /// Counts an allowed access that is not reported one by one.
    pub fn count_allowed(&self) {
        self.allowed.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves when something was pushed since the last call (a permit is kept if nobody
    /// waits).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Takes up to `max` reports, oldest first, and the counters accumulated so far. A batch
    /// that cannot be sent goes back with [`ReportQueue::put_back`] and
    /// [`ReportQueue::restore_counts`].
    pub fn take(&self, max: usize) -> Batch {
        let reports = {
            let mut q = self.queue.lock();
            let n = q.len().min(max);
            q.drain(..n).collect()
        };
        Batch {
            reports,
            allowed: self.allowed.swap(0, Ordering::Relaxed),
            dropped: self.dropped.swap(0, Ordering::Relaxed),
        }
    }

    /// Puts back reports that could not be sent (in front, keeping their order); those beyond
    /// the capacity are dropped and counted.
    pub fn put_back(&self, reports: Vec<LocalReport>) {
        let mut q = self.queue.lock();
        for r in reports.into_iter().rev() {
            if q.len() >= self.capacity {
                self.count_dropped();
            } else {
                q.push_front(r);
            }
        }
    }

    /// Gives back counters taken with a batch that could not be sent.
    pub fn restore_counts(&self, allowed: u64, dropped: u64) {
        self.allowed.fetch_add(allowed, Ordering::Relaxed);
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
    }

    fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.dropped_total.fetch_add(1, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use fleetscan_core::{AccessKind, Action, LocalReason, Subject};

    use super::*;

    /// A report of a cached denial of `path`.
    pub(crate) fn report(path: &str) -> LocalReport {
        LocalReport {
            at_unix_ms: 0,
            action: Action::Deny,
            reason: LocalReason::Cached,
            sha256: None,
            subject: Subject::default(),
            path: path.into(),
            host_path: String::new(),
            kind: AccessKind::Open,
            threat_name: String::new(),
        }
    }

    fn paths(b: &Batch) -> Vec<&str> {
        b.reports.iter().map(|r| r.path.as_str()).collect()
    }

    #[test]
    fn full_queue_drops_and_counts_then_sends_the_count() {
        let q = ReportQueue::new(2);
        q.push(report("a"));
        q.push(report("b"));
        q.push(report("c"));
        q.count_allowed();
        q.count_allowed();
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped_total(), 1);
        let got = q.take(10);
        assert_eq!(paths(&got), ["a", "b"]);
        assert_eq!((got.allowed, got.dropped), (2, 1));
        // Counters were taken once: nothing left.
        assert_eq!(q.take(10), Batch::default());
    }

    #[test]
    fn counters_wait_for_a_batch_when_there_is_no_report() {
        let q = ReportQueue::new(2);
        assert_eq!(q.take(10), Batch::default());
        q.count_allowed();
        let got = q.take(10);
        assert!(got.reports.is_empty());
        assert_eq!(got.allowed, 1);
        // Not sent: given back, they travel with the next batch.
        q.restore_counts(got.allowed, got.dropped);
        q.push(report("a"));
        let got = q.take(10);
        assert_eq!((paths(&got), got.allowed), (vec!["a"], 1));
    }

    #[test]
    fn put_back_keeps_order_and_counters() {
        let q = ReportQueue::new(3);
        q.push(report("a"));
        q.push(report("b"));
        q.count_allowed();
        let got = q.take(10);
        q.push(report("c"));
        q.put_back(got.reports);
        q.restore_counts(got.allowed, got.dropped);
        let again = q.take(10);
        assert_eq!(paths(&again), ["a", "b", "c"]);
        assert_eq!(again.allowed, 1);
    }

    #[test]
    fn put_back_beyond_the_capacity_drops_and_counts() {
        let q = ReportQueue::new(2);
        q.push(report("a"));
        q.push(report("b"));
        let got = q.take(10);
        q.push(report("c"));
        q.put_back(got.reports);
        assert_eq!(paths(&q.take(10)), ["b", "c"]);
        assert_eq!(q.dropped_total(), 1);
    }

    #[tokio::test]
    async fn push_wakes_a_waiter_registered_later() {
        let q = ReportQueue::new(2);
        q.push(report("a"));
        // The permit is kept until someone waits.
        tokio::time::timeout(std::time::Duration::from_secs(1), q.ready())
            .await
            .unwrap();
    }
}
