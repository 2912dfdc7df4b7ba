//! The fanotify read loop, on a thread of its own: it triages every permission event and
//! answers what it can at once.
//!
//! Per batch, the agent's own accesses are allowed before any other event of it is looked at
//! (no statx, no log: the agent must never wait on itself). Then per event, in this order:
//! files that are not regular are allowed at once; a cached allow answers at once (one statx
//! and one cache look-up: no path, no mount table, since an unprotected file would be allowed
//! too); files that are not protected are allowed at once; a cached denial decides; then, with
//! no broker or too many accesses waiting, the fail mode decides at once. Only what is left
//! becomes a waiting [`Access`]: scheduled with the deadline thread and handed to the hashing
//! threads. The conclusions themselves are `access.rs`'s.
//!
//! This thread never waits on the network, on the hashing threads or on the tokio runtime:
//! every hand-off is non-blocking, and a full queue means "answer with the fail mode now". It
//! reads files only through the event's descriptor and `/proc`, and never opens one.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetscan_core::{AccessKind, Action};
use fleetscan_fanotify::{Event as RawEvent, POLLIN, POLLPRI, PollFd, Response};
use tracing::{error, warn};

use crate::access::{self, Access, Event, Failure};
use crate::cache::FileKey;
use crate::deadline::DeadlineQueue;
use crate::hashers::Hashers;
use crate::interceptor::Interceptor;
use crate::mounts::{self, Coverage, MountTable};
use crate::session::SessionSlot;
use crate::stats::bump;

/// Where the reader sends the accesses that must wait.
pub(crate) struct Waits {
    pub deadlines: Arc<DeadlineQueue<Arc<Access>>>,
    pub session: Arc<SessionSlot>,
    pub hashers: Hashers,
}

/// How often the loop wakes to check for shutdown when nothing happens.
const IDLE_POLL: Duration = Duration::from_millis(50);

pub(crate) fn run(ic: Arc<Interceptor>, mut mounts: MountTable, waits: Waits) {
    while !ic.stopping.load(Ordering::SeqCst) {
        let (ready, mounts_changed) = {
            let mut fds = [
                PollFd::new(ic.group.as_fd(), POLLIN),
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
            read_batch(&ic, &mut mounts, &waits);
        }
    }
    // Shutting down: the filesystem marks are gone, so what is queued, and what was in flight
    // while they went, is all there is. Allow it, as closing the group would, until the group
    // stays quiet for a moment.
    loop {
        let mut fds = [PollFd::new(ic.group.as_fd(), POLLIN)];
        if !matches!(fleetscan_fanotify::poll(&mut fds, Some(DRAIN_QUIET)), Ok(n) if n > 0) {
            break;
        }
        match ic.group.read_events() {
            Ok((events, _)) => {
                for ev in events {
                    if let Some(fd) = ev.fd.as_ref()
                        && ev.is_permission()
                    {
                        let _ = ic.group.respond(fd.as_fd(), Response::Allow);
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

fn read_batch(ic: &Interceptor, mounts: &mut MountTable, waits: &Waits) {
    let (events, fault) = match ic.group.read_events() {
        Ok(r) => r,
        Err(e) => {
            if let fleetscan_fanotify::FanotifyError::Read(io) = &e
                && matches!(io.raw_os_error(), Some(EMFILE | ENFILE))
            {
                // The kernel denied the event it could not give us a descriptor for.
                bump(&ic.counters.overloaded);
            }
            error!(error = %e, "reading fanotify events failed");
            std::thread::sleep(Duration::from_millis(10));
            return;
        }
    };
    // The agent's own accesses first, before any other event of the batch is looked at: one
    // of them may be what another agent thread waits on.
    for ev in events.iter().filter(|ev| is_own(ic, ev)) {
        if let Some(fd) = ev.fd.as_ref() {
            let _ = ic.group.respond(fd.as_fd(), Response::Allow);
            bump(&ic.counters.own_pid);
        }
    }
    for ev in events {
        if !is_own(ic, &ev) {
            handle(ic, mounts, waits, ev);
        }
    }
    if let Some(f) = fault {
        error!(error = %f, "malformed fanotify events skipped");
    }
}

/// A permission event of the agent's own process (answered by [`read_batch`] before the rest).
fn is_own(ic: &Interceptor, ev: &RawEvent) -> bool {
    ev.pid == ic.own_pid && ev.is_permission() && ev.fd.is_some()
}

fn handle(ic: &Interceptor, mounts: &mut MountTable, waits: &Waits, ev: RawEvent) {
    if ev.fd.is_none() {
        if ev.is_overflow() {
            bump(&ic.counters.queue_overflows);
            warn!("fanotify queue overflow");
        }
        return;
    }
    if !ev.is_permission() {
        return;
    }
    bump(&ic.counters.events);
    let kind = if ev.is_exec() {
        AccessKind::Exec
    } else {
        AccessKind::Open
    };
    let RawEvent { fd, pid, pidfd, .. } = ev;
    let ev = Event {
        file: File::from(fd.expect("checked above")),
        pidfd,
        pid,
        kind,
    };
    let st = match fleetscan_fanotify::statx_fd(ev.file.as_fd()) {
        Ok(st) => st,
        Err(e) => {
            access::fail_now(ic, &ev, "", None, &ic.policy(), Failure::Statx(e));
            return;
        }
    };
    if !st.is_regular() {
        // Devices, FIFOs, sockets: nothing to scan, and reading a FIFO would block.
        access::allow_unprotected(ic, &ev.file);
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
    let (scope, subject) = ic.scope_of(pid, ev.pidfd.as_ref());
    if let Some(why) = scope.skip_early(kind, subject.as_ref()) {
        access::skip_now(ic, &ev.file, &why);
        return;
    }
    let key = FileKey::from(&st);
    let hit = ic.cached(&key, scope.id);
    if let Some(hit) = &hit
        && hit.action == Action::Allow
    {
        access::allow_cached(ic, &ev.file, &key, scope.id, hit.ignorable);
        return;
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{}", ev.file.as_raw_fd()))
        .map(mounts::strip_deleted)
        .unwrap_or_default();
    let coverage =
        ic.protection
            .classify(mounts, (st.dev_major, st.dev_minor), st.mnt_id, &path, pid);
    if coverage == Coverage::Unprotected {
        access::allow_unprotected(ic, &ev.file);
        return;
    }
    // Borrowed, not copied, for the usual UTF-8 path.
    let path = path.to_string_lossy();
    if let Some(hit) = hit {
        access::decide_cached(ic, &ev, &path, subject, &hit);
        return;
    }
    if !waits.session.is_up() {
        access::fail_now(ic, &ev, &path, subject, &scope.policy, Failure::NoBroker);
        return;
    }
    if ic.waiting() >= ic.tuning.max_pending {
        access::fail_now(
            ic,
            &ev,
            &path,
            subject,
            &scope.policy,
            Failure::TooManyWaiting,
        );
        return;
    }
    let access = Access::wait(ic, ev, key, path.into_owned(), subject, scope);
    waits.deadlines.push(access.deadline, access.clone());
    if let Err(access) = waits.hashers.submit(access) {
        access::fail(ic, &access, Failure::HashQueueFull);
    }
}
