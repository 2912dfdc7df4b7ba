//! Who made an access: host pid, pid in its own pid namespace, uid, executable, cgroup, and the
//! container and pod the cgroup names, for the process behind an event's pidfd.
//!
//! Never attribute to the wrong process. A pid number is recycled once its process has exited
//! and been reaped, so nothing here trusts one alone: `/proc/<pid>` is opened as a directory
//! first, and only if the pidfd then says its process has not exited did that pid name the
//! process when the directory was opened. Everything is read *relative to that directory*
//! (`status`, `cgroup`, the `exe` link), which the kernel ties to the one process it was
//! opened for: once that process is gone, reads fail with `ESRCH`/`ENOENT` instead of
//! describing a newcomer with the same number. No pidfd (the kernel could not make one, the
//! process had exited before the event was read, or a kernel before 5.15), or a process gone
//! before the directory was opened: the access is *unattributed* (host pid only, every other
//! field empty).
//!
//! It reads only `status`, `cgroup` and the `exe` link: none of them takes the target's
//! `exec_update_lock`, which a process blocked in an exec's permission event may hold (reading
//! `environ`, `maps` or `mem` there would deadlock). Nothing here blocks or opens a file
//! outside `/proc`.
//!
//! **Cache.** A process that opens a thousand files should not cost a thousand sets of `/proc`
//! reads. Subjects are cached by the pidfd's inode number on pidfs (Linux 6.9+: one number per
//! process for the whole boot, never reused, unlike a pid) in a bounded LRU shared by every
//! thread. A hit costs a `statx` and a `PIDFD_GET_INFO` (6.13+) on the pidfd, and is used only
//! while the process's cgroup id and real uid are still those cached: a move to another
//! cgroup (and so another container) or a setuid is seen at the next access. What `PIDFD_GET_INFO`
//! cannot see is an `execve` (it changes `exe`, nothing else here): an entry is therefore
//! re-read after [`TTL`], which bounds how long `exe` may name the previous program after an
//! exec. Without pidfs there is no cache (every pidfd shares one inode); without
//! `PIDFD_GET_INFO`, entries live for [`TTL`] only. A cached subject of a process that has
//! exited since stays right: the key names that process alone.

use std::fs::File;
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use fleetscan_core::Subject;
use fleetscan_fanotify::PidfdInfo;
use lru::LruCache;
use parking_lot::Mutex;

/// How long a cached subject is used before `/proc` is read again (see the module header).
pub(crate) const TTL: Duration = Duration::from_secs(1);

/// Processes whose subjects are cached at once (a few hundred bytes each).
const CAPACITY: usize = 4096;

static CACHE: LazyLock<Mutex<SubjectCache>> =
    LazyLock::new(|| Mutex::new(SubjectCache::new(CAPACITY, TTL)));

/// Who made the access `pid` (as the agent's pid namespace sees it) reported with `pidfd`.
/// Missing pieces stay empty; without a pidfd, or for a process that exited before it could be
/// examined, everything but `pid` is empty (unattributed), never another process's data.
pub(crate) fn resolve(pid: i32, pidfd: Option<&OwnedFd>) -> Subject {
    let unattributed = Subject {
        pid: u32::try_from(pid).unwrap_or(0),
        ..Default::default()
    };
    let Some(pidfd) = pidfd else {
        return unattributed;
    };
    if pid <= 0 {
        return unattributed;
    }
    let pidfd = pidfd.as_fd();
    let key = process_key(pidfd);
    let info = fleetscan_fanotify::pidfd_info(pidfd);
    let live = info.as_ref().ok().copied();
    if let Some(key) = key {
        let gone = matches!(&info, Err(e) if e.raw_os_error() == Some(ESRCH));
        if let Some(hit) = CACHE.lock().get(key, live.as_ref(), gone, Instant::now()) {
            return hit;
        }
    }
    if let Some(info) = &live
        && info.pid != 0
        && i64::from(info.pid) != i64::from(pid)
    {
        // The event's pid and the pidfd disagree: trust neither.
        return unattributed;
    }
    let Some(dir) = ProcDir::open(pid, pidfd) else {
        return unattributed;
    };
    let s = read_subject(&dir, unattributed);
    if let Some(key) = key {
        CACHE.lock().insert(key, &s, live.as_ref(), Instant::now());
    }
    s
}

