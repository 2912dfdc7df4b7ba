//! Where the agent concludes an access: the [`Access`] that travels from the reader to the
//! hashing threads to the session, its exactly-once answer, and every way the agent answers
//! an event — at once from the reader (its own cache, unprotected files, no broker, too much
//! waiting), with the fail mode (deadline, session lost, unreadable, full queues), or with a
//! broker's decision, which it then caches and may turn into a kernel ignore mark.
//!
//! **Exactly once.** A waiting access holds its event's descriptors and what is known of it in
//! one slot; answering *takes* them out of it, under its lock, and only the taker answers.
//! Whoever comes later (the deadline thread after a decision, a late decision after the
//! deadline, the hashing thread after either) finds the slot empty and does nothing. Taking
//! also gives the descriptors up: they close as soon as no hashing thread or upload still
//! reads through them, wherever else the access is still referenced (the deadline heap keeps
//! every access until its deadline).
//!
//! **Answer first.** Every conclusion here answers the kernel before it counts, logs, looks
//! up the process or the paths for the record, caches or marks. The kernel is answered only
//! from here (`Interceptor::respond`), except the agent's own accesses and the shutdown drain
//! of the group, which the reader allows before anything is known of them.
//!
//! Never here: waiting (no lock is held across I/O but the cache's across placing a mark), a
//! read of the file's content, a protocol type.

use std::borrow::Cow;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetscan_core::policy::Outcome;
use fleetscan_core::{AccessKind, Action, LocalReason, LocalReport, Policy, Sha256, Subject};
use parking_lot::Mutex;
use tracing::debug;

use crate::cache::{CachedDecision, FileKey};
use crate::interceptor::Interceptor;
use crate::paths::{self, AccessPaths};
use crate::scope::Scope;
use crate::stats::{Counters, bump};

/// A permission event as the reader holds it while it decides whether it can answer at once.
#[derive(Debug)]
pub(crate) struct Event {
    /// The event's descriptor: the answer goes through it, and the content is read only
    /// through it.
    pub file: File,
    /// The opener, as the kernel reported it (`FAN_REPORT_PIDFD`).
    pub pidfd: Option<OwnedFd>,
    pub pid: i32,
    pub kind: AccessKind,
}

/// An access that waits for a decision: made by the reader, hashed by a hashing thread, asked
/// about by the session, expired by the deadline thread — answered by exactly one of them.
#[derive(Debug)]
pub(crate) struct Access {
    pub kind: AccessKind,
    pub pid: i32,
    /// The file's identity as the reader's statx saw it.
    pub key: FileKey,
    /// The policy scope that decides it (fail mode, size limit, cache scope).
    pub scope: Arc<Scope>,
    pub deadline: Instant,
    /// The verdict generation when the event arrived; a decision is cached only if it is
    /// still current.
    pub generation: Option<u64>,
    /// `None` once answered (see the module header).
    waiting: Mutex<Option<Box<Waiting>>>,
}

/// What a waiting access holds, given up by its answer.
#[derive(Debug)]
struct Waiting {
    file: Arc<File>,
    pidfd: Option<Arc<OwnedFd>>,
    /// As the agent sees it (`readlink /proc/self/fd/N`) until `path_resolved`; then as the
    /// opening process sees it.
    path: String,
    path_resolved: bool,
    /// As the host sees it, where it differs from `path` (known once `path_resolved`).
    host_path: String,
    subject: Option<Subject>,
    /// Known once hashed.
    sha256: Option<Sha256>,
}

/// What a hashing thread borrows of a waiting access to work on it.
#[derive(Debug)]
pub(crate) struct Borrowed {
    pub file: Arc<File>,
    pub pidfd: Option<Arc<OwnedFd>>,
    /// As the agent sees it.
    pub path: String,
    /// When the reader needed it for the scope.
    pub subject: Option<Subject>,
}

/// One version of an access's file, hashed: what a hashing thread hands to the session with
/// the access.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hashed {
    pub sha256: Sha256,
    pub len: u64,
    /// The identity of the hashed content: the decision is about this version, whatever the
    /// reader's statx saw before.
    pub key: FileKey,
    /// Whether `key` names exactly the hashed bytes (hashed under a read lease: no writer
    /// before or during), so that a decision may be cached and turned into an ignore mark.
    pub stable: bool,
}

