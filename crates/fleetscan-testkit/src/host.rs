//! Hosts for fleet tests on one machine: each [`Host`] is a network namespace on a bridge of the
//! sandbox's own, with a mount namespace of its own in which a fresh tmpfs is mounted at
//! [`Host::root`] (the same path on every host, a different filesystem on each), and its own
//! `fleetscan agent` running inside both namespaces ([`Sandbox::host_agent`]).
//!
//! A host's namespaces are held open by a *holder* process (`ip netns exec NS unshare --mount
//! --propagation private sh -c 'mount …; exec cat'`) that lives until its stdin closes, so it
//! also ends when the test process dies. The test reaches a host through [`Host::run`], which
//! runs a closure on a fresh thread that has entered the host's network and mount namespaces:
//! opens from there are opens on the host, seen by its agent, timed precisely, with the real
//! errno.
//!
//! Must never: touch a link, namespace or mount it did not create; let an agent protect a path
//! outside the host's own tmpfs (checked before the agent starts); wait on a host without a
//! deadline.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use nix::sched::CloneFlags;

use crate::cleanup::Teardown;
use crate::command::{COMMAND_LIMIT, run_checked, run_with_deadline};
use crate::{OpenOutcome, Proc, Sandbox};

/// How long one call into a host ([`Host::run`], [`HostCall::wait`]) may take.
pub const HOST_CALL_LIMIT: Duration = Duration::from_secs(60);

/// The prefix length of the sandbox's subnet.
const PREFIX_LEN: u8 = 24;

/// The script of a host's holder, run inside the new network and mount namespaces. $1: where
/// to mount the host's tmpfs, $2: the tmpfs's source name (to find it in mountinfo).
const HOLDER_SCRIPT: &str = r#"
mount -t tmpfs -o size=1g,mode=0755 "$2" "$1" || exit 1
echo "holder ready $$"
exec cat >/dev/null
"#;

/// The sandbox's bridge and the hosts on it.
pub(crate) struct Net {
    /// Unique per sandbox on this machine: the pid and a per-process sequence number.
    tag: String,
    bridge: String,
    /// The first three octets of the /24; .1 is the gateway (the bridge), hosts from .2.
    subnet: [u8; 3],
    hosts: u8,
}

impl Net {
    fn gateway(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }
}

/// One simulated host: its own network namespace (veth to the sandbox's bridge), its own mount
/// namespace with its own tmpfs at [`Host::root`].
pub struct Host {
    name: String,
    netns: String,
    addr: Ipv4Addr,
    root: PathBuf,
    holder: Proc,
    /// `/proc/HOLDER/ns/{net,mnt}`, opened once: they keep the namespaces alive while the host
    /// is in use, whatever happens to the holder.
    net_ns: Arc<File>,
    mnt_ns: Arc<File>,
}

/// A call into a host running on its own thread; [`HostCall::wait`] for its result.
pub struct HostCall<T> {
    host: String,
    rx: mpsc::Receiver<std::thread::Result<T>>,
}

impl<T> HostCall<T> {
    /// The closure's result; re-raises its panic; panics past [`HOST_CALL_LIMIT`] (the thread
    /// is left behind, blocked on whatever it waits for; the watchdog ends the test).
    pub fn wait(self) -> T {
        match self.rx.recv_timeout(HOST_CALL_LIMIT) {
            Ok(Ok(v)) => v,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!(
                "a call into host {} did not return within {HOST_CALL_LIMIT:?}",
                self.host
            ),
        }
    }
}

impl Host {
    /// The node name its agent reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of its network namespace (`ip netns`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its address on the sandbox's bridge.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Where its own tmpfs is mounted, as the host sees it (the same path on every host; in
    /// the test's own mount namespace it is an empty directory).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The process holding its namespaces (`nsenter -t PID -n -m` enters the host).
    pub fn holder_pid(&self) -> u32 {
        self.holder.pid
    }

