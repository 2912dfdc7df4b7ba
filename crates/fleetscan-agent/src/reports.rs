//! The queue of accesses the agent decided itself, on their way to the broker.
//!
//! It belongs to the agent, not to a session, so it survives reconnects. It is bounded: when
//! full, a new report is dropped and counted, and the count travels with a later report
//! (`dropped_reports`) so the loss is visible. Allowed accesses decided from the cache are only
//! counted (`allowed_count`). Pushing never blocks and needs no runtime: the reader thread, the
//! deadline thread and the hashing threads all push.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetscan_proto::v1;
use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct ReportQueue {
    queue: Mutex<VecDeque<v1::AccessReport>>,
    capacity: usize,
    allowed: AtomicU64,
    dropped: AtomicU64,
    /// Total ever dropped (for stats; `dropped` is reset when sent).
    dropped_total: AtomicU64,
    ready: Notify,
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
    pub fn push(&self, report: v1::AccessReport) {
        let mut q = self.queue.lock();
        if q.len() >= self.capacity {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
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

    /// Takes up to `max` reports; the first carries the counters accumulated so far. When there
    /// are counters but no report, and `counters_only` is set, a report carrying only the
    /// counters (action unspecified, reason unspecified, no path) is made; the broker records
    /// nothing for it but the counts.
    pub fn take(&self, max: usize, counters_only: bool) -> Vec<v1::AccessReport> {
        let mut out: Vec<_> = {
            let mut q = self.queue.lock();
            let n = q.len().min(max);
            q.drain(..n).collect()
        };
        let allowed = self.allowed.swap(0, Ordering::Relaxed);
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if out.is_empty() && counters_only && (allowed > 0 || dropped > 0) {
            out.push(v1::AccessReport {
                at_unix_ms: fleetscan_core::now_unix_ms(),
                action: v1::Action::Unspecified.into(),
                ..Default::default()
            });
        }
        match out.first_mut() {
            Some(first) => {
                first.allowed_count += allowed;
                first.dropped_reports += dropped;
            }
            None => self.restore_counts(allowed, dropped),
        }
        out
    }

    /// Puts back reports that could not be sent (in front, keeping their order and counters);
    /// those beyond the capacity are dropped and counted.
    pub fn put_back(&self, reports: Vec<v1::AccessReport>) {
        let mut q = self.queue.lock();
        for mut r in reports.into_iter().rev() {
            self.restore_counts(r.allowed_count, r.dropped_reports);
            r.allowed_count = 0;
            r.dropped_reports = 0;
            if r.path.is_empty() && r.reason == 0 {
                // A counters-only report: its counters are restored, nothing else to keep.
                continue;
            }
            if q.len() >= self.capacity {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
            } else {
                q.push_front(r);
            }
        }
    }

    fn restore_counts(&self, allowed: u64, dropped: u64) {
        self.allowed.fetch_add(allowed, Ordering::Relaxed);
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
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
mod tests {
    use super::*;

    fn report(path: &str) -> v1::AccessReport {
        v1::AccessReport {
            path: path.into(),
            action: v1::Action::Deny.into(),
            reason: v1::LocalReason::Cached.into(),
            ..Default::default()
        }
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
        let got = q.take(10, false);
        assert_eq!(
            got.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(got[0].dropped_reports, 1);
        assert_eq!(got[0].allowed_count, 2);
        assert_eq!(got[1].dropped_reports, 0);
        // Counters were sent once: nothing left.
        assert!(q.take(10, true).is_empty());
    }

    #[test]
    fn counters_only_report_when_nothing_else_to_send() {
        let q = ReportQueue::new(2);
        assert!(q.take(10, true).is_empty());
        q.count_allowed();
        assert!(q.take(10, false).is_empty(), "counters kept for later");
        let got = q.take(10, true);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].allowed_count, 1);
        assert!(got[0].path.is_empty());
    }

    #[test]
    fn put_back_keeps_order_and_counters() {
        let q = ReportQueue::new(3);
        q.push(report("a"));
        q.push(report("b"));
        q.count_allowed();
        let got = q.take(10, false);
        q.push(report("c"));
        q.put_back(got);
        let again = q.take(10, false);
        assert_eq!(
            again.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(again[0].allowed_count, 1);
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
