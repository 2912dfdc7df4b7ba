//! The local verdict cache: decisions keyed by the identity of one version of one file.
//!
//! The key is (device, inode, ctime, mtime, size), times to the nanosecond: rewriting a file
//! changes its ctime, so the new content never hits the old entry. A key is only ever stored
//! for content hashed while the file had no writer (see `hashers.rs`), so the content behind a
//! key is the content of that version, never a write caught half-way. Every entry belongs to
//! one verdict generation (the broker's rule-set epoch); a new generation or a flush empties
//! the cache.
//!
//! Pure code: no I/O, no clock of its own (callers pass `now`), no lock (its owner's).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use fleetscan_core::{Action, Sha256};
use fleetscan_fanotify::FileStat;
use lru::LruCache;

/// The identity of one version of a file on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub size: u64,
}

#[cfg(test)]
impl FileKey {
    /// One file's identity, one version per `ctime_nsec`.
    pub(crate) fn test(ctime_nsec: u32) -> FileKey {
        FileKey {
            dev: 1,
            ino: 2,
            ctime_sec: 3,
            ctime_nsec,
            mtime_sec: 3,
            mtime_nsec: 0,
            size: 4,
        }
    }
}

impl From<&FileStat> for FileKey {
    fn from(st: &FileStat) -> Self {
        FileKey {
            dev: st.dev,
            ino: st.ino,
            ctime_sec: st.ctime_sec,
            ctime_nsec: st.ctime_nsec,
            mtime_sec: st.mtime_sec,
            mtime_nsec: st.mtime_nsec,
            size: st.size,
        }
    }
}

/// A decision the broker said may be reused for the same file identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CachedDecision {
    pub action: Action,
    pub reason: String,
    pub sha256: Option<Sha256>,
    pub threat_name: String,
    /// Whether a kernel ignore mark may stand for this decision (clean, no expiry).
    pub ignorable: bool,
    pub expires: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct VerdictCache {
    /// `None` until the first broker session says which generation is current.
    generation: Option<u64>,
    /// Shared, so that a hit on the hot path costs a reference count, not three strings.
    /// Keyed by the file's identity and the policy scope the decision was made in (see
    /// `scope.rs`; always 0 with a single policy).
    entries: LruCache<(FileKey, u32), Arc<CachedDecision>>,
}

impl VerdictCache {
    pub fn new(capacity: usize) -> Self {
        VerdictCache {
            generation: None,
            entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
        }
    }

    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// A live entry for `key`; expired entries are dropped on the way.
    pub fn get(&mut self, key: &FileKey, scope: u32, now: Instant) -> Option<Arc<CachedDecision>> {
        let k = (*key, scope);
        let hit = self.entries.get(&k)?;
        if hit.expires.is_some_and(|t| t <= now) {
            self.entries.pop(&k);
            return None;
        }
        Some(hit.clone())
    }

    /// Stores a decision made under `generation`; refused (false) when the generation moved on
    /// since the request was made, so a decision from old rules never outlives a flush.
    pub fn insert(
        &mut self,
        key: FileKey,
        scope: u32,
        decision: CachedDecision,
        generation: Option<u64>,
    ) -> bool {
        if generation != self.generation {
            return false;
        }
        self.entries.put((key, scope), Arc::new(decision));
        true
    }

    /// Adopts `generation`; a change empties the cache. Returns whether it changed.
    pub fn set_generation(&mut self, generation: u64) -> bool {
        if self.generation == Some(generation) {
            return false;
        }
        self.generation = Some(generation);
        self.entries.clear();
        true
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(ctime_nsec: u32) -> FileKey {
        FileKey::test(ctime_nsec)
    }

    fn allow() -> CachedDecision {
        CachedDecision {
            action: Action::Allow,
            reason: "clean".into(),
            sha256: None,
            threat_name: String::new(),
            ignorable: true,
            expires: None,
        }
    }

    #[test]
    fn a_new_ctime_misses() {
        let mut c = VerdictCache::new(10);
        c.set_generation(1);
        let now = Instant::now();
        assert!(c.insert(key(0), 0, allow(), Some(1)));
        assert_eq!(c.get(&key(0), 0, now).as_deref(), Some(&allow()));
        assert_eq!(c.get(&key(1), 0, now), None);
    }

    #[test]
    fn generation_change_empties_and_refuses_stale_inserts() {
        let mut c = VerdictCache::new(10);
        c.set_generation(1);
        assert!(c.insert(key(0), 0, allow(), Some(1)));
        assert!(!c.set_generation(1), "same generation keeps entries");
        assert_eq!(c.len(), 1);
        assert!(c.set_generation(2));
        assert_eq!(c.len(), 0);
        assert!(
            !c.insert(key(0), 0, allow(), Some(1)),
            "decided under old rules"
        );
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn expired_entries_are_not_returned() {
        let mut c = VerdictCache::new(10);
        let now = Instant::now();
        let mut d = allow();
        d.expires = Some(now + Duration::from_secs(1));
        assert!(c.insert(key(0), 0, d, None));
        assert!(c.get(&key(0), 0, now).is_some());
        assert!(c.get(&key(0), 0, now + Duration::from_secs(2)).is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_decision_answers_only_its_own_scope() {
        let mut c = VerdictCache::new(10);
        let now = Instant::now();
        assert!(c.insert(key(0), 1, allow(), None));
        assert!(c.get(&key(0), 1, now).is_some());
        assert!(
            c.get(&key(0), 2, now).is_none(),
            "another tenant's or namespace's policy"
        );
        assert!(c.get(&key(0), 0, now).is_none());
    }

    #[test]
    fn capacity_evicts_least_recently_used() {
        let mut c = VerdictCache::new(2);
        let now = Instant::now();
        c.insert(key(0), 0, allow(), None);
        c.insert(key(1), 0, allow(), None);
        c.get(&key(0), 0, now);
        c.insert(key(2), 0, allow(), None);
        assert!(c.get(&key(0), 0, now).is_some());
        assert!(c.get(&key(1), 0, now).is_none());
    }
}
