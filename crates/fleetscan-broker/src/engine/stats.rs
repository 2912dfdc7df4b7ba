//! Counters since the broker started. Plain relaxed atomics: they are read only for reports, and
//! incrementing them must cost nothing on the decision path.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Stats {
    pub decisions: AtomicU64,
    pub cache_hits: AtomicU64,
    pub store_hits: AtomicU64,
    /// Store look-ups skipped: the content cannot be in a store this broker owns alone.
    pub store_lookups_skipped: AtomicU64,
    pub scans_started: AtomicU64,
    pub scans_deduplicated: AtomicU64,
    pub denied: AtomicU64,
    pub oversize: AtomicU64,
    pub scan_errors: AtomicU64,
    pub fail_mode_decisions: AtomicU64,
    /// Scans refused because the job queue was full (each also decided by the fail mode).
    pub queue_rejected: AtomicU64,
    /// Reports agents said they dropped while disconnected.
    pub dropped_reports: AtomicU64,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
