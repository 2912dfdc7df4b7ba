//! The path of an accessed file as the process that opened it sees it, and as the host (the
//! agent's mount namespace) sees it.
//!
//! What the agent has is `readlink(/proc/self/fd/N)` of the event's descriptor: the kernel's
//! `d_path` of the file, walked up the mounts *of the namespace the file was opened in* and
//! stopped at that namespace's root. Measured on Linux 6.18:
//! - a file opened through a mount of another mount namespace reads as the path from *that*
//!   namespace's root: after `pivot_root` it is the container's own path (`/data/a`), after a
//!   `chroot` it is the path to the chroot plus the container's path;
//! - a file opened through an overlayfs, when the overlay's *layer* filesystem is the marked one
//!   (the usual case: the agent protects the filesystem that holds the image layers), arrives
//!   as the layer's file (the overlay's internal "backing file"), on the layer's device, whose
//!   path is relative to the layer directory (`/data/a` for `<lowerdir>/data/a`), reached
//!   through a private mount that is in no mountinfo;
//! - a file opened through an overlay whose own superblock is marked arrives on the overlay's
//!   device with the path as in the first case.
//!
//! So no string is trusted: every candidate is checked by `lstat`, and kept only when it names
//! the event's file (device and inode; for an overlay over the event's layer file, the overlay
//! device and the same inode number, which overlayfs keeps for non-directories when its
//! layers share a filesystem or `xino` is on). The container's view is looked up through the
//! opener's `/proc/<pid>/root` (opened only while the pid still names the pidfd's process, see
//! [`crate::subject::ProcDir`]); the host's view through the agent's own mount table and the
//! overlay's layer directories. When nothing checks out, `path` is what the descriptor said
//! and `host_path` is empty: a missing path, never a wrong one.
//!
//! Cost: per access, an open of `/proc/<pid>` and a few `lstat`s; the opener's root and
//! mount table, and the agent's, are cached for [`MOUNTS_TTL`] (a mount change inside that
//! window can only make a check fail, never pass wrongly).
//!
//! Must never: open a file outside `/proc` (the `lstat`s open nothing, so they raise no
//! permission event), block on anything but the kernel's path walk, or run on the reader
//! thread before the kernel has its answer.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use fleetscan_fanotify::FileStat;
use lru::LruCache;
use parking_lot::Mutex;

use crate::mounts::{MountEntry, parse_mountinfo};
use crate::subject::ProcDir;

/// How long a mount table (the opener's, the agent's) is reused before it is read again.
pub(crate) const MOUNTS_TTL: Duration = Duration::from_secs(1);

/// Openers whose root and mount table are cached at once.
const OPENERS: usize = 256;

/// Both views of one accessed file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AccessPaths {
    /// As the opening process sees it (relative to its root, through its mounts). When that
    /// cannot be established: the path the event's descriptor reads as.
    pub path: String,
    /// As the agent's mount namespace (the host) sees it, when such a path reaches the same
    /// file and differs from `path`; empty otherwise.
    pub host_path: String,
}

/// The paths of the file of an event: `fd` is the event's descriptor, `seen` what
/// `readlink(/proc/self/fd/N)` said of it (without " (deleted)"), `pid`/`pidfd` the opener as
/// the event reported it. Call it off the reader thread (the hashing threads), or after the
/// kernel has its answer.
pub(crate) fn resolve(
    fd: BorrowedFd<'_>,
    seen: &Path,
    pid: i32,
    pidfd: Option<&OwnedFd>,
) -> AccessPaths {
    match fleetscan_fanotify::statx_fd(fd) {
        Ok(st) => resolve_stat(&st, seen, pid, pidfd),
        Err(_) => AccessPaths {
            path: seen.to_string_lossy().into_owned(),
            host_path: String::new(),
        },
    }
}

