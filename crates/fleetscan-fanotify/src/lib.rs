//! A small safe wrapper over the kernel's fanotify permission events, and the few other system
//! calls the agent needs on an event's descriptor (`statx`, `poll`).
//!
//! This is the only fleetscan crate with `unsafe`; every block says why it is sound. It must
//! never hand out a raw descriptor that nobody owns: every descriptor an event carries (the
//! file, the pidfd) is an [`OwnedFd`] from the moment it is read, so dropping an [`Event`]
//! closes them all. It must never open a file by path on a marked filesystem, nor block
//! anywhere but in [`poll`]: the caller answers the kernel, and a listener that blocks on its
//! own filesystem deadlocks.
//!
//! Group flags, decided once for every user of the crate:
//! - `FAN_CLASS_CONTENT`: permission events, delivered after the file is in the page cache.
//! - `FAN_CLOEXEC`, and `O_CLOEXEC` on event descriptors: no descriptor leaks into a child.
//! - `O_NONBLOCK` on event descriptors: the kernel opens the event's file for the reader
//!   *inside the reader's `read(2)`*, before the opener's own open has gone through. Without
//!   it, a FIFO (no writer yet: the writer is the opener, waiting for our answer) or a device
//!   that waits for carrier would block the reader there forever, and with it every opener on
//!   the filesystem. Kernels since about 6.14 send no permission events for such files; older
//!   ones do. `pread` on a regular file ignores the flag.
//! - `FAN_NONBLOCK`: the reader polls the group together with other descriptors (shutdown,
//!   `/proc/self/mountinfo`) and never sleeps inside `read(2)`, so it can always stop.
//! - `FAN_UNLIMITED_QUEUE`: with the default 16,384-event queue, the kernel *drops* a
//!   permission event that does not fit and lets the access go ahead unscanned (reporting only
//!   `FAN_Q_OVERFLOW`), a bypass by flooding. A group that only asks for permission events
//!   cannot grow without bound anyway: each queued permission event holds its opener blocked,
//!   so the queue is bounded by the number of tasks. The reader bounds its own work instead,
//!   answering beyond its limit at once.
//! - `FAN_REPORT_PIDFD` (optional, Linux 5.15+): a pidfd per event, so the opener is
//!   identified by a handle that cannot be recycled, not only by a pid number.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod parse;
mod pidfd;
#[cfg(feature = "testing")]
pub mod testing;

pub use parse::ParseError;
pub use pidfd::{PidfdInfo, pidfd_info, pidfd_inode, pidfd_open};

/// The event mask of a content scanner: opens and opens for execution, as permission events.
pub const PERMISSION_MASK: u64 = libc::FAN_OPEN_PERM | libc::FAN_OPEN_EXEC_PERM;

