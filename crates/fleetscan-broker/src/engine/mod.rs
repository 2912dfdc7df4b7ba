//! The broker's shared state and the verdict path every service uses: memory cache, then (once
//! per content, single-flight) the store, then — once per content in the whole fleet, through a
//! claim in the store ([`crate::fleet`]) — content and a job on the pool's workers.
//!
//! Each pool's current scanner identity and the verdict generation agents are given are the
//! fleet's (the store's), so that every broker replica hands out the same ones; while the store
//! cannot be reached, a new identity is used at once on this broker under a generation of its
//! own, and confirmed in the store when it returns.
//!
//! Pools are the tenancy's ([`fleetscan_core::tenancy`]): each is known by its [`PoolKey`]
//! (owner and name; as a string, [`PoolKey::key`]), and the verdicts of a tenant's own pool are
//! interned, cached and stored within that tenant's scope, so that they never decide for another
//! tenant. The tenancy (policies, pools, namespaces) can be replaced at run time by a newer
//! version; agent sessions push it to their agents.
//!
//! The decision path never writes to the store (writes go to the write-behind queue after the
//! answer) and never holds a lock across an await. A scan, once started, runs to its own end
//! (bounded by `scan_deadline`) even when the request that started it has stopped waiting, so
//! that its verdict serves the next request.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fleetscan_core::tenancy::{EffectivePolicy, TenancyError, WorkerRoute};
use fleetscan_core::{
    DEFAULT_TENANT, Policy, PoolKey, ScannerIdentity, Sha256, Tenancy, TenancyConfig, Verdict,
    now_unix_ms,
};
use fleetscan_store::{Backend, FleetState, Store};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Semaphore, watch};
use tracing::{error, info, warn};

use crate::cache::{Identities, IdentityId, InternedIdentity, VerdictCache};
use crate::config::BrokerConfig;
use crate::content::ContentSource;
use crate::decide::Resolution;
use crate::error::BrokerError;
use crate::fleet::{Fleet, Skipped, Standing};
use crate::flight::{Joined, Leader, SingleFlight, Waiter};
use crate::scheduler::{EnqueueError, JobPayload, RunOutcome, Scheduler};
use crate::stats::{Stats, bump};
use crate::stored::StoredContents;
use crate::writer::{WriteBehind, WriteOp};

/// The fleet operator's default pool, as a pool key: the pool of every worker that names none,
/// and of applications' scans.
pub const DEFAULT_POOL: &str = fleetscan_core::tenancy::DEFAULT_POOL;

/// Content held for scans at once, in KiB (1 GiB): bounds the memory of uploads in progress.
/// A fetch waits for room, within its scan deadline.
const CONTENT_BUDGET_KIB: u32 = 1024 * 1024;

type FlightKey = (Sha256, IdentityId);

/// A request for the verdict on one content from the fleet operator's pool `pool`, under the
/// fleet's policy (the scan service's).
pub struct Lookup {
    pub sha256: Sha256,
    pub size: u64,
    pub tenant: String,
    pub pool: &'static str,
    pub path_hint: String,
    /// Where the content can be had if it must be scanned.
    pub source: ContentSource,
}

/// A request for the verdict on one content from one pool, for one tenant.
pub struct PoolLookup {
    pub sha256: Sha256,
    pub size: u64,
    pub tenant: String,
    /// The pool, as [`PoolKey::key`].
    pub pool: String,
    /// The effective policy's maximum: larger content is not scanned.
    pub max_file_size: u64,
    pub path_hint: String,
    /// Where the content can be had if it must be scanned.
    pub source: ContentSource,
}

/// The answer to a [`Lookup`]: at once, or after a flight.
pub enum Pending {
    Ready(Resolution),
    Wait(Waiter<Resolution>),
}

/// One connected agent session, for the admin API.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub tenant: String,
    pub node: String,
}