/// [`resolve`] with the descriptor's statx already taken.
pub(crate) fn resolve_stat(
    file: &FileStat,
    seen: &Path,
    pid: i32,
    pidfd: Option<&OwnedFd>,
) -> AccessPaths {
    let key = pidfd.and_then(|fd| crate::subject::process_key(fd.as_fd()));
    // An opener with the agent's own root and mounts (a host process) sees what the
    // descriptor reads as: nothing to work out, nothing to check.
    let known = key.and_then(cached_view);
    if known.as_ref().is_some_and(|v| v.agents_view) {
        return AccessPaths {
            path: seen.to_string_lossy().into_owned(),
            host_path: String::new(),
        };
    }
    let opener = pidfd.and_then(|fd| {
        let dir = ProcDir::open(pid, fd.as_fd())?;
        let view = known.or_else(|| read_view(&dir, key))?;
        Some((dir, view))
    });
    if opener.as_ref().is_some_and(|(_, v)| v.agents_view) {
        return AccessPaths {
            path: seen.to_string_lossy().into_owned(),
            host_path: String::new(),
        };
    }
    let mut layers: Vec<PathBuf> = Vec::new();
    let container = opener
        .as_ref()
        .and_then(|(dir, view)| container_path(dir, view, file, seen, &mut layers));
    let host = host_path(
        file,
        seen,
        &layers,
        opener.as_ref().map(|(_, v)| &**v),
        container.as_deref(),
    );
    let path = container.unwrap_or_else(|| seen.to_path_buf());
    let host_path = host.filter(|h| *h != path);
    AccessPaths {
        path: path.to_string_lossy().into_owned(),
        host_path: host_path
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// One mount as a process sees it, with what mountinfo says after the ` - `.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mount {
    pub entry: MountEntry,
    pub fstype: String,
    /// An overlay's layer directories (upper first, then the lower ones), as its mounter gave
    /// them; empty for other filesystems.
    pub layers: Vec<PathBuf>,
}

/// What an opener's paths are relative to: its root as the agent reads it, and its mounts.
#[derive(Debug)]
struct OpenerView {
    root: PathBuf,
    mounts: Vec<Mount>,
    /// Its root is the agent's and it is in the agent's mount namespace: its paths are the
    /// agent's.
    agents_view: bool,
    at: Instant,
}

static OPENER_VIEWS: LazyLock<Mutex<LruCache<u64, Arc<OpenerView>>>> =
    LazyLock::new(|| Mutex::new(LruCache::new(NonZeroUsize::new(OPENERS).expect("non-zero"))));

/// The agent's own mount table and when it was read.
type HostMounts = Option<(Instant, Arc<Vec<Mount>>)>;

static HOST_MOUNTS: LazyLock<Mutex<HostMounts>> = LazyLock::new(|| Mutex::new(None));

/// The cached view of the opener whose pidfs inode is `key`, if younger than [`MOUNTS_TTL`]
/// (a mount change inside that window can only make a check fail, never pass wrongly).
fn cached_view(key: u64) -> Option<Arc<OpenerView>> {
    let mut views = OPENER_VIEWS.lock();
    let v = views.get(&key)?;
    (Instant::now().saturating_duration_since(v.at) < MOUNTS_TTL).then(|| v.clone())
}

/// The opener's root and mount table, read through its `/proc` directory and cached by its
/// pidfs inode `key` (none: not cached).
fn read_view(dir: &ProcDir, key: Option<u64>) -> Option<Arc<OpenerView>> {
    static AGENT_MOUNT_NS: LazyLock<Option<PathBuf>> =
        LazyLock::new(|| std::fs::read_link("/proc/self/ns/mnt").ok());
    let root = dir.read_link("root").ok()?;
    let mount_ns = dir.read_link("ns/mnt").ok();
    let agents_view = root == Path::new("/")
        && mount_ns.is_some()
        && mount_ns.as_ref() == AGENT_MOUNT_NS.as_ref();
    let mounts = if agents_view {
        Vec::new() // Never looked at: its paths are the agent's.
    } else {
        dir.read("mountinfo")
            .map(|t| parse_mounts(&t))
            .unwrap_or_default()
    };
    let view = Arc::new(OpenerView {
        root,
        mounts,
        agents_view,
        at: Instant::now(),
    });
    if let Some(key) = key {
        OPENER_VIEWS.lock().put(key, view.clone());
    }
    Some(view)
}

fn host_mounts() -> Arc<Vec<Mount>> {
    let now = Instant::now();
    let mut cached = HOST_MOUNTS.lock();
    if let Some((at, m)) = &*cached
        && now.saturating_duration_since(*at) < MOUNTS_TTL
    {
        return m.clone();
    }
    let m = Arc::new(
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| parse_mounts(&t))
            .unwrap_or_default(),
    );
    *cached = Some((now, m.clone()));
    m
}

/// Whether `path` (`lstat`, not followed) is the event's file.
fn is_file(path: &Path, file: &FileStat) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == file.dev && m.ino() == file.ino)
}

/// Whether `path` is the overlay file over the event's layer file: on the overlay `mount`
/// and with the layer file's inode number.
fn is_overlay_of(path: &Path, mount: &Mount, file: &FileStat) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        let (major, minor) = dev_split(m.dev());
        (major, minor) == (mount.entry.major, mount.entry.minor)
            && m.ino() == file.ino
            && m.file_type().is_file()
    })
}

