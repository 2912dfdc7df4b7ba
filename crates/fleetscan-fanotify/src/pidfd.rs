//! Process handles: what a pidfd (e.g. the one a fanotify event carries) says about its process
//! without going through a pid number, which the kernel recycles.
//!
//! - [`pidfd_info`]: `PIDFD_GET_INFO` (Linux 6.13), the pid, ids and cgroup of the very process
//!   behind the pidfd, or `ESRCH` once it has been reaped.
//! - [`pidfd_inode`]: the pidfd's inode on pidfs (Linux 6.9), unique to one process for the
//!   life of the boot, so it can key a cache where a pid number cannot.
//! - [`pidfd_open`]: a pidfd for a pid (tests, and callers that hold a child they started).
//! - [`pidfd_exited`]: whether the process has exited (its pidfd polls readable).
//!
//! Nothing here blocks, and nothing opens a file by path.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::poll::{POLLIN, PollFd, poll};

/// `struct pidfd_info` as of its first version (64 bytes, `PIDFD_INFO_SIZE_VER0`). The kernel
/// copies at most the size the request names, so later kernels with a longer struct answer
/// this one unchanged.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawPidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    spare0: u32,
}

const PIDFD_INFO_PID: u64 = 1 << 0;
const PIDFD_INFO_CREDS: u64 = 1 << 1;
const PIDFD_INFO_CGROUPID: u64 = 1 << 2;

/// `_IOWR(PIDFS_IOCTL_MAGIC = 0xFF, 11, struct pidfd_info)` for the 64-byte struct.
const PIDFD_GET_INFO: u64 =
    (3 << 30) | ((size_of::<RawPidfdInfo>() as u64) << 16) | (0xFF << 8) | 11;

/// `PIDFS_MAGIC`, the `f_type` of pidfs.
const PIDFS_MAGIC: i64 = 0x5049_4446;

/// What `PIDFD_GET_INFO` says about a live (or not yet reaped) process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PidfdInfo {
    /// Thread-group id in the caller's pid namespace (0 when not visible there).
    pub pid: u32,
    pub ppid: u32,
    pub ruid: u32,
    pub euid: u32,
    /// The inode number of the process's cgroup v2 directory (`None` when the kernel did not
    /// report it).
    pub cgroupid: Option<u64>,
}

/// `PIDFD_GET_INFO` on `pidfd`. Errors: `ESRCH` once the process has been reaped; `ENOTTY`
/// or `EINVAL` on kernels before 6.13.
pub fn pidfd_info(pidfd: BorrowedFd<'_>) -> io::Result<PidfdInfo> {
    let mut info = RawPidfdInfo {
        mask: PIDFD_INFO_PID | PIDFD_INFO_CREDS | PIDFD_INFO_CGROUPID,
        ..Default::default()
    };
    // SAFETY: `info` is a live, writable `struct pidfd_info` of exactly the size encoded in
    // the request number; the kernel writes at most that many bytes. `pidfd` is borrowed
    // (open) for the call. The request type is `c_ulong` on glibc and `c_int` on musl.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO as _, &raw mut info) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PidfdInfo {
        pid: info.pid,
        ppid: info.ppid,
        ruid: info.ruid,
        euid: info.euid,
        cgroupid: (info.mask & PIDFD_INFO_CGROUPID != 0).then_some(info.cgroupid),
    })
}

/// The inode number of `pidfd` when it lives on pidfs (Linux 6.9+), where the number names one
/// process for the life of the boot; `None` on older kernels, whose pidfds all share one
/// anonymous inode.
pub fn pidfd_inode(pidfd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    // SAFETY: `statfs` is plain old data; all-zero is a valid value.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `pidfd` is borrowed (open) for the call and `sfs` is a writable statfs buffer.
    if unsafe { libc::fstatfs(pidfd.as_raw_fd(), &mut sfs) } < 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // `f_type` is i64 on some targets, u32 on others.
    if sfs.f_type as i64 != PIDFS_MAGIC {
        return Ok(None);
    }
    Ok(Some(crate::statx_fd(pidfd)?.ino))
}

/// `pidfd_open(pid, 0)`: a handle on the process `pid` names *now*. Only race-free for a pid
/// the caller knows cannot have been recycled (its own unreaped child).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes two integers and returns a new descriptor or -1.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(rc).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` was just returned by pidfd_open, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(pidfd, POLLIN)];
    matches!(poll(&mut fds, Some(Duration::ZERO)), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn info_and_inode_of_a_child_then_of_its_reaped_self() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let fd = pidfd_open(pid).unwrap();
        let info = pidfd_info(fd.as_fd()).expect("PIDFD_GET_INFO (Linux 6.13+)");
        assert_eq!(info.pid, child.id());
        assert_eq!(info.ppid, std::process::id());
        assert!(info.cgroupid.is_some());
        let ino = pidfd_inode(fd.as_fd())
            .unwrap()
            .expect("pidfs (Linux 6.9+)");
        let again = pidfd_open(pid).unwrap();
        assert_eq!(
            pidfd_inode(again.as_fd()).unwrap(),
            Some(ino),
            "same process"
        );
        let me = pidfd_open(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert_ne!(
            pidfd_inode(me.as_fd()).unwrap(),
            Some(ino),
            "another process"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(crate::pidfd_exited(fd.as_fd()));
        let e = pidfd_info(fd.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "{e}");
        // The inode still names the reaped process: it is never handed to another.
        assert_eq!(pidfd_inode(fd.as_fd()).unwrap(), Some(ino));
    }
}
