//! The agent's counters: bumped by every thread without a lock, read as a [`StatsSnapshot`]
//! through a [`Stats`] handle that outlives the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub events: AtomicU64,
    pub own_pid: AtomicU64,
    pub unprotected: AtomicU64,
    /// Accesses their policy does not scan (exec-only opens, exclusions).
    pub skipped: AtomicU64,
    pub cache_hits: AtomicU64,
    pub ignore_marks: AtomicU64,
    pub deadline_expiries: AtomicU64,
    pub no_broker: AtomicU64,
    pub overloaded: AtomicU64,
    pub broker_decisions: AtomicU64,
    pub late_decisions: AtomicU64,
    pub oversize: AtomicU64,
    pub unreadable: AtomicU64,
    pub queue_overflows: AtomicU64,
    pub sessions: AtomicU64,
    pub requests_sent: AtomicU64,
    pub decisions_cached: AtomicU64,
    pub flushes: AtomicU64,
    pub reports_dropped: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A point-in-time copy of the agent's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Permission events from other processes.
    pub events: u64,
    /// The agent's own accesses, allowed first thing (not in `events`).
    pub own_pid: u64,
    /// Allowed at once: outside the protected directories, or not a regular file.
    pub unprotected: u64,
    /// Allowed at once because their policy does not scan them (exec-only opens, exclusions).
    pub skipped: u64,
    pub cache_hits: u64,
    pub ignore_marks: u64,
    /// Answered by the deadline thread with the fail mode.
    pub deadline_expiries: u64,
    /// Answered with the fail mode because no broker session was up (or it was lost).
    pub no_broker: u64,
    /// Answered with the fail mode because too much was pending or queued; also reads that
    /// failed for want of descriptors (the kernel denied at least one access each time).
    pub overloaded: u64,
    pub broker_decisions: u64,
    /// Decisions that came after the event was answered.
    pub late_decisions: u64,
    pub oversize: u64,
    pub unreadable: u64,
    pub queue_overflows: u64,
    /// Broker sessions accepted so far.
    pub sessions: u64,
    pub requests_sent: u64,
    /// Broker decisions stored in the local cache.
    pub decisions_cached: u64,
    /// Cache and ignore-mark flushes (CacheFlush, or a new verdict generation).
    pub flushes: u64,
    pub reports_dropped: u64,
}

/// A handle on the agent's counters; cheap to clone, valid after the agent is gone.
#[derive(Clone, Debug)]
pub struct Stats(pub(crate) Arc<Counters>);

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.0;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            events: g(&c.events),
            own_pid: g(&c.own_pid),
            unprotected: g(&c.unprotected),
            skipped: g(&c.skipped),
            cache_hits: g(&c.cache_hits),
            ignore_marks: g(&c.ignore_marks),
            deadline_expiries: g(&c.deadline_expiries),
            no_broker: g(&c.no_broker),
            overloaded: g(&c.overloaded),
            broker_decisions: g(&c.broker_decisions),
            late_decisions: g(&c.late_decisions),
            oversize: g(&c.oversize),
            unreadable: g(&c.unreadable),
            queue_overflows: g(&c.queue_overflows),
            sessions: g(&c.sessions),
            requests_sent: g(&c.requests_sent),
            decisions_cached: g(&c.decisions_cached),
            flushes: g(&c.flushes),
            reports_dropped: g(&c.reports_dropped),
        }
    }
}
