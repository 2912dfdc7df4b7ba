//! The fleetscan node agent: intercepts opens and execs on the protected filesystems with
//! fanotify permission events, answers each from its local cache or a broker's decision, and
//! never lets one wait past its deadline.
//!
//! Threads and what each may wait on:
//! - **reader** (one OS thread): reads the group, answers its own process, unprotected files,
//!   cache hits and no-broker cases at once; parks the rest with a deadline. Waits on nothing
//!   but `poll(2)`.
//! - **deadline** (one OS thread): answers every parked event whose deadline passed with the
//!   fail mode. Waits on nothing but its condition variable.
//! - **hashing pool** (a few OS threads): hash through the event's descriptor, send the request.
//! - **session** (tokio, in [`Agent::run`]): the broker stream; decisions, uploads, reports.
//!
//! The invariants, each tested in `tests/agent.rs`: every event is answered within the
//! effective deadline (≤ 5 s) exactly once, whatever fails; the agent's own accesses are allowed
//! first, before any other work; unprotected files never wait on the broker; the answer to the
//! kernel comes before any log or report.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use fleetscan_core::FailMode;
use fleetscan_fanotify::{Fanotify, FanotifyError, InitOptions, PERMISSION_MASK};
use parking_lot::Mutex;
use tracing::{info, warn};

mod cache;
mod deadline;
mod marks;
mod mounts;
mod paths;
mod pending;
pub mod pods;
mod pool;
mod reader;
mod reports;
mod scope;
mod session;
mod state;
mod subject;

use mounts::{MountTable, ProtectedDir, Protection};
use state::{Counters, Shared, bump};

/// What the agent protects and where its brokers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Broker URLs ("http://127.0.0.1:7700"), tried in order, then round again.
    pub brokers: Vec<String>,
    /// Directories whose files are scanned. Their whole filesystems are marked; files outside
    /// these directories are allowed at once.
    pub protect: Vec<PathBuf>,
    pub node: String,
    pub cluster: String,
    /// Until the broker's policy arrives, and when no broker was ever reached.
    pub fail_mode: FailMode,
    /// Local cap on waiting for a decision; effective = min(this, the policy's), never above
    /// 5 s.
    pub decision_deadline: Duration,
    /// Until the broker's policy arrives.
    pub max_file_size: u64,
    /// Kernel ignore marks for clean files, so their next opens cost nothing.
    pub ignore_marks: bool,
    /// Entries of the local verdict cache.
    pub cache_capacity: usize,
    /// Where pod metadata (name, namespace, labels, images) comes from.
    pub pods: pods::PodSource,
    /// How long a pod that went away still resolves, for late events.
    pub pod_retention: Duration,
}

impl Default for AgentConfig {
    /// One local broker, nothing protected, fail-open, 5 s, 64 MiB, ignore marks on, 100,000
    /// cache entries; the node is the host name, the cluster "default".
    fn default() -> Self {
        AgentConfig {
            brokers: vec!["http://127.0.0.1:7700".into()],
            protect: Vec::new(),
            node: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "localhost".into()),
            cluster: "default".into(),
            fail_mode: FailMode::Open,
            decision_deadline: fleetscan_core::policy::MAX_DECISION_DEADLINE,
            max_file_size: 64 * 1024 * 1024,
            ignore_marks: true,
            cache_capacity: 100_000,
            pods: pods::PodSource::None,
            pod_retention: Duration::from_secs(300),
        }
    }
}

/// Internal limits, rarely changed; tests shrink them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentTuning {
    /// Events parked at once; beyond it, the fail mode answers at once (and is counted).
    pub max_pending: usize,
    /// Threads that hash content.
    pub hash_threads: usize,
    /// Reports waiting for a broker; beyond it they are dropped and counted.
    pub report_queue: usize,
    /// Control messages queued towards the broker in one session.
    pub session_queue: usize,
    /// Content uploads at once.
    pub upload_concurrency: usize,
    pub heartbeat: Duration,
    /// For connecting and for the broker's `SessionAccepted`.
    pub connect_timeout: Duration,
    /// Kernel ignore marks kept at once (each holds a descriptor and a read lease); beyond it
    /// the oldest is removed.
    pub max_marks: usize,
}

