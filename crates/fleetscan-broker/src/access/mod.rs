//! Where an access is decided.
//!
//! [`Agent::decide`] takes one typed [`Access`] of a connected agent and returns its
//! [`Decision`] with the verdicts behind it: at once, or ([`Answer::Later`]) once the engine's
//! flights ended, within the access's deadline. In order:
//! 1. attribution: the access's tenant (`access_tenant`: a tenant's own agent speaks for that
//!    tenant only, whatever namespace it names; the fleet operator's agents' accesses are
//!    attributed by namespace, then the namespace's label) and its `Scope` (the policy of that
//!    tenant and namespace, and whether it is the only policy in force);
//! 2. what the policy does not scan (exec-only opens, exclusions), allowed at once;
//! 3. the cached path: known content of every required pool's current identity, from the
//!    engine's memory, decided at once — the fleet's steady state, which must never allocate
//!    beyond the decision, spawn, await, or take a lock besides the tenancy's and the cache's;
//! 4. otherwise, within the agent's bound on pending requests, each required pool's resolution
//!    by the engine (store, single-flight, scan), one after another, decided together by the
//!    policy ([`decide`]).
//!
//! A decision is sent by the caller, then settled here ([`Agent::settle`]): counted, and
//! recorded when the policy says so (every denial; what audit-only mode would deny). Accesses
//! an agent decided itself arrive as [`Report`]s and are recorded the same way. Applications'
//! voluntary scans are decided in [`scan`].
//!
//! Must never: see a protocol type or a stream (the services convert at the edge), write to the
//! store on the way to a decision (records go behind), or let an access of one tenant reach
//! another tenant's pools, verdicts or records.

pub mod decide;
mod record;
pub mod scan;
mod types;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use fleetscan_core::tenancy::{EffectivePolicy, check_name};
use fleetscan_core::{AccessKind, DEFAULT_TENANT, PoolKey, Sha256, Tenancy};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use self::decide::Decided;
pub use self::record::Report;
pub use self::types::{Access, Decision, Hello, Subject, Tally, Verdicts};
use crate::engine::cache::IdentityId;
use crate::engine::content::{AgentLink, AskContent, ContentEvent, ContentSource};
use crate::engine::flight::Waiter;
use crate::engine::stats::bump;
use crate::engine::{Engine, Pending, PoolLookup, Resolution, SessionId};
use crate::error::BrokerError;

/// Requests of one agent waiting for a scan at once; beyond, the fail mode answers at once.
const MAX_PENDING: usize = 4096;
/// The longest a request is waited for, whatever deadline the agent gives.
const MAX_REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// A decision at once, or the rest of the way to it.
pub enum Answer {
    Now(Decision),
    Later(Box<Later>),
}

/// An access waiting for the engine's flights: [`Later::decision`] finishes it, or gives up
/// (`None`) when its deadline passes first — the agent then answers the kernel itself, and the
/// scan goes on to serve the next request.
pub struct Later {
    agent: Arc<Agent>,
    access: Access,
    scope: Scope,
    sha256: Sha256,
    deadline: Instant,
    pending: OwnedSemaphorePermit,
    waiter: Waiter<Resolution>,
    /// The next required pool to ask, by index.
    next: usize,
    resolutions: Vec<Resolution>,
    /// The identity each pool was asked under, to tell whether the rules changed meanwhile.
    identities: Vec<(PoolKey, Option<IdentityId>)>,
}

/// One connected agent as the access layer knows it: its node, its tenant, whether it keys its
/// cache by policy, its bound on pending requests, its counters, and the link its content
/// uploads come through.
pub struct Agent {
    engine: Arc<Engine>,
    session: SessionId,
    node: String,
    tenant: String,
    cluster: String,
    agent_version: String,
    scoped_cache: bool,
    link: Arc<AgentLink>,
    /// Accesses allowed and denied since the host counters were last flushed.
    allowed: AtomicU64,
    denied: AtomicU64,
    pending: Arc<Semaphore>,
}

/// What one access is decided under, looked up once per access: its policy, and whether that
/// policy is the only one (read from the same tenancy snapshot).
struct Scope {
    effective: Arc<EffectivePolicy>,
    single_policy: bool,
}