/// A broker's decision on an access, as the agent applies it.
#[derive(Debug)]
pub(crate) struct BrokerDecision {
    pub action: Action,
    pub reason: String,
    /// Whether the broker allows caching it for the file's identity.
    pub cacheable: bool,
    /// How long it may be cached; 0: until the file or the rules change.
    pub ttl_seconds: u32,
    /// The threat name of the first verdict behind it that blocks, when one does.
    pub blocking: Option<String>,
}

/// Why the fail mode decides an access.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The reader could not identify the event's file.
    Statx(std::io::Error),
    /// The content could not be read.
    Unreadable(std::io::Error),
    /// No broker session.
    NoBroker,
    /// The session the request went out on ended.
    SessionLost,
    /// `max_pending` accesses wait already.
    TooManyWaiting,
    HashQueueFull,
    BrokerQueueFull,
    Deadline,
    /// The broker's decision carried no action the agent knows.
    MalformedDecision,
}

impl Failure {
    fn why(&self) -> Cow<'static, str> {
        match self {
            Failure::Statx(e) => format!("statx failed: {e}").into(),
            Failure::Unreadable(e) => format!("unreadable: {e}").into(),
            Failure::NoBroker => "no broker connected".into(),
            Failure::SessionLost => "broker session lost".into(),
            Failure::TooManyWaiting => "too many accesses pending".into(),
            Failure::HashQueueFull => "hashing queue full".into(),
            Failure::BrokerQueueFull => "broker queue full".into(),
            Failure::Deadline => "no decision before the deadline".into(),
            Failure::MalformedDecision => "decision without an action".into(),
        }
    }

    fn reason(&self) -> LocalReason {
        match self {
            Failure::Statx(_) | Failure::Unreadable(_) => LocalReason::Unreadable,
            Failure::NoBroker | Failure::SessionLost => LocalReason::NoBroker,
            Failure::TooManyWaiting
            | Failure::HashQueueFull
            | Failure::BrokerQueueFull
            | Failure::Deadline => LocalReason::Deadline,
            Failure::MalformedDecision => LocalReason::MalformedDecision,
        }
    }

    fn counter<'a>(&self, c: &'a Counters) -> Option<&'a AtomicU64> {
        match self {
            Failure::Statx(_) | Failure::Unreadable(_) => Some(&c.unreadable),
            Failure::NoBroker | Failure::SessionLost => Some(&c.no_broker),
            Failure::TooManyWaiting | Failure::HashQueueFull | Failure::BrokerQueueFull => {
                Some(&c.overloaded)
            }
            Failure::Deadline => Some(&c.deadline_expiries),
            Failure::MalformedDecision => None,
        }
    }
}

impl Access {
    /// Parks `ev`: from here on it waits for a decision, until its scope's deadline, and
    /// counts against `max_pending` until it is answered. `path` is what its descriptor reads
    /// as; `subject` is the process when the scope needed it.
    pub fn wait(
        ic: &Interceptor,
        ev: Event,
        key: FileKey,
        path: String,
        subject: Option<Subject>,
        scope: Arc<Scope>,
    ) -> Arc<Access> {
        ic.wait_begins();
        Arc::new(Access {
            kind: ev.kind,
            pid: ev.pid,
            key,
            deadline: Instant::now() + scope.policy.decision_deadline,
            scope,
            generation: ic.generation(),
            waiting: Mutex::new(Some(Box::new(Waiting {
                file: Arc::new(ev.file),
                pidfd: ev.pidfd.map(Arc::new),
                path,
                path_resolved: false,
                host_path: String::new(),
                subject,
                sha256: None,
            }))),
        })
    }

    /// Takes the answer: what the access holds for the one caller that gets it, `None` for
    /// every caller after (see the module header).
    fn take(&self, ic: &Interceptor) -> Option<Box<Waiting>> {
        let taken = self.waiting.lock().take();
        if taken.is_some() {
            ic.wait_ends();
        }
        taken
    }

    pub fn is_answered(&self) -> bool {
        self.waiting.lock().is_none()
    }

    /// What a hashing thread works with, while the access waits.
    pub fn borrow(&self) -> Option<Borrowed> {
        self.waiting.lock().as_ref().map(|w| Borrowed {
            file: w.file.clone(),
            pidfd: w.pidfd.clone(),
            path: w.path.clone(),
            subject: w.subject.clone(),
        })
    }

    /// The event's descriptor, while the access waits (for an upload).
    pub fn file(&self) -> Option<Arc<File>> {
        self.waiting.lock().as_ref().map(|w| w.file.clone())
    }