/// `ESRCH` ("no such process"), 3 on every Linux architecture; what `PIDFD_GET_INFO` answers
/// once the process has been reaped.
const ESRCH: i32 = 3;

/// The pidfd's pidfs inode (see the module header), `None` where pidfds have no identity of
/// their own. Whether pidfs exists is learned once: after that, one `statx` per call.
pub(crate) fn process_key(pidfd: BorrowedFd<'_>) -> Option<u64> {
    static PIDFS: OnceLock<bool> = OnceLock::new();
    match PIDFS.get() {
        Some(true) => fleetscan_fanotify::statx_fd(pidfd).ok().map(|st| st.ino),
        Some(false) => None,
        None => match fleetscan_fanotify::pidfd_inode(pidfd) {
            Ok(ino) => {
                let _ = PIDFS.set(ino.is_some());
                ino
            }
            Err(_) => None,
        },
    }
}

fn read_subject(dir: &ProcDir, mut s: Subject) -> Subject {
    if let Ok(status) = dir.read("status") {
        let (uid, ns_pid) = parse_status(&status);
        s.uid = uid.unwrap_or(0);
        s.ns_pid = ns_pid.unwrap_or(0);
    }
    if let Ok(exe) = dir.read_link("exe") {
        s.exe = exe.to_string_lossy().into_owned();
    }
    if let Ok(cg) = dir.read("cgroup") {
        s.cgroup = parse_cgroup_file(&cg);
        let ids = container_of(&s.cgroup);
        s.container_id = ids.container_id;
        s.pod_uid = ids.pod_uid;
    }
    s
}

/// `/proc/<pid>` of one process, opened while `pid` still named it (checked through its
/// pidfd). Entries read through it describe that process or fail.
#[derive(Debug)]
pub(crate) struct ProcDir {
    dir: File,
}

impl ProcDir {
    /// Opens `/proc/<pid>` and keeps it only if the process behind `pidfd` had not exited by
    /// then (so the pid was not yet free to be reused).
    pub fn open(pid: i32, pidfd: BorrowedFd<'_>) -> Option<ProcDir> {
        if pid <= 0 {
            return None;
        }
        let dir = File::open(format!("/proc/{pid}")).ok()?;
        // After the open: a process that has not exited has not been reaped either, so the
        // directory just opened is its own.
        if fleetscan_fanotify::pidfd_exited(pidfd) {
            return None;
        }
        Some(ProcDir { dir })
    }

    /// The path of `name` inside the directory, through this process's descriptor of it (the
    /// kernel resolves it from the directory itself, not from the pid number).
    pub fn entry(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.dir.as_raw_fd()))
    }

    pub fn read(&self, name: &str) -> io::Result<String> {
        let mut text = String::new();
        File::open(self.entry(name))?.read_to_string(&mut text)?;
        Ok(text)
    }

    pub fn read_link(&self, name: &str) -> io::Result<PathBuf> {
        std::fs::read_link(self.entry(name))
    }
}

/// The cached part of a subject, and what it was read under.
#[derive(Clone, Debug)]
struct Entry {
    subject: Subject,
    cgroupid: Option<u64>,
    ruid: Option<u32>,
    at: Instant,
}

/// Subjects by process key (pidfs inode), bounded, least recently used out first.
#[derive(Debug)]
pub(crate) struct SubjectCache {
    entries: LruCache<u64, Entry>,
    ttl: Duration,
}