impl Default for AgentTuning {
    fn default() -> Self {
        AgentTuning {
            max_pending: 4096,
            hash_threads: 2,
            report_queue: 10_000,
            session_queue: 1024,
            upload_concurrency: 4,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_marks: 16_384,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent config: {0}")]
    Config(String),
    #[error("cannot protect {path}: {source}")]
    Protect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not in the agent's mount table")]
    UnknownMount { path: PathBuf },
    #[error(transparent)]
    Fanotify(#[from] FanotifyError),
    #[error("reading the mount table failed: {0}")]
    MountTable(#[source] std::io::Error),
    #[error("starting an agent thread failed: {0}")]
    Thread(#[source] std::io::Error),
}

/// A point-in-time copy of the agent's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Permission events from other processes.
    pub events: u64,
    /// The agent's own accesses, allowed first thing (not in `events`).
    pub own_pid: u64,
    /// Allowed at once: outside the protected directories, or not a regular file.
    pub unprotected: u64,
    /// Allowed at once because their policy does not scan them (exec-only opens, exclusions).
    pub skipped: u64,
    pub cache_hits: u64,
    pub ignore_marks: u64,
    /// Answered by the deadline thread with the fail mode.
    pub deadline_expiries: u64,
    /// Answered with the fail mode because no broker session was up (or it was lost).
    pub no_broker: u64,
    /// Answered with the fail mode because too much was pending or queued; also reads that
    /// failed for want of descriptors (the kernel denied at least one access each time).
    pub overloaded: u64,
    pub broker_decisions: u64,
    /// Decisions that came after the event was answered.
    pub late_decisions: u64,
    pub oversize: u64,
    pub unreadable: u64,
    pub queue_overflows: u64,
    /// Broker sessions accepted so far.
    pub sessions: u64,
    pub requests_sent: u64,
    /// Broker decisions stored in the local cache.
    pub decisions_cached: u64,
    /// Cache and ignore-mark flushes (CacheFlush, or a new verdict generation).
    pub flushes: u64,
    pub reports_dropped: u64,
}

/// A handle on the agent's counters; cheap to clone, valid after the agent is gone.
#[derive(Clone, Debug)]
pub struct Stats(Arc<Counters>);

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.0;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            events: g(&c.events),
            own_pid: g(&c.own_pid),
            unprotected: g(&c.unprotected),
            skipped: g(&c.skipped),
            cache_hits: g(&c.cache_hits),
            ignore_marks: g(&c.ignore_marks),
            deadline_expiries: g(&c.deadline_expiries),
            no_broker: g(&c.no_broker),
            overloaded: g(&c.overloaded),
            broker_decisions: g(&c.broker_decisions),
            late_decisions: g(&c.late_decisions),
            oversize: g(&c.oversize),
            unreadable: g(&c.unreadable),
            queue_overflows: g(&c.queue_overflows),
            sessions: g(&c.sessions),
            requests_sent: g(&c.requests_sent),
            decisions_cached: g(&c.decisions_cached),
            flushes: g(&c.flushes),
            reports_dropped: g(&c.reports_dropped),
        }
    }
}

struct Threads {
    reader: JoinHandle<()>,
    deadline: JoinHandle<()>,
    marks: JoinHandle<()>,
}

/// A running agent: protection is active from [`Agent::start`] on.
pub struct Agent {
    shared: Arc<Shared>,
    threads: Mutex<Option<Threads>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("protect", &self.shared.config.protect)
            .finish_non_exhaustive()
    }
}

/// Maps a configured directory to its filesystem and its path from that filesystem's root.
fn protected_dir(path: &Path, mounts: &mut MountTable) -> Result<ProtectedDir, AgentError> {
    use std::os::fd::AsFd;
    let err = |source| AgentError::Protect {
        path: path.into(),
        source,
    };
    let canonical = std::fs::canonicalize(path).map_err(err)?;
    // Opened before any mark is placed, so this cannot block on our own group.
    let dir = std::fs::File::open(&canonical).map_err(err)?;
    let st = fleetscan_fanotify::statx_fd(dir.as_fd()).map_err(err)?;
    let unknown = || AgentError::UnknownMount { path: path.into() };
    let mount = st
        .mnt_id
        .and_then(|id| mounts.find(id, (st.dev_major, st.dev_minor), 0))
        .ok_or_else(unknown)?;
    let fs_path = mounts::fs_relative(&mount, &canonical).ok_or_else(unknown)?;
    Ok(ProtectedDir {
        major: mount.major,
        minor: mount.minor,
        fs_path,
        configured: canonical,
    })
}

/// Descriptors kept for everything but waiting accesses: the runtime, connections, the events
/// of one read being sorted out.
const RESERVED_FDS: u64 = 512;

/// Makes room for the descriptors of waiting accesses. When the kernel cannot install an
/// event's descriptor in `read(2)` it denies the access itself (no fail mode, no report), so
/// the pending bound must stay below what the limit holds: beyond it the fail mode answers.
/// Kept ignore marks hold a descriptor each too: they get at most a quarter of what is left
/// after the reserve (fewer marks only cost events; fewer pending slots cost fail-mode answers).
fn fit_descriptor_limit(tuning: &mut AgentTuning) {
    let limit = match fleetscan_fanotify::raise_nofile_limit() {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "raising the open-descriptor limit failed");
            return;
        }
    };
    let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let available = limit.saturating_sub(RESERVED_FDS);
    let marks_fit = to_usize(available / 4).max(1);
    if tuning.max_marks > marks_fit {
        info!(
            limit,
            max_marks = tuning.max_marks,
            fit = marks_fit,
            "open-descriptor limit lowers the ignore marks kept"
        );
        tuning.max_marks = marks_fit;
    }
    let marks = u64::try_from(tuning.max_marks).unwrap_or(u64::MAX);
    // The event's descriptor and its pidfd.
    let fit = to_usize(available.saturating_sub(marks) / 2).max(1);
    if tuning.max_pending > fit {
        warn!(
            limit,
            max_pending = tuning.max_pending,
            fit,
            "open-descriptor limit too low for max_pending, lowered"
        );
        tuning.max_pending = fit;
    }
}

