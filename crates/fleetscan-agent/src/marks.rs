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
//! At most `capacity` marks are kept (each holds a descriptor and keeps its inode in memory);
//! the oldest is removed to make room, and a deleted file's within a sweep (every `SWEEP`).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fleetscan_fanotify::{
    Fanotify, LeaseNotices, LeaseOutcome, PERMISSION_MASK, ReadLease, lease_intact, release_lease,
};
use parking_lot::Mutex;
use tracing::{debug, warn};

use crate::cache::FileKey;
use crate::state::{KernelMark, mark_if_unchanged};

/// (device, inode): a mark is per inode.
type Inode = (u64, u64);

#[derive(Debug)]
pub(crate) struct Marks {
    /// Set by the marks thread once it can hear lease breaks; no mark before.
    notices: OnceLock<Arc<LeaseNotices>>,
    held: Mutex<Held>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Held {
    /// The leased descriptor of each marked inode, and when it was marked.
    by_inode: HashMap<Inode, (File, u64)>,
    /// Lease-break notices name the descriptor.
    by_fd: HashMap<RawFd, Inode>,
    /// Marking order, for making room; entries already gone are skipped.
    order: VecDeque<(Inode, u64)>,
    seq: u64,
}

impl Held {
    /// Forgets `inode`'s mark: removes it from the kernel, then lets the lease go.
    fn drop_mark(&mut self, group: &Fanotify, inode: Inode) {
        let Some((file, _)) = self.by_inode.remove(&inode) else {
            return;
        };
        self.by_fd.remove(&file.as_raw_fd());
        if let Err(e) = group.remove_ignore_mark(file.as_fd(), PERMISSION_MASK) {
            warn!(error = %e, "removing an ignore mark failed");
        }
        release_lease(file.as_fd());
    }

    fn make_room(&mut self, group: &Fanotify, capacity: usize) {
        while self.by_inode.len() >= capacity {
            let Some((inode, seq)) = self.order.pop_front() else {
                return;
            };
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

    /// Whether a mark is kept for `key`'s inode.
    pub fn holds(&self, key: &FileKey) -> bool {
        self.held.lock().by_inode.contains_key(&(key.dev, key.ino))
    }

    /// Marks `file` if its identity is still `key` (see `state::mark_if_unchanged`) and keeps
    /// the mark under a read lease. Returns whether a mark was placed now.
    pub fn place(&self, group: &Fanotify, file: &File, key: &FileKey) -> bool {
        let Some(notices) = self.notices.get() else {
            return false;
        };
        let inode = (key.dev, key.ino);
        // Held throughout: a break announced while this runs is handled once the entry is in.
        let mut held = self.held.lock();
        if held.by_inode.contains_key(&inode) {
            return false;
        }
        // A descriptor of our own: the lease's notices name it, and it lives as long as the
        // mark, whatever becomes of the event's.
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
            if let Err(e) = group.remove_ignore_mark(own.as_fd(), PERMISSION_MASK) {
                warn!(error = %e, "removing an ignore mark failed");
            }
            drop(lease);
            return false;
        }
        lease.keep();
        held.make_room(group, self.capacity);
        held.seq += 1;
        let seq = held.seq;
        held.by_fd.insert(own.as_raw_fd(), inode);
        held.by_inode.insert(inode, (own, seq));
        held.order.push_back((inode, seq));
        true
    }

    /// A writer wants the file behind `fd`: its mark goes, then its lease.
    fn broken(&self, group: &Fanotify, fd: RawFd) {
        let mut held = self.held.lock();
        if let Some(inode) = held.by_fd.get(&fd).copied() {
            held.drop_mark(group, inode);
        }
    }

    /// The leases being broken that no notice told of (a notice that could not be queued),
    /// and the files deleted since they were marked: our descriptor is all that keeps them (on
    /// a tmpfs, their space too), and no one can open them any more.
    fn sweep(&self, group: &Fanotify) {
        let mut held = self.held.lock();
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

    /// Lets every lease go, after the group's inode marks were flushed.
    pub fn clear(&self) {
        let mut held = self.held.lock();
        for (file, _) in held.by_inode.values() {
            release_lease(file.as_fd());
        }
        *held = Held::default();
    }
}

/// How often the marks thread looks at every kept mark itself: for notices that were lost
/// (a writer waits that long at most) and for deleted files (their space is freed that late).
const SWEEP: Duration = Duration::from_secs(5);

/// The marks thread: hears lease breaks and gives up their marks until `stopping` is set.
/// Returns once it can hear them (or could not: then no mark is ever placed).
pub(crate) fn start(
    shared: &Arc<crate::state::Shared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let shared = shared.clone();
    let handle = std::thread::Builder::new()
        .name("fleetscan-marks".into())
        .spawn(move || {
            let notices = match LeaseNotices::for_this_thread() {
                Ok(n) => Arc::new(n),
                Err(e) => {
                    warn!(error = %e, "lease-break notices unavailable, no ignore marks");
                    let _ = tx.send(());
                    return;
                }
            };
            let _ = shared.marks.notices.set(notices.clone());
            let _ = tx.send(());
            run(&shared, &notices);
        })?;
    let _ = rx.recv();
    Ok(handle)
}

fn run(shared: &crate::state::Shared, notices: &LeaseNotices) {
    use std::sync::atomic::Ordering;
    let mut last_sweep = Instant::now();
    while !shared.stopping.load(Ordering::SeqCst) {
        let mut fds = [fleetscan_fanotify::PollFd::new(
            notices.as_fd(),
            fleetscan_fanotify::POLLIN,
        )];
        if let Err(e) = fleetscan_fanotify::poll(&mut fds, Some(Duration::from_millis(100))) {
            warn!(error = %e, "waiting for lease-break notices failed");
            std::thread::sleep(Duration::from_millis(100));
        }
        match notices.take() {
            Ok(broken) => {
                for fd in broken {
                    shared.marks.broken(&shared.group, fd);
                }
            }
            Err(e) => warn!(error = %e, "reading lease-break notices failed"),
        }
        if last_sweep.elapsed() >= SWEEP {
            shared.marks.sweep(&shared.group);
            last_sweep = Instant::now();
        }
    }
    shared.marks.clear();
}