/// Errors of the fanotify system calls, each with the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    #[error("fanotify_init failed: {0}")]
    Init(#[source] io::Error),
    #[error("cannot {op} fanotify mark on {path}: {source}")]
    Mark {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {0} fanotify mark: {1}")]
    InodeMark(&'static str, #[source] io::Error),
    #[error("path contains a NUL byte: {0}")]
    NulInPath(PathBuf),
    #[error("reading fanotify events failed: {0}")]
    Read(#[source] io::Error),
    #[error("bad fanotify event stream: {0}")]
    Parse(#[from] ParseError),
    #[error("writing fanotify response failed: {0}")]
    Respond(#[source] io::Error),
}

/// How to create a group. Every other flag is fixed (see the crate header).
#[derive(Clone, Copy, Debug, Default)]
pub struct InitOptions {
    /// Ask for a pidfd per event (`FAN_REPORT_PIDFD`).
    pub report_pidfd: bool,
}

/// The answer to a permission event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    Allow,
    Deny,
}

/// What a pidfd record said when it did not carry a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PidfdStatus {
    /// The group was created without `FAN_REPORT_PIDFD`.
    NotRequested,
    /// A pidfd is in [`Event::pidfd`].
    Present,
    /// The process had exited by the time the event was read (`FAN_NOPIDFD`).
    Exited,
    /// The kernel could not make one (`FAN_EPIDFD`), e.g. the process is in another pid
    /// namespace than the reader's or the reader hit its descriptor limit.
    Error,
}

/// One event read from the group. Dropping it closes its descriptors.
///
/// A permission event must be answered with [`Fanotify::respond`] *before* its [`Event::fd`]
/// is closed: the kernel finds the event by that descriptor number.
#[derive(Debug)]
pub struct Event {
    pub mask: u64,
    /// The file the event is about, opened read-only by the kernel for the reader. `None` for
    /// a queue overflow and for events without a file (`FAN_NOFD`).
    pub fd: Option<OwnedFd>,
    /// The process that caused the event (its thread group id), as the reader's pid namespace
    /// sees it; 0 when it is not visible there.
    pub pid: i32,
    pub pidfd: Option<OwnedFd>,
    pub pidfd_status: PidfdStatus,
}

impl Event {
    /// The kernel's queue overflowed (only possible without `FAN_UNLIMITED_QUEUE`).
    pub fn is_overflow(&self) -> bool {
        self.mask & libc::FAN_Q_OVERFLOW != 0
    }

    /// The event waits for an answer.
    pub fn is_permission(&self) -> bool {
        self.mask & PERMISSION_MASK != 0
    }

    /// An open for execution (execve, uselib); an exec may set both permission bits in one
    /// event.
    pub fn is_exec(&self) -> bool {
        self.mask & libc::FAN_OPEN_EXEC_PERM != 0
    }
}

/// A fanotify group of class content. Methods take `&self` and may be called from several
/// threads at once (each is one system call on the group descriptor).
#[derive(Debug)]
pub struct Fanotify {
    fd: OwnedFd,
    report_pidfd: bool,
    /// Whether `FAN_MARK_IGNORE` (Linux 6.0) was refused, so the older `FAN_MARK_IGNORED_MASK`
    /// is used for ignore marks.
    legacy_ignore: AtomicBool,
    /// The buffer of `read(2)`, allocated once: reading is on the path of every event.
    read_buf: ReadBuf,
}

/// The read buffer, behind a lock only so that `read_events` can take `&self` (one thread
/// reads); its `Debug` does not print 64 KiB.
struct ReadBuf(std::sync::Mutex<Box<[u8]>>);

impl std::fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadBuf({READ_BUFFER} bytes)")
    }
}

/// Size of the buffer of one `read(2)`: room for a few hundred events.
const READ_BUFFER: usize = 64 * 1024;

fn c_path(path: &Path) -> Result<CString, FanotifyError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| FanotifyError::NulInPath(path.into()))
}