pub struct Engine {
    pub config: BrokerConfig,
    pub store: Store,
    pub cache: VerdictCache,
    pub identities: Identities,
    /// Each pool's current scanner identity: the one whose verdicts are used.
    current: RwLock<HashMap<PoolKey, Arc<InternedIdentity>>>,
    /// Identities this broker has seen in each pool (from the fleet or its own workers).
    seen: Mutex<HashSet<(String, IdentityId)>>,
    /// Pools whose current identity was set here while the store was unreachable, and is not
    /// yet the fleet's: re-registered until the store takes it.
    unconfirmed: Mutex<HashMap<String, ScannerIdentity>>,
    /// Serialises every change of pool identities and generation (fleet states arrive from the
    /// fleet task, from registrations and from re-registrations at once), and remembers the
    /// newest fleet generation applied: an older state read before a newer one was applied is
    /// never applied after it.
    applying: Mutex<u64>,
    pub fleet: Arc<Fleet>,
    flights: SingleFlight<FlightKey, Resolution, ContentSource>,
    pub scheduler: Arc<Scheduler>,
    pub writer: WriteBehind,
    pub stats: Stats,
    /// The tenancy in force; sessions watch it to push each new version to their agents.
    pub tenancy: watch::Sender<Arc<Tenancy>>,
    /// Bumped whenever a pool's identity changes; agents flush decisions of other generations.
    pub generation: watch::Sender<u64>,
    pub sessions: Mutex<HashMap<u64, SessionInfo>>,
    content_budget: Arc<Semaphore>,
    /// What a store this broker owns alone (SQLite) may hold, so that a miss on new content
    /// skips the look-up; `None` on Postgres, which other brokers write to.
    pub stored_contents: Option<Arc<StoredContents>>,
}

impl Engine {
    /// Fails when the configured tenancy is invalid.
    pub fn new(
        config: BrokerConfig,
        store: Store,
        writer: WriteBehind,
    ) -> Result<Self, BrokerError> {
        let tenancy = Tenancy::new(&config.policy, &config.tenancy)
            .map_err(|e| BrokerError::InvalidArgument(format!("tenancy configuration: {e}")))?;
        // Until the fleet's generation is read: one of this broker's own, which no agent holds.
        let first_generation = local_generation();
        let stored_contents =
            (store.backend() == Backend::Sqlite).then(|| Arc::new(StoredContents::new()));
        Ok(Engine {
            cache: VerdictCache::new(config.verdict_cache_capacity),
            fleet: Arc::new(Fleet::new(
                store.clone(),
                &config.broker_id,
                config.claim_ttl,
            )),
            config,
            store,
            identities: Identities::default(),
            current: RwLock::new(HashMap::new()),
            seen: Mutex::new(HashSet::new()),
            unconfirmed: Mutex::new(HashMap::new()),
            applying: Mutex::new(0),
            flights: SingleFlight::default(),
            scheduler: Arc::new(Scheduler::default()),
            writer,
            stats: Stats::default(),
            generation: watch::channel(first_generation).0,
            sessions: Mutex::new(HashMap::new()),
            content_budget: Arc::new(Semaphore::new(CONTENT_BUDGET_KIB as usize)),
            tenancy: watch::channel(Arc::new(tenancy)).0,
            stored_contents,
        })
    }

    /// The fleet's policy as configured: the scan service's (which acts for the fleet operator
    /// until callers are authenticated). Accesses are decided by [`Engine::effective`].
    pub fn policy(&self, _tenant: &str) -> &Policy {
        &self.config.policy
    }

    /// The tenancy in force.
    pub fn tenancy(&self) -> Arc<Tenancy> {
        self.tenancy.borrow().clone()
    }

    /// The policy in force for an access of `tenant` from `namespace`.
    pub fn effective(&self, tenant: &str, namespace: &str) -> Arc<EffectivePolicy> {
        self.tenancy.borrow().resolve(tenant, namespace)
    }

    /// Replaces the tenancy by a newer version (over the fleet's configured policy); every
    /// agent session pushes it to its agent. Workers already attached keep their pools.
    pub fn set_tenancy(&self, config: &TenancyConfig) -> Result<(), TenancyError> {
        let next = Tenancy::new(&self.config.policy, config)?;
        let mut result = Ok(());
        self.tenancy.send_if_modified(|current| {
            result = current.check_successor(&next);
            if result.is_ok() {
                *current = Arc::new(next);
            }
            result.is_ok()
        });
        if result.is_ok() {
            info!(
                version = config.version,
                "tenancy replaced; agents are sent the new policies"
            );
        }
        result
    }

