//! Kernel ignore marks that stand only while the agent holds a read lease on their file.
//!
//! The kernel clears an ignore mark on the first modify event, but a store through a shared
//! writable mapping sends none: an open for writing that the mark let through unseen, a
//! `mmap`, and the malicious content would be opened under the clean version's mark for as long
//! as it stood. So every mark is kept together with a descriptor of its file that holds a read
//! lease. An open for writing (or a truncate) must break that lease before it can go on: the
//! kernel tells the *marks* thread ([`LeaseNotices`]), which removes the mark and only then
//! lets the lease go; the writer waits in `break_lease` meanwhile. Every open after that
//! reaches the agent again, and the writer's changes move the file's identity (a write fault on
//! a shared mapping updates ctime too), so the verdict cache misses.
//!
//! A kept descriptor also keeps its inode in memory, its mount busy (`umount` fails with
//! `EBUSY`: a pod's volumes, a container's root) and a deleted file's space in use. So marks
//! are short-lived: at most `capacity` of them, oldest out first; none older than
//! [`LIFETIME`] (the file's next open after that is answered from the verdict cache and marks
//! it again: one event per file per lifetime); and a deleted file's goes at the next sweep
//! (every [`SWEEP`]).
//!
//! Never: a mark without its lease (when a mark cannot be removed, every mark goes), a mark on
//! a file whose identity is not the judged one, or an open of a file (it works on descriptors
//! it is given).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fleetscan_fanotify::{
    Fanotify, LeaseNotices, LeaseOutcome, PERMISSION_MASK, ReadLease, lease_intact, release_lease,
};
use parking_lot::Mutex;
use tracing::{debug, error, warn};

use crate::cache::FileKey;

/// (device, inode): a mark is per inode.
type Inode = (u64, u64);

#[derive(Debug)]
pub(crate) struct Marks {
    /// Set by the marks thread once it can hear lease breaks; no mark before.
    notices: OnceLock<Arc<LeaseNotices>>,
    held: Mutex<Held>,
    capacity: usize,
}

/// The longest a mark is kept.
pub(crate) const LIFETIME: Duration = Duration::from_secs(10);

/// How often the marks thread looks at every kept mark itself: for marks past their lifetime,
/// for deleted files (their space is freed that late) and for notices that were lost (a writer
/// waits that long at most; a lost notice the kernel could say was lost starts a sweep at once).
const SWEEP: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Held {
    /// The leased descriptor of each marked inode, and its place in `order`.
    by_inode: HashMap<Inode, (File, u64)>,
    /// Lease-break notices name the descriptor.
    by_fd: HashMap<RawFd, Inode>,
    /// Marking order and time, for making room and for the lifetime; entries already gone
    /// are skipped.
    order: VecDeque<(Inode, u64, Instant)>,
    seq: u64,
    /// The marks thread has ended: nobody would hear a break any more.
    closed: bool,
}

impl Held {
    /// Forgets `inode`'s mark: removes it from the kernel, then lets the lease go.
    fn drop_mark(&mut self, group: &Fanotify, inode: Inode) {
        let Some((file, _)) = self.by_inode.remove(&inode) else {
            return;
        };
        self.by_fd.remove(&file.as_raw_fd());
        unmark(group, &file);
        release_lease(file.as_fd());
    }

    /// Lets every lease go (their marks are gone) and forgets them.
    fn release_all(&mut self) {
        for (file, _) in self.by_inode.values() {
            release_lease(file.as_fd());
        }
        self.by_inode.clear();
        self.by_fd.clear();
        self.order.clear();
    }

    /// Drops marks from the front of `order` while `done` says so of the oldest.
    fn drop_oldest(&mut self, group: &Fanotify, mut done: impl FnMut(&Held, Instant) -> bool) {
        while let Some(&(inode, seq, at)) = self.order.front() {
            if !done(self, at) {
                return;
            }
            self.order.pop_front();
            if self.by_inode.get(&inode).is_some_and(|(_, s)| *s == seq) {
                self.drop_mark(group, inode);
            }
        }
    }
}

impl Marks {
    pub fn new(capacity: usize) -> Marks {
        Marks {
            notices: OnceLock::new(),
            held: Mutex::new(Held::default()),
            capacity: capacity.max(1),
        }
    }

