//! Pods on this machine, for attribution tests: a [`Container`] is a process tree in new mount
//! and pid namespaces whose root is an overlayfs, inside a cgroup v2 directory named the way
//! containerd or CRI-O (systemd driver) names a pod's container:
//! `<parent>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<64 hex>.scope`
//! (or `crio-<64 hex>.scope`), under a parent cgroup of the test's own
//! (`fleetscan-test-<pid>-<n>`).
//!
//! The overlay is mounted *only inside* the container's mount namespace (over layer
//! directories the caller chooses, normally on a tmpfs of the sandbox that the agent protects);
//! the host's `/usr` (and `/bin`, `/lib*`, `/sbin`, which may be links into it) is bound
//! read-only into it so programs run, a `/proc` of the new pid namespace is mounted, a `/dev`
//! tmpfs with the host's `null`, `zero` and `urandom` bound into it, and the
//! init process `pivot_root`s into it, as runc does. The init process is moved into the cgroup
//! before it execs, so everything in the container is in it from its first instruction. The
//! init waits on its standard input, held by the test: if the test process dies, the init sees
//! end of file and exits, which ends the pid namespace (and its mount namespace with it).
//!
//! Cleanup: [`Drop`] ends the init, kills whatever is left in the cgroups (`cgroup.kill`) and
//! removes them, deepest first. A guard shell does the same when its standard input (held by
//! the test) closes, should the test process be killed before Drop runs.
//!
//! Must never: create or remove a cgroup outside its own parent directory, mount anything
//! outside the container's own mount namespace, kill a process outside its own cgroups.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::command::run_with_deadline;
use crate::require_root;

/// How long a command run in a container ([`Container::exec`]) may take.
pub const EXEC_LIMIT: Duration = Duration::from_secs(60);

/// Which container runtime's cgroup naming to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope`
    Containerd,
    /// `crio-<id>.scope`
    Crio,
}

/// What to put in a container.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub runtime: Runtime,
    /// Files of the image (the overlay's lower layer): path inside the container, content.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// Host directories bound into the container (a pod's volumes): host path, path inside.
    pub volumes: Vec<(PathBuf, PathBuf)>,
}

impl ContainerSpec {
    pub fn new(runtime: Runtime) -> Self {
        ContainerSpec {
            runtime,
            files: Vec::new(),
            volumes: Vec::new(),
        }
    }

    /// Adds a file of the image at `path` (absolute, inside the container).
    pub fn file(mut self, path: &str, data: &[u8]) -> Self {
        self.files.push((path.into(), data.to_vec()));
        self
    }

    /// Binds the host directory `host` at `path` inside the container.
    pub fn volume(mut self, host: &Path, path: &str) -> Self {
        self.volumes.push((host.to_path_buf(), path.into()));
        self
    }
}

/// A running container. See the module header.
pub struct Container {
    /// The 64-hex container id its cgroup names.
    pub id: String,
    /// The pod UID (dashes) its cgroup names.
    pub pod_uid: String,
    /// Its cgroup as `/proc/<pid>/cgroup` shows it (`0::<this>`).
    pub cgroup: String,
    /// Its cgroup directory.
    pub cgroup_dir: PathBuf,
    /// The layer directories on the host: the image's files are under `lower`, what the
    /// container writes lands in `upper`.
    pub lower: PathBuf,
    pub upper: PathBuf,
    /// Host pid of the container's init (pid 1 inside).
    pub init_pid: u32,
    /// The `unshare` process (its child is the init).
    unshare: Child,
    init_stdin: Option<ChildStdin>,
    /// Cgroup directories created, parents first.
    created: Vec<PathBuf>,
    guard: Option<(Child, ChildStdin)>,
}

/// The init's script, run as pid 1 of the new pid namespace, in the new mount namespace.
/// $1 lower, $2 upper, $3 work, $4 rootfs; then pairs of (host dir, path inside) to bind.
const INIT_SCRIPT: &str = r#"
set -e
lower=$1 upper=$2 work=$3 rootfs=$4
shift 4
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$rootfs"
for d in usr bin lib lib32 lib64 libx32 sbin; do
    [ -d "/$d" ] || continue
    mkdir -p "$rootfs/$d"
    mount --bind "/$d" "$rootfs/$d"
    mount -o remount,bind,ro "$rootfs/$d"