    /// Records the access's paths and process, for whoever answers it. False once answered.
    pub fn resolved(&self, paths: &AccessPaths, subject: &Subject) -> bool {
        let mut w = self.waiting.lock();
        let Some(w) = w.as_mut() else { return false };
        w.path.clone_from(&paths.path);
        w.host_path.clone_from(&paths.host_path);
        w.path_resolved = true;
        w.subject = Some(subject.clone());
        true
    }

    /// Records the content's digest, for whoever answers it. False once answered.
    pub fn hashed(&self, sha256: Sha256) -> bool {
        let mut w = self.waiting.lock();
        let Some(w) = w.as_mut() else { return false };
        w.sha256 = Some(sha256);
        true
    }
}

/// Answers a waiting access with its scope's fail mode, then reports it. False when it was
/// answered already.
pub(crate) fn fail(ic: &Interceptor, access: &Access, failure: Failure) -> bool {
    let Some(w) = access.take(ic) else {
        return false;
    };
    let outcome = access.scope.policy.on_failure(&failure.why());
    ic.respond(&w.file, outcome.action);
    if let Some(c) = failure.counter(&ic.counters) {
        bump(c);
    }
    record(
        ic,
        &w.file,
        &outcome,
        failure.reason(),
        waiting_record(access, &w),
    );
    true
}

/// Answers a waiting access whose content exceeds its policy's limit (`size` bytes or more)
/// with the policy's oversize action, then reports it.
pub(crate) fn oversize(ic: &Interceptor, access: &Access, size: u64) -> bool {
    let Some(w) = access.take(ic) else {
        return false;
    };
    let outcome = access.scope.policy.oversize(size);
    ic.respond(&w.file, outcome.action);
    bump(&ic.counters.oversize);
    record(
        ic,
        &w.file,
        &outcome,
        LocalReason::Oversize,
        waiting_record(access, &w),
    );
    true
}

/// Allows a waiting access its policy does not scan by its path (an exclusion).
pub(crate) fn skip(ic: &Interceptor, access: &Access, why: &str) -> bool {
    let Some(w) = access.take(ic) else {
        return false;
    };
    skip_now(ic, &w.file, why);
    true
}

/// Answers a waiting access with its broker's decision, then caches the decision (and may
/// mark the file) for the hashed version. False when the access was answered already (a late
/// decision).
pub(crate) fn decided(
    ic: &Interceptor,
    access: &Access,
    hashed: &Hashed,
    d: BrokerDecision,
) -> bool {
    let Some(w) = access.take(ic) else {
        return false;
    };
    ic.respond(&w.file, d.action);
    bump(&ic.counters.broker_decisions);
    if d.cacheable {
        // A kernel ignore mark stands only for a clean file: an allow that rests on a blocking
        // verdict (audit-only) must keep producing events, and a mark cannot expire with a ttl.
        let ignorable = d.action == Action::Allow && d.blocking.is_none() && d.ttl_seconds == 0;
        let expires = (d.ttl_seconds > 0)
            .then(|| Instant::now() + Duration::from_secs(u64::from(d.ttl_seconds)));
        let decision = CachedDecision {
            action: d.action,
            reason: d.reason,
            sha256: Some(hashed.sha256),
            threat_name: d.blocking.unwrap_or_default(),
            ignorable,
            expires,
        };
        cache(ic, access, hashed, &w, decision);
    }
    true
}

/// Allows a waiting access because the agent stops (as closing the group would): no report.
pub(crate) fn allow_on_shutdown(ic: &Interceptor, access: &Access) {
    if let Some(w) = access.take(ic) {
        ic.respond(&w.file, Action::Allow);
    }
}

/// Caches a decision for the version of the file that was hashed, if the policy set did not
/// change since the event arrived and the hash is known to be of that version alone (`stable`),
/// and places a kernel ignore mark for it when it may stand for it.
fn cache(
    ic: &Interceptor,
    access: &Access,
    hashed: &Hashed,
    w: &Waiting,
    mut decision: CachedDecision,
) {
    if !hashed.stable {
        debug!(path = %w.path, "file had a writer while hashed, decision not cached");
        return;
    }
    let mut locked = ic.lock_cache();
    if access.scope.set_version != locked.set_version {
        debug!(path = %w.path, "policy set changed while asking, decision not cached");
        return;
    }
    // A mark is per inode and would answer every scope's processes alike: with several
    // policies in force no entry stands for one (the set cannot change while the cache lock
    // is held, and a change empties the cache).
    decision.ignorable &= !locked.scoped;
    let mark = decision.ignorable && ic.config.ignore_marks;
    let generation = access.generation;
    if !locked
        .cache
        .insert(hashed.key, access.scope.id, decision, generation)
    {
        return;
    }
    bump(&ic.counters.decisions_cached);
    if mark {
        ic.place_ignore_mark(&locked.cache, &w.file, &hashed.key);
    }
}

