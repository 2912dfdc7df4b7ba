//! Which accesses are protected: a file is protected when its path *relative to the root of its
//! filesystem* lies under a protected directory of the same filesystem.
//!
//! The fanotify mark covers a whole filesystem (so no bind mount can bypass it), which means
//! events arrive for every file of that filesystem, reached through any of its mounts. A path
//! as the opener sees it says nothing reliable (a bind mount of the protected directory
//! elsewhere shows another path); the mount the file was opened through says how to map it
//! back: `/proc/*/mountinfo` gives each mount's root within its filesystem and its mount point,
//! and `statx(STATX_MNT_ID)` on the event's descriptor gives the mount id.
//!
//! Everything here reads only procfs: it must never open a file on a marked filesystem, and
//! never decides an access by the path the opener sees alone.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One line of `/proc/*/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub id: u64,
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted (`/` unless a bind mount or subvolume).
    pub root: PathBuf,
    pub mount_point: PathBuf,
}

/// Undoes the octal escapes (`\040` for a space and so on) of mountinfo fields.
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Parses mountinfo text; malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> HashMap<u64, MountEntry> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut f = line.split(' ');
        let (Some(id), Some(_parent), Some(dev), Some(root), Some(mount_point)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Ok(id) = id.parse() else { continue };
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        out.insert(
            id,
            MountEntry {
                id,
                major,
                minor,
                root: unescape(root),
                mount_point: unescape(mount_point),
            },
        );
    }
    out
}

/// The path of `path` relative to the root of its filesystem, given the mount it was reached
/// through; `None` when `path` is not under that mount's mount point.
pub(crate) fn fs_relative(mount: &MountEntry, path: &Path) -> Option<PathBuf> {
    let rest = path.strip_prefix(&mount.mount_point).ok()?;
    Some(if rest.as_os_str().is_empty() {
        mount.root.clone()
    } else {
        mount.root.join(rest)
    })
}

/// A path from `readlink(/proc/self/fd/N)` with the kernel's suffix for unlinked files removed.
pub(crate) fn strip_deleted(path: PathBuf) -> PathBuf {
    const SUFFIX: &[u8] = b" (deleted)";
    let bytes = path.into_os_string().into_vec();
    let bytes = match bytes.strip_suffix(SUFFIX) {
        Some(b) => b.to_vec(),
        None => bytes,
    };
    PathBuf::from(std::ffi::OsString::from_vec(bytes))
}

/// The mounts of the agent's mount namespace, re-read when they change.
#[derive(Debug)]
pub(crate) struct MountTable {
    source: File,
    mounts: HashMap<u64, MountEntry>,
    /// Mounts of other mount namespaces, seen through an opener's `/proc/<pid>/mountinfo`.
    foreign: HashMap<u64, MountEntry>,
    foreign_since: Instant,
}

impl MountTable {
    pub fn load() -> io::Result<MountTable> {
        let source = File::open("/proc/self/mountinfo")?;
        let mut t = MountTable {
            source,
            mounts: HashMap::new(),
            foreign: HashMap::new(),
            foreign_since: Instant::now(),
        };
        t.refresh()?;
        Ok(t)
    }

    /// `/proc/self/mountinfo`, open: it polls `POLLPRI` when the mount table changes.
    pub fn source(&self) -> &File {
        &self.source
    }

    pub fn refresh(&mut self) -> io::Result<()> {
        let mut text = String::new();
        self.source.rewind()?;
        self.source.read_to_string(&mut text)?;
        self.mounts = parse_mountinfo(&text);
        Ok(())
    }

    /// The mount with `id` on device `dev`: from the agent's table (re-read once when the id
    /// is unknown: a mount newer than the last change notification), else from the mount
    /// namespace of `pid` (an opener in a container: mount ids are global, but a container's
    /// mounts are not in the agent's table). Mounts found the second way are remembered for a
    /// few seconds, so that a busy container does not cost a mountinfo read per access; the
    /// device must match, which catches most reuses of an id by another mount.
    pub fn find(&mut self, id: u64, dev: (u32, u32), pid: i32) -> Option<MountEntry> {
        let on_dev = |m: &&MountEntry| (m.major, m.minor) == dev;
        if let Some(m) = self.mounts.get(&id).filter(on_dev) {
            return Some(m.clone());
        }
        if self.foreign_since.elapsed() > FOREIGN_TTL || self.foreign.len() > FOREIGN_MAX {
            self.foreign.clear();
            self.foreign_since = Instant::now();
        }
        if let Some(m) = self.foreign.get(&id).filter(on_dev) {
            return Some(m.clone());
        }
        if self.refresh().is_ok()
            && let Some(m) = self.mounts.get(&id).filter(on_dev)
        {
            return Some(m.clone());
        }
        if pid > 0 {
            let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
            let m = parse_mountinfo(&text).remove(&id)?;
            if (m.major, m.minor) == dev {
                self.foreign.insert(id, m.clone());
                return Some(m);
            }
        }
        None
    }
}

