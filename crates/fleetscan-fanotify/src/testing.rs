//! Helpers for tests that run against the real kernel (feature `testing`).
//!
//! Tests may mark only filesystems they create themselves: a [`Tmpfs`] mounted on a fresh
//! temporary directory and detached (`MNT_DETACH`) when dropped. A test process that marks
//! anything also starts a [`watchdog`]: permission events nobody answers freeze their openers
//! forever, and aborting the process closes the group, which releases them all.
//!
//! Never use these in production code: they mount filesystems and abort the process.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("test path without NUL")
}

fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (mount(2) and fanotify permission events); run the tests as root"
    );
}

/// A tmpfs of the test's own, mounted on a fresh temporary directory.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
    // Dropped after the unmount (field order), so the directory is removed once empty.
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a new tmpfs (panics with a clear message when not root).
    pub fn new() -> Tmpfs {
        require_root("mounting a test tmpfs");
        let dir = tempfile::Builder::new()
            .prefix("fleetscan-tmpfs-")
            .tempdir()
            .expect("temp dir for the tmpfs");
        let path = dir.path().to_path_buf();
        let target = c(&path);
        // SAFETY: all pointers are NUL-terminated strings that outlive the call; the data
        // argument is a NUL-terminated option string.
        let rc = unsafe {
            libc::mount(
                c"fleetscan-test".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"size=256m,mode=0755".as_ptr().cast(),
            )
        };
        assert!(
            rc == 0,
            "mount tmpfs on {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        Tmpfs { path, _dir: dir }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for Tmpfs {
    fn default() -> Self {
        Tmpfs::new()
    }
}

fn detach(path: &Path) {
    let target = c(path);
    // SAFETY: `target` is a NUL-terminated path that outlives the call.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        detach(&self.path);
    }
}

/// A bind mount of `source` on a fresh temporary directory, detached when dropped.
#[derive(Debug)]
pub struct BindMount {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl BindMount {
    pub fn new(source: &Path) -> BindMount {
        require_root("a bind mount");
        let dir = tempfile::Builder::new()
            .prefix("fleetscan-bind-")
            .tempdir()
            .expect("temp dir for the bind mount");
        let path = dir.path().to_path_buf();
        let (src, target) = (c(source), c(&path));
        // SAFETY: NUL-terminated paths that outlive the call; a bind mount takes no type or
        // data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert!(
            rc == 0,
            "bind mount {} on {}: {}",
            source.display(),
            path.display(),
            io::Error::last_os_error()
        );
        BindMount { path, _dir: dir }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        detach(&self.path);
    }
}

/// Starts (once per process) a thread that aborts the process after `limit`: the last resort
/// against a test that leaves an opener blocked on a permission event. Process exit closes
/// every fanotify group, which allows every pending event.
pub fn watchdog(limit: Duration) {
    static START: Once = Once::new();
    START.call_once(|| {
        std::thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(move || {
                std::thread::sleep(limit);
                eprintln!("test watchdog: still running after {limit:?}, aborting");
                std::process::abort();
            })
            .expect("spawn watchdog");
    });
}