done
while [ $# -ge 2 ]; do
    mkdir -p "$rootfs$2"
    mount --bind "$1" "$rootfs$2"
    shift 2
done
mkdir -p "$rootfs/proc" "$rootfs/tmp" "$rootfs/dev" "$rootfs/.oldroot"
mount -t proc proc "$rootfs/proc"
mount -t tmpfs -o size=1m,mode=0755 dev "$rootfs/dev"
for d in null zero urandom; do
    : > "$rootfs/dev/$d"
    mount --bind "/dev/$d" "$rootfs/dev/$d"
done
cd "$rootfs"
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
echo "container ready $$"
exec cat >/dev/null
"#;

/// The guard's script: collects cgroup directories (one a line, parents first) until end of
/// file, then kills what is in them and removes them, deepest first. It ignores the terminal's
/// signals, so that a Ctrl-C cannot stop it before it has cleaned up.
const GUARD_SCRIPT: &str = r#"
trap '' INT TERM HUP QUIT
todo=''
while IFS= read -r dir; do
    todo="$dir
$todo"
done
printf '%s' "$todo" | while IFS= read -r dir; do
    [ -d "$dir" ] || continue
    echo 1 > "$dir/cgroup.kill" 2>/dev/null
    i=0
    while [ -s "$dir/cgroup.procs" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
    rmdir "$dir"
done >/dev/null 2>&1
"#;

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on a hybrid host), and the cgroup path of that mount's root.
fn cgroup2_mount() -> (PathBuf, String) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    for line in text.lines() {
        let Some((head, tail)) = line.split_once(" - ") else {
            continue;
        };
        if tail.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let f: Vec<&str> = head.split(' ').collect();
        if f.len() >= 5 {
            return (PathBuf::from(f[4]), f[3].to_owned());
        }
    }
    panic!("this test needs a cgroup v2 hierarchy (no cgroup2 mount in /proc/self/mountinfo)")
}

/// Unique-enough random bits for ids: time, pid and a counter through xorshift.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut x = t
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

fn container_id() -> String {
    (0..4).map(|_| format!("{:016x}", random_u64())).collect()
}

