//! The state every agent thread shares, and the few operations that must be done the same way
//! wherever they happen: answering the kernel, concluding an access locally (answer first, then
//! report), caching a decision together with its kernel ignore mark, flushing.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetscan_core::policy::{MAX_DECISION_DEADLINE, Outcome};
use fleetscan_core::{AccessKind, Action, Policy};
use fleetscan_fanotify::{Fanotify, Response};
use fleetscan_proto::{convert, v1};
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::cache::{CachedDecision, FileKey, VerdictCache};
use crate::deadline::DeadlineQueue;
use crate::marks::Marks;
use crate::mounts::Protection;
use crate::pending::{PendingEvent, PendingMap};
use crate::pods::PodDirectory;
use crate::reports::ReportQueue;
use crate::scope::{Policies, Scope};
use crate::{AgentConfig, AgentTuning, subject};

/// Counters behind [`crate::Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub events: AtomicU64,
    pub own_pid: AtomicU64,
    pub unprotected: AtomicU64,
    /// Accesses their policy does not scan (exec-only opens, exclusions).
    pub skipped: AtomicU64,
    pub cache_hits: AtomicU64,
    pub ignore_marks: AtomicU64,
    pub deadline_expiries: AtomicU64,
    pub no_broker: AtomicU64,
    pub overloaded: AtomicU64,
    pub broker_decisions: AtomicU64,
    pub late_decisions: AtomicU64,
    pub oversize: AtomicU64,
    pub unreadable: AtomicU64,
    pub queue_overflows: AtomicU64,
    pub sessions: AtomicU64,
    pub requests_sent: AtomicU64,
    pub decisions_cached: AtomicU64,
    pub flushes: AtomicU64,
    pub reports_dropped: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The live broker session, as the threads that send requests see it.
#[derive(Clone, Debug)]
pub(crate) struct SessionLink {
    pub epoch: u64,
    /// Cleared (before the session's pending events are drained) when the session ends.
    pub alive: Arc<AtomicBool>,
    pub tx: mpsc::Sender<v1::AgentMessage>,
}

/// What a local report says about the access, besides the decision.
#[derive(Debug, Default)]
pub(crate) struct ReportCtx<'a> {
    pub path: &'a str,
    /// `path` is what the event's descriptor reads as: the report gets the opener's view
    /// (worked out after the kernel has its answer).
    pub descriptor_path: bool,
    /// The host's view, where it differs (when `path` is already the opener's).
    pub host_path: String,
    pub kind: Option<AccessKind>,
    pub sha256: String,
    pub threat_name: String,
    pub pid: i32,
    pub pidfd: Option<&'a std::os::fd::OwnedFd>,
    pub subject: Option<v1::Subject>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub group: Fanotify,
    pub config: AgentConfig,
    pub tuning: AgentTuning,
    pub own_pid: i32,
    pub protection: Protection,
    /// Pod metadata, filled by [`crate::pods::run`].
    pub pods: Arc<PodDirectory>,
    /// The session's policy (the operator's: until a policy set says more, and for failures
    /// before an access's scope is known) and the broker's policy set, as scopes.
    policies: RwLock<Policies>,
    /// The verdict cache; its lock also orders ignore-mark placement against flushes.
    cache: Mutex<VerdictCache>,
    /// Kernel ignore marks and the leases that guard them.
    pub marks: Marks,
    pub pending: PendingMap,
    pub deadlines: DeadlineQueue,
    session: RwLock<Option<SessionLink>>,
    pub reports: ReportQueue,
    pub counters: Arc<Counters>,
    next_id: AtomicU64,
    next_epoch: AtomicU64,
    /// Set by the reader's owner to end the reader thread.
    pub stopping: AtomicBool,
    /// Set when [`crate::Agent::run`] is shutting down: pending events are then allowed by
    /// the shutdown, not failed by the session that ends with it.
    pub shutting_down: AtomicBool,
}