    /// Where a registering worker belongs: its pool (by key) and the tenants it serves.
    pub fn route_worker(
        &self,
        pool: &str,
        tenants: &[String],
    ) -> Result<WorkerRoute, TenancyError> {
        self.tenancy.borrow().route_worker(pool, tenants)
    }

    /// The pool's current scanner identity, if a worker ever registered; `pool` is a
    /// [`PoolKey::key`] (a bare name is the fleet operator's pool).
    pub fn current(&self, pool: &str) -> Option<Arc<InternedIdentity>> {
        self.current.read().get(&PoolKey::parse(pool)).cloned()
    }

    /// The pool's current scanner identity, if a worker ever registered.
    pub fn current_of(&self, pool: &PoolKey) -> Option<Arc<InternedIdentity>> {
        self.current.read().get(pool).cloned()
    }

    /// A worker registered `identity` in the pool (or reported it with a result). The fleet
    /// decides whether it becomes the pool's current one: it does when no broker has seen it in
    /// this pool before. When the store cannot be reached, this broker decides alone by the same
    /// rule on what it has seen, under a generation of its own, and confirms with the fleet
    /// later.
    pub async fn register_identity(self: &Arc<Self>, pool: &str, identity: &ScannerIdentity) {
        let key = PoolKey::parse(pool);
        let registered = self
            .fleet
            .guarded(self.store.register_identity(
                key.store_tenant(),
                &key.name,
                identity,
                now_unix_ms(),
            ))
            .await;
        match registered {
            Ok(state) => {
                {
                    let mut unconfirmed = self.unconfirmed.lock();
                    if unconfirmed.get(pool) == Some(identity) {
                        unconfirmed.remove(pool);
                    }
                }
                self.apply_fleet(&state);
            }
            Err(Skipped::Failed(e)) if !e.is_unavailable() => {
                // The store answered, wrongly: deciding alone would split this broker from the
                // fleet for no outage. The pool keeps its identity until a registration (the
                // worker's next attach) succeeds.
                error!(pool, error = %e, "registering a scanner identity failed");
            }
            Err(e) => {
                warn!(pool, error = %e, "scanner identity not registered with the fleet; deciding locally");
                let _applying = self.applying.lock();
                let interned = self.identities.intern_scoped(key.verdict_scope(), identity);
                let new = self.seen.lock().insert((pool.to_owned(), interned.id));
                if (new || self.current_of(&key).is_none()) && self.set_current(&key, interned) {
                    self.unconfirmed
                        .lock()
                        .insert(pool.to_owned(), identity.clone());
                    let generation = local_generation();
                    self.generation.send_replace(generation);
                    info!(
                        pool,
                        generation, "verdict generation moved locally; agents flush"
                    );
                }
            }
        }
    }

    /// Adopts the fleet's state: each pool's current identity and the verdict generation. Pools
    /// whose identity this broker set alone (store unreachable) keep it and are registered
    /// again; until the fleet has them, the generation stays this broker's own.
    pub fn apply_fleet(self: &Arc<Self>, state: &FleetState) {
        let mut applied = self.applying.lock();
        if state.generation < *applied {
            return; // Read before a newer state that is applied already.
        }
        *applied = state.generation;
        let unconfirmed = self.unconfirmed.lock().clone();
        {
            let mut seen = self.seen.lock();
            for p in &state.known {
                let key = PoolKey::from_store(&p.tenant, &p.pool);
                let id = self
                    .identities
                    .intern_scoped(key.verdict_scope(), &p.identity)
                    .id;
                seen.insert((key.key(), id));
            }
        }
        for p in &state.pools {
            let key = PoolKey::from_store(&p.tenant, &p.pool);
            if unconfirmed.contains_key(&key.key()) {
                continue;
            }
            let interned = self
                .identities
                .intern_scoped(key.verdict_scope(), &p.identity);
            self.seen.lock().insert((key.key(), interned.id));
            self.set_current(&key, interned);
        }
        if unconfirmed.is_empty() {
            let changed = self.generation.send_if_modified(|g| {
                let changed = *g != state.generation;
                *g = state.generation;
                changed
            });
            if changed {
                info!(
                    generation = state.generation,
                    "verdict generation of the fleet adopted; agents of other generations flush"
                );
            }
        } else {
            for (pool, identity) in unconfirmed {
                let engine = self.clone();
                tokio::spawn(async move { engine.register_identity(&pool, &identity).await });
            }
        }
    }