impl Scope {
    /// The policy in force for an access of an agent of `agent_tenant` by `subject` (the
    /// access's tenant's policy, or its namespace's within the tenant).
    fn of(engine: &Engine, agent_tenant: &str, subject: &Subject) -> Scope {
        engine.with_tenancy(|tenancy| {
            let namespace = &subject.context.namespace;
            let tenant = access_tenant(tenancy, agent_tenant, namespace, &subject.labelled_tenant);
            Scope {
                effective: tenancy.resolve(tenant, namespace),
                single_policy: tenancy.is_single_policy(),
            }
        })
    }
}

/// The tenant an access of an agent of `agent_tenant` belongs to: a tenant's own agent's
/// accesses are all that tenant's (its agent cannot speak for another tenant's namespaces); the
/// fleet operator's agents' are attributed by namespace and label.
fn access_tenant<'a>(
    tenancy: &'a Tenancy,
    agent_tenant: &'a str,
    namespace: &str,
    labelled: &'a str,
) -> &'a str {
    if agent_tenant == DEFAULT_TENANT {
        tenancy.tenant_of(namespace, labelled)
    } else {
        agent_tenant
    }
}

/// The kind an access is skipped (or not) by: an unknown or unspecified kind (a newer agent,
/// a broken one) counts as an exec, the kind no policy lets through unscanned.
pub(crate) fn skip_kind(kind: Option<AccessKind>) -> AccessKind {
    kind.unwrap_or(AccessKind::Exec)
}

/// How long the broker waits for an access: the agent's deadline (at most
/// [`MAX_REQUEST_DEADLINE`]), or the policy's.
fn request_deadline(deadline: Option<Duration>, policy: &EffectivePolicy) -> Duration {
    match deadline {
        None => policy.policy.effective_deadline(),
        Some(deadline) => deadline.min(MAX_REQUEST_DEADLINE),
    }
}

