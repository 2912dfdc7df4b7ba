//! Who made an access, as an agent attributes it: the process (host pid, pid in its own pid
//! namespace, uid, executable, cgroup) and what its cgroup and the pod directory say of it
//! (container, pod, Kubernetes namespace, image, tenant).
//!
//! A plain value: filled by the agent, converted to the protocol's `Subject` at its session
//! edge. Empty strings (and an `ns_pid` of 0) mean unknown; a subject with nothing but `pid`
//! is an unattributed access (the process could not be examined).

/// Who made an access; see the module header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    /// As the host's pid namespace sees it.
    pub pid: u32,
    /// As the process's own pid namespace sees it (equal to `pid` outside containers).
    pub ns_pid: u32,
    /// The real uid.
    pub uid: u32,
    pub exe: String,
    /// The cgroup v2 path (the first hierarchy's on a v1 host).
    pub cgroup: String,
    /// 64 lower-case hex digits, without the runtime's prefix.
    pub container_id: String,
    pub pod_uid: String,
    /// The Kubernetes namespace of the pod.
    pub namespace: String,
    /// The tenant the agent's policy set gives the namespace; empty for host processes.
    pub tenant: String,
    /// The container's image as the runtime reports it.
    pub image: String,
}