    /// Marks `file` if its identity is still `key` and keeps the mark under a read lease that
    /// a writer's open takes away together with the mark. Returns whether a mark was placed
    /// now.
    ///
    /// The kernel clears an ignore mask on the first modify event *after* the mark is there; a
    /// write that finished before it is only seen in the identity. So the mark goes on only
    /// under the read lease (no writer has the file open, none can open it until the lease is
    /// given up, so no write is under way and the file has no writable mapping) and only when
    /// the identity, taken under that lease, is still `key` (ctime and mtime to the
    /// nanosecond: on this kernel's multigrain filesystems a change after our statx always
    /// gets a new ctime). The check comes *before* the mark (see [`mark_if_unchanged`]): a
    /// write may have come and gone since the content was judged (a cache hit's answer lets
    /// the writer go on at once, and a decision can arrive after the file changed), and a mark
    /// placed on the new version even for a moment hides every open made in that moment.
    ///
    /// No lease, no mark: a file open for writing is about to change, and a filesystem
    /// without leases (network filesystems) cannot keep a writer out, nor report a remote
    /// write as a modify event.
    pub fn place(&self, group: &Fanotify, file: &File, key: &FileKey) -> bool {
        let Some(notices) = self.notices.get() else {
            return false;
        };
        let inode = (key.dev, key.ino);
        // Held throughout: a break announced while this runs is handled once the entry is in.
        let mut held = self.held.lock();
        if held.closed || held.by_inode.contains_key(&inode) {
            return false;
        }
        // A descriptor of our own: the lease's notices name it, and it lives as long as the
        // mark, whatever becomes of the event's. It is a duplicate, so the lease belongs to the
        // event's open file description too: nothing may take or drop a lease through the
        // event's descriptor from here on (the hashing thread's lease on it ended before the
        // decision that led here could be made).
        let own = match file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e, "no descriptor to keep, no ignore mark");
                return false;
            }
        };
        let lease = match ReadLease::try_acquire(own.as_fd()) {
            LeaseOutcome::Held(l) => l,
            LeaseOutcome::Writers => {
                debug!("file open for writing, no ignore mark");
                return false;
            }
            LeaseOutcome::Unsupported(e) => {
                debug!(error = %e, "no read lease on this filesystem, no ignore mark");
                return false;
            }
        };
        if let Err(e) = notices.watch(own.as_fd()) {
            warn!(error = %e, "lease breaks cannot be heard, no ignore mark");
            return false;
        }
        let target = KernelMark { group, file: &own };
        if !mark_if_unchanged(&target, key) {
            return false;
        }
        // A break that began before `watch` was announced to nobody.
        // The mark goes before the lease: the writer waits for the lease.
        if !lease_intact(own.as_fd()) {
            target.remove();
            drop(lease);
            return false;
        }
        lease.keep();
        let capacity = self.capacity;
        held.drop_oldest(group, |h, _| h.by_inode.len() >= capacity);
        held.seq += 1;
        let seq = held.seq;
        held.by_fd.insert(own.as_raw_fd(), inode);
        held.by_inode.insert(inode, (own, seq));
        held.order.push_back((inode, seq, Instant::now()));
        true
    }

    /// A writer wants the file behind `fd`: its mark goes, then its lease.
    fn broken(&self, group: &Fanotify, fd: RawFd) {
        let mut held = self.held.lock();
        if let Some(inode) = held.by_fd.get(&fd).copied() {
            held.drop_mark(group, inode);
        }
    }

    /// Marks past their lifetime; the leases being broken that no notice told of (a notice
    /// that could not be queued); and the files deleted since they were marked: our
    /// descriptor is all that keeps them (on a tmpfs, their space too), and no one can open
    /// them any more.
    fn sweep(&self, group: &Fanotify) {
        let mut held = self.held.lock();
        let now = Instant::now();
        held.drop_oldest(group, |_, at| now.duration_since(at) >= LIFETIME);
        let broken: Vec<Inode> = held
            .by_inode
            .iter()
            .filter(|(_, (f, _))| {
                !lease_intact(f.as_fd())
                    || fleetscan_fanotify::statx_fd(f.as_fd()).map_or(true, |st| st.nlink == 0)
            })
            .map(|(i, _)| *i)
            .collect();
        for inode in broken {
            held.drop_mark(group, inode);
        }
    }

    /// Removes every mark of the group (a flush of the verdict cache), then lets every lease
    /// go.
    pub fn flush(&self, group: &Fanotify) {
        let mut held = self.held.lock();
        if let Err(e) = group.flush_inode_marks() {
            warn!(error = %e, "flushing ignore marks failed");
        }
        held.release_all();
    }

    /// The marks thread ends: every mark and lease goes, and no mark is placed after.
    fn close(&self, group: &Fanotify) {
        self.held.lock().closed = true;
        self.flush(group);
    }
}

/// Removes the ignore mark on `file`'s inode. A mark must never outlive the lease that guards
/// it, so when that fails every mark of the group goes instead (the leases still kept then
/// guard nothing and go with their breaks or their lifetime).
fn unmark(group: &Fanotify, file: &File) {
    if let Err(e) = group.remove_ignore_mark(file.as_fd(), PERMISSION_MASK) {
        warn!(error = %e, "removing an ignore mark failed, removing them all");
        if let Err(e) = group.flush_inode_marks() {
            error!(error = %e, "flushing ignore marks failed: a mark may outlive its lease");
        }
    }
}

/// What placing an ignore mark asks of the kernel, apart so that the order of the steps can be
/// tested on its own (the kernel's side is `tests/rewrite_race.rs`).
trait MarkTarget {
    /// The file's identity now; `None` when it cannot be had.
    fn identity(&self) -> Option<FileKey>;
    fn add(&self) -> bool;
    fn remove(&self);
}

struct KernelMark<'a> {
    group: &'a Fanotify,
    file: &'a File,
}

