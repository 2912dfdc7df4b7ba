//! The broker's memory verdict cache, in front of the store.
//!
//! Keyed by (content SHA-256, scanner identity): a verdict is reused only for the same content
//! judged by the same scanner at the same engine and rule-set versions. Identities are interned
//! to small ids so that a lookup hashes 36 bytes instead of four strings. The cache is sharded by
//! content digest, each shard a strict LRU behind its own short lock, so that lookups from many
//! sessions do not serialise on one mutex. Pure code: no I/O, never awaits while holding a lock.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use fleetscan_core::{ScannerIdentity, Sha256, Verdict};
use lru::LruCache;
use parking_lot::{Mutex, RwLock};

/// A scanner identity interned by [`Identities`]; equal ids mean equal identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdentityId(u32);

/// A scanner identity together with its interned id, within the scope of its verdicts.
#[derive(Debug, PartialEq, Eq)]
pub struct InternedIdentity {
    pub id: IdentityId,
    pub identity: ScannerIdentity,
    /// Whose verdicts these are: a tenant's own pool's (its name), or the fleet's (empty).
    pub scope: String,
}

/// Interns scanner identities within a verdict scope: the same identity in two tenants' own
/// pools gets two ids, so that their verdicts never meet in the cache. Grows with the number of
/// distinct (scope, identity) pairs ever seen (one per rule-set release and pool owner), which
/// is small; ids are never reused, so a stale id never matches a new identity.
#[derive(Default)]
pub struct Identities {
    map: RwLock<HashMap<(String, ScannerIdentity), Arc<InternedIdentity>>>,
}

impl Identities {
    /// Interns an identity of the fleet's scope (shared pools, the fleet operator's pools).
    pub fn intern(&self, identity: &ScannerIdentity) -> Arc<InternedIdentity> {
        self.intern_scoped("", identity)
    }

    /// Interns an identity within `scope` (a tenant's name for its own pools, empty for the
    /// fleet's).
    pub fn intern_scoped(&self, scope: &str, identity: &ScannerIdentity) -> Arc<InternedIdentity> {
        // The look-up key is built once per call; interning happens on registrations and
        // misses, never on the cached decision path.
        let key = (scope.to_owned(), identity.clone());
        if let Some(found) = self.map.read().get(&key) {
            return found.clone();
        }
        let mut map = self.map.write();
        let next = u32::try_from(map.len()).unwrap_or(u32::MAX);
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(InternedIdentity {
                    id: IdentityId(next),
                    identity: identity.clone(),
                    scope: scope.to_owned(),
                })
            })
            .clone()
    }
}

/// Default number of shards; a power of two.
const DEFAULT_SHARDS: usize = 16;

type Key = (Sha256, IdentityId);
type Shard = Mutex<LruCache<Key, Arc<Verdict>>>;

/// A bounded, sharded LRU of conclusive verdicts.
pub struct VerdictCache {
    shards: Box<[Shard]>,
    mask: usize,
}

impl VerdictCache {
    /// A cache of about `capacity` verdicts (at least one per shard).
    pub fn new(capacity: usize) -> Self {
        Self::with_shards(capacity, DEFAULT_SHARDS)
    }

    /// `shards` is rounded up to a power of two; capacity is split evenly among the shards.
    pub fn with_shards(capacity: usize, shards: usize) -> Self {
        let shards = shards.max(1).next_power_of_two();
        let per_shard = NonZeroUsize::new(capacity.div_ceil(shards)).unwrap_or(NonZeroUsize::MIN);
        VerdictCache {
            shards: (0..shards)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            mask: shards - 1,
        }
    }

    fn shard(&self, sha256: &Sha256) -> &Shard {
        // The digest is uniformly distributed already: its first bytes pick the shard.
        let n = usize::from(sha256.0[0]) | (usize::from(sha256.0[1]) << 8);
        &self.shards[n & self.mask]
    }

    /// The verdict of exactly this scanner identity for the content, if cached.
    pub fn get(&self, sha256: &Sha256, identity: IdentityId) -> Option<Arc<Verdict>> {
        self.shard(sha256).lock().get(&(*sha256, identity)).cloned()
    }