    /// Runs `f` inside the host (its network and mount namespaces) on a fresh thread, and
    /// returns at once; the thread leaves the rest of the test process where it was.
    pub fn spawn<T, F>(&self, f: F) -> HostCall<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let net = Arc::clone(&self.net_ns);
        let mnt = Arc::clone(&self.mnt_ns);
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("host-{name}"))
            .spawn(move || {
                let out = match enter(&net, &mnt) {
                    Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)),
                    Err(e) => Err(Box::new(format!("cannot enter host {name}: {e}"))
                        as Box<dyn std::any::Any + Send>),
                };
                let _ = tx.send(out);
            })
            .expect("spawning a host thread");
        HostCall {
            host: self.name.clone(),
            rx,
        }
    }

    /// Runs `f` inside the host and waits for it (at most [`HOST_CALL_LIMIT`]).
    pub fn run<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.spawn(f).wait()
    }

    /// Opens and reads `path` on the host, timing the open.
    pub fn open(&self, path: impl Into<PathBuf>) -> OpenOutcome {
        let path = path.into();
        self.run(move || crate::open_timed(&path))
    }

    /// Writes `data` to `path` on the host, creating its parent directories.
    pub fn write(&self, path: impl Into<PathBuf>, data: &[u8]) {
        self.write_all(vec![(path.into(), data.to_vec())]);
    }

    /// Writes every `(path, content)` on the host, creating parent directories.
    pub fn write_all(&self, files: Vec<(PathBuf, Vec<u8>)>) {
        let name = self.name.clone();
        self.run(move || {
            for (path, data) in files {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .unwrap_or_else(|e| panic!("host {name}: creating {}: {e}", dir.display()));
                }
                std::fs::write(&path, data)
                    .unwrap_or_else(|e| panic!("host {name}: writing {}: {e}", path.display()));
            }
        });
    }

    /// Renames `from` to `to` on the host: how a test puts a new file in a protected directory
    /// without opening it there (a rename is no open, so the agent is not asked).
    pub fn rename(&self, from: impl Into<PathBuf>, to: impl Into<PathBuf>) {
        let (from, to) = (from.into(), to.into());
        let name = self.name.clone();
        self.run(move || {
            std::fs::rename(&from, &to).unwrap_or_else(|e| {
                panic!(
                    "host {name}: renaming {} to {}: {e}",
                    from.display(),
                    to.display()
                )
            })
        });
    }
}

/// Moves the calling thread into the host's namespaces. A mount namespace can only be entered
/// by a thread that shares its filesystem attributes (root, cwd) with nobody, hence the
/// `unshare(CLONE_FS)` first; it affects this thread only.
fn enter(net: &File, mnt: &File) -> nix::Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_FS)?;
    nix::sched::setns(net, CloneFlags::CLONE_NEWNET)?;
    nix::sched::setns(mnt, CloneFlags::CLONE_NEWNS)
}

/// Whether `mountinfo` (the text of a `/proc/PID/mountinfo`) has a tmpfs named `source` mounted
/// at `point`.
fn has_tmpfs(mountinfo: &str, point: &Path, source: &str) -> bool {
    mountinfo.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or_default();
        let mut r = right.split(' ');
        let (fstype, src) = (r.next().unwrap_or_default(), r.next().unwrap_or_default());
        // mountinfo escapes spaces and the like as octal; our paths have none.
        Path::new(mount_point) == point && fstype == "tmpfs" && src == source
    })
}