impl MarkTarget for KernelMark<'_> {
    fn identity(&self) -> Option<FileKey> {
        fleetscan_fanotify::statx_fd(self.file.as_fd())
            .ok()
            .map(|st| FileKey::from(&st))
    }

    fn add(&self) -> bool {
        match self
            .group
            .add_ignore_mark(self.file.as_fd(), PERMISSION_MASK)
        {
            Ok(()) => true,
            Err(e) => {
                debug!(error = %e, "ignore mark not placed");
                false
            }
        }
    }

    fn remove(&self) {
        unmark(self.group, self.file);
    }
}

/// Under a read lease: marks the file only if its identity is still `key`, compared before the
/// mark (see [`Marks::place`]) and again after (a lease the kernel revoked after
/// lease-break-time would have let a writer in). Returns whether a mark stands.
fn mark_if_unchanged(target: &impl MarkTarget, key: &FileKey) -> bool {
    if target.identity().as_ref() != Some(key) {
        debug!("file changed since it was judged, no ignore mark");
        return false;
    }
    if !target.add() {
        return false;
    }
    if target.identity().as_ref() == Some(key) {
        return true;
    }
    target.remove();
    false
}

impl Marks {
    /// The marks thread's body: hears lease breaks and gives up their marks until `stopping`
    /// is set, then removes every mark. Calls `ready` once it can hear breaks (or found that
    /// it cannot: then no mark is ever placed), so that the caller can wait for that before
    /// any event flows.
    pub fn serve(&self, group: &Fanotify, stopping: &AtomicBool, ready: impl FnOnce()) {
        let notices = match LeaseNotices::for_this_thread() {
            Ok(n) => Arc::new(n),
            Err(e) => {
                warn!(error = %e, "lease-break notices unavailable, no ignore marks");
                ready();
                return;
            }
        };
        let _ = self.notices.set(notices.clone());
        ready();
        let mut last_sweep = Instant::now();
        while !stopping.load(Ordering::SeqCst) {
            let mut fds = [fleetscan_fanotify::PollFd::new(
                notices.as_fd(),
                fleetscan_fanotify::POLLIN,
            )];
            if let Err(e) = fleetscan_fanotify::poll(&mut fds, Some(Duration::from_millis(100))) {
                warn!(error = %e, "waiting for lease-break notices failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut lost = false;
            match notices.take() {
                Ok(n) => {
                    for fd in n.broken {
                        self.broken(group, fd);
                    }
                    lost = n.lost;
                }
                Err(e) => warn!(error = %e, "reading lease-break notices failed"),
            }
            if lost || last_sweep.elapsed() >= SWEEP {
                self.sweep(group);
                last_sweep = Instant::now();
            }
        }
        self.close(group);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    fn key(ctime_nsec: u32) -> FileKey {
        FileKey::test(ctime_nsec)
    }

    /// A file whose identity reads as the listed keys, one per look, recording each step.
    struct Script {
        identities: RefCell<Vec<FileKey>>,
        steps: RefCell<Vec<&'static str>>,
    }

    impl Script {
        fn new(identities: &[FileKey]) -> Script {
            Script {
                identities: RefCell::new(identities.iter().rev().copied().collect()),
                steps: RefCell::new(Vec::new()),
            }
        }

        fn steps(&self) -> Vec<&'static str> {
            self.steps.borrow().clone()
        }
    }

    impl MarkTarget for Script {
        fn identity(&self) -> Option<FileKey> {
            self.steps.borrow_mut().push("look");
            self.identities.borrow_mut().pop()
        }

        fn add(&self) -> bool {
            self.steps.borrow_mut().push("mark");
            true
        }

        fn remove(&self) {
            self.steps.borrow_mut().push("unmark");
        }
    }

    /// The rewrite race: the file was rewritten after it was judged (the writer went on as
    /// soon as the cached allow answered it, or before a late decision arrived). A mark placed
    /// first and taken back after the look would hide the opens made in between.
    #[test]
    fn a_file_changed_since_its_judgement_is_never_marked_even_for_a_moment() {
        let t = Script::new(&[key(2), key(2)]);
        assert!(!mark_if_unchanged(&t, &key(1)));
        assert_eq!(t.steps(), ["look"]);
    }

    #[test]
    fn an_unchanged_file_is_marked_after_one_look_and_kept_after_another() {
        let t = Script::new(&[key(1), key(1)]);
        assert!(mark_if_unchanged(&t, &key(1)));
        assert_eq!(t.steps(), ["look", "mark", "look"]);
    }

    /// A lease the kernel revoked (lease-break-time) lets a writer in while the mark goes on.
    #[test]
    fn a_change_during_marking_takes_the_mark_back() {
        let t = Script::new(&[key(1), key(2)]);
        assert!(!mark_if_unchanged(&t, &key(1)));
        assert_eq!(t.steps(), ["look", "mark", "look", "unmark"]);
    }

    #[test]
    fn a_file_whose_identity_cannot_be_had_is_not_marked() {
        let t = Script::new(&[]);
        assert!(!mark_if_unchanged(&t, &key(1)));
        assert_eq!(t.steps(), ["look"]);
    }
}