    /// Makes `identity` the pool's current one on this broker; whether it changed. Older
    /// verdicts are no longer used (they are keyed by identity) and only workers with this
    /// identity get jobs.
    fn set_current(&self, key: &PoolKey, identity: Arc<InternedIdentity>) -> bool {
        let pool = key.key();
        let pool = pool.as_str();
        {
            let mut current = self.current.write();
            if current.get(key).is_some_and(|c| c.id == identity.id) {
                return false;
            }
            current.insert(key.clone(), identity.clone());
            // Under the same lock, so that the engine and the scheduler never disagree on the
            // pool's identity (the scheduler never calls back into the engine).
            self.scheduler.set_current(pool, identity.identity.clone());
        }
        let id = &identity.identity;
        info!(
            pool,
            scanner = %id.scanner,
            engine = %id.engine,
            engine_version = %id.engine_version,
            ruleset_version = %id.ruleset_version,
            "pool's scanner identity changed"
        );
        true
    }

    /// The cached verdict of the pool's current identity, if any: the hot path.
    pub fn cached_in(&self, sha256: &Sha256, pool: &PoolKey) -> Option<Arc<Verdict>> {
        let current = self.current.read();
        let identity = current.get(pool)?;
        self.cache.get(sha256, identity.id)
    }

    /// Resolves a content's verdict from a pool of the fleet operator under the fleet's policy.
    pub fn resolve(self: &Arc<Self>, lookup: Lookup) -> (Option<IdentityId>, Pending) {
        let max_file_size = self.policy(&lookup.tenant).max_file_size;
        self.resolve_in(PoolLookup {
            sha256: lookup.sha256,
            size: lookup.size,
            tenant: lookup.tenant,
            pool: lookup.pool.to_owned(),
            max_file_size,
            path_hint: lookup.path_hint,
            source: lookup.source,
        })
    }

    /// Resolves a content's verdict under the pool's current identity. Concurrent lookups of
    /// one content share one flight: one store look-up, one content upload, one job. Flights
    /// are keyed by the pool's interned identity, which is scoped: a tenant's own pool never
    /// shares a flight (nor a verdict) with another tenant's.
    pub fn resolve_in(self: &Arc<Self>, lookup: PoolLookup) -> (Option<IdentityId>, Pending) {
        let Some(identity) = self.current(&lookup.pool) else {
            let resolution = if lookup.size > lookup.max_file_size {
                Resolution::Oversize(lookup.size)
            } else {
                Resolution::Failed("no live scanner".into())
            };
            return (None, Pending::Ready(resolution));
        };
        if let Some(v) = self.cache.get(&lookup.sha256, identity.id) {
            bump(&self.stats.cache_hits);
            return (Some(identity.id), Pending::Ready(Resolution::Verdict(v)));
        }
        let key = (lookup.sha256, identity.id);
        let id = identity.id;
        let pending = match self.flights.join(key, lookup.source) {
            Joined::Leader(leader) => {
                let waiter = leader.waiter();
                let engine = self.clone();
                let PoolLookup {
                    sha256,
                    size,
                    tenant,
                    pool,
                    max_file_size,
                    path_hint,
                    source: _,
                } = lookup;
                tokio::spawn(async move {
                    let job = Job {
                        sha256,
                        size,
                        tenant,
                        pool,
                        max_file_size,
                        path_hint,
                    };
                    engine.fly(leader, identity, job).await;
                });
                Pending::Wait(waiter)
            }
            Joined::Follower(waiter) => {
                bump(&self.stats.scans_deduplicated);
                Pending::Wait(waiter)
            }
        };
        (Some(id), pending)
    }

