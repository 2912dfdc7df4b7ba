//! A small safe wrapper over the kernel's fanotify permission events, and the few other system
//! calls the agent needs on an event's descriptor (`statx`, `poll`).
//!
//! This is the only fleetscan crate with `unsafe`; every block says why it is sound. It must
//! never hand out a raw descriptor that nobody owns: every descriptor an event carries (the
//! file, the pidfd) is an [`OwnedFd`](std::os::fd::OwnedFd) from the moment it is read, so
//! dropping an [`Event`] closes them all. It must never open a file by path on a marked
//! filesystem, nor block anywhere but in [`poll`]: the caller answers the kernel, and a
//! listener that blocks on its own filesystem deadlocks.
//!
//! One module per family of system calls:
//! - `group`: the fanotify group (`fanotify_init`, `fanotify_mark`, reading events, answering
//!   them), and the group flags every user of the crate gets;
//! - `parse`: the bytes `read(2)` returns, as events and info records (no system call);
//! - `pidfd`: what a pidfd says about its process;
//! - `stat`: `statx` on an open descriptor;
//! - `lease`: read leases and the notices of their breaks;
//! - `poll`: waiting on descriptors;
//! - `limits`: resource limits.

mod group;
mod lease;
mod limits;
mod parse;
mod pidfd;
mod poll;
mod stat;
#[cfg(feature = "testing")]
pub mod testing;

pub use group::{
    Event, Fanotify, FanotifyError, InitOptions, PERMISSION_MASK, PidfdStatus, Response,
};
pub use lease::{LeaseNotices, LeaseOutcome, Notices, ReadLease, lease_intact, release_lease};
pub use limits::raise_nofile_limit;
pub use parse::ParseError;
pub use pidfd::{PidfdInfo, pidfd_exited, pidfd_info, pidfd_inode, pidfd_open};
pub use poll::{POLLIN, POLLPRI, PollFd, poll};
pub use stat::{FileStat, statx_fd};
