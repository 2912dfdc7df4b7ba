//! Read leases (`fcntl(F_SETLEASE)`) on an event's open file, and the notices of their breaks
//! (`F_SETOWN_EX`, `F_SETSIG`, a signalfd): content read and ignore marks placed under a lease
//! belong to one version of the file, and a writer's open is noticed at once.
//!
//! It must never leave a lease-break signal with its default action (which ends the process),
//! and never block: every call here returns at once.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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