    /// Leads one flight to its end, bounded by `scan_deadline`, and publishes the result.
    async fn fly(
        self: Arc<Self>,
        leader: Leader<FlightKey, Resolution, ContentSource>,
        identity: Arc<InternedIdentity>,
        job: Job,
    ) {
        let resolution = match tokio::time::timeout(
            self.config.scan_deadline,
            self.resolve_miss(&leader, &identity, &job),
        )
        .await
        {
            Ok(resolution) => resolution,
            Err(_) => {
                bump(&self.stats.scan_errors);
                warn!(sha256 = %job.sha256, "scan deadline exceeded");
                Resolution::Failed("scan deadline exceeded".into())
            }
        };
        // The pool's identity may have changed while the flight ran (a worker with new rules
        // registered), or the job may have gone to a worker still running the old ones. A
        // verdict of any identity but the current one must decide nothing from now on: the
        // waiters get the fail mode (the verdict itself stays cached and stored under its own
        // identity).
        let resolution = match resolution {
            Resolution::Verdict(v)
                if self
                    .current(&job.pool)
                    .is_none_or(|current| current.identity != v.scanner) =>
            {
                warn!(sha256 = %job.sha256, scanner = %v.scanner.scanner, ruleset_version = %v.scanner.ruleset_version, "verdict of a superseded scanner identity not used");
                Resolution::Failed("verdict of a superseded scanner identity".into())
            }
            resolution => resolution,
        };
        // The filter of what a SQLite store holds knows only this broker's writes. When the scan
        // could not decide, the look-up it skipped is made after all: a verdict that something
        // else stored (another writer to the file) beats the fail mode.
        let resolution = match resolution {
            r @ (Resolution::Failed(_) | Resolution::Oversize(_))
                if identity.scope.is_empty() && self.stored_contents.is_some() =>
            {
                match self.find_stored(&identity, &job).await {
                    Some(v) => Resolution::Verdict(v),
                    None => r,
                }
            }
            resolution => resolution,
        };
        leader.complete(resolution);
    }

