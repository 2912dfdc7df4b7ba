//! Who made an access: pid, uid, executable, cgroup, and the container and pod the cgroup
//! names, read from `/proc/<pid>`.
//!
//! It reads only `status`, `cgroup` and the `exe` link: none of them takes the target's
//! `exec_update_lock`, which a process blocked in an exec's permission event may hold (reading
//! `environ`, `maps` or `mem` there would deadlock). The pidfd of the event, when there is
//! one, says whether the pid still names the same process after the reads; if it exited,
//! what was read may belong to a new process with a recycled pid and is dropped.

use std::os::fd::{AsFd, OwnedFd};

use fleetscan_proto::v1;

/// Reads what `/proc` says about `pid`. Missing pieces stay empty.
pub(crate) fn resolve(pid: i32, pidfd: Option<&OwnedFd>) -> v1::Subject {
    let mut s = v1::Subject {
        pid: u32::try_from(pid).unwrap_or(0),
        ..Default::default()
    };
    if pid <= 0 {
        return s;
    }
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        let (uid, ns_pid) = parse_status(&status);
        s.uid = uid.unwrap_or(0);
        s.ns_pid = ns_pid.unwrap_or(s.pid);
    }
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        s.exe = exe.to_string_lossy().into_owned();
    }
    if let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        s.cgroup = parse_cgroup_file(&cg);
        let ids = container_of(&s.cgroup);
        s.container_id = ids.container_id;
        s.pod_uid = ids.pod_uid;
    }
    if let Some(fd) = pidfd
        && fleetscan_fanotify::pidfd_exited(fd.as_fd())
    {
        // The process is gone: the pid may already name another one.
        return v1::Subject {
            pid: s.pid,
            ns_pid: s.pid,
            ..Default::default()
        };
    }
    s
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

    #[test]
    fn resolves_this_process() {
        let s = resolve(i32::try_from(std::process::id()).unwrap(), None);
        assert_eq!(s.pid, std::process::id());
        assert!(!s.exe.is_empty());
    }
}