impl Fanotify {
    /// Creates a group (see the crate header for the flags).
    pub fn new(options: InitOptions) -> Result<Fanotify, FanotifyError> {
        let mut flags = libc::FAN_CLASS_CONTENT
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_UNLIMITED_QUEUE;
        if options.report_pidfd {
            flags |= libc::FAN_REPORT_PIDFD;
        }
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC | libc::O_NONBLOCK)
            as libc::c_uint;
        // SAFETY: fanotify_init takes two integers and returns a new descriptor or -1; no
        // memory is shared with the kernel.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            return Err(FanotifyError::Init(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by fanotify_init, is open, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Fanotify {
            fd,
            report_pidfd: options.report_pidfd,
            legacy_ignore: AtomicBool::new(false),
            read_buf: ReadBuf(std::sync::Mutex::new(
                vec![0u8; READ_BUFFER].into_boxed_slice(),
            )),
        })
    }

    /// Whether events carry pidfds.
    pub fn reports_pidfd(&self) -> bool {
        self.report_pidfd
    }

    fn mark(
        &self,
        flags: libc::c_uint,
        mask: u64,
        dirfd: RawFd,
        path: Option<&CString>,
    ) -> io::Result<()> {
        let path_ptr = path.map_or(std::ptr::null(), |p| p.as_ptr());
        // SAFETY: the group descriptor is open for the life of `self`; `path_ptr` is either
        // null or a NUL-terminated string that outlives the call; `dirfd` is AT_FDCWD or a
        // descriptor borrowed by the caller for the duration of the call.
        let rc = unsafe { libc::fanotify_mark(self.fd.as_raw_fd(), flags, mask, dirfd, path_ptr) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Marks the whole filesystem (superblock) that holds `path`, so that every mount of it,
    /// bind mounts included, produces events for `mask`.
    pub fn add_filesystem_mark(&self, path: &Path, mask: u64) -> Result<(), FanotifyError> {
        let c = c_path(path)?;
        self.mark(
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
            mask,
            libc::AT_FDCWD,
            Some(&c),
        )
        .map_err(|source| FanotifyError::Mark {
            op: "add filesystem",
            path: path.into(),
            source,
        })
    }

    /// Removes `mask` from the filesystem mark of `path`.
    pub fn remove_filesystem_mark(&self, path: &Path, mask: u64) -> Result<(), FanotifyError> {
        let c = c_path(path)?;
        self.mark(
            libc::FAN_MARK_REMOVE | libc::FAN_MARK_FILESYSTEM,
            mask,
            libc::AT_FDCWD,
            Some(&c),
        )
        .map_err(|source| FanotifyError::Mark {
            op: "remove filesystem",
            path: path.into(),
            source,
        })
    }

    /// Drops every filesystem mark of the group: no new event is generated afterwards (events
    /// already queued still wait for an answer).
    pub fn flush_filesystem_marks(&self) -> Result<(), FanotifyError> {
        self.mark(
            libc::FAN_MARK_FLUSH | libc::FAN_MARK_FILESYSTEM,
            0,
            libc::AT_FDCWD,
            None,
        )
        .map_err(|e| FanotifyError::InodeMark("flush filesystem", e))
    }

    /// Places an ignore mark for `mask` on the inode of `fd` (an event's descriptor): further
    /// events of `mask` on that inode are not generated at all. The mark is evictable (it goes
    /// when the kernel evicts the inode, so it pins no memory) and does not survive a
    /// modification: the first write to the file removes it.
    pub fn add_ignore_mark(&self, fd: BorrowedFd<'_>, mask: u64) -> Result<(), FanotifyError> {
        let base = libc::FAN_MARK_ADD | libc::FAN_MARK_EVICTABLE;
        if !self.legacy_ignore.load(Ordering::Relaxed) {
            match self.mark(base | libc::FAN_MARK_IGNORE, mask, fd.as_raw_fd(), None) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Kernels before 6.0 know only the older flag.
                    self.legacy_ignore.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(FanotifyError::InodeMark("add ignore", e)),
            }
        }
        self.mark(
            base | libc::FAN_MARK_IGNORED_MASK,
            mask,
            fd.as_raw_fd(),
            None,
        )
        .map_err(|e| FanotifyError::InodeMark("add ignore", e))
    }

    /// Removes the ignore mark [`Fanotify::add_ignore_mark`] placed on the inode of `fd`.
    /// Removing a mark that is not there is not an error.
    pub fn remove_ignore_mark(&self, fd: BorrowedFd<'_>, mask: u64) -> Result<(), FanotifyError> {
        let flag = if self.legacy_ignore.load(Ordering::Relaxed) {
            libc::FAN_MARK_IGNORED_MASK
        } else {
            libc::FAN_MARK_IGNORE
        };
        match self.mark(libc::FAN_MARK_REMOVE | flag, mask, fd.as_raw_fd(), None) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                Err(FanotifyError::InodeMark("remove ignore", e))
            }
            _ => Ok(()),
        }
    }

    /// Drops every inode mark of the group (all ignore marks, e.g. when the rules change); the
    /// filesystem marks stay.
    pub fn flush_inode_marks(&self) -> Result<(), FanotifyError> {
        self.mark(libc::FAN_MARK_FLUSH, 0, libc::AT_FDCWD, None)
            .map_err(|e| FanotifyError::InodeMark("flush inode", e))
    }

    /// Reads the events that are queued, without blocking: an empty vector when there are
    /// none. Every descriptor is owned by the returned events, even when the stream turns out
    /// malformed (then the events before the fault are returned and the fault is logged by
    /// the caller through the second value).
    pub fn read_events(&self) -> Result<(Vec<Event>, Option<ParseError>), FanotifyError> {
        // A panic elsewhere cannot leave the bytes half-valid: each read overwrites them.
        let mut buf = self
            .read_buf
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // SAFETY: `buf` is a live, writable allocation of `buf.len()` bytes, and the group
        // descriptor is open for the life of `self`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok((Vec::new(), None)),
                _ => Err(FanotifyError::Read(e)),
            };
        }
        let n = usize::try_from(n).expect("non-negative read length");
        let (raw, fault) = parse::parse_events(&buf[..n]);
        let events = raw
            .into_iter()
            .map(|r| {
                let fd = (r.fd >= 0).then(|| {
                    // SAFETY: the kernel installed this descriptor in our table for this
                    // event and hands its ownership to the reader; it is wrapped once, here.
                    unsafe { OwnedFd::from_raw_fd(r.fd) }
                });
                let (pidfd, pidfd_status) = match r.pidfd {
                    Some(p) if p >= 0 => {
                        // SAFETY: as above, a pidfd the kernel installed for this event only.
                        (
                            Some(unsafe { OwnedFd::from_raw_fd(p) }),
                            PidfdStatus::Present,
                        )
                    }
                    Some(libc::FAN_NOPIDFD) => (None, PidfdStatus::Exited),
                    Some(_) => (None, PidfdStatus::Error),
                    None if self.report_pidfd => (None, PidfdStatus::Error),
                    None => (None, PidfdStatus::NotRequested),
                };
                Event {
                    mask: r.mask,
                    fd,
                    pid: r.pid,
                    pidfd,
                    pidfd_status,
                }
            })
            .collect();
        Ok((events, fault))
    }

    /// Answers the permission event whose descriptor is `fd`. Must be called before that
    /// descriptor is closed, and once per event.
    pub fn respond(&self, fd: BorrowedFd<'_>, response: Response) -> Result<(), FanotifyError> {
        let msg = libc::fanotify_response {
            fd: fd.as_raw_fd(),
            response: match response {
                Response::Allow => libc::FAN_ALLOW,
                Response::Deny => libc::FAN_DENY,
            },
        };
        let len = std::mem::size_of::<libc::fanotify_response>();
        // SAFETY: `msg` is a fully initialised `fanotify_response` living on the stack for the
        // duration of the call; the kernel reads exactly `len` bytes of it. One write of 8
        // bytes is atomic, so concurrent callers never interleave.
        let n = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&raw const msg).cast::<libc::c_void>(),
                len,
            )
        };
        if n < 0 {
            return Err(FanotifyError::Respond(io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl AsFd for Fanotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What `statx` says about an open file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStat {
    /// `st_dev` (the superblock of the file), split and joined.
    pub dev_major: u32,
    pub dev_minor: u32,
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    /// Hard links: 0 once the file was deleted (while descriptors keep it).
    pub nlink: u32,
    pub size: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// The id of the mount the descriptor was opened through, as in `/proc/*/mountinfo`;
    /// `None` where the kernel does not report it.
    pub mnt_id: Option<u64>,
}

impl FileStat {
    pub fn is_regular(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

/// `statx(fd, "", AT_EMPTY_PATH)`: the identity of an open file, without opening anything.
pub fn statx_fd(fd: BorrowedFd<'_>) -> io::Result<FileStat> {
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a static empty C string, `fd` is borrowed (open) for the call, and
    // `st` is a writable statx buffer.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_SYNC_AS_STAT,
            libc::STATX_BASIC_STATS | libc::STATX_MNT_ID,
            &mut st,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FileStat {
        dev_major: st.stx_dev_major,
        dev_minor: st.stx_dev_minor,
        dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        mode: u32::from(st.stx_mode),
        nlink: st.stx_nlink,
        size: st.stx_size,
        ctime_sec: st.stx_ctime.tv_sec,
        ctime_nsec: st.stx_ctime.tv_nsec,
        mtime_sec: st.stx_mtime.tv_sec,
        mtime_nsec: st.stx_mtime.tv_nsec,
        mnt_id: (st.stx_mask & libc::STATX_MNT_ID != 0).then_some(st.stx_mnt_id),
    })
}

/// A read lease on an open file (`F_SETLEASE`, `F_RDLCK`), released when dropped.
///
/// The kernel grants it only while nobody has the file open for writing, and while it is held
/// every open for writing, `truncate(2)` and `ftruncate(2)` of the file waits in `break_lease`
/// (at most `/proc/sys/fs/lease-break-time`) until it is released (an `O_RDONLY | O_TRUNC`
/// open does not wait, but needs write permission and sends a modify event). So content read
/// while holding it, and an ignore mark placed while holding it, belong to one version of the
/// file: a write
/// that was already under way (its ctime updated at its start, its data copied after, its
/// modify event sent last) makes the lease fail instead of letting a torn read or a stale
/// mark through.
///
/// Lease breaks are announced with `SIGIO`, whose default action ends the process; the first
/// lease taken sets `SIGIO` to ignored for the whole process (the agent needs no `SIGIO`).
#[derive(Debug)]
pub struct ReadLease<'a> {
    fd: BorrowedFd<'a>,
}

/// What [`ReadLease::try_acquire`] found.
#[derive(Debug)]
pub enum LeaseOutcome<'a> {
    /// Held: nobody has the file open for writing.
    Held(ReadLease<'a>),
    /// Someone has the file open for writing (`EAGAIN`): its content may be changing.
    Writers,
    /// The filesystem or the descriptor does not support leases (e.g. not a regular file,
    /// leases disabled): nothing is known either way.
    Unsupported(io::Error),
}

fn ignore_sigio() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SIG_IGN is a valid disposition for SIGIO; `sigaction` is not used here,
        // `signal` with SIG_IGN has no handler to be async-signal-safe.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
    });
}

