//! The interceptor: the fanotify group and what every agent thread needs to answer its events
//! — which files are protected, the policies in force and their scopes, the verdict cache and
//! the kernel ignore marks behind it, pod metadata, the report queue, the counters.
//!
//! It knows no access in flight (those travel as `access::Access` values between the threads)
//! and no broker session (the session owns its link): it is what decides, not what waits. The
//! rules of concluding an access (answer first, then report; when a decision is cached or
//! marked) are in `access.rs`; this module keeps the locks they are applied under. Nothing
//! here blocks on the network or the runtime.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleetscan_core::policy::MAX_DECISION_DEADLINE;
use fleetscan_core::tenancy::PolicySet;
use fleetscan_core::{Action, Policy, Subject};
use fleetscan_fanotify::{Fanotify, Response};
use parking_lot::{Mutex, MutexGuard, RwLock};
use tracing::{debug, info, warn};

use crate::cache::{CachedDecision, FileKey, VerdictCache};
use crate::config::{AgentConfig, AgentTuning};
use crate::marks::Marks;
use crate::mounts::Protection;
use crate::pods::PodDirectory;
use crate::reports::ReportQueue;
use crate::scope::{Policies, Scope};
use crate::stats::{Counters, bump};
use crate::subject;

#[derive(Debug)]
pub(crate) struct Interceptor {
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
    pub reports: ReportQueue,
    pub counters: Arc<Counters>,
    /// Accesses waiting for an answer now (the `max_pending` bound).
    waiting: AtomicUsize,
    /// Set by the agent's owner to end the reader and marks threads.
    pub stopping: AtomicBool,
    /// Set when [`crate::Agent::run`] is shutting down: waiting accesses are then allowed by
    /// the shutdown, not failed by the session that ends with it.
    pub shutting_down: AtomicBool,
}

/// The verdict cache, locked, with what a decision is stored under: nothing of it changes
/// while this is held (a policy set is adopted under the cache lock).
pub(crate) struct CacheGuard<'a> {
    pub cache: MutexGuard<'a, VerdictCache>,
    /// The version of the policy set in force.
    pub set_version: u64,
    /// Whether several policies are in force (then no decision is ignorable).
    pub scoped: bool,
}

impl Interceptor {
    pub fn new(
        group: Fanotify,
        config: AgentConfig,
        tuning: AgentTuning,
        protection: Protection,
    ) -> Interceptor {
        let policy = Policy {
            version: 0,
            fail_mode: config.fail_mode,
            decision_deadline: config.decision_deadline,
            max_file_size: config.max_file_size,
            ..Policy::default()
        };
        let mut ic = Interceptor {
            group,
            own_pid: i32::try_from(std::process::id()).expect("pid fits i32"),
            protection,
            pods: PodDirectory::new(config.pod_retention),
            policies: RwLock::new(Policies::new(policy.clone())),
            cache: Mutex::new(VerdictCache::new(config.cache_capacity)),
            marks: Marks::new(tuning.max_marks),
            reports: ReportQueue::new(tuning.report_queue),
            counters: Arc::new(Counters::default()),
            waiting: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            config,
            tuning,
        };
        let effective = ic.effective(policy);
        *ic.policies.get_mut() = Policies::new(effective);
        ic
    }

    /// Answers the kernel. Errors are logged: the event may already be gone (the opener was
    /// killed), and there is nothing else to do. Only `access.rs` calls it, once per event.
    pub fn respond(&self, file: &File, action: Action) {
        let r = match action {
            Action::Allow => Response::Allow,
            Action::Deny => Response::Deny,
        };
        if let Err(e) = self.group.respond(file.as_fd(), r) {
            warn!(error = %e, "fanotify response failed");
        }
    }

    /// Accesses waiting for an answer now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// One more access waits (see `access::Access::wait`).
    pub fn wait_begins(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
    }

    /// A waiting access was answered.
    pub fn wait_ends(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Who made an access: what `/proc` says of the process, and what the pod directory
    /// knows of its pod.
    pub fn subject(&self, pid: i32, pidfd: Option<&OwnedFd>) -> Subject {
        self.attribute(pid, pidfd).0
    }

    /// [`Interceptor::subject`], with the tenant filled in, and the scope whose policy
    /// decides the process's accesses.
    pub fn attribute(&self, pid: i32, pidfd: Option<&OwnedFd>) -> (Subject, Arc<Scope>) {
        let mut s = subject::resolve(pid, pidfd);
        self.pods.enrich(&mut s);
        let policies = self.policies.read();
        let labelled = policies
            .namespace_label()
            .and_then(|label| self.pods.namespace_label(&s.namespace, label))
            .unwrap_or_default();
        let scope = policies.scope(&mut s, &labelled);
        (s, scope)
    }

    /// The scope of an access, and its subject when finding the scope needed it (several
    /// policies in force, or rules by image or namespace). With one policy this costs nothing.
    pub fn scope_of(&self, pid: i32, pidfd: Option<&OwnedFd>) -> (Arc<Scope>, Option<Subject>) {
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
    pub fn set_policy_set(&self, set: PolicySet) {
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

    /// A cached decision for `key` in `scope`, if any.
    pub fn cached(&self, key: &FileKey, scope: u32) -> Option<Arc<CachedDecision>> {
        self.cache.lock().get(key, scope, Instant::now())
    }

    /// The verdict cache, locked, for storing a decision (see [`CacheGuard`]).
    pub fn lock_cache(&self) -> CacheGuard<'_> {
        let cache = self.cache.lock();
        let (set_version, scoped) = {
            let p = self.policies.read();
            (p.version(), p.multi())
        };
        CacheGuard {
            cache,
            set_version,
            scoped,
        }
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

    /// Places an ignore mark through `file` if its identity is still `key` (see
    /// [`Marks::place`]). Call it with the cache locked, so that a flush cannot interleave.
    pub fn place_ignore_mark(
        &self,
        _locked: &MutexGuard<'_, VerdictCache>,
        file: &File,
        key: &FileKey,
    ) {
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
            self.place_ignore_mark(&c, file, key);
        }
    }
}

#[cfg(test)]
impl Interceptor {
    /// An interceptor whose group marks nothing, for unit tests of what answers: its answers
    /// go to descriptors that are no events and fail harmlessly. Needs root.
    pub(crate) fn for_tests() -> Interceptor {
        let group = Fanotify::new(fleetscan_fanotify::InitOptions::default())
            .expect("a fanotify group (needs root)");
        Interceptor::new(
            group,
            AgentConfig::default(),
            AgentTuning::default(),
            Protection::default(),
        )
    }
}
