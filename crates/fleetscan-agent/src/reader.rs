//! The fanotify read loop, on a thread of its own.
//!
//! Per batch, the agent's own accesses are allowed before any other event of it is looked at
//! (no statx, no log: the agent must never wait on itself). Then per event, in this order:
//! files that are not regular are allowed at once; a cached allow answers at once (one statx
//! and one cache look-up: no path, no mount table, since an unprotected file would be allowed
//! too); files that are not protected are allowed at once; a cached denial decides; then, with
//! no broker or too many events pending, the fail mode decides at once. Only what is left is
//! parked in the pending map with a deadline and handed to the hashing pool.
//!
//! This thread never waits on the network, on the hashing pool or on the tokio runtime: every
//! hand-off is a non-blocking `try_send`, and a full queue means "answer with the fail mode
//! now". It reads files only through the event's descriptor and `/proc`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fleetscan_core::AccessKind;
use fleetscan_fanotify::{Event, POLLIN, POLLPRI, PollFd, Response};
use fleetscan_proto::v1;
use tracing::{error, warn};

use crate::cache::FileKey;
use crate::mounts::{self, MountTable, Verdict};
use crate::pending::PendingEvent;
use crate::pool::HashPool;
use crate::state::{ReportCtx, Shared, bump};

/// How often the loop wakes to check for shutdown when nothing happens.
const IDLE_POLL: Duration = Duration::from_millis(50);

pub(crate) fn run(shared: Arc<Shared>, mut mounts: MountTable, pool: HashPool) {
    while !shared.stopping.load(Ordering::SeqCst) {
        let (ready, mounts_changed) = {
            let mut fds = [
                PollFd::new(shared.group.as_fd(), POLLIN),
                PollFd::new(mounts.source().as_fd(), POLLPRI),
            ];
            match fleetscan_fanotify::poll(&mut fds, Some(IDLE_POLL)) {
                Ok(_) => (fds[0].revents != 0, fds[1].revents != 0),
                Err(e) => {
                    error!(error = %e, "poll on the fanotify group failed");
                    std::thread::sleep(IDLE_POLL);
                    (true, false)
                }
            }
        };
        if mounts_changed && let Err(e) = mounts.refresh() {
            warn!(error = %e, "re-reading mountinfo failed");
        }
        if ready {
            read_batch(&shared, &mut mounts, &pool);
        }
    }
    // Shutting down: the filesystem marks are gone, so what is queued, and what was in flight
    // while they went, is all there is. Allow it, as closing the group would, until the group
    // stays quiet for a moment.
    loop {
        let mut fds = [PollFd::new(shared.group.as_fd(), POLLIN)];
        if !matches!(fleetscan_fanotify::poll(&mut fds, Some(DRAIN_QUIET)), Ok(n) if n > 0) {
            break;
        }
        match shared.group.read_events() {
            Ok((events, _)) => {
                for ev in events {
                    if let Some(fd) = ev.fd.as_ref()
                        && ev.is_permission()
                    {
                        let _ = shared.group.respond(fd.as_fd(), Response::Allow);
                    }
                }
            }
            Err(_) => break,
        }
    }
}

/// `EMFILE` and `ENFILE` (Linux numbers; the agent is Linux-only): out of descriptors.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// How long the group must stay quiet for the shutdown drain to end.
const DRAIN_QUIET: Duration = Duration::from_millis(20);

fn read_batch(shared: &Shared, mounts: &mut MountTable, pool: &HashPool) {
    let (events, fault) = match shared.group.read_events() {
        Ok(r) => r,
        Err(e) => {
            if let fleetscan_fanotify::FanotifyError::Read(io) = &e
                && matches!(io.raw_os_error(), Some(EMFILE | ENFILE))
            {
                // The kernel denied the event it could not give us a descriptor for.
                bump(&shared.counters.overloaded);
            }
            error!(error = %e, "reading fanotify events failed");
            std::thread::sleep(Duration::from_millis(10));
            return;
        }
    };
    // The agent's own accesses first, before any other event of the batch is looked at: one
    // of them may be what another agent thread waits on.
    for ev in events.iter().filter(|ev| is_own(shared, ev)) {
        if let Some(fd) = ev.fd.as_ref() {
            let _ = shared.group.respond(fd.as_fd(), Response::Allow);
            bump(&shared.counters.own_pid);
        }
    }
    for ev in events {
        if !is_own(shared, &ev) {
            handle(shared, mounts, pool, ev);
        }
    }
    if let Some(f) = fault {
        error!(error = %f, "malformed fanotify events skipped");
    }
}

/// A permission event of the agent's own process (answered by [`read_batch`] before the rest).
fn is_own(shared: &Shared, ev: &Event) -> bool {
    ev.pid == shared.own_pid && ev.is_permission() && ev.fd.is_some()
}

