//! The engine: what the broker knows and can find out about contents, beneath every service and
//! the access layer.
//!
//! - The verdict path (`resolve`, [`Engine::resolve_in`]): memory cache ([`cache`]), then the
//!   store (skipped while it is down, every call bounded: `fleet`), then one flight per content
//!   and pool identity ([`flight`]) that claims the scan fleet-wide (`fleet` again), fetches the
//!   content from one of its sources ([`content`]) and runs a job on the pool's workers
//!   ([`scheduler`], fair per-tenant lanes in `queue`). Verdicts and records are written behind
//!   ([`writer`], into the store through `store_sink`); `stored` knows what a SQLite store of
//!   this broker's own holds.
//! - The registry of pool identities and the verdict generation (`registry`): the fleet's state
//!   as applied on this broker.
//! - The tenancy in force, the connected agent sessions, the counters ([`stats`]).
//!
//! Its state is private: callers ask by intent ([`Engine::cached_verdict`],
//! [`Engine::resolve_in`], [`Engine::lookup_known`], [`Engine::subscribe_generation`], …).
//!
//! Must never: know a protocol type, a stream or a session's mechanics; decide an access (the
//! access layer does); write to the store on the way to an answer except under a claim; hold a
//! lock across an await.

pub mod cache;
pub mod content;
mod fleet;
pub mod flight;
mod queue;
mod registry;
mod resolve;
pub mod scheduler;
pub mod stats;
mod store_sink;
mod stored;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetscan_core::tenancy::{EffectivePolicy, TenancyError, WorkerRoute};
use fleetscan_core::{Policy, PoolKey, ScannerIdentity, Tenancy, TenancyConfig};
use fleetscan_store::{Backend, FleetState, Store};
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;

use self::cache::{IdentityId, VerdictCache};
use self::content::ContentSource;
use self::fleet::Fleet;
use self::flight::SingleFlight;
use self::registry::Registry;
use self::resolve::{CONTENT_BUDGET_KIB, FlightKey};
pub use self::resolve::{Lookup, Pending, PoolLookup, Resolution};
use self::scheduler::WorkerReport;
use self::scheduler::{Attach, JobId, Scheduler, ToWorker, UnknownJob, WorkerId, WorkerInfo};
use self::stats::Stats;
use self::stored::StoredContents;
use self::writer::{WriteBehind, WriteOp};
use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::shutdown::Shutdown;

/// The fleet operator's default pool, as a pool key: the pool of every worker that names none,
/// and of applications' scans.
pub const DEFAULT_POOL: &str = fleetscan_core::tenancy::DEFAULT_POOL;

/// One connected agent session, for the admin API.
#[derive(Clone, Debug)]
struct SessionInfo {
    tenant: String,
    node: String,
}

/// Names a connected agent session while it lasts ([`Engine::join_session`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(u64);