impl Agent {
    /// The agent of a session that began with `hello`; content is asked of it through `asker`.
    /// A hello without a node, or naming a tenant the tenancy could never hold, is refused
    /// rather than guessed at: the agent's tenant decides every access of a tenant's agent.
    pub fn new(
        engine: Arc<Engine>,
        hello: Hello,
        asker: impl AskContent,
    ) -> Result<Agent, BrokerError> {
        if hello.node.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "AgentHello without a node name".into(),
            ));
        }
        if !hello.tenant.is_empty()
            && let Err(e) = check_name("tenant", &hello.tenant)
        {
            return Err(BrokerError::InvalidArgument(format!("AgentHello: {e}")));
        }
        let tenant = if hello.tenant.is_empty() {
            DEFAULT_TENANT.to_owned()
        } else {
            hello.tenant
        };
        Ok(Agent {
            session: engine.join_session(&tenant, &hello.node),
            engine,
            node: hello.node,
            tenant,
            cluster: hello.cluster,
            agent_version: hello.agent_version,
            scoped_cache: hello.scoped_cache,
            link: Arc::new(AgentLink::new(asker)),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The agent's own tenant (the fleet operator's unless its hello named another).
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// Decides one access; see the module documentation.
    pub fn decide(self: &Arc<Self>, access: Access) -> Answer {
        let engine = &self.engine;
        let scope = Scope::of(engine, &self.tenant, &access.subject);
        let context = &access.subject.context;
        if let Some(why) = scope.effective.skip(
            skip_kind(access.kind),
            access.path(),
            &context.image,
            &context.namespace,
        ) {
            let decided = decide::skipped(why);
            return self.now(access, &scope, None, decided, Verdicts::None);
        }
        let policy = &scope.effective.policy;
        let sha256 = match &access.sha256 {
            Ok(sha256) => *sha256,
            Err(e) => {
                let decided = decide::fail(policy, format!("invalid request: {e}"));
                return self.now(access, &scope, None, decided, Verdicts::None);
            }
        };
        let pools = scope.effective.pools.as_slice();
        // The cached path: known content of the pool's current identity, no store, no spawn.
        if let [pool] = pools
            && let Some(verdict) = engine.cached_verdict(&sha256, pool)
        {
            bump(&engine.stats().cache_hits);
            let decided = decide::decide(policy, &Resolution::Verdict(verdict.clone()));
            let verdicts = Verdicts::One(verdict);
            return self.now(access, &scope, Some(sha256), decided, verdicts);
        }
        if pools.len() > 1 {
            let cached: Option<Vec<Resolution>> = pools
                .iter()
                .map(|pool| {
                    engine
                        .cached_verdict(&sha256, pool)
                        .map(Resolution::Verdict)
                })
                .collect();
            if let Some(resolutions) = cached {
                bump(&engine.stats().cache_hits);
                let decided = decide::decide_all(policy, &resolutions);
                let verdicts = Verdicts::Of(resolutions);
                return self.now(access, &scope, Some(sha256), decided, verdicts);
            }
        }
        let Ok(pending) = self.pending.clone().try_acquire_owned() else {
            let decided = decide::fail(policy, "broker overloaded: too many pending requests");
            return self.now(access, &scope, Some(sha256), decided, Verdicts::None);
        };
        let deadline = Instant::now() + request_deadline(access.deadline, &scope.effective);
        // The pools are asked one after another: a flight that needs the content asks the agent
        // for it under this request's id, and one id carries one upload at a time.
        let mut resolutions = Vec::with_capacity(pools.len());
        let mut identities = Vec::with_capacity(pools.len());
        let mut waiting = None;
        for (i, pool) in pools.iter().enumerate() {
            let (identity, answer) = engine.resolve_in(self.lookup(&access, sha256, &scope, pool));
            identities.push((pool.clone(), identity));
            match answer {
                Pending::Ready(resolution) => resolutions.push(resolution),
                Pending::Wait(waiter) => {
                    waiting = Some((waiter, i + 1));
                    break;
                }
            }
        }
        let Some((waiter, next)) = waiting else {
            drop(pending);
            let decided = decide::decide_all(policy, &resolutions);
            let verdicts = Verdicts::Of(resolutions);
            return self.now(access, &scope, Some(sha256), decided, verdicts);
        };
        Answer::Later(Box::new(Later {
            agent: self.clone(),
            access,
            scope,
            sha256,
            deadline,
            pending,
            waiter,
            next,
            resolutions,
            identities,
        }))
    }

    /// A decision made without waiting.
    fn now(
        &self,
        access: Access,
        scope: &Scope,
        sha256: Option<Sha256>,
        decided: Decided,
        verdicts: Verdicts,
    ) -> Answer {
        Answer::Now(self.decision(access, scope, sha256, decided, verdicts, None))
    }

    /// What the engine is asked for one pool of an access.
    fn lookup(&self, access: &Access, sha256: Sha256, scope: &Scope, pool: &PoolKey) -> PoolLookup {
        let effective = &scope.effective;
        PoolLookup {
            sha256,
            size: access.size,
            tenant: effective.tenant.clone(),
            pool: pool.key(),
            max_file_size: effective.policy.max_file_size,
            path_hint: access.path.clone(),
            source: ContentSource::Agent {
                link: self.link.clone(),
                request_id: access.request_id,
                size: access.size,
            },
        }
    }

    /// The decision as the agent is sent it: cacheable only where the agent's cache can keep
    /// it apart from other policies' decisions; with its record made now (the record belongs to
    /// the access's tenant, `scope`'s, which for the fleet operator's agents is not necessarily
    /// the agent's).
    fn decision(
        &self,
        access: Access,
        scope: &Scope,
        sha256: Option<Sha256>,
        decided: Decided,
        verdicts: Verdicts,
        pending: Option<OwnedSemaphorePermit>,
    ) -> Decision {
        let mut decided = decided;
        if decided.cacheable && !self.scoped_cache && !scope.single_policy {
            decided.cacheable = false;
            decided.ttl_seconds = 0;
        }
        let record = decided
            .record
            .then(|| Box::new(self.record(access, &scope.effective.tenant, sha256, &mut decided)));
        Decision {
            action: decided.action,
            reason: decided.reason,
            cacheable: decided.cacheable,
            ttl_seconds: decided.ttl_seconds,
            verdicts,
            tally: Tally {
                action: decided.action,
                fail_mode: decided.fail_mode,
                oversize: decided.oversize,
                record,
                _pending: pending,
            },
        }
    }

    /// Hands content the agent uploaded (or could not) to the fetch waiting for it.
    pub async fn content(&self, request_id: u64, event: ContentEvent) {
        self.link.route(request_id, event).await;
    }

    /// The session ended: every fetch from it fails at once, and it is no longer listed.
    pub fn close(&self) {
        self.link.close();
        self.engine.leave_session(self.session);
    }
}