impl Shared {
    pub fn new(
        group: Fanotify,
        config: AgentConfig,
        tuning: AgentTuning,
        protection: Protection,
    ) -> Shared {
        let policy = Policy {
            version: 0,
            fail_mode: config.fail_mode,
            decision_deadline: config.decision_deadline,
            max_file_size: config.max_file_size,
            ..Policy::default()
        };
        let cache = VerdictCache::new(config.cache_capacity);
        let reports = ReportQueue::new(tuning.report_queue);
        let mut s = Shared {
            group,
            own_pid: i32::try_from(std::process::id()).expect("pid fits i32"),
            protection,
            pods: PodDirectory::new(config.pod_retention),
            policies: RwLock::new(Policies::new(policy.clone())),
            cache: Mutex::new(cache),
            marks: Marks::new(tuning.max_marks),
            pending: PendingMap::default(),
            deadlines: DeadlineQueue::new(),
            session: RwLock::new(None),
            reports,
            counters: Arc::new(Counters::default()),
            next_id: AtomicU64::new(1),
            next_epoch: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            config,
            tuning,
        };
        let effective = s.effective(policy);
        *s.policies.get_mut() = Policies::new(effective);
        s
    }

    /// Who made an access: what `/proc` says of the process, and what the pod directory
    /// knows of its pod.
    pub fn subject(&self, pid: i32, pidfd: Option<&std::os::fd::OwnedFd>) -> v1::Subject {
        self.attribute(pid, pidfd).0
    }

    /// [`Shared::subject`], with the tenant filled in, and the scope whose policy decides
    /// the process's accesses.
    pub fn attribute(
        &self,
        pid: i32,
        pidfd: Option<&std::os::fd::OwnedFd>,
    ) -> (v1::Subject, Arc<Scope>) {
        let mut s = subject::resolve(pid, pidfd);
        self.pods.enrich(&mut s);
        let policies = self.policies.read();
        let labelled = policies
            .namespace_label()
            .and_then(|label| self.pods.namespace_label(&s.k8s_namespace, label))
            .unwrap_or_default();
        let scope = policies.scope(&mut s, &labelled);
        (s, scope)
    }

    /// The scope of an access, and its subject when finding the scope needed it (several
    /// policies in force, or rules by image or namespace). With one policy this costs nothing.
    pub fn scope_of(
        &self,
        pid: i32,
        pidfd: Option<&std::os::fd::OwnedFd>,
    ) -> (Arc<Scope>, Option<v1::Subject>) {
        {
            let policies = self.policies.read();
            if !policies.needs_subject() {
                return (policies.single(), None);
            }
        }
        let (s, scope) = self.attribute(pid, pidfd);
        (scope, Some(s))
    }