fn handle(shared: &Shared, mounts: &mut MountTable, pool: &HashPool, ev: Event) {
    if ev.fd.is_none() {
        if ev.is_overflow() {
            bump(&shared.counters.queue_overflows);
            warn!("fanotify queue overflow");
        }
        return;
    }
    if !ev.is_permission() {
        return;
    }
    bump(&shared.counters.events);
    let kind = if ev.is_exec() {
        AccessKind::Exec
    } else {
        AccessKind::Open
    };
    let Event { fd, pid, pidfd, .. } = ev;
    let file = File::from(fd.expect("checked above"));
    let st = match fleetscan_fanotify::statx_fd(file.as_fd()) {
        Ok(st) => st,
        Err(e) => {
            let outcome = shared.policy().on_failure(&format!("statx failed: {e}"));
            bump(&shared.counters.unreadable);
            let ctx = ReportCtx {
                kind: Some(kind),
                pid,
                pidfd: pidfd.as_ref(),
                ..Default::default()
            };
            shared.conclude(&file, &outcome, v1::LocalReason::Unreadable, ctx, true);
            return;
        }
    };
    if !st.is_regular() {
        // Devices, FIFOs, sockets: nothing to scan, and reading a FIFO would block.
        shared.answer(&file, fleetscan_core::Action::Allow);
        bump(&shared.counters.unprotected);
        return;
    }
    // The cache first: a cached allow is the answer whether the file is protected or not (an
    // unprotected file is allowed too), so it needs neither the path nor the mount table. Only
    // a cached denial, or a miss, goes on to decide "protected" by the path relative to the
    // filesystem's root (invariant 3): a denial must not reach a file outside the protected
    // set through a hard link, and a miss must not be scanned (or wait) if unprotected.
    //
    // The policy scope comes before the cache: with one policy it is known at once; with
    // several (tenants, namespace overrides) the process is looked at first, since a decision
    // holds only within the scope it was made in.
    let (scope, subject) = shared.scope_of(pid, pidfd.as_ref());
    if let Some(why) = scope.skip_early(kind, subject.as_ref()) {
        skipped(shared, &file, &why);
        return;
    }
    let key = FileKey::from(&st);
    let hit = shared.cached(&key, scope.id);
    if let Some(hit) = &hit
        && hit.action == fleetscan_core::Action::Allow
    {
        shared.answer(&file, fleetscan_core::Action::Allow);
        bump(&shared.counters.cache_hits);
        shared.reports.count_allowed();
        if hit.ignorable {
            shared.refresh_ignore_mark(&file, &key, scope.id);
        }
        return;
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(mounts::strip_deleted)
        .unwrap_or_default();
    let protected =
        shared
            .protection
            .classify(mounts, (st.dev_major, st.dev_minor), st.mnt_id, &path, pid);
    if protected == Verdict::Unprotected {
        shared.answer(&file, fleetscan_core::Action::Allow);
        bump(&shared.counters.unprotected);
        return;
    }
    // Borrowed, not copied, for the usual UTF-8 path.
    let path = path.to_string_lossy();
    if let Some(hit) = hit {
        bump(&shared.counters.cache_hits);
        let outcome = fleetscan_core::policy::Outcome {
            action: hit.action,
            reason: hit.reason.clone(),
            cacheable: true,
        };
        let ctx = ReportCtx {
            path: &path,
            descriptor_path: true,
            kind: Some(kind),
            sha256: hit.sha256.clone(),
            threat_name: hit.threat_name.clone(),
            pid,
            pidfd: pidfd.as_ref(),
            subject,
            host_path: String::new(),
        };
        shared.conclude(&file, &outcome, v1::LocalReason::Cached, ctx, false);
        return;
    }
    if !shared.broker_connected() {
        bump(&shared.counters.no_broker);
        let outcome = scope.policy.on_failure("no broker connected");
        let ctx = ReportCtx {
            path: &path,
            descriptor_path: true,
            kind: Some(kind),
            pid,
            pidfd: pidfd.as_ref(),
            subject,
            ..Default::default()
        };
        shared.conclude(&file, &outcome, v1::LocalReason::NoBroker, ctx, false);
        return;
    }
    if shared.pending.len() >= shared.tuning.max_pending {
        overloaded(
            shared,
            &file,
            &path,
            kind,
            pid,
            pidfd.as_ref(),
            &scope.policy,
        );
        return;
    }
    let id = shared.next_id();
    let deadline = Instant::now() + scope.policy.decision_deadline;
    let file = Arc::new(file);
    shared.pending.insert(
        id,
        PendingEvent {
            file: file.clone(),
            key,
            path: path.into_owned(),
            path_resolved: false,
            host_path: String::new(),
            kind,
            pid,
            pidfd: pidfd.map(Arc::new),
            deadline,
            generation: shared.generation(),
            session: None,
            sha256: None,
            hashed_len: 0,
            stable: false,
            subject,
            scope,
        },
    );
    shared.deadlines.push(deadline, id);
    if !pool.submit(id)
        && let Some(ev) = shared.pending.take(id)
    {
        bump(&shared.counters.overloaded);
        shared.fail_pending(ev, "hashing queue full", v1::LocalReason::Deadline);
    }
}

fn overloaded(
    shared: &Shared,
    file: &File,
    path: &str,
    kind: AccessKind,
    pid: i32,
    pidfd: Option<&std::os::fd::OwnedFd>,
    policy: &fleetscan_core::Policy,
) {
    bump(&shared.counters.overloaded);
    let outcome = policy.on_failure("too many accesses pending");
    let ctx = ReportCtx {
        path,
        descriptor_path: true,
        kind: Some(kind),
        pid,
        pidfd,
        ..Default::default()
    };
    shared.conclude(file, &outcome, v1::LocalReason::Deadline, ctx, true);
}

/// An access its policy does not scan (exec-only, an exclusion): allowed at once and counted,
/// never reported one by one nor cached (another scope may have to scan the same file).
pub(crate) fn skipped(shared: &Shared, file: &File, why: &str) {
    shared.answer(file, fleetscan_core::Action::Allow);
    bump(&shared.counters.skipped);
    shared.reports.count_allowed();
    tracing::trace!(why, "access not scanned by policy");
}
