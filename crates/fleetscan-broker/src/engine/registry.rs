//! Each pool's current scanner identity and the verdict generation agents cache under: the
//! registry of identities.
//!
//! Both are the fleet's, kept in the store, so that every broker replica hands out the same
//! ones: a broker adopts the fleet's state at start, on notice and on a period
//! ([`Registry::apply_fleet`]), and registers each identity its workers bring
//! ([`Registry::register_identity`]); an identity never seen in a pool becomes its current one,
//! a known one never turns it back. While the store cannot be reached, a new identity is used
//! at once on this broker under a generation of its own (top bit set), and registered when the
//! store returns.
//!
//! Identities are interned within their verdict scope ([`Identities`]): a tenant's own pool's
//! verdicts never share a key with another tenant's. The scheduler is told of every change of a
//! pool's identity under the same lock, so that the two never disagree.
//!
//! Must never: apply a fleet state older than one already applied, or hold a lock across an
//! await.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fleetscan_core::{PoolKey, ScannerIdentity, now_unix_ms};
use fleetscan_store::{FleetState, Store};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::cache::{Identities, IdentityId, InternedIdentity};
use super::fleet::{Fleet, Skipped};
use super::scheduler::Scheduler;

/// See the module documentation.
pub(super) struct Registry {
    identities: Identities,
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
    /// Bumped whenever a pool's identity changes; agents flush decisions of other generations.
    generation: watch::Sender<u64>,
    store: Store,
    fleet: Arc<Fleet>,
    scheduler: Arc<Scheduler>,
}

impl Registry {
    pub(super) fn new(store: Store, fleet: Arc<Fleet>, scheduler: Arc<Scheduler>) -> Registry {
        Registry {
            identities: Identities::default(),
            current: RwLock::new(HashMap::new()),
            seen: Mutex::new(HashSet::new()),
            unconfirmed: Mutex::new(HashMap::new()),
            applying: Mutex::new(0),
            // Until the fleet's generation is read: one of this broker's own, which no agent
            // holds.
            generation: watch::channel(local_generation()).0,
            store,
            fleet,
            scheduler,
        }
    }

    /// Interns an identity within `scope` (a tenant's name for its own pools, empty for the
    /// fleet's).
    pub(super) fn intern(&self, scope: &str, identity: &ScannerIdentity) -> Arc<InternedIdentity> {
        self.identities.intern_scoped(scope, identity)
    }

    /// The pool's current scanner identity, if a worker ever registered; `pool` is a
    /// [`PoolKey::key`] (a bare name is the fleet operator's pool).
    pub(super) fn current(&self, pool: &str) -> Option<Arc<InternedIdentity>> {
        self.current.read().get(&PoolKey::parse(pool)).cloned()
    }

    /// The pool's current scanner identity, if a worker ever registered.
    pub(super) fn current_of(&self, pool: &PoolKey) -> Option<Arc<InternedIdentity>> {
        self.current.read().get(pool).cloned()
    }

    /// The id of the pool's current scanner identity: one read lock, no reference count (the
    /// cached decision path).
    pub(super) fn current_id(&self, pool: &PoolKey) -> Option<IdentityId> {
        self.current.read().get(pool).map(|identity| identity.id)
    }

    /// The verdict generation agents are given now.
    pub(super) fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Follows the verdict generation.
    pub(super) fn subscribe_generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A worker registered `identity` in the pool (or reported it with a result). The fleet
    /// decides whether it becomes the pool's current one: it does when no broker has seen it in
    /// this pool before. When the store cannot be reached, this broker decides alone by the same
    /// rule on what it has seen, under a generation of its own, and confirms with the fleet
    /// later.
    pub(super) async fn register_identity(
        self: &Arc<Self>,
        pool: &str,
        identity: &ScannerIdentity,
    ) {
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
    pub(super) fn apply_fleet(self: &Arc<Self>, state: &FleetState) {
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
                let registry = self.clone();
                tokio::spawn(async move { registry.register_identity(&pool, &identity).await });
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
            // Under the same lock, so that the registry and the scheduler never disagree on
            // the pool's identity (the scheduler never calls back).
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fleetscan_core::DEFAULT_TENANT;
    use fleetscan_store::PoolIdentity;

    use super::*;
    use crate::engine::DEFAULT_POOL;

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

    async fn registry() -> Arc<Registry> {
        let store = Store::connect("sqlite::memory:").await.unwrap();
        let fleet = Arc::new(Fleet::new(store.clone(), "test", Duration::from_secs(5)));
        Arc::new(Registry::new(store, fleet, Arc::new(Scheduler::default())))
    }

    #[tokio::test]
    async fn a_fleet_state_read_before_a_newer_one_is_never_applied_after_it() {
        let registry = registry().await;
        registry.apply_fleet(&state(11, "r2"));
        // A sync that read the store before the registration of r2 finishes late.
        registry.apply_fleet(&state(10, "r1"));
        assert_eq!(
            registry.current(DEFAULT_POOL).unwrap().identity,
            identity("r2")
        );
        assert_eq!(registry.generation(), 11);
        // The same state again changes nothing; a newer one is applied.
        registry.apply_fleet(&state(11, "r2"));
        registry.apply_fleet(&state(12, "r3"));
        assert_eq!(
            registry.current(DEFAULT_POOL).unwrap().identity,
            identity("r3")
        );
        assert_eq!(registry.generation(), 12);
    }

    #[test]
    fn local_generations_are_never_repeated_nor_a_fleets() {
        let generations: Vec<u64> = (0..10_000).map(|_| local_generation()).collect();
        assert!(generations.windows(2).all(|w| w[0] < w[1]));
        // Fleet generations count up from a time in milliseconds: far below the top bit.
        assert!(generations.iter().all(|g| *g >= 1 << 63));
    }
}