/// `major:minor` of an encoded `st_dev` (glibc's `gnu_dev_major`/`gnu_dev_minor`).
fn dev_split(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    (major as u32, minor as u32)
}

/// `path` without its root, for joining under another directory; `None` if it climbs (`..`)
/// or is not absolute.
fn relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    let mut comps = path.components();
    if comps.next() != Some(Component::RootDir) {
        return None;
    }
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// The path as the opener sees it (relative to its root), checked through
/// `/proc/<pid>/root`. For an overlay's layer file, the overlay's layer directories go to
/// `layers` (where the host may see the file).
fn container_path(
    dir: &ProcDir,
    view: &OpenerView,
    file: &FileStat,
    seen: &Path,
    layers: &mut Vec<PathBuf>,
) -> Option<PathBuf> {
    let root = dir.entry("root");
    // The descriptor's path and the opener's root are both read from the root of the same
    // mount namespace: one under the other gives the path inside the root.
    if let Ok(rest) = seen.strip_prefix(&view.root)
        && let Some(rel) = relative(&Path::new("/").join(rest))
        && is_file(&root.join(&rel), file)
    {
        return Some(Path::new("/").join(rel));
    }
    // A layer file of an overlay: the path below the layer is the path below the overlay.
    let rel = relative(seen)?;
    for m in view.mounts.iter().filter(|m| m.fstype == "overlay") {
        let Some(mp) = relative(&m.entry.mount_point) else {
            continue;
        };
        let candidate = mp.join(&rel);
        if is_overlay_of(&root.join(&candidate), m, file) {
            layers.clone_from(&m.layers);
            return Some(Path::new("/").join(candidate));
        }
    }
    None
}

/// A path in the agent's mount namespace that reaches the file.
fn host_path(
    file: &FileStat,
    seen: &Path,
    layers: &[PathBuf],
    view: Option<&OpenerView>,
    container: Option<&Path>,
) -> Option<PathBuf> {
    if seen.is_absolute() && is_file(seen, file) {
        return Some(seen.to_path_buf());
    }
    let rel = relative(seen)?;
    for layer in layers {
        let candidate = layer.join(&rel);
        if candidate.is_absolute() && is_file(&candidate, file) {
            return Some(candidate);
        }
    }
    // Through the filesystem: the opener's mount gives the file's path from the root of its
    // filesystem, and any mount of that filesystem in the agent's table that shows that
    // directory gives a host path.
    let (view, container) = (view?, container?);
    let mount = file
        .mnt_id
        .and_then(|id| view.mounts.iter().find(|m| m.entry.id == id))?;
    let fs_path = crate::mounts::fs_relative(&mount.entry, container)?;
    let host = host_mounts();
    host.iter()
        .filter(|h| (h.entry.major, h.entry.minor) == (file.dev_major, file.dev_minor))
        .filter_map(|h| {
            let below = fs_path.strip_prefix(&h.entry.root).ok()?;
            Some(h.entry.mount_point.join(below))
        })
        .find(|candidate| is_file(candidate, file))
}