/// A /24 that nothing on this machine routes yet, derived from the pid and `seq` so that
/// concurrent test processes pick different ones.
fn free_subnet(seq: u32) -> [u8; 3] {
    let routes = run_with_deadline(
        Command::new("ip").args(["-4", "route", "show", "table", "all"]),
        COMMAND_LIMIT,
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_else(|e| panic!("listing routes (ip -4 route): {e}"));
    let addrs = run_with_deadline(
        Command::new("ip").args(["-4", "addr", "show"]),
        COMMAND_LIMIT,
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_else(|e| panic!("listing addresses (ip -4 addr): {e}"));
    let pid = std::process::id();
    for i in 0..200u32 {
        let b = 200 + ((seq + i) % 50) as u8;
        let c = ((pid + i / 50) % 250) as u8 + 1;
        let prefix = format!("10.{b}.{c}.");
        if !routes.contains(&prefix) && !addrs.contains(&prefix) {
            return [10, b, c];
        }
    }
    panic!("no free 10.x.y.0/24 subnet for the sandbox's bridge")
}

impl Sandbox {
    /// The address brokers listen on for hosts: the sandbox's bridge in this (the root)
    /// network namespace, created on first use.
    pub fn gateway(&mut self) -> Ipv4Addr {
        if self.net.is_none() {
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            // Interface names have at most 15 bytes: "fs" + pid (≤ 6 hex) + seq + suffix.
            let tag = format!("fs{:x}{:x}", std::process::id(), seq % 256);
            let net = Net {
                bridge: format!("{tag}br"),
                tag,
                subnet: free_subnet(seq),
                hosts: 0,
            };
            self.tear_down_later(Teardown::Link(net.bridge.clone()));
            let gw = format!("{}/{PREFIX_LEN}", net.gateway());
            run_checked(Command::new("ip").args(["link", "add", &net.bridge, "type", "bridge"]));
            // A bridge takes the lowest address of its ports unless given one: each host added
            // could change the gateway's address under the hosts already talking to it, whose
            // packets then go to the old address until their neighbour entry expires (seconds
            // of silent loss). A fixed, locally administered address never changes.
            let [_, b, c] = net.subnet;
            let mac = format!("02:66:73:{b:02x}:{c:02x}:01");
            run_checked(Command::new("ip").args(["link", "set", &net.bridge, "address", &mac]));
            run_checked(Command::new("ip").args(["addr", "add", &gw, "dev", &net.bridge]));
            run_checked(Command::new("ip").args(["link", "set", &net.bridge, "up"]));
            self.net = Some(net);
        }
        self.net.as_ref().map(Net::gateway).expect("net just made")
    }

    /// A new host named `name` (also its agent's node name): a network namespace with a veth
    /// to the sandbox's bridge, and a mount namespace with a fresh tmpfs at `root()`, verified
    /// to be its own before this returns.
    pub fn host(&mut self, name: &str) -> Host {
        self.gateway();
        let root = self.dir().join("hostroot");
        std::fs::create_dir_all(&root).expect("creating the hosts' mount point");
        let (tag, bridge, subnet, n) = {
            let net = self.net.as_mut().expect("gateway() made the net");
            net.hosts += 1;
            assert!(net.hosts < 250, "too many hosts in one sandbox");
            (net.tag.clone(), net.bridge.clone(), net.subnet, net.hosts)
        };
        let netns = format!("fleetscan-{tag}-{n}");
        let veth = format!("{tag}v{n}");
        let peer = format!("{tag}p{n}");
        let addr = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], n + 1);
        let cidr = format!("{addr}/{PREFIX_LEN}");

        self.tear_down_later(Teardown::Netns(netns.clone()));
        run_checked(Command::new("ip").args(["netns", "add", &netns]));
        self.tear_down_later(Teardown::Link(veth.clone()));
        run_checked(Command::new("ip").args([
            "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &netns,
        ]));
        run_checked(Command::new("ip").args(["link", "set", &veth, "master", &bridge, "up"]));
        let in_ns = |args: &[&str]| {
            let mut cmd = Command::new("ip");
            cmd.args(["-n", &netns]).args(args);
            run_checked(&mut cmd);
        };
        in_ns(&["link", "set", &peer, "name", "eth0"]);
        in_ns(&["addr", "add", &cidr, "dev", "eth0"]);
        in_ns(&["link", "set", "eth0", "up"]);
        in_ns(&["link", "set", "lo", "up"]);

        let source = format!("fleetscan-{tag}-{name}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns])
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", HOLDER_SCRIPT, "fleetscan-holder"])
            .arg(&root)
            .arg(&source)
            // Held open by the sandbox; its end (drop, kill, death of this process) ends the
            // holder.
            .stdin(Stdio::piped());
        let (holder, line) = self.spawn_command(&format!("holder-{name}"), cmd, "holder ready");
        assert!(
            line.ends_with(&format!(" {}", holder.pid)),
            "host {name}: the holder forked (`{line}`, started pid {}); nsenter would enter the \
             wrong process",
            holder.pid
        );

        // Before anything may mark it: the host's root must be the tmpfs just mounted in the
        // host's mount namespace, and must not be visible in ours.
        let theirs = std::fs::read_to_string(format!("/proc/{}/mountinfo", holder.pid))
            .unwrap_or_else(|e| panic!("host {name}: reading the holder's mountinfo: {e}"));
        let ours = std::fs::read_to_string("/proc/self/mountinfo").expect("our mountinfo");
        assert!(
            has_tmpfs(&theirs, &root, &source) && !has_tmpfs(&ours, &root, &source),
            "host {name}: its tmpfs is not (only) in its own mount namespace"
        );
        let ns = |kind: &str| {
            Arc::new(
                File::open(format!("/proc/{}/ns/{kind}", holder.pid))
                    .unwrap_or_else(|e| panic!("host {name}: opening its {kind} namespace: {e}")),
            )
        };
        Host {
            name: name.to_owned(),
            netns,
            addr,
            root,
            net_ns: ns("net"),
            mnt_ns: ns("mnt"),
            holder,
        }
    }

    /// Starts `fleetscan agent` inside `host` (its network and mount namespaces, via
    /// `nsenter`), named after the host, protecting `protect` (paths as the host sees them,
    /// which must lie on the host's own tmpfs) and connecting to `brokers` in that order;
    /// waits until its marks are in place.
    pub fn host_agent(
        &mut self,
        host: &Host,
        brokers: &[&str],
        protect: &[&Path],
        args: &[&str],
    ) -> Proc {
        for p in protect {
            assert!(
                p.starts_with(host.root()) && !p.components().any(|c| c.as_os_str() == ".."),
                "host {}: an agent may protect only paths on the host's own tmpfs ({}), not {}",
                host.name,
                host.root().display(),
                p.display()
            );
        }
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &host.holder.pid.to_string(), "-n", "-m", "--"])
            .arg(&self.bin)
            .args(["agent", "--node", &host.name]);
        for b in brokers {
            cmd.args(["--broker", b]);
        }
        for p in protect {
            cmd.arg("--protect").arg(p);
        }
        cmd.args(args).stdin(Stdio::null());
        let name = format!("agent-{}-{}", host.name, self.counter);
        self.counter += 1;
        self.spawn_command(&name, cmd, "agent ready").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tmpfs_is_found_by_mount_point_type_and_source() {
        let info = "\
36 35 0:30 / /tmp rw,nosuid - tmpfs tmpfs rw
90 36 0:55 / /tmp/sb/hostroot rw,relatime shared:1 - tmpfs fleetscan-x-h1 rw,size=1048576k
91 36 0:56 / /tmp/sb/other rw - ext4 /dev/sda1 rw";
        let root = Path::new("/tmp/sb/hostroot");
        assert!(has_tmpfs(info, root, "fleetscan-x-h1"));
        assert!(!has_tmpfs(info, root, "fleetscan-x-h2"));
        assert!(!has_tmpfs(info, Path::new("/tmp/sb/other"), "/dev/sda1"));
        assert!(!has_tmpfs(info, Path::new("/tmp/sb"), "fleetscan-x-h1"));
    }
}