fn pod_uid() -> String {
    let h = format!("{:016x}{:016x}", random_u64(), random_u64());
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Container {
    /// Starts a container whose layers live under `layers` (a directory of the test's own,
    /// normally on a tmpfs its agent protects), and waits until its init is in its root.
    /// Needs root and cgroup v2.
    pub fn start(layers: &Path, spec: ContainerSpec) -> Container {
        require_root();
        let id = container_id();
        let pod_uid = pod_uid();
        let (cg_mount, cg_root) = cgroup2_mount();
        let parent = format!(
            "fleetscan-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let scope = match spec.runtime {
            Runtime::Containerd => format!("cri-containerd-{id}.scope"),
            Runtime::Crio => format!("crio-{id}.scope"),
        };
        let chain = [
            parent,
            "kubepods.slice".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_")),
            scope,
        ];
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(GUARD_SCRIPT)
            .arg("fleetscan-container-guard")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the container guard (sh): {e}"));
        let mut guard_in = guard.stdin.take().expect("piped stdin");
        let mut created = Vec::new();
        let mut dir = cg_mount.clone();
        for c in &chain {
            dir.push(c);
            std::fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
            writeln!(guard_in, "{}", dir.display()).expect("telling the container guard");
            created.push(dir.clone());
        }
        let cgroup = Path::new(&cg_root)
            .join(dir.strip_prefix(&cg_mount).expect("under the mount"))
            .display()
            .to_string();

        let base = layers.join(format!("ctr-{}", &id[..12]));
        let (lower, upper, work, rootfs) = (
            base.join("lower"),
            base.join("upper"),
            base.join("work"),
            base.join("rootfs"),
        );
        for d in [&lower, &upper, &work, &rootfs] {
            std::fs::create_dir_all(d).expect("creating a layer directory");
        }
        for (path, data) in &spec.files {
            let rel = path.strip_prefix("/").unwrap_or(path);
            let p = lower.join(rel);
            std::fs::create_dir_all(p.parent().expect("a parent")).expect("creating image dirs");
            std::fs::write(&p, data).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        }

        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(
                r#"echo $$ > "$1/cgroup.procs" || exit 1; shift
                exec unshare --mount --propagation private --pid --fork --kill-child sh -c "$@""#,
            )
            .arg("fleetscan-container")
            .arg(&dir)
            .arg(INIT_SCRIPT)
            .arg("fleetscan-container-init")
            .args([&lower, &upper, &work, &rootfs]);
        for (host, inside) in &spec.volumes {
            cmd.arg(host).arg(inside);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting a container: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // From here on, Drop cleans up whatever happens.
        let mut container = Container {
            id,
            pod_uid,
            cgroup,
            cgroup_dir: dir,
            lower,
            upper,
            init_pid: 0,
            init_stdin: child.stdin.take(),
            unshare: child,
            created,
            guard: Some((guard, guard_in)),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("container ready") {
                    let _ = tx.send(());
                }
            }
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut { stderr }, &mut s);
            s
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = container.unshare.kill();
            panic!(
                "the container did not start: {}",
                err.join().unwrap_or_default()
            );
        }
        container.init_pid = container
            .pids()
            .into_iter()
            .find(|p| ns_pid_of(*p) == Some(1))
            .expect("the container's init in its cgroup");
        container
    }

    /// Host pids of the processes in the container's cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.cgroup_dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Runs `argv` inside the container (its cgroup, mount and pid namespaces, root and
    /// working directory) and returns its output; killed past [`EXEC_LIMIT`].
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_inner(None, argv)
    }

    /// [`Container::exec`], asking the kernel to give the process started inside the host pid
    /// `host_pid` (by setting the host's `ns_last_pid` just before the fork). Other processes
    /// forking at the same moment can take it first: the caller checks and retries.
    pub fn exec_as_host_pid(&self, host_pid: u32, argv: &[&str]) -> Output {
        self.exec_inner(Some(host_pid), argv)
    }

    fn exec_inner(&self, host_pid: Option<u32>, argv: &[&str]) -> Output {
        let last = host_pid.map_or(String::new(), |p| p.saturating_sub(1).to_string());
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(
                r#"echo $$ > "$1/cgroup.procs" || exit 125
                [ -z "$3" ] || echo "$3" > /proc/sys/kernel/ns_last_pid || exit 125
                target=$2; shift 3
                exec nsenter --target "$target" --mount --pid --root --wd -- "$@""#,
            )
            .arg("fleetscan-container-exec")
            .arg(&self.cgroup_dir)
            .arg(self.init_pid.to_string())
            .arg(last)
            .args(argv);
        run_with_deadline(&mut cmd, EXEC_LIMIT)
            .unwrap_or_else(|e| panic!("running {argv:?} in container {}: {e}", self.id))
    }

    fn remove_cgroups(&mut self) {
        for dir in self.created.iter().rev() {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5)
                && !std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .trim()
                    .is_empty()
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The pid of host process `pid` in its innermost pid namespace.
fn ns_pid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

impl Drop for Container {
    fn drop(&mut self) {
        // End of its input ends the init, and with it the pid namespace.
        drop(self.init_stdin.take());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.unshare.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        self.remove_cgroups();
        if let Some((mut guard, stdin)) = self.guard.take() {
            // End of file: the guard finds nothing left and exits.
            drop(stdin);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = guard.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = guard.kill();
            let _ = guard.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_runtimes_formats() {
        let id = container_id();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        let uid = pod_uid();
        assert_eq!(uid.len(), 36);
        assert_eq!(uid.matches('-').count(), 4);
        assert_ne!(container_id(), id);
    }
}
