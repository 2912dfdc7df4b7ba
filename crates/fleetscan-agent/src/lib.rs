//! The fleetscan node agent: intercepts opens and execs on the protected filesystems with
//! fanotify permission events, answers each from its local cache or a broker's decision, and
//! never lets one wait past its deadline.
//!
//! Threads and what each may wait on:
//! - **reader** (one OS thread, `reader.rs`): reads the group, answers its own process,
//!   unprotected files, cache hits and no-broker cases at once; makes the rest waiting
//!   accesses. Waits on nothing but `poll(2)`.
//! - **deadline** (one OS thread, `deadline.rs`): answers every waiting access whose deadline
//!   passed with the fail mode. Waits on nothing but its condition variable.
//! - **hashers** (a few OS threads, `hashers.rs`): hash through the event's descriptor, hand
//!   the access to the session and put its request on the wire through the session's link.
//!   Wait on nothing but their queue and the file's content.
//! - **marks** (one OS thread, `marks.rs`): hears lease breaks and takes ignore marks away.
//! - **session** (tokio, in [`Agent::run`], `session/`): the broker stream; decisions,
//!   uploads, reports. The only code that knows protocol types.
//!
//! One value travels between them: an `access::Access`, made by the reader, owned by a hashing
//! thread while hashed, then by the session until decided, and scheduled with the deadline
//! thread throughout. Its answer is taken exactly once, by whichever thread comes first;
//! `access.rs` is where every answer and every local decision is made.
//!
//! Modules, each using only those listed before it: `stats`, `cache`, `deadline`, `mounts`,
//! `subject`, `paths`, `pods`, `config`, `scope`, `reports`, `marks`; `interceptor` (what
//! every thread needs to answer); `access`; `session`; `hashers`; `reader`; this file.
//!
//! The invariants, each tested in `tests/`: every event is answered within the effective
//! deadline (≤ 5 s) exactly once, whatever fails; the agent's own accesses are allowed first,
//! before any other work; unprotected files never wait on the broker; the answer to the
//! kernel comes before any log or report; content is read only through the event's
//! descriptor.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use fleetscan_fanotify::{Fanotify, FanotifyError, InitOptions, PERMISSION_MASK};
use parking_lot::Mutex;
use tracing::{info, warn};

mod access;
mod cache;
mod config;
mod deadline;
mod hashers;
mod interceptor;
mod marks;
mod mounts;
mod paths;
pub mod pods;
mod reader;
mod reports;
mod scope;
mod session;
mod stats;
mod subject;

pub use config::{AgentConfig, AgentTuning};
pub use stats::{Stats, StatsSnapshot};

use access::Access;
use deadline::DeadlineQueue;
use interceptor::Interceptor;
use mounts::{MountTable, ProtectedDir, Protection};
use session::SessionSlot;

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

struct Threads {
    reader: JoinHandle<()>,
    deadline: JoinHandle<()>,
    marks: JoinHandle<()>,
}

/// A running agent: protection is active from [`Agent::start`] on.
pub struct Agent {
    ic: Arc<Interceptor>,
    /// Every waiting access, until its deadline.
    deadlines: Arc<DeadlineQueue<Arc<Access>>>,
    session: Arc<SessionSlot>,
    threads: Mutex<Option<Threads>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("protect", &self.ic.config.protect)
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

/// Starts a named agent thread.
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(AgentError::Thread)
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
        let ic = Arc::new(Interceptor::new(
            group,
            config,
            tuning,
            Protection::new(dirs),
        ));
        let deadlines = Arc::new(DeadlineQueue::new());
        let session = Arc::new(SessionSlot::default());

        let deadline = {
            let (ic, deadlines) = (ic.clone(), deadlines.clone());
            spawn("fleetscan-deadline", move || {
                deadlines.run(|a: Arc<Access>| {
                    access::fail(&ic, &a, access::Failure::Deadline);
                });
            })?
        };
        // The hashing threads are not joined at shutdown: one may sit in a slow read, and the
        // accesses it works on are answered without it. They end once the reader (which owns
        // the submitting side) is gone and their queue is empty.
        let (hashers, _threads) =
            hashers::start(&ic, &session, ic.tuning.hash_threads, ic.tuning.max_pending)
                .map_err(AgentError::Thread)?;
        let marks = {
            let ic = ic.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let handle = spawn("fleetscan-marks", move || {
                ic.marks.serve(&ic.group, &ic.stopping, || {
                    let _ = ready_tx.send(());
                });
            })?;
            // No mark may be placed before the thread can hear its lease break.
            let _ = ready_rx.recv();
            handle
        };
        let reader = {
            let waits = reader::Waits {
                deadlines: deadlines.clone(),
                session: session.clone(),
                hashers,
            };
            let ic = ic.clone();
            spawn("fleetscan-reader", move || reader::run(ic, mounts, waits))?
        };
        let agent = Agent {
            ic,
            deadlines,
            session,
            threads: Mutex::new(Some(Threads {
                reader,
                deadline,
                marks,
            })),
        };
        // Marks last: from here on events flow, and every thread that answers them is up.
        for path in &protect {
            agent.ic.group.add_filesystem_mark(path, PERMISSION_MASK)?;
        }
        for d in agent.ic.protection.dirs() {
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
        Stats(self.ic.counters.clone())
    }

    /// Runs the broker sessions until `shutdown`; then removes the marks and allows everything
    /// still pending, as closing the group would.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let ic = self.ic.clone();
        tokio::select! {
            // The flag is set before the session future is dropped, so that the session's end
            // leaves its waiting accesses to the shutdown (allow) instead of the fail mode.
            () = async { shutdown.await; ic.shutting_down.store(true, Ordering::SeqCst) } => {}
            () = session::run(self.ic.clone(), self.session.clone()) => {}
            () = pods::run(
                self.ic.pods.clone(),
                self.ic.config.pods.clone(),
                self.ic.config.node.clone(),
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
        let ic = &self.ic;
        // No new events from here on; the reader allows what is still queued as it exits.
        if let Err(e) = ic.group.flush_filesystem_marks() {
            warn!(error = %e, "removing the filesystem marks failed");
        }
        ic.stopping.store(true, Ordering::SeqCst);
        let _ = threads.reader.join();
        // Every waiting access is scheduled until its deadline: allow them all.
        for a in self.deadlines.drain() {
            access::allow_on_shutdown(ic, &a);
        }
        self.deadlines.stop();
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
