//! A sandbox for end-to-end tests and benchmarks: it starts the real `fleetscan` binary as
//! brokers, workers and agents, mounts filesystems of its own for them to protect, and tears
//! everything down again.
//!
//! Safety: an agent that stops answering permission events freezes whoever opens a file on its
//! filesystems. Every sandbox therefore has a watchdog thread that kills all its processes when
//! the sandbox outlives its hard limit (the kernel allows every pending event when an agent's
//! fanotify fd closes), and the sandbox only ever marks filesystems it mounted itself.
//!
//! Fleet tests add [`Host`]s (see [`host`]): network and mount namespaces of the sandbox's own,
//! on a bridge of its own. The links and namespaces it creates are deleted on drop and by the
//! watchdog. Should the test process die without either (SIGKILL), a guard process that notices
//! the end of its stdin kills the sandbox's processes (each known by pid *and* start time, so a
//! reused pid is never hit) and deletes the links and namespaces. The sandbox never touches a
//! process, link or namespace it did not create.
//!
//! Modules: `sandbox` (the processes and mounts), `cleanup` (what ends them whatever happens),
//! `host` and `container` (hosts and pods on this machine), `admin` (what a broker says),
//! `open` (opens as a process under test), `wait`, `command` and `postgres` (helpers).

mod admin;
mod cleanup;
mod command;
pub mod container;
pub mod host;
mod open;
mod postgres;
mod sandbox;
mod wait;

use std::time::Duration;

pub use admin::{
    admin, events, events_of, hosts, is_connected, jobs_done, jobs_done_of, stats, wait_for_event,
    wait_for_host, wait_for_worker, workers,
};
pub use host::{Host, HostCall};
pub use open::{OpenOutcome, open_file, open_timed};
pub use postgres::pg_count;
pub use sandbox::{BrokerProc, Proc, Sandbox};
pub use wait::{block_on, eventually};

/// The standard 68-byte EICAR anti-virus test file.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// How long any sandbox may live before its watchdog kills every process it started.
pub const HARD_LIMIT: Duration = Duration::from_secs(240);

/// Panics with a clear message unless the process runs as root (fanotify permission events and
/// mounts need it).
pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test needs root: fanotify permission events and tmpfs mounts need CAP_SYS_ADMIN \
         (run the suite as root, as CI does)"
    );
}