impl Later {
    /// The decision once every required pool resolved; `None` when the deadline passed first.
    pub async fn decision(self: Box<Self>) -> Option<Decision> {
        let Later {
            agent,
            access,
            scope,
            sha256,
            deadline,
            pending,
            waiter,
            mut next,
            mut resolutions,
            mut identities,
        } = *self;
        let engine = &agent.engine;
        let effective = &scope.effective;
        let mut waiter = Some(waiter);
        loop {
            if let Some(w) = waiter.take() {
                let Ok(resolution) = tokio::time::timeout_at(deadline, w.wait()).await else {
                    // The agent answers the kernel with its fail mode and reports it; the scan
                    // goes on and its verdict serves the next request.
                    debug!(node = %agent.node, request_id = access.request_id, sha256 = %sha256, "decision deadline passed");
                    return None;
                };
                resolutions.push(
                    resolution.unwrap_or_else(|| Resolution::Failed("scan abandoned".into())),
                );
            }
            let Some(pool) = effective.pools.get(next) else {
                break;
            };
            next += 1;
            let (identity, answer) = engine.resolve_in(agent.lookup(&access, sha256, &scope, pool));
            identities.push((pool.clone(), identity));
            match answer {
                Pending::Ready(resolution) => resolutions.push(resolution),
                Pending::Wait(w) => waiter = Some(w),
            }
        }
        let mut decided = decide::decide_all(&effective.policy, &resolutions);
        if identities
            .iter()
            .any(|(pool, identity)| engine.current_identity(pool) != *identity)
        {
            // The rules changed during the scan: answer, but let no agent keep it.
            decided.cacheable = false;
            decided.ttl_seconds = 0;
        }
        let verdicts = Verdicts::Of(resolutions);
        Some(agent.decision(
            access,
            &scope,
            Some(sha256),
            decided,
            verdicts,
            Some(pending),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exec-only policy skips plain opens only: a kind the broker does not know (a newer
    /// agent's, or none) must be scanned, not let through as an open. (The wire's values are
    /// mapped in `services::agent`'s test of the same name.)
    #[test]
    fn unknown_access_kinds_are_skipped_as_execs() {
        assert_eq!(skip_kind(Some(AccessKind::Open)), AccessKind::Open);
        assert_eq!(skip_kind(Some(AccessKind::Exec)), AccessKind::Exec);
        assert_eq!(skip_kind(None), AccessKind::Exec);
    }

    #[test]
    fn a_tenants_agent_speaks_for_its_tenant_only() {
        let tenancy = Tenancy::new(&Default::default(), &Default::default()).unwrap();
        assert_eq!(access_tenant(&tenancy, "acme", "shop", "globex"), "acme");
        assert_eq!(
            access_tenant(&tenancy, DEFAULT_TENANT, "", ""),
            tenancy.tenant_of("", "")
        );
    }

    #[test]
    fn the_agents_deadline_is_bounded_and_the_policys_is_the_default() {
        let effective = EffectivePolicy {
            tenant: "acme".into(),
            namespace: None,
            policy: fleetscan_core::Policy::default(),
            exec_only: false,
            exclusions: Default::default(),
            pools: Vec::new(),
        };
        assert_eq!(
            request_deadline(None, &effective),
            effective.policy.effective_deadline()
        );
        assert_eq!(
            request_deadline(Some(Duration::from_millis(300)), &effective),
            Duration::from_millis(300)
        );
        assert_eq!(
            request_deadline(Some(Duration::from_secs(3600)), &effective),
            MAX_REQUEST_DEADLINE
        );
    }
}