/// Parses mountinfo text with each mount's filesystem type and, for overlays, their layers.
pub(crate) fn parse_mounts(text: &str) -> Vec<Mount> {
    let mut extra: HashMap<u64, (String, Vec<PathBuf>)> = HashMap::new();
    for line in text.lines() {
        let Some((head, tail)) = line.split_once(" - ") else {
            continue;
        };
        let Some(Ok(id)) = head.split(' ').next().map(str::parse::<u64>) else {
            continue;
        };
        let mut f = tail.split(' ');
        let (Some(fstype), Some(_source), Some(options)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let layers = if fstype == "overlay" {
            overlay_layers(options)
        } else {
            Vec::new()
        };
        extra.insert(id, (fstype.to_owned(), layers));
    }
    let mut mounts: Vec<Mount> = parse_mountinfo(text)
        .into_values()
        .filter_map(|entry| {
            let (fstype, layers) = extra.remove(&entry.id)?;
            Some(Mount {
                entry,
                fstype,
                layers,
            })
        })
        .collect();
    // Mount ids grow with time: the newest mount on a path is the one in view.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.entry.id));
    mounts
}

/// `upperdir` then each `lowerdir` of an overlay's options (`lowerdir=/a:/b,upperdir=/u,…`).
/// In the options, `,`, spaces and `\` are octal escapes, and a `:` inside a path is `\:`.
fn overlay_layers(options: &str) -> Vec<PathBuf> {
    let mut upper = Vec::new();
    let mut lower = Vec::new();
    for opt in options.split(',') {
        if let Some(v) = opt.strip_prefix("upperdir=") {
            upper.push(unescape(v.as_bytes()));
        } else if let Some(v) = opt.strip_prefix("lowerdir=") {
            let b = v.as_bytes();
            let mut start = 0;
            let mut i = 0;
            while i <= b.len() {
                if i == b.len() || (b[i] == b':' && (i == 0 || b[i - 1] != b'\\')) {
                    // "::" separates data-only layers: an empty piece is no layer.
                    if i > start {
                        lower.push(unescape(&b[start..i]));
                    }
                    start = i + 1;
                }
                i += 1;
            }
        }
    }
    upper.extend(lower);
    upper
}

/// Undoes mountinfo's octal escapes and overlayfs's `\:`.
fn unescape(b: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else if b[i] == b'\\' && b.get(i + 1) == Some(&b':') {
            out.push(b':');
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const SAMPLE: &str = "\
69 44 0:40 / / rw,relatime - overlay ov rw,lowerdir=/l/one:/l/tw\\072o::/l/data,upperdir=/u\\040x,workdir=/w,uuid=on
75 69 0:39 /vol /vol rw,relatime - tmpfs t rw
76 69 0:42 / /proc rw,relatime - proc proc rw
broken line
";

    #[test]
    fn mounts_with_types_and_overlay_layers() {
        let m = parse_mounts(SAMPLE);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].entry.id, 76, "newest first");
        let ov = m.iter().find(|m| m.fstype == "overlay").unwrap();
        assert_eq!(
            ov.layers,
            ["/u x", "/l/one", "/l/tw:o", "/l/data"]
                .map(PathBuf::from)
                .to_vec()
        );
        let vol = m.iter().find(|m| m.entry.id == 75).unwrap();
        assert_eq!(vol.fstype, "tmpfs");
        assert!(vol.layers.is_empty());
        assert_eq!(
            overlay_layers(r"lowerdir=/a\:b:/c"),
            ["/a:b", "/c"].map(PathBuf::from).to_vec()
        );
    }

    #[test]
    fn relative_paths_never_climb() {
        assert_eq!(relative(Path::new("/a/./b")), Some(PathBuf::from("a/b")));
        assert_eq!(relative(Path::new("/")), Some(PathBuf::new()));
        assert_eq!(relative(Path::new("/a/../etc")), None);
        assert_eq!(relative(Path::new("a/b")), None);
    }

    /// A file of this test's own under the temp directory, removed on drop.
    struct Scratch(PathBuf, std::fs::File);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let p =
                std::env::temp_dir().join(format!("fleetscan-paths-{}-{name}", std::process::id()));
            std::fs::write(&p, name).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            Scratch(std::fs::canonicalize(&p).unwrap(), f)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn device_numbers_split_as_glibc_does() {
        let f = Scratch::new("dev");
        let st = fleetscan_fanotify::statx_fd(f.1.as_fd()).unwrap();
        assert_eq!(dev_split(st.dev), (st.dev_major, st.dev_minor));
        // glibc's makedev(0x1234, 0x4567): both numbers wider than the old 8/12 bits.
        let (major, minor) = (0x1234u64, 0x4567u64);
        let dev = ((major & 0xffff_f000) << 32)
            | ((major & 0xfff) << 8)
            | ((minor & 0xffff_ff00) << 12)
            | (minor & 0xff);
        assert_eq!(dev_split(dev), (0x1234, 0x4567));
    }

    #[test]
    fn a_host_process_sees_the_host_path() {
        let f = Scratch::new("host");
        let me = i32::try_from(std::process::id()).unwrap();
        let pidfd = fleetscan_fanotify::pidfd_open(me).unwrap();
        let seen = f.0.clone();
        let p = resolve(f.1.as_fd(), &seen, me, Some(&pidfd));
        assert_eq!(
            p,
            AccessPaths {
                path: seen.to_string_lossy().into_owned(),
                host_path: String::new(),
            }
        );
        // A wrong string is never confirmed: the path of another file is not this file's.
        let other = Scratch::new("other");
        let p = resolve(other.1.as_fd(), &seen, me, Some(&pidfd));
        assert_eq!(
            p.path,
            seen.to_string_lossy(),
            "falls back to what the descriptor said"
        );
        assert_eq!(p.host_path, "");
    }
}
