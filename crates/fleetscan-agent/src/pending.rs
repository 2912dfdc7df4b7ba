//! Permission events that wait for a decision, by event id.
//!
//! Removal from this map is the exactly-once gate: the reader's fast paths never insert, and
//! every other path (decision, deadline, hashing failure, session loss, shutdown) answers an
//! event only after taking it out with [`PendingMap::take`] or a drain. Whoever gets the entry
//! answers it; everyone else finds nothing. The entry holds the event's descriptor in an `Arc`,
//! so a hashing or upload thread still reading it keeps the descriptor number alive until the
//! answer is written.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use fleetscan_core::{AccessKind, Sha256};
use fleetscan_proto::v1;
use parking_lot::Mutex;

use crate::cache::FileKey;

#[derive(Debug)]
pub(crate) struct PendingEvent {
    pub file: Arc<File>,
    pub key: FileKey,
    /// As the agent sees it (`readlink /proc/self/fd/N`) until `path_resolved`; then as the
    /// opening process sees it.
    pub path: String,
    pub path_resolved: bool,
    /// As the host sees it, where it differs from `path` (known once `path_resolved`).
    pub host_path: String,
    pub kind: AccessKind,
    pub pid: i32,
    pub pidfd: Option<Arc<OwnedFd>>,
    pub deadline: Instant,
    /// The verdict generation when the event arrived; a decision is cached only if it is
    /// still current.
    pub generation: Option<u64>,
    /// The session the access request went out on.
    pub session: Option<u64>,
    pub sha256: Option<Sha256>,
    /// Bytes hashed (the content the broker may ask for).
    pub hashed_len: u64,
    /// Whether the content was hashed under a read lease (no writer before or during), so
    /// that `key` names exactly the hashed content and the decision may be cached and turned
    /// into an ignore mark. False until hashed, and for a file that had a writer.
    pub stable: bool,
    pub subject: Option<v1::Subject>,
    /// The policy scope that decides the access (its fail mode, size limit, cache scope).
    pub scope: Arc<crate::scope::Scope>,
}

/// Why [`PendingMap::assign`] did not assign.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AssignError {
    /// The event was answered meanwhile (deadline).
    Gone,
    /// The session ended before the request could go out.
    SessionDead,
}

#[derive(Debug, Default)]
pub(crate) struct PendingMap {
    map: Mutex<HashMap<u64, PendingEvent>>,
}

impl PendingMap {
    pub fn insert(&self, id: u64, ev: PendingEvent) {
        self.map.lock().insert(id, ev);
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.map.lock().contains_key(&id)
    }

    /// Takes the event out: the caller now owns the answer.
    pub fn take(&self, id: u64) -> Option<PendingEvent> {
        self.map.lock().remove(&id)
    }

    /// Takes the event out only if its request went out on `session` (a decision from another
    /// session's broker is about another request with the same id).
    pub fn take_for_session(&self, id: u64, session: u64) -> Option<PendingEvent> {
        let mut m = self.map.lock();
        match m.get(&id) {
            Some(ev) if ev.session == Some(session) => m.remove(&id),
            _ => None,
        }
    }

    /// Reads from the event while it is pending.
    pub fn with<R>(&self, id: u64, f: impl FnOnce(&mut PendingEvent) -> R) -> Option<R> {
        self.map.lock().get_mut(&id).map(f)
    }

    /// Records that the request goes out on `session`, if the event is still pending and the
    /// session still alive. Checked under the map's lock, which the session's drain also
    /// takes after clearing `alive`: either the drain sees the assignment and answers the
    /// event, or this sees the session dead.
    pub fn assign(&self, id: u64, session: u64, alive: &AtomicBool) -> Result<(), AssignError> {
        let mut m = self.map.lock();
        let ev = m.get_mut(&id).ok_or(AssignError::Gone)?;
        if !alive.load(Ordering::SeqCst) {
            return Err(AssignError::SessionDead);
        }
        ev.session = Some(session);
        Ok(())
    }

    /// Takes every event whose request went out on `session`.
    pub fn drain_session(&self, session: u64) -> Vec<(u64, PendingEvent)> {
        let mut m = self.map.lock();
        let ids: Vec<u64> = m
            .iter()
            .filter(|(_, ev)| ev.session == Some(session))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| m.remove(&id).map(|ev| (id, ev)))
            .collect()
    }

    /// Takes every event.
    pub fn drain_all(&self) -> Vec<(u64, PendingEvent)> {
        self.map.lock().drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> PendingEvent {
        PendingEvent {
            file: Arc::new(tempfile_like()),
            key: FileKey {
                dev: 0,
                ino: 0,
                ctime_sec: 0,
                ctime_nsec: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
                size: 0,
            },
            path: String::new(),
            path_resolved: false,
            host_path: String::new(),
            kind: AccessKind::Open,
            pid: 1,
            pidfd: None,
            deadline: Instant::now(),
            generation: None,
            session: None,
            sha256: None,
            hashed_len: 0,
            stable: false,
            subject: None,
            scope: crate::scope::Policies::new(fleetscan_core::Policy::default()).single(),
        }
    }

    fn tempfile_like() -> File {
        File::open("/proc/self/stat").unwrap()
    }

    #[test]
    fn take_is_exactly_once_across_threads() {
        let m = Arc::new(PendingMap::default());
        for id in 0..200 {
            m.insert(id, event());
        }
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || (0..200).filter(|id| m.take(*id).is_some()).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 200);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn assign_and_drain_never_both_miss() {
        let m = PendingMap::default();
        let alive = AtomicBool::new(true);
        m.insert(1, event());
        m.insert(2, event());
        assert_eq!(m.assign(1, 7, &alive), Ok(()));
        // The session ends: alive cleared first, then the drain.
        alive.store(false, Ordering::SeqCst);
        let drained = m.drain_session(7);
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].0, 1);
        assert_eq!(m.assign(2, 7, &alive), Err(AssignError::SessionDead));
        assert_eq!(m.assign(3, 7, &alive), Err(AssignError::Gone));
        assert!(
            m.take_for_session(2, 7).is_none(),
            "never sent on session 7"
        );
        assert!(m.take(2).is_some());
    }
}