    /// Adopts the broker's policy set if it is newer than the one in force. Decisions cached
    /// under the old scopes, and their ignore marks, are dropped.
    pub fn set_policy_set(&self, set: fleetscan_core::tenancy::PolicySet) {
        let version = set.version;
        // Under the cache lock, as every cache insert and mark: none of the old scopes'
        // decisions can be stored once the new set is in force.
        let mut c = self.cache.lock();
        {
            let mut cur = self.policies.write();
            if version <= cur.version() {
                debug!(version, current = cur.version(), "older policy set ignored");
                return;
            }
            let session = cur.session_policy().clone();
            *cur = Policies::with_set(set, session, |p| self.effective(p));
            info!(version, multi = cur.multi(), "policy set applied");
        }
        c.clear();
        self.flush_marks();
        bump(&self.counters.flushes);
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_epoch(&self) -> u64 {
        self.next_epoch.fetch_add(1, Ordering::Relaxed)
    }

    /// The policy in force, its deadline already the effective one.
    pub fn policy(&self) -> Policy {
        self.policies.read().session_policy().clone()
    }

    fn effective(&self, mut p: Policy) -> Policy {
        let local = self
            .config
            .decision_deadline
            .clamp(Duration::from_millis(1), MAX_DECISION_DEADLINE);
        p.decision_deadline = p.effective_deadline().min(local);
        p
    }

    /// Adopts a broker's policy. `force` (a new session) takes it whatever its version; an
    /// update older than the policy in force is ignored.
    pub fn set_policy(&self, p: Policy, force: bool) {
        let p = self.effective(p);
        let mut policies = self.policies.write();
        let cur = policies.session_policy();
        if !force && p.version < cur.version {
            debug!(
                version = p.version,
                current = cur.version,
                "older policy ignored"
            );
            return;
        }
        if *cur != p {
            info!(
                version = p.version,
                fail_mode = ?p.fail_mode,
                deadline_ms = p.decision_deadline.as_millis() as u64,
                max_file_size = p.max_file_size,
                audit_only = p.audit_only,
                "policy applied"
            );
        }
        policies.set_session_policy(p);
    }

    /// Answers the kernel. Errors are logged: the event may already be gone (the opener was
    /// killed), and there is nothing else to do.
    pub fn answer(&self, file: &File, action: Action) {
        let r = match action {
            Action::Allow => Response::Allow,
            Action::Deny => Response::Deny,
        };
        if let Err(e) = self.group.respond(file.as_fd(), r) {
            warn!(error = %e, "fanotify response failed");
        }
    }

    /// Decides an access locally: answers the kernel first, then reports it (denials, and
    /// allows when `report_allow`) or counts it (other allows).
    pub fn conclude(
        &self,
        file: &File,
        outcome: &Outcome,
        reason: v1::LocalReason,
        ctx: ReportCtx<'_>,
        report_allow: bool,
    ) {
        self.answer(file, outcome.action);
        if outcome.action == Action::Allow && !report_allow {
            self.reports.count_allowed();
            return;
        }
        let subject = ctx
            .subject
            .unwrap_or_else(|| self.subject(ctx.pid, ctx.pidfd));
        let (path, host_path) = if ctx.descriptor_path && !ctx.path.is_empty() {
            let p = crate::paths::resolve(
                file.as_fd(),
                std::path::Path::new(ctx.path),
                ctx.pid,
                ctx.pidfd,
            );
            (p.path, p.host_path)
        } else {
            (ctx.path.to_string(), ctx.host_path)
        };
        let threat_name = if ctx.threat_name.is_empty() {
            outcome.reason.clone()
        } else {
            ctx.threat_name
        };
        self.reports.push(v1::AccessReport {
            at_unix_ms: fleetscan_core::now_unix_ms(),
            action: convert::action_to_proto(outcome.action).into(),
            reason: reason.into(),
            sha256: ctx.sha256,
            subject: Some(subject),
            path,
            kind: convert::access_kind_to_proto(ctx.kind.unwrap_or(AccessKind::Open)).into(),
            threat_name,
            allowed_count: 0,
            dropped_reports: 0,
            host_path,
        });
        self.counters
            .reports_dropped
            .store(self.reports.dropped_total(), Ordering::Relaxed);
        debug!(
            path = ctx.path,
            action = outcome.action.as_str(),
            reason = ?reason,
            why = %outcome.reason,
            "access decided locally"
        );
    }

    /// Answers a pending event (already taken out of the map) with the failure outcome.
    pub fn fail_pending(&self, ev: PendingEvent, why: &str, reason: v1::LocalReason) {
        let outcome = ev.scope.policy.on_failure(why);
        let ctx = ReportCtx {
            path: &ev.path,
            descriptor_path: !ev.path_resolved,
            host_path: ev.host_path.clone(),
            kind: Some(ev.kind),
            sha256: ev.sha256.map(|s| s.to_hex()).unwrap_or_default(),
            threat_name: String::new(),
            pid: ev.pid,
            pidfd: ev.pidfd.as_deref(),
            subject: ev.subject.clone(),
        };
        // NO_BROKER allows are only counted: while a broker is away every access would be
        // one, and the bounded queue should keep room for denials.
        let report_allow = reason != v1::LocalReason::NoBroker;
        self.conclude(&ev.file, &outcome, reason, ctx, report_allow);
    }

    pub fn current_session(&self) -> Option<SessionLink> {
        self.session.read().clone()
    }

    pub fn broker_connected(&self) -> bool {
        self.session.read().is_some()
    }

    pub fn set_session(&self, link: SessionLink) {
        *self.session.write() = Some(link);
    }

    /// Forgets the session if it is still the current one.
    pub fn clear_session(&self, epoch: u64) {
        let mut s = self.session.write();
        if s.as_ref().is_some_and(|l| l.epoch == epoch) {
            *s = None;
        }
    }

    /// A cached decision for `key` in `scope`, if any.
    pub fn cached(&self, key: &FileKey, scope: u32) -> Option<Arc<CachedDecision>> {
        self.cache.lock().get(key, scope, Instant::now())
    }

    pub fn generation(&self) -> Option<u64> {
        self.cache.lock().generation()
    }

    /// Adopts the broker's verdict generation; a change drops the cache and every ignore mark.
    pub fn set_generation(&self, generation: u64) {
        let mut c = self.cache.lock();
        if c.set_generation(generation) {
            info!(generation, "verdict generation changed, cache dropped");
            self.flush_marks();
            bump(&self.counters.flushes);
        }
    }

    /// A CacheFlush: drops every cached decision and ignore mark; adopts the generation.
    pub fn flush(&self, generation: u64, reason: &str) {
        let mut c = self.cache.lock();
        c.clear();
        c.set_generation(generation);
        self.flush_marks();
        bump(&self.counters.flushes);
        info!(generation, reason, "cache flushed");
    }

    fn flush_marks(&self) {
        self.marks.flush(&self.group);
    }

    /// Caches a decision for the version of the file that was hashed, if the generation did
    /// not move since the event arrived and the hash is known to be of that version alone
    /// (`stable`: hashed under a read lease), and places a kernel ignore mark for it when
    /// allowed (see [`Shared::place_ignore_mark`]).
    pub fn cache_decision(&self, ev: &PendingEvent, mut decision: CachedDecision) {
        if !ev.stable {
            debug!(path = %ev.path, "file had a writer while hashed, decision not cached");
            return;
        }
        let mut c = self.cache.lock();
        let (set_version, scoped) = {
            let p = self.policies.read();
            (p.version(), p.multi())
        };
        if ev.scope.set_version != set_version {
            debug!(path = %ev.path, "policy set changed while asking, decision not cached");
            return;
        }
        // A mark is per inode and would answer every scope's processes alike: with several
        // policies in force no entry stands for one (the set cannot change while the cache
        // lock is held, and a change empties the cache).
        decision.ignorable &= !scoped;
        let mark = decision.ignorable && self.config.ignore_marks;
        if !c.insert(ev.key, ev.scope.id, decision, ev.generation) {
            return;
        }
        bump(&self.counters.decisions_cached);
        if mark {
            self.place_ignore_mark(&ev.file, &ev.key);
        }
    }

    /// Places an ignore mark through `file` if its identity is still `key`, kept under a read
    /// lease that a writer's open takes away together with the mark (see `marks.rs`).
    ///
    /// The kernel clears an ignore mask on the first modify event *after* the mark is there; a
    /// write that finished before it is only seen in the identity. So the mark goes on only
    /// under the read lease (no writer has the file open, none can open it until the lease is
    /// given up, so no write is under way and the file has no writable mapping) and only when
    /// the identity, taken under that lease, is still `key` (ctime and mtime to the
    /// nanosecond: on this kernel's multigrain filesystems a change after our statx always
    /// gets a new ctime). The check comes *before* the mark: a write may have come and gone
    /// since the content was judged (a cache hit's answer lets the writer go on at once, and
    /// a decision can arrive after the file changed), and a mark placed on the new version
    /// even for a moment hides every open made in that moment.
    ///
    /// No lease, no mark: a file open for writing is about to change, and a filesystem
    /// without leases (network filesystems) cannot keep a writer out, nor report a remote
    /// write as a modify event.
    pub fn place_ignore_mark(&self, file: &File, key: &FileKey) {
        if self.marks.place(&self.group, file, key) {
            bump(&self.counters.ignore_marks);
        }
    }

    /// Re-places the mark for a cached clean decision (marks go with their lifetime, to make
    /// room, or with a writer's open), under the cache lock and only while the entry is still
    /// there, so that a flush cannot interleave.
    pub fn refresh_ignore_mark(&self, file: &File, key: &FileKey, scope: u32) {
        if !self.config.ignore_marks {
            return;
        }
        let mut c = self.cache.lock();
        if c.get(key, scope, Instant::now())
            .is_some_and(|d| d.ignorable)
        {
            self.place_ignore_mark(file, key);
        }
    }
}