impl<'a> ReadLease<'a> {
    /// Takes a read lease on `fd` (which must be open read-only), without blocking.
    pub fn try_acquire(fd: BorrowedFd<'a>) -> LeaseOutcome<'a> {
        ignore_sigio();
        // SAFETY: fcntl on a borrowed, open descriptor with integer arguments only.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        if rc == 0 {
            return LeaseOutcome::Held(ReadLease { fd });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => LeaseOutcome::Writers,
            _ => LeaseOutcome::Unsupported(e),
        }
    }

    /// Whether the lease is still held whole: false once an open for writing (or a truncate)
    /// has started to break it. That writer is still waiting for [`Drop`], so the content has
    /// not changed yet; but it is about to.
    pub fn intact(&self) -> bool {
        lease_intact(self.fd)
    }
}

impl Drop for ReadLease<'_> {
    fn drop(&mut self) {
        release_lease(self.fd);
    }
}

impl ReadLease<'_> {
    /// Keeps the lease past this guard: it lasts until [`release_lease`] on a descriptor of
    /// the same open file, or until the last of those descriptors is closed.
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

/// Releases a read lease taken on `fd`'s open file (none held: nothing happens); a writer
/// waiting for it goes ahead.
pub fn release_lease(fd: BorrowedFd<'_>) {
    // SAFETY: fcntl on a borrowed, open descriptor with integer arguments only.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
}