/// How long mounts of other namespaces are remembered, and how many at most.
const FOREIGN_TTL: Duration = Duration::from_secs(10);
const FOREIGN_MAX: usize = 4096;

/// A protected directory: its filesystem (device numbers) and its path from that filesystem's
/// root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProtectedDir {
    pub major: u32,
    pub minor: u32,
    pub fs_path: PathBuf,
    /// As configured, for logs.
    pub configured: PathBuf,
}

/// Whether a file is under a protected directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coverage {
    Protected,
    Unprotected,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Protection {
    dirs: Vec<ProtectedDir>,
}

impl Protection {
    pub fn new(dirs: Vec<ProtectedDir>) -> Self {
        Protection { dirs }
    }

    pub fn dirs(&self) -> &[ProtectedDir] {
        &self.dirs
    }

    /// Whether the file at `fs_path` of filesystem `major:minor` is under a protected
    /// directory (component by component: `/data2` is not under `/data`).
    pub fn covers(&self, major: u32, minor: u32, fs_path: &Path) -> bool {
        self.dirs
            .iter()
            .any(|d| d.major == major && d.minor == minor && fs_path.starts_with(&d.fs_path))
    }

    /// Decides for a file opened through mount `mnt_id` and seen at `path` by the agent.
    /// Anything that cannot be mapped back to its filesystem is protected: an unknown mount
    /// must not be a way around the scanner.
    pub fn classify(
        &self,
        mounts: &mut MountTable,
        dev: (u32, u32),
        mnt_id: Option<u64>,
        path: &Path,
        pid: i32,
    ) -> Coverage {
        if !self.dirs.iter().any(|d| (d.major, d.minor) == dev) {
            return Coverage::Unprotected;
        }
        let Some(mount) = mnt_id.and_then(|id| mounts.find(id, dev, pid)) else {
            return Coverage::Protected;
        };
        match fs_relative(&mount, path) {
            Some(rel) if self.covers(mount.major, mount.minor, &rel) => Coverage::Protected,
            Some(_) => Coverage::Unprotected,
            None => Coverage::Protected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
41 30 0:45 / /tmp/fs rw,relatime shared:20 - tmpfs t rw
42 30 0:45 /protected /srv/bind\\040here rw,relatime shared:20 - tmpfs t rw
bogus line
";

    #[test]
    fn parses_mountinfo_with_escapes() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        let b = &m[&42];
        assert_eq!((b.major, b.minor), (0, 45));
        assert_eq!(b.root, PathBuf::from("/protected"));
        assert_eq!(b.mount_point, PathBuf::from("/srv/bind here"));
    }

    #[test]
    fn relative_path_maps_bind_mounts_back_to_the_filesystem() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(
            fs_relative(&m[&41], Path::new("/tmp/fs/protected/a")),
            Some(PathBuf::from("/protected/a"))
        );
        assert_eq!(
            fs_relative(&m[&42], Path::new("/srv/bind here/a")),
            Some(PathBuf::from("/protected/a"))
        );
        assert_eq!(
            fs_relative(&m[&42], Path::new("/srv/bind here")),
            Some(PathBuf::from("/protected"))
        );
        assert_eq!(fs_relative(&m[&42], Path::new("/elsewhere/a")), None);
    }

    #[test]
    fn covers_is_per_filesystem_and_per_component() {
        let p = Protection::new(vec![ProtectedDir {
            major: 0,
            minor: 45,
            fs_path: "/protected".into(),
            configured: "/tmp/fs/protected".into(),
        }]);
        assert!(p.covers(0, 45, Path::new("/protected/a/b")));
        assert!(!p.covers(0, 45, Path::new("/protected2/a")));
        assert!(!p.covers(0, 45, Path::new("/other/a")));
        assert!(!p.covers(0, 46, Path::new("/protected/a")));
    }

    #[test]
    fn deleted_suffix_is_removed() {
        assert_eq!(
            strip_deleted("/a/b (deleted)".into()),
            PathBuf::from("/a/b")
        );
        assert_eq!(strip_deleted("/a/b".into()), PathBuf::from("/a/b"));
    }

    #[test]
    fn live_table_knows_the_root_mount_of_this_process() {
        use std::os::fd::AsFd;
        let mut t = MountTable::load().unwrap();
        let f = File::open("/proc/self/mountinfo").unwrap();
        let st = fleetscan_fanotify::statx_fd(f.as_fd()).unwrap();
        let m = t
            .find(st.mnt_id.unwrap(), (st.dev_major, st.dev_minor), 0)
            .expect("the mount of /proc is known");
        assert_eq!(m.mount_point, PathBuf::from("/proc"));
    }
}