/// See the module documentation.
pub struct Engine {
    config: BrokerConfig,
    store: Store,
    cache: VerdictCache,
    registry: Arc<Registry>,
    fleet: Arc<Fleet>,
    flights: SingleFlight<FlightKey, Resolution, ContentSource>,
    scheduler: Arc<Scheduler>,
    writer: WriteBehind,
    stats: Stats,
    /// The tenancy in force; sessions watch it to push each new version to their agents.
    tenancy: watch::Sender<Arc<Tenancy>>,
    sessions: Mutex<HashMap<SessionId, SessionInfo>>,
    next_session: AtomicU64,
    content_budget: Arc<Semaphore>,
    /// What a store this broker owns alone (SQLite) may hold, so that a miss on new content
    /// skips the look-up; `None` on Postgres, which other brokers write to.
    stored_contents: Option<Arc<StoredContents>>,
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
        let stored_contents =
            (store.backend() == Backend::Sqlite).then(|| Arc::new(StoredContents::new()));
        let fleet = Arc::new(Fleet::new(
            store.clone(),
            &config.broker_id,
            config.claim_ttl,
        ));
        let scheduler = Arc::new(Scheduler::default());
        Ok(Engine {
            cache: VerdictCache::new(config.verdict_cache_capacity),
            registry: Arc::new(Registry::new(
                store.clone(),
                fleet.clone(),
                scheduler.clone(),
            )),
            fleet,
            config,
            store,
            flights: SingleFlight::default(),
            scheduler,
            writer,
            stats: Stats::default(),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            content_budget: Arc::new(Semaphore::new(CONTENT_BUDGET_KIB as usize)),
            tenancy: watch::channel(Arc::new(tenancy)).0,
            stored_contents,
        })
    }

    /// Gets ready to serve: adopts the fleet's generation and pool identities (so that agents
    /// moving here from another replica keep their caches), and on a SQLite store, which is
    /// this broker's alone, starts reading what it holds (so that a new content's look-up,
    /// which must miss, is skipped).
    pub async fn prepare(&self) -> Result<(), BrokerError> {
        let fleet = self.store.fleet_state().await?;
        self.registry.apply_fleet(&fleet);
        if let Some(filter) = &self.stored_contents {
            tokio::spawn(stored::seed(filter.clone(), self.store.clone()));
        }
        Ok(())
    }

    /// Keeps the fleet's state applied and the store's health known until `shutdown`.
    pub fn spawn_fleet_sync(&self, shutdown: Shutdown) -> JoinHandle<()> {
        let registry = self.registry.clone();
        self.fleet
            .spawn(move |state| registry.apply_fleet(&state), shutdown)
    }

    /// The configuration the broker was started with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
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

    /// Runs `f` on the tenancy in force without taking a reference to it (the decision path:
    /// one read lock, no reference count).
    pub fn with_tenancy<R>(&self, f: impl FnOnce(&Tenancy) -> R) -> R {
        f(&self.tenancy.borrow())
    }

    /// Follows the tenancy: each new version, for agent sessions to push to their agents.
    pub fn subscribe_tenancy(&self) -> watch::Receiver<Arc<Tenancy>> {
        self.tenancy.subscribe()
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

    /// The verdict generation agents are given now.
    pub fn generation(&self) -> u64 {
        self.registry.generation()
    }

    /// Follows the verdict generation: it moves whenever a pool's identity changes, and agents
    /// flush the decisions of other generations.
    pub fn subscribe_generation(&self) -> watch::Receiver<u64> {
        self.registry.subscribe_generation()
    }

    /// The id of the pool's current scanner identity, if a worker ever registered.
    pub fn current_identity(&self, pool: &PoolKey) -> Option<IdentityId> {
        self.registry.current_id(pool)
    }

    /// A worker registered `identity` in the pool (or reported it with a result). The fleet
    /// decides whether it becomes the pool's current one: it does when no broker has seen it in
    /// this pool before. When the store cannot be reached, this broker decides alone by the same
    /// rule on what it has seen, under a generation of its own, and confirms with the fleet
    /// later.
    pub async fn register_identity(&self, pool: &str, identity: &ScannerIdentity) {
        self.registry.register_identity(pool, identity).await;
    }

    /// Adopts the fleet's state: each pool's current identity and the verdict generation.
    pub fn apply_fleet(&self, state: &FleetState) {
        self.registry.apply_fleet(state);
    }

    /// Adds a worker to its pool, once the fleet settled whether its identity becomes the
    /// pool's current one ([`Engine::register_identity`]). It takes no job until it grants
    /// credits; its jobs arrive on `tx`.
    pub async fn attach_worker(&self, attach: Attach, tx: mpsc::Sender<ToWorker>) -> WorkerId {
        self.registry
            .register_identity(&attach.pool, &attach.identity)
            .await;
        self.scheduler.attach(attach, tx)
    }

    /// The worker asks for up to `credits` more jobs.
    pub fn grant_credits(&self, worker: WorkerId, credits: u32) {
        self.scheduler.grant(worker, credits);
    }

    /// The worker's engine or rules changed under it: it is registered with its new identity,
    /// which becomes the pool's current one by the fleet's rule.
    pub async fn worker_identity_changed(
        &self,
        worker: WorkerId,
        pool: &str,
        identity: &ScannerIdentity,
    ) {
        self.registry.register_identity(pool, identity).await;
        self.scheduler.set_identity(worker, identity.clone());
    }

    /// Delivers a worker's result for one of its outstanding jobs.
    pub fn complete_job(
        &self,
        worker: WorkerId,
        job_id: JobId,
        report: WorkerReport,
    ) -> Result<(), UnknownJob> {
        self.scheduler.complete(worker, job_id, report)
    }

    /// Removes a worker; its outstanding jobs are retried elsewhere.
    pub fn detach_worker(&self, worker: WorkerId) {
        self.scheduler.detach(worker);
    }

    /// The attached workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.scheduler.workers()
    }

    /// The counters since the broker started.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queues a record for the store without waiting (see [`WriteBehind::submit`]).
    pub fn write_behind(&self, op: WriteOp) -> bool {
        self.writer.submit(op)
    }

    /// Records the write-behind queue gave up on since start.
    pub fn records_lost(&self) -> u64 {
        self.writer.records_lost()
    }

    /// Records waiting to be written.
    pub fn write_backlog(&self) -> u64 {
        self.writer.backlog()
    }

    /// An agent session of `node` for `tenant` is open on this broker from now on.
    pub fn join_session(&self, tenant: &str, node: &str) -> SessionId {
        let id = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        self.sessions.lock().insert(
            id,
            SessionInfo {
                tenant: tenant.to_owned(),
                node: node.to_owned(),
            },
        );
        id
    }

    /// The session ended.
    pub fn leave_session(&self, id: SessionId) {
        self.sessions.lock().remove(&id);
    }

    /// The nodes of `tenant` whose agents are connected to this broker now.
    pub fn connected_nodes(&self, tenant: &str) -> Vec<String> {
        self.sessions
            .lock()
            .values()
            .filter(|s| s.tenant == tenant)
            .map(|s| s.node.clone())
            .collect()
    }

    /// Whether the broker has read which contents its store holds: `None` where it does not
    /// keep track (Postgres, shared with other brokers).
    pub fn stored_contents_known(&self) -> Option<bool> {
        self.stored_contents.as_ref().map(|s| s.is_seeded())
    }
}