/// Whether a read lease is held whole on `fd`'s open file (see [`ReadLease::intact`]).
pub fn lease_intact(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: as in `release_lease`.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETLEASE) };
    rc == libc::F_RDLCK
}

/// `<asm-generic/fcntl.h>` values the `libc` crate does not export for this target.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// Notices of lease breaks for one thread, so that a lease can be held for a long time and
/// given up the moment a writer wants the file.
///
/// The kernel announces a break to the owner of the leased open file with the signal set by
/// `F_SETSIG`, the descriptor in `si_fd`. [`LeaseNotices::watch`] directs that signal (a
/// real-time signal, blocked in the owning thread) to the thread that made the notices, which
/// reads it through a signalfd; the writer waits in `break_lease` meanwhile. The signal's
/// disposition is set to "ignore" for the process, so that one sent to the process as a whole
/// (a lease taken again resets the owner to the process) is dropped instead of ending it.
/// A notice that cannot be queued comes as `SIGIO` instead, with no descriptor: it is read
/// too ([`Notices::lost`]), and the holder must then look at its leases with [`lease_intact`].
#[derive(Debug)]
pub struct LeaseNotices {
    sigfd: OwnedFd,
    signo: i32,
    tid: i32,
}

impl LeaseNotices {
    /// Made on the thread that will read the notices. `SIGIO` is blocked there and read too:
    /// the kernel sends it instead when the real-time signal cannot be queued.
    pub fn for_this_thread() -> io::Result<LeaseNotices> {
        ignore_sigio();
        let signo = libc::SIGRTMIN() + 5;
        // Once per process: setting a disposition to "ignore" discards what is pending, so a
        // second agent in the process must not throw away the first one's notices.
        static IGNORED: std::sync::Once = std::sync::Once::new();
        // SAFETY: SIG_IGN is a valid disposition and has no handler.
        IGNORED.call_once(|| unsafe {
            libc::signal(signo, libc::SIG_IGN);
        });
        // SAFETY: plain libc calls on a sigset owned by this frame.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signo);
            libc::sigaddset(&mut set, libc::SIGIO);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(LeaseNotices {
                sigfd: OwnedFd::from_raw_fd(fd),
                signo,
                tid: libc::gettid(),
            })
        }
    }

    /// Directs the break notices of the lease on `fd`'s open file to this thread. Call it
    /// after the lease is taken (taking one makes the process the owner again), then check
    /// [`lease_intact`]: a break that began before this call was announced to nobody.
    pub fn watch(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let owner = FOwnerEx {
            kind: F_OWNER_TID,
            pid: self.tid,
        };
        // SAFETY: fcntl on a borrowed, open descriptor; `owner` outlives the call.
        unsafe {
            if libc::fcntl(fd.as_raw_fd(), F_SETOWN_EX, &raw const owner) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::fcntl(fd.as_raw_fd(), F_SETSIG, self.signo) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The notices queued so far, without blocking (poll [`AsFd::as_fd`] for `POLLIN` to
    /// wait).
    pub fn take(&self) -> io::Result<Notices> {
        let mut notices = Notices::default();
        loop {
            // SAFETY: signalfd_siginfo is plain data; the read writes at most its size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reading into `info`, `size` bytes long.
            let n = unsafe {
                libc::read(
                    self.sigfd.as_raw_fd(),
                    (&raw mut info).cast::<libc::c_void>(),
                    size,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(notices),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if usize::try_from(n).ok() != Some(size) {
                return Ok(notices);
            }
            match i32::try_from(info.ssi_signo) {
                Ok(s) if s == self.signo => notices.broken.push(info.ssi_fd),
                Ok(libc::SIGIO) => notices.lost = true,
                _ => {}
            }
        }
    }
}

/// What [`LeaseNotices::take`] read.
#[derive(Debug, Default)]
pub struct Notices {
    /// The descriptors whose leases began to break.
    pub broken: Vec<RawFd>,
    /// A notice could not be queued (the kernel sent `SIGIO` instead): which lease it was
    /// about is not known.
    pub lost: bool,
}

impl AsFd for LeaseNotices {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sigfd.as_fd()
    }
}

/// `POLLIN`: data to read (a fanotify group with events; an exited process's pidfd).
pub const POLLIN: i16 = libc::POLLIN;
/// `POLLPRI`: an exceptional condition (`/proc/self/mountinfo` changed).
pub const POLLPRI: i16 = libc::POLLPRI;

/// One descriptor to [`poll`], with the events asked for and those that happened.
#[derive(Debug)]
pub struct PollFd<'a> {
    pub fd: BorrowedFd<'a>,
    pub events: i16,
    pub revents: i16,
}

impl<'a> PollFd<'a> {
    pub fn new(fd: BorrowedFd<'a>, events: i16) -> Self {
        PollFd {
            fd,
            events,
            revents: 0,
        }
    }
}

/// `poll(2)`: waits until one of `fds` is ready or `timeout` passes (`None`: forever). Returns
/// how many are ready; `EINTR` counts as none.
pub fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let mut raw: Vec<libc::pollfd> = fds
        .iter()
        .map(|p| libc::pollfd {
            fd: p.fd.as_raw_fd(),
            events: p.events,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| {
        // Round up so that a short timeout does not become a busy loop.
        libc::c_int::try_from(t.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `raw` is a live array of `raw.len()` initialised pollfd structs whose
    // descriptors are borrowed for the duration of the call.
    let rc = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    for (p, r) in fds.iter_mut().zip(&raw) {
        p.revents = r.revents;
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(pidfd, POLLIN)];
    matches!(poll(&mut fds, Some(Duration::ZERO)), Ok(n) if n > 0)
}

/// Raises the soft limit on open descriptors (`RLIMIT_NOFILE`) to the hard limit and returns
/// the soft limit now in force.
///
/// Every event read holds a descriptor (two with pidfds) until it is answered, and when the
/// kernel cannot install one in `read(2)` (`EMFILE`) it *denies* the event itself: an access
/// refused with no scan, no fail mode and no report. The common soft limit of 1,024 is reached
/// by a few hundred accesses waiting at once.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a writable rlimit struct for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is an initialised rlimit struct read by the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } < 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statx_of_an_open_file_reports_identity_and_mount() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, b"hello").unwrap();
        let st = statx_fd(f.as_fd()).unwrap();
        let meta = f.metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(st.ino, meta.ino());
        assert_eq!(st.dev, meta.dev());
        assert_eq!(st.size, 5);
        assert_eq!(st.ctime_sec, meta.ctime());
        assert!(st.is_regular());
        assert!(st.mnt_id.is_some(), "kernel 5.8+ reports STATX_MNT_ID");
    }

    #[test]
    fn poll_times_out_on_a_quiet_descriptor() {
        let (r, _w) = std::io::pipe().unwrap();
        let mut fds = [PollFd::new(r.as_fd(), POLLIN)];
        let t = std::time::Instant::now();
        assert_eq!(poll(&mut fds, Some(Duration::from_millis(20))).unwrap(), 0);
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