    async fn resolve_miss(
        self: &Arc<Self>,
        leader: &Leader<FlightKey, Resolution, ContentSource>,
        identity: &InternedIdentity,
        job: &Job,
    ) -> Resolution {
        // A flight that just ended may have cached the verdict after our caller looked.
        if let Some(v) = self.cache.get(&job.sha256, identity.id) {
            return Resolution::Verdict(v);
        }
        if job.size > job.max_file_size {
            if let Some(v) = self.stored(identity, job).await {
                return Resolution::Verdict(v);
            }
            return Resolution::Oversize(job.size);
        }
        // The store, then a claim on the scan: another broker may be scanning it right now.
        let mut waited = false;
        let claim = loop {
            if let Some(v) = self.stored(identity, job).await {
                return Resolution::Verdict(v);
            }
            match self.fleet.stand(&job.sha256, &identity.identity).await {
                // Another broker may have stored the verdict and released its claim between
                // our look-up and our claim: look once more before scanning again.
                Standing::Scan(Some(claim)) => match self.stored(identity, job).await {
                    Some(v) => {
                        claim.release().await;
                        return Resolution::Verdict(v);
                    }
                    None => break Some(claim),
                },
                Standing::Scan(None) => break None,
                Standing::Wait => {
                    if !waited {
                        waited = true;
                        bump(&self.stats.scans_deduplicated);
                    }
                    self.fleet.wait_for_verdict(&job.sha256).await;
                }
            }
        };
        if !self.scheduler.is_live(&job.pool, &job.tenant, job.size) {
            if let Some(claim) = claim {
                claim.release().await;
            }
            return Resolution::Failed("no live scanner".into());
        }
        let mut last_error = String::from("no agent could provide it");
        // The budget is held until the scan ends: the content stays in memory until then.
        let (content, _budget) = loop {
            let Some(source) = leader.next_source() else {
                bump(&self.stats.scan_errors);
                return Resolution::Failed(format!("content unavailable: {last_error}"));
            };
            // Each source is held to the size it declared itself, not the leader's: one agent's
            // wrong size must not fail the honest uploads of the flight's other waiters.
            let size = source.size();
            if size > job.max_file_size {
                last_error = format!("declared size {size} over the maximum");
                continue;
            }
            let kib = u32::try_from(size.div_ceil(1024))
                .unwrap_or(u32::MAX)
                .clamp(1, CONTENT_BUDGET_KIB);
            let Ok(budget) = self.content_budget.clone().acquire_many_owned(kib).await else {
                return Resolution::Failed("broker shutting down".into());
            };
            match source.fetch(&job.sha256, self.config.job_deadline).await {
                Ok(content) => break (content, budget),
                Err(e) => {
                    warn!(sha256 = %job.sha256, error = %e, "content upload failed; trying another source");
                    last_error = e;
                }
            }
        };
        bump(&self.stats.scans_started);
        let payload = Arc::new(JobPayload {
            sha256: job.sha256,
            tenant: job.tenant.clone(),
            content,
            path_hint: job.path_hint.clone(),
        });
        match self
            .scheduler
            .run(
                &job.pool,
                payload,
                self.config.max_tries,
                self.config.job_deadline,
            )
            .await
        {
            RunOutcome::Report(report) => {
                let verdict = Arc::new(Verdict {
                    sha256: job.sha256,
                    scanner: report.identity,
                    kind: report.kind,
                    threat_name: report.threat_name,
                    detail: report.detail,
                    scanned_at_unix_ms: now_unix_ms(),
                    scan_micros: report.scan_micros,
                });
                if verdict.kind.is_conclusive() {
                    // A tenant's own pool's verdict is cached and stored within the tenant's
                    // scope only; the fleet's pools' are everyone's.
                    let scope = identity.scope.as_str();
                    let id = self.identities.intern_scoped(scope, &verdict.scanner).id;
                    self.cache.insert(id, verdict.clone());
                    if let Some(stored) = self.stored_contents.as_ref().filter(|_| scope.is_empty())
                    {
                        stored.add(&verdict.sha256);
                    }
                    // Brokers waiting on our claim read the verdict from the store when we
                    // release it, so it is written first, not behind; without a claim, or
                    // while the store is unreachable, the write-behind queue keeps it.
                    let stored = match &claim {
                        Some(_) if scope.is_empty() => self
                            .fleet
                            .guarded(self.store.put_verdict(&verdict))
                            .await
                            .is_ok(),
                        Some(_) => self
                            .fleet
                            .guarded(self.store.put_tenant_verdict(scope, &verdict))
                            .await
                            .is_ok(),
                        None => false,
                    };
                    if !stored {
                        self.writer.submit(if scope.is_empty() {
                            WriteOp::Verdict(verdict.clone())
                        } else {
                            WriteOp::TenantVerdict {
                                tenant: scope.to_owned(),
                                verdict: verdict.clone(),
                            }
                        });
                    }
                } else {
                    bump(&self.stats.scan_errors);
                }
                if let Some(claim) = claim {
                    claim.release().await;
                }
                Resolution::Verdict(verdict)
            }
            RunOutcome::Failed(why) => {
                bump(&self.stats.scan_errors);
                Resolution::Failed(why)
            }
            RunOutcome::Refused(e) => {
                if e == EnqueueError::QueueFull {
                    bump(&self.stats.queue_rejected);
                    warn!(sha256 = %job.sha256, "scan queue full; the fail mode decides");
                }
                Resolution::Failed(e.to_string())
            }
        }
    }

    /// The stored verdict of this identity (within its scope), if the store has one and
    /// answers in time.
    async fn stored(&self, identity: &InternedIdentity, job: &Job) -> Option<Arc<Verdict>> {
        if identity.scope.is_empty()
            && let Some(stored) = &self.stored_contents
            && !stored.may_hold(&job.sha256)
        {
            bump(&self.stats.store_lookups_skipped);
            return None;
        }
        self.find_stored(identity, job).await
    }

