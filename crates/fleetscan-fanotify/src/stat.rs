//! `statx` on an open descriptor: the identity of the file an event is about (device, inode,
//! times, size, mount), without opening anything.
//!
//! It must never take a path: a path on a marked filesystem would raise an event of its own.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

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
}