impl SubjectCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        SubjectCache {
            entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
            ttl,
        }
    }

    /// The cached subject of process `key`, if it is still good: younger than the TTL and
    /// read under the cgroup and uid `info` reports now. A process that is `gone` (reaped)
    /// keeps its last subject: the key was its alone.
    pub fn get(
        &mut self,
        key: u64,
        info: Option<&PidfdInfo>,
        gone: bool,
        now: Instant,
    ) -> Option<Subject> {
        let e = self.entries.get(&key)?;
        if gone {
            return Some(e.subject.clone());
        }
        let fresh = now.saturating_duration_since(e.at) < self.ttl;
        let same = info.is_none_or(|i| e.cgroupid == i.cgroupid && e.ruid == Some(i.ruid));
        if fresh && same {
            return Some(e.subject.clone());
        }
        self.entries.pop(&key);
        None
    }

    pub fn insert(&mut self, key: u64, subject: &Subject, info: Option<&PidfdInfo>, now: Instant) {
        self.entries.put(
            key,
            Entry {
                subject: subject.clone(),
                cgroupid: info.and_then(|i| i.cgroupid),
                ruid: info.map(|i| i.ruid),
                at: now,
            },
        );
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// (real uid, pid in the innermost pid namespace) from `/proc/<pid>/status`.
fn parse_status(status: &str) -> (Option<u32>, Option<u32>) {
    let mut uid = None;
    let mut ns_pid = None;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            uid = v.split_whitespace().next().and_then(|x| x.parse().ok());
        } else if let Some(v) = line.strip_prefix("NSpid:") {
            ns_pid = v.split_whitespace().last().and_then(|x| x.parse().ok());
        }
    }
    (uid, ns_pid)
}

/// The cgroup v2 path (`0::/…`), or the first hierarchy's path on a v1 host.
fn parse_cgroup_file(text: &str) -> String {
    let mut first = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" {
            return path.to_string();
        }
        first.get_or_insert_with(|| path.to_string());
    }
    first.unwrap_or_default()
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ContainerIds {
    pub container_id: String,
    pub pod_uid: String,
}