impl Agent {
    /// Creates the fanotify group and places the filesystem marks. When this returns Ok,
    /// protection is active (unknown files get the fail mode until a broker answers).
    pub fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        Agent::start_tuned(config, AgentTuning::default())
    }

    /// [`Agent::start`] with explicit internal limits.
    ///
    /// Raises the process's soft limit on open descriptors to its hard limit (each waiting
    /// access holds two), and lowers `max_pending` to what the limit can hold.
    pub fn start_tuned(config: AgentConfig, mut tuning: AgentTuning) -> Result<Agent, AgentError> {
        if config.brokers.is_empty() {
            return Err(AgentError::Config("no broker url".into()));
        }
        if config.protect.is_empty() {
            return Err(AgentError::Config("no directory to protect".into()));
        }
        if config.decision_deadline.is_zero() {
            return Err(AgentError::Config("decision deadline is zero".into()));
        }
        fit_descriptor_limit(&mut tuning);
        let group = match Fanotify::new(InitOptions { report_pidfd: true }) {
            Ok(g) => g,
            // Kernels before 5.15 have no FAN_REPORT_PIDFD: identify openers by pid alone.
            Err(FanotifyError::Init(e)) if e.kind() == std::io::ErrorKind::InvalidInput => {
                warn!("kernel without FAN_REPORT_PIDFD, openers identified by pid only");
                Fanotify::new(InitOptions::default())?
            }
            Err(e) => return Err(e.into()),
        };
        let mut mounts = MountTable::load().map_err(AgentError::MountTable)?;
        let dirs = config
            .protect
            .iter()
            .map(|p| protected_dir(p, &mut mounts))
            .collect::<Result<Vec<_>, _>>()?;
        let protect = config.protect.clone();
        let shared = Arc::new(Shared::new(group, config, tuning, Protection::new(dirs)));

        let deadline = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fleetscan-deadline".into())
                .spawn(move || {
                    shared.deadlines.run(|id| {
                        if let Some(ev) = shared.pending.take(id) {
                            bump(&shared.counters.deadline_expiries);
                            shared.fail_pending(
                                ev,
                                "no decision before the deadline",
                                fleetscan_proto::v1::LocalReason::Deadline,
                            );
                        }
                    });
                })
                .map_err(AgentError::Thread)?
        };
        // The hashing threads are not joined at shutdown: one may sit in a slow read, and the
        // events it works on are answered without it. They end once the reader (which owns
        // the submitting side) is gone and their queue is empty.
        let (pool, _workers) = pool::start(
            &shared,
            shared.tuning.hash_threads,
            shared.tuning.max_pending,
        )
        .map_err(AgentError::Thread)?;
        let marks = marks::start(&shared).map_err(AgentError::Thread)?;
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fleetscan-reader".into())
                .spawn(move || reader::run(shared, mounts, pool))
                .map_err(AgentError::Thread)?
        };
        let agent = Agent {
            shared,
            threads: Mutex::new(Some(Threads {
                reader,
                deadline,
                marks,
            })),
        };
        // Marks last: from here on events flow, and every thread that answers them is up.
        for path in &protect {
            agent
                .shared
                .group
                .add_filesystem_mark(path, PERMISSION_MASK)?;
        }
        for d in agent.shared.protection.dirs() {
            info!(
                path = %d.configured.display(),
                fs_path = %d.fs_path.display(),
                dev = %format!("{}:{}", d.major, d.minor),
                "protecting"
            );
        }
        Ok(agent)
    }

    /// The agent's counters.
    pub fn stats(&self) -> Stats {
        Stats(self.shared.counters.clone())
    }

    /// Runs the broker sessions until `shutdown`; then removes the marks and allows everything
    /// still pending, as closing the group would.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let shared = self.shared.clone();
        tokio::select! {
            // The flag is set before the session future is dropped, so that the session's end
            // leaves its pending events to the shutdown (allow) instead of the fail mode.
            () = async { shutdown.await; shared.shutting_down.store(true, Ordering::SeqCst) } => {}
            () = session::run(self.shared.clone()) => {}
            () = pods::run(
                self.shared.pods.clone(),
                self.shared.config.pods.clone(),
                self.shared.config.node.clone(),
            ) => {}
        }
        // Joining the reader takes up to one poll interval: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || self.stop()).await;
        Ok(())
    }

    /// Stops the threads and answers everything (idempotent).
    fn stop(&self) {
        let Some(threads) = self.threads.lock().take() else {
            return;
        };
        let s = &self.shared;
        // No new events from here on; the reader allows what is still queued as it exits.
        if let Err(e) = s.group.flush_filesystem_marks() {
            warn!(error = %e, "removing the filesystem marks failed");
        }
        s.stopping.store(true, Ordering::SeqCst);
        let _ = threads.reader.join();
        for (_, ev) in s.pending.drain_all() {
            s.answer(&ev.file, fleetscan_core::Action::Allow);
        }
        s.deadlines.stop();
        let _ = threads.deadline.join();
        let _ = threads.marks.join();
        info!("agent stopped");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