    /// [`Engine::stored`] without the filter of what the store holds.
    async fn find_stored(&self, identity: &InternedIdentity, job: &Job) -> Option<Arc<Verdict>> {
        let found = if identity.scope.is_empty() {
            self.fleet
                .guarded(self.store.find_verdict(&job.sha256, &identity.identity))
                .await
        } else {
            self.fleet
                .guarded(self.store.find_tenant_verdict(
                    &identity.scope,
                    &job.sha256,
                    &identity.identity,
                ))
                .await
        };
        match found {
            Ok(Some(v)) => {
                bump(&self.stats.store_hits);
                let v = Arc::new(v);
                self.cache.insert(identity.id, v.clone());
                Some(v)
            }
            Ok(None) => None,
            // The store being down must not stop scanning: carry on as for unknown content.
            Err(e) => {
                warn!(error = %e, sha256 = %job.sha256, "verdict look-up failed");
                None
            }
        }
    }

    /// Whether an agent of the node is connected to this broker now.
    pub fn connected_nodes(&self, tenant: &str) -> Vec<String> {
        self.sessions
            .lock()
            .values()
            .filter(|s| s.tenant == tenant)
            .map(|s| s.node.clone())
            .collect()
    }
}

/// What a flight scans.
struct Job {
    sha256: Sha256,
    size: u64,
    tenant: String,
    pool: String,
    max_file_size: u64,
    path_hint: String,
}

/// A verdict generation of this broker's own, for use while the fleet's is unknown: the top
/// bit set keeps it apart from the fleet's (which count up from a time in milliseconds), and
/// the microsecond clock keeps one broker's successive ones, and different brokers', apart.
fn local_generation() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX >> 1));
    let candidate = (1 << 63) | (micros & (u64::MAX >> 1));
    // Never the same twice in one process, even within a microsecond or after a clock step.
    let previous = LAST
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |last| Some(candidate.max(last + 1) | (1 << 63)),
        )
        .unwrap_or(0);
    candidate.max(previous + 1) | (1 << 63)
}

/// The tenant a peer named, or the default one.
pub fn tenant_or_default(tenant: &str) -> String {
    if tenant.is_empty() {
        DEFAULT_TENANT.to_owned()
    } else {
        tenant.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use fleetscan_store::PoolIdentity;

    use super::*;
    use crate::writer::write_behind;

    fn identity(ruleset: &str) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "reference".into(),
            engine: "test".into(),
            engine_version: "1".into(),
            ruleset_version: ruleset.into(),
        }
    }

    fn state(generation: u64, ruleset: &str) -> FleetState {
        let current = PoolIdentity {
            tenant: DEFAULT_TENANT.into(),
            pool: DEFAULT_POOL.into(),
            identity: identity(ruleset),
        };
        FleetState {
            generation,
            pools: vec![current.clone()],
            known: vec![current],
        }
    }

    async fn engine() -> Arc<Engine> {
        let store = Store::connect("sqlite::memory:").await.unwrap();
        let (writer, _queue) = write_behind(16);
        Arc::new(Engine::new(BrokerConfig::default(), store, writer).unwrap())
    }

    #[tokio::test]
    async fn a_fleet_state_read_before_a_newer_one_is_never_applied_after_it() {
        let engine = engine().await;
        engine.apply_fleet(&state(11, "r2"));
        // A sync that read the store before the registration of r2 finishes late.
        engine.apply_fleet(&state(10, "r1"));
        assert_eq!(
            engine.current(DEFAULT_POOL).unwrap().identity,
            identity("r2")
        );
        assert_eq!(*engine.generation.borrow(), 11);
        // The same state again changes nothing; a newer one is applied.
        engine.apply_fleet(&state(11, "r2"));
        engine.apply_fleet(&state(12, "r3"));
        assert_eq!(
            engine.current(DEFAULT_POOL).unwrap().identity,
            identity("r3")
        );
        assert_eq!(*engine.generation.borrow(), 12);
    }

    #[test]
    fn local_generations_are_never_repeated_nor_a_fleets() {
        let generations: Vec<u64> = (0..10_000).map(|_| local_generation()).collect();
        assert!(generations.windows(2).all(|w| w[0] < w[1]));
        // Fleet generations count up from a time in milliseconds: far below the top bit.
        assert!(generations.iter().all(|g| *g >= 1 << 63));
    }
}