    /// Caches a verdict under the identity it was made with. Inconclusive verdicts (errors,
    /// unsupported) are refused: they must not decide a later access.
    pub fn insert(&self, identity: IdentityId, verdict: Arc<Verdict>) -> bool {
        if !verdict.kind.is_conclusive() {
            return false;
        }
        let key = (verdict.sha256, identity);
        self.shard(&verdict.sha256).lock().put(key, verdict);
        true
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use fleetscan_core::VerdictKind;

    use super::*;

    fn identity(ruleset: &str) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "reference".into(),
            engine: "yara-x".into(),
            engine_version: "1.0".into(),
            ruleset_version: ruleset.into(),
        }
    }

    fn verdict(content: &[u8], scanner: &ScannerIdentity, kind: VerdictKind) -> Arc<Verdict> {
        Arc::new(Verdict {
            sha256: Sha256::of(content),
            scanner: scanner.clone(),
            kind,
            threat_name: None,
            detail: None,
            scanned_at_unix_ms: 0,
            scan_micros: 0,
        })
    }

    #[test]
    fn interning_is_stable_and_distinguishes_versions() {
        let ids = Identities::default();
        let a = ids.intern(&identity("r1"));
        let b = ids.intern(&identity("r2"));
        assert_ne!(a.id, b.id);
        assert_eq!(ids.intern(&identity("r1")).id, a.id);
        assert_eq!(b.identity.ruleset_version, "r2");
    }

    #[test]
    fn the_same_identity_in_two_scopes_is_two_keys() {
        let ids = Identities::default();
        let fleet = ids.intern(&identity("r1"));
        let acme = ids.intern_scoped("acme", &identity("r1"));
        let globex = ids.intern_scoped("globex", &identity("r1"));
        assert_ne!(acme.id, globex.id);
        assert_ne!(acme.id, fleet.id);
        assert_eq!(ids.intern_scoped("acme", &identity("r1")).id, acme.id);
        assert_eq!(ids.intern_scoped("", &identity("r1")).id, fleet.id);
        let cache = VerdictCache::new(100);
        let v = verdict(b"x", &acme.identity, VerdictKind::Malicious);
        cache.insert(acme.id, v.clone());
        assert!(cache.get(&v.sha256, acme.id).is_some());
        assert!(
            cache.get(&v.sha256, globex.id).is_none(),
            "one tenant's private verdict must not serve another"
        );
        assert!(cache.get(&v.sha256, fleet.id).is_none());
    }

    #[test]
    fn verdicts_are_keyed_by_identity() {
        let ids = Identities::default();
        let old = ids.intern(&identity("r1"));
        let new = ids.intern(&identity("r2"));
        let cache = VerdictCache::new(100);
        let v = verdict(b"x", &old.identity, VerdictKind::Malicious);
        assert!(cache.insert(old.id, v.clone()));
        assert_eq!(cache.get(&v.sha256, old.id).as_deref(), Some(&*v));
        assert!(
            cache.get(&v.sha256, new.id).is_none(),
            "a verdict of another rule-set version must not be reused"
        );
        assert!(cache.get(&Sha256::of(b"y"), old.id).is_none());
    }

    #[test]
    fn inconclusive_verdicts_are_not_cached() {
        let ids = Identities::default();
        let id = ids.intern(&identity("r1"));
        let cache = VerdictCache::new(100);
        for kind in [VerdictKind::Error, VerdictKind::Unsupported] {
            let v = verdict(b"x", &id.identity, kind);
            assert!(!cache.insert(id.id, v.clone()));
            assert!(cache.get(&v.sha256, id.id).is_none());
        }
    }

    #[test]
    fn least_recently_used_entry_is_evicted_at_capacity() {
        let ids = Identities::default();
        let id = ids.intern(&identity("r1"));
        let cache = VerdictCache::with_shards(2, 1);
        let a = verdict(b"a", &id.identity, VerdictKind::Clean);
        let b = verdict(b"b", &id.identity, VerdictKind::Clean);
        let c = verdict(b"c", &id.identity, VerdictKind::Clean);
        cache.insert(id.id, a.clone());
        cache.insert(id.id, b.clone());
        // Touch `a` so that `b` is the least recently used.
        assert!(cache.get(&a.sha256, id.id).is_some());
        cache.insert(id.id, c.clone());
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&a.sha256, id.id).is_some());
        assert!(cache.get(&b.sha256, id.id).is_none());
        assert!(cache.get(&c.sha256, id.id).is_some());
    }

    #[test]
    fn capacity_is_bounded_across_shards() {
        let ids = Identities::default();
        let id = ids.intern(&identity("r1"));
        let cache = VerdictCache::with_shards(64, 16);
        for i in 0..10_000u32 {
            cache.insert(
                id.id,
                verdict(&i.to_le_bytes(), &id.identity, VerdictKind::Clean),
            );
        }
        assert!(cache.len() <= 64, "len {}", cache.len());
    }
}