/// Allows an event that needs no scan: not a regular file, or outside the protected
/// directories.
pub(crate) fn allow_unprotected(ic: &Interceptor, file: &File) {
    ic.respond(file, Action::Allow);
    bump(&ic.counters.unprotected);
}

/// Allows an event its policy does not scan (exec-only, an exclusion): counted, never reported
/// one by one nor cached (another scope may have to scan the same file).
pub(crate) fn skip_now(ic: &Interceptor, file: &File, why: &str) {
    ic.respond(file, Action::Allow);
    bump(&ic.counters.skipped);
    ic.reports.count_allowed();
    tracing::trace!(why, "access not scanned by policy");
}

/// Allows an event from a cached allow: counted, not reported; its ignore mark, if the
/// decision may have one, placed again (it went with its lifetime or to make room).
pub(crate) fn allow_cached(ic: &Interceptor, file: &File, key: &FileKey, scope: u32, mark: bool) {
    ic.respond(file, Action::Allow);
    bump(&ic.counters.cache_hits);
    ic.reports.count_allowed();
    if mark {
        ic.refresh_ignore_mark(file, key, scope);
    }
}

/// Decides an event from a cached decision that is not a plain allow (a denial): answered,
/// then reported with the cached verdict. `path` is what the descriptor reads as.
pub(crate) fn decide_cached(
    ic: &Interceptor,
    ev: &Event,
    path: &str,
    subject: Option<Subject>,
    hit: &CachedDecision,
) {
    let outcome = Outcome {
        action: hit.action,
        reason: hit.reason.clone(),
        cacheable: true,
    };
    ic.respond(&ev.file, outcome.action);
    bump(&ic.counters.cache_hits);
    let rec = Record {
        sha256: hit.sha256,
        threat_name: hit.threat_name.clone(),
        subject,
        ..event_record(ev, path)
    };
    record(ic, &ev.file, &outcome, LocalReason::Cached, rec);
}

/// Decides an event with `policy`'s fail mode before it waits for anything (no broker, too
/// many waiting, its file unidentifiable), then reports it. `path` is what the descriptor
/// reads as (empty when unknown).
pub(crate) fn fail_now(
    ic: &Interceptor,
    ev: &Event,
    path: &str,
    subject: Option<Subject>,
    policy: &Policy,
    failure: Failure,
) {
    let outcome = policy.on_failure(&failure.why());
    ic.respond(&ev.file, outcome.action);
    if let Some(c) = failure.counter(&ic.counters) {
        bump(c);
    }
    let rec = Record {
        subject,
        ..event_record(ev, path)
    };
    record(ic, &ev.file, &outcome, failure.reason(), rec);
}

/// What the record of an access says besides the decision.
#[derive(Debug)]
struct Record<'a> {
    path: Cow<'a, str>,
    /// `path` is what the event's descriptor reads as: the record gets the opener's view
    /// (worked out after the kernel has its answer).
    descriptor_path: bool,
    /// The host's view, where it differs (when `path` is already the opener's).
    host_path: Cow<'a, str>,
    kind: AccessKind,
    sha256: Option<Sha256>,
    threat_name: String,
    pid: i32,
    pidfd: Option<&'a OwnedFd>,
    subject: Option<Subject>,
}

fn event_record<'a>(ev: &'a Event, path: &'a str) -> Record<'a> {
    Record {
        path: Cow::Borrowed(path),
        descriptor_path: true,
        host_path: Cow::Borrowed(""),
        kind: ev.kind,
        sha256: None,
        threat_name: String::new(),
        pid: ev.pid,
        pidfd: ev.pidfd.as_ref(),
        subject: None,
    }
}

fn waiting_record<'a>(access: &Access, w: &'a Waiting) -> Record<'a> {
    Record {
        path: Cow::Borrowed(&w.path),
        descriptor_path: !w.path_resolved,
        host_path: Cow::Borrowed(&w.host_path),
        kind: access.kind,
        sha256: w.sha256,
        threat_name: String::new(),
        pid: access.pid,
        pidfd: w.pidfd.as_deref(),
        subject: w.subject.clone(),
    }
}