/// The container id and pod uid a cgroup path names, in the layouts of containerd, CRI-O,
/// Docker and podman, with the systemd and the cgroupfs drivers:
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`,
/// `/kubepods/besteffort/pod<uid>/<id>`, `/system.slice/docker-<id>.scope`, `crio-<id>.scope`,
/// `…/kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>` (a systemd unit name and its
/// runtime and id joined by colons), `libpod-<id>.scope/container`. Where several components
/// match (a node running in a container of its own: `/docker-<node>.scope/kubepods/…`), the
/// last one wins: it is the innermost. Anything else is no match, never a guess.
pub(crate) fn container_of(cgroup: &str) -> ContainerIds {
    let mut ids = ContainerIds::default();
    for comp in cgroup.split(['/', ':']) {
        let base = comp
            .strip_suffix(".scope")
            .or_else(|| comp.strip_suffix(".slice"))
            .unwrap_or(comp);
        let id = [
            "cri-containerd-",
            "docker-",
            "crio-",
            "libpod-",
            "containerd-",
        ]
        .iter()
        .find_map(|p| base.strip_prefix(p))
        .unwrap_or(base);
        if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            ids.container_id = id.to_ascii_lowercase();
            continue;
        }
        // "pod<uid>" (cgroupfs) or "kubepods-<qos>-pod<uid>" (systemd, '_' for '-').
        let pod = base
            .strip_prefix("pod")
            .or_else(|| base.rsplit_once("-pod").map(|(_, u)| u));
        if let Some(uid) = pod {
            let uid = uid.replace('_', "-");
            if is_uuid(&uid) {
                ids.pod_uid = uid.to_ascii_lowercase();
            }
        }
    }
    ids
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn containerd_with_systemd_driver() {
        let cg = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_0000_1111_2222_333344445555.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            container_of(&cg),
            ContainerIds {
                container_id: ID.into(),
                pod_uid: "1b2c3d4e-0000-1111-2222-333344445555".into()
            }
        );
    }

    #[test]
    fn cgroupfs_driver_crio_and_docker() {
        let cg = format!("/kubepods/besteffort/pod1b2c3d4e-0000-1111-2222-333344445555/{ID}");
        let ids = container_of(&cg);
        assert_eq!(ids.container_id, ID);
        assert_eq!(ids.pod_uid, "1b2c3d4e-0000-1111-2222-333344445555");
        assert_eq!(
            container_of(&format!("/machine.slice/crio-{ID}.scope")).container_id,
            ID
        );
        assert_eq!(
            container_of(&format!("/system.slice/docker-{ID}.scope")).container_id,
            ID
        );
        assert_eq!(
            container_of("/user.slice/user-0.slice/session-1.scope"),
            ContainerIds::default()
        );
    }

    #[test]
    fn colon_joined_units_podman_and_nested_runtimes() {
        let uid = "1b2c3d4e-0000-1111-2222-333344445555";
        let cg = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice:cri-containerd:{ID}",
            uid.replace('-', "_")
        );
        assert_eq!(
            container_of(&cg),
            ContainerIds {
                container_id: ID.into(),
                pod_uid: uid.into()
            }
        );
        assert_eq!(
            container_of(&format!("/machine.slice/libpod-{ID}.scope/container")).container_id,
            ID
        );
        // A kind/k3d node is itself a Docker container: the pod's container is the innermost.
        let node = "f".repeat(64);
        let cg = format!("/system.slice/docker-{node}.scope/kubepods/burstable/pod{uid}/{ID}");
        assert_eq!(
            container_of(&cg),
            ContainerIds {
                container_id: ID.into(),
                pod_uid: uid.into()
            }
        );
        // Upper-case ids are the same container.
        assert_eq!(
            container_of(&format!("/system.slice/docker-{}.scope", ID.to_uppercase())).container_id,
            ID
        );
    }

    #[test]
    fn malformed_paths_name_no_container() {
        for cg in [
            String::new(),
            "/".into(),
            format!("/system.slice/docker-{}.scope", &ID[..63]),
            format!("/system.slice/docker-{ID}0.scope"),
            format!("/system.slice/docker-{}g.scope", &ID[..63]),
            "/kubepods/burstable/pod1b2c3d4e-0000-1111-2222-33334444555".into(),
            "/kubepods/burstable/pod1b2c3d4e_0000_1111_2222_333344445555x".into(),
            "::::".into(),
            "/kubepods-pod.slice/-pod/pod".into(),
        ] {
            assert_eq!(container_of(&cg), ContainerIds::default(), "{cg:?}");
        }
    }

    /// Random paths built from the pieces real ones are made of, and random bytes: the parser
    /// never panics, and whatever it reports is well-formed and was in the input.
    #[test]
    fn fuzzed_paths_never_panic_nor_invent_ids() {
        let pieces = [
            "/",
            ":",
            ".scope",
            ".slice",
            "kubepods",
            "-pod",
            "pod",
            "docker-",
            "crio-",
            "cri-containerd-",
            "libpod-",
            "containerd-",
            "_",
            "-",
            ID,
            &ID[..40],
            "0123",
            "1b2c3d4e-0000-1111-2222-333344445555",
            "1b2c3d4e_0000_1111_2222_333344445555",
            "é",
            "\0",
            " ",
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let mut cg = String::new();
            for _ in 0..(next() % 12) {
                if round % 4 == 0 {
                    // Raw bytes, made valid UTF-8 the lossy way.
                    let bytes: Vec<u8> = (0..(next() % 8)).map(|_| next() as u8).collect();
                    cg.push_str(&String::from_utf8_lossy(&bytes));
                } else {
                    cg.push_str(pieces[(next() % pieces.len() as u64) as usize]);
                }
            }
            let ids = container_of(&cg);
            if !ids.container_id.is_empty() {
                assert_eq!(ids.container_id.len(), 64, "{cg:?}");
                assert!(
                    ids.container_id
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                    "{cg:?}"
                );
                assert!(
                    cg.to_ascii_lowercase().contains(&ids.container_id),
                    "{cg:?}"
                );
            }
            if !ids.pod_uid.is_empty() {
                assert!(is_uuid(&ids.pod_uid), "{cg:?}");
                assert!(
                    cg.to_ascii_lowercase()
                        .replace('_', "-")
                        .contains(&ids.pod_uid),
                    "{cg:?}"
                );
            }
            let _ = parse_cgroup_file(&cg);
            let _ = parse_status(&cg);
        }
    }

    #[test]
    fn status_and_cgroup_files() {
        let status = "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nNSpid:\t4242\t7\n";
        assert_eq!(parse_status(status), (Some(1000), Some(7)));
        assert_eq!(
            parse_cgroup_file("0::/system.slice/x.service\n"),
            "/system.slice/x.service"
        );
        assert_eq!(parse_cgroup_file("12:cpu:/a\n11:memory:/b\n"), "/a");
    }

    fn me() -> i32 {
        i32::try_from(std::process::id()).unwrap()
    }

    #[test]
    fn resolves_this_process_through_its_pidfd() {
        let pidfd = fleetscan_fanotify::pidfd_open(me()).unwrap();
        let s = resolve(me(), Some(&pidfd));
        assert_eq!(s.pid, std::process::id());
        assert!(!s.exe.is_empty());
        assert!(s.cgroup.starts_with('/'), "{s:?}");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(Some(s.ns_pid), parse_status(&status).1);
        // A second call is answered from the cache, identically.
        assert_eq!(resolve(me(), Some(&pidfd)), s);
    }

    #[test]
    fn without_a_pidfd_nothing_but_the_pid_is_reported() {
        let s = resolve(me(), None);
        assert_eq!(
            s,
            Subject {
                pid: std::process::id(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_reaped_process_is_unattributed_even_when_its_pid_names_a_live_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pidfd = fleetscan_fanotify::pidfd_open(i32::try_from(child.id()).unwrap()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // The pid of this live process stands for "a recycled pid": the pidfd is not its.
        let s = resolve(me(), Some(&pidfd));
        assert_eq!(
            s,
            Subject {
                pid: std::process::id(),
                ..Default::default()
            }
        );
        assert!(ProcDir::open(me(), pidfd.as_fd()).is_none());
    }

    #[test]
    fn a_pidfd_of_another_process_than_the_pid_is_unattributed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pidfd = fleetscan_fanotify::pidfd_open(i32::try_from(child.id()).unwrap()).unwrap();
        let s = resolve(me(), Some(&pidfd));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            s.exe.is_empty() && s.cgroup.is_empty() && s.ns_pid == 0,
            "{s:?}"
        );
    }

    /// Spawns `argv` as a child with host pid `pid` if the kernel hands it out (by setting
    /// `ns_last_pid` just before the fork); other forks on the machine may win, so it retries.
    fn spawn_with_pid(pid: i32, argv: &[&str]) -> Option<std::process::Child> {
        for _ in 0..200 {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
            let mut child = std::process::Command::new(argv[0])
                .args(&argv[1..])
                .spawn()
                .ok()?;
            if i32::try_from(child.id()) == Ok(pid) {
                return Some(child);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }

    /// A real permission event whose opener exits, and whose pid is then given to another
    /// program before the event is examined: the event is never attributed to the newcomer
    /// (with the event's pidfd, nor without one), while a bare read of `/proc/<pid>` would.
    /// Needs root.
    #[test]
    fn an_event_examined_after_its_pid_was_reused_is_never_attributed_to_the_newcomer() {
        use fleetscan_fanotify::testing::{Tmpfs, watchdog};
        use fleetscan_fanotify::{Fanotify, InitOptions, PERMISSION_MASK, Response};
        watchdog(Duration::from_secs(120));
        let fs = Tmpfs::new();
        let file = fs.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let group = Fanotify::new(InitOptions { report_pidfd: true }).unwrap();
        group
            .add_filesystem_mark(fs.path(), PERMISSION_MASK)
            .unwrap();
        let mut opener = std::process::Command::new("cat")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let opener_pid = i32::try_from(opener.id()).unwrap();
        let start = Instant::now();
        let ev = loop {
            let (events, _) = group.read_events().unwrap();
            if let Some(ev) = events.into_iter().find(|e| e.pid == opener_pid) {
                break ev;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no event");
            std::thread::sleep(Duration::from_millis(5));
        };
        group
            .respond(ev.fd.as_ref().unwrap().as_fd(), Response::Allow)
            .unwrap();
        group
            .remove_filesystem_mark(fs.path(), PERMISSION_MASK)
            .unwrap();
        assert!(opener.wait().unwrap().success());
        let pidfd = ev.pidfd.expect("a pidfd with the event");
        let Some(mut newcomer) = spawn_with_pid(opener_pid, &["sleep", "30"]) else {
            panic!("pid {opener_pid} was never handed out again (other forks won)");
        };
        // The pid now names the newcomer: a bare read says so.
        let naive = std::fs::read_link(format!("/proc/{opener_pid}/exe")).unwrap();
        assert!(naive.ends_with("sleep"), "{naive:?}");
        let unattributed = Subject {
            pid: u32::try_from(opener_pid).unwrap(),
            ..Default::default()
        };
        assert_eq!(resolve(opener_pid, Some(&pidfd)), unattributed);
        assert_eq!(resolve(opener_pid, None), unattributed);
        newcomer.kill().unwrap();
        newcomer.wait().unwrap();
    }

    fn subject(exe: &str) -> Subject {
        Subject {
            pid: 7,
            exe: exe.into(),
            ..Default::default()
        }
    }

    fn info(cgroupid: u64, ruid: u32) -> PidfdInfo {
        PidfdInfo {
            pid: 7,
            ppid: 1,
            ruid,
            euid: ruid,
            cgroupid: Some(cgroupid),
        }
    }

    #[test]
    fn cache_entries_expire_and_follow_cgroup_and_uid_changes() {
        let t0 = Instant::now();
        let mut c = SubjectCache::new(8, Duration::from_secs(1));
        c.insert(1, &subject("/a"), Some(&info(10, 0)), t0);
        let later = t0 + Duration::from_millis(500);
        assert_eq!(
            c.get(1, Some(&info(10, 0)), false, later),
            Some(subject("/a"))
        );
        assert_eq!(
            c.get(2, Some(&info(10, 0)), false, later),
            None,
            "other process"
        );
        // Moved to another cgroup: re-read (and the stale entry is gone).
        assert_eq!(c.get(1, Some(&info(11, 0)), false, later), None);
        assert_eq!(c.len(), 0);
        c.insert(1, &subject("/a"), Some(&info(10, 0)), t0);
        assert_eq!(
            c.get(1, Some(&info(10, 1000)), false, later),
            None,
            "setuid"
        );
        c.insert(1, &subject("/a"), Some(&info(10, 0)), t0);
        // Past the TTL (an exec may have changed exe): re-read.
        let expired = t0 + Duration::from_secs(1);
        assert_eq!(c.get(1, Some(&info(10, 0)), false, expired), None);
        // A reaped process keeps its last subject, however old: the key was its alone.
        c.insert(1, &subject("/a"), Some(&info(10, 0)), t0);
        assert_eq!(
            c.get(1, None, true, t0 + Duration::from_secs(60)),
            Some(subject("/a"))
        );
        // Without PIDFD_GET_INFO only the TTL applies.
        assert_eq!(c.get(1, None, false, later), Some(subject("/a")));
    }

    #[test]
    fn cache_is_bounded() {
        let t0 = Instant::now();
        let mut c = SubjectCache::new(3, TTL);
        for k in 0..10 {
            c.insert(k, &subject("/a"), None, t0);
        }
        assert_eq!(c.len(), 3);
        assert!(c.get(9, None, false, t0).is_some());
        assert!(c.get(0, None, false, t0).is_none());
    }
}
