//! The fanotify group itself: `fanotify_init`, `fanotify_mark` (filesystem marks and ignore
//! marks), `read(2)` of its events and `write(2)` of the answers.
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
//!
//! It must never let an event's descriptor go unowned: each is wrapped into an [`OwnedFd`] the
//! moment `read(2)` returns it, before anything else can fail.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::parse::{self, ParseError};

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

/// How to create a group. Every other flag is fixed (see the module header).
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