/// After the answer: reports a local decision, or only counts it: an allow from the cache, or
/// from the fail mode for want of a broker (while a broker is away every access would be one,
/// and the bounded queue should keep room for denials).
fn record(ic: &Interceptor, file: &File, outcome: &Outcome, reason: LocalReason, rec: Record<'_>) {
    if outcome.action == Action::Allow
        && matches!(reason, LocalReason::NoBroker | LocalReason::Cached)
    {
        ic.reports.count_allowed();
        return;
    }
    let subject = rec
        .subject
        .unwrap_or_else(|| ic.subject(rec.pid, rec.pidfd));
    let (path, host_path) = if rec.descriptor_path && !rec.path.is_empty() {
        let p = paths::resolve(file.as_fd(), Path::new(&*rec.path), rec.pid, rec.pidfd);
        (p.path, p.host_path)
    } else {
        (rec.path.into_owned(), rec.host_path.into_owned())
    };
    let threat_name = if rec.threat_name.is_empty() {
        outcome.reason.clone()
    } else {
        rec.threat_name
    };
    debug!(
        path = %path,
        action = outcome.action.as_str(),
        reason = ?reason,
        why = %outcome.reason,
        "access decided locally"
    );
    ic.reports.push(LocalReport {
        at_unix_ms: fleetscan_core::now_unix_ms(),
        action: outcome.action,
        reason,
        sha256: rec.sha256,
        subject,
        path,
        host_path,
        kind: rec.kind,
        threat_name,
    });
    ic.counters
        .reports_dropped
        .store(ic.reports.dropped_total(), Ordering::Relaxed);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An access as the reader parks it, without an interceptor: its descriptor is any file.
    pub(crate) fn access() -> Access {
        Access {
            kind: AccessKind::Open,
            pid: 1,
            key: FileKey::test(0),
            scope: crate::scope::Policies::new(Policy::default()).single(),
            deadline: Instant::now(),
            generation: None,
            waiting: Mutex::new(Some(Box::new(Waiting {
                file: Arc::new(File::open("/proc/self/stat").unwrap()),
                pidfd: None,
                path: String::new(),
                path_resolved: false,
                host_path: String::new(),
                subject: None,
                sha256: None,
            }))),
        }
    }

    /// The gate alone (what `take` does without the interceptor's count).
    fn take(a: &Access) -> bool {
        a.waiting.lock().take().is_some()
    }

    #[test]
    fn the_answer_is_taken_exactly_once_across_threads() {
        let accesses: Arc<Vec<Access>> = Arc::new((0..200).map(|_| access()).collect());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let accesses = accesses.clone();
                std::thread::spawn(move || accesses.iter().filter(|a| take(a)).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 200);
        assert!(accesses.iter().all(Access::is_answered));
    }

    #[test]
    fn an_answered_access_lends_nothing_and_records_nothing() {
        let a = access();
        assert!(a.borrow().is_some() && a.file().is_some());
        assert!(a.hashed(Sha256::of(b"x")));
        assert!(take(&a));
        assert!(a.borrow().is_none() && a.file().is_none());
        assert!(!a.hashed(Sha256::of(b"x")));
        assert!(!a.resolved(&AccessPaths::default(), &Subject::default()));
        assert!(!take(&a), "answered once");
    }

    #[test]
    fn the_answer_gives_the_descriptor_up_once_nobody_reads_through_it() {
        let a = access();
        let reading = a.file().unwrap();
        let weak = Arc::downgrade(&reading);
        assert!(take(&a));
        assert!(weak.upgrade().is_some(), "a reader still holds it");
        drop(reading);
        assert!(
            weak.upgrade().is_none(),
            "closed, though the access lives on"
        );
        assert!(a.is_answered());
    }

    #[test]
    fn failures_say_why_and_under_which_reason() {
        let c = Counters::default();
        for (f, reason) in [
            (Failure::Deadline, LocalReason::Deadline),
            (Failure::SessionLost, LocalReason::NoBroker),
            (Failure::HashQueueFull, LocalReason::Deadline),
            (
                Failure::Unreadable(std::io::Error::from_raw_os_error(5)),
                LocalReason::Unreadable,
            ),
            (Failure::MalformedDecision, LocalReason::MalformedDecision),
        ] {
            assert_eq!(f.reason(), reason, "{f:?}");
            assert!(!f.why().is_empty());
            assert_eq!(
                f.counter(&c).is_none(),
                matches!(f, Failure::MalformedDecision)
            );
        }
        let why = Failure::Unreadable(std::io::Error::from_raw_os_error(5)).why();
        assert!(why.starts_with("unreadable: "), "{why}");
    }
}
