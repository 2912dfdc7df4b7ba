//! Tenancy: whose an access is, which policy decides it, and which scanner pools must judge it.
//!
//! A tenant owns namespaces (by a mapping in the broker's configuration, or by a label on the
//! Kubernetes namespace that the agent reads), private scanner pools, and a policy with
//! per-namespace overrides. Shared pools belong to the fleet operator and serve the tenants that
//! opt into them. Host processes outside any container, and namespaces nobody claims, belong to
//! the fleet operator's tenant, [`DEFAULT_TENANT`].
//!
//! No global names: every name a tenant uses — its pools, its namespaces' overrides — is looked
//! up within that tenant ([`Tenancy::pool`], [`Tenancy::resolve`]); a tenant cannot name another
//! tenant's private pool, and two tenants may use the same pool name for different pools.
//!
//! Pure code: no I/O, no protocol types, no clock. Everything a broker or agent needs to decide
//! an access is resolved here from a [`TenancyConfig`] once, when the configuration is loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{AccessKind, Action, DEFAULT_TENANT, FailMode, Policy};

/// The namespace label agents read the tenant from, unless configured otherwise.
pub const DEFAULT_NAMESPACE_LABEL: &str = "fleetscan.io/tenant";

/// The pool a worker serves when it names none, and the fleet operator's scanner pool.
pub const DEFAULT_POOL: &str = "default";

/// How shared pools appear where a tenant name is expected (store rows, pool keys). Not a valid
/// tenant name, so it can never collide with one.
const SHARED_OWNER: &str = "*";

/// A configuration or registration that tenancy rules refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TenancyError {
    #[error(
        "invalid {what} name {name:?}: 1 to 63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit"
    )]
    InvalidName { what: &'static str, name: String },
    #[error("namespace {namespace:?} is mapped to two tenants, {first:?} and {second:?}")]
    NamespaceTwice {
        namespace: String,
        first: String,
        second: String,
    },
    #[error("tenant {tenant:?} opts into shared pool {pool:?}, which is not configured")]
    UnknownSharedPool { tenant: String, pool: String },
    #[error("tenant {tenant:?} has no pool named {pool:?}")]
    UnknownPool { tenant: String, pool: String },
    #[error(
        "tenant {tenant:?} names {pool:?} both as a private pool and as a shared pool it opts into"
    )]
    AmbiguousPool { tenant: String, pool: String },
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("shared pool {0:?} serves no tenant: none opted in among those the worker named")]
    NoOptedInTenant(String),
    #[error(
        "a private pool serves one tenant; {pool:?} was registered for {count} (use a shared pool)"
    )]
    PrivatePoolOfSeveralTenants { pool: String, count: usize },
    #[error("policy version must be at least 1")]
    ZeroVersion,
    #[error("policy version {offered} is not newer than the one in force, {current}")]
    NotNewer { current: u64, offered: u64 },
}

/// Checks a tenant, pool or namespace name: lower-case letters, digits, `-`, `_`, `.`, 1 to 63
/// characters, starting with a letter or digit (every Kubernetes namespace name qualifies).
/// Keeps `/` and `*` out of names, so that [`PoolKey::key`] is unambiguous.
pub fn check_name(what: &'static str, name: &str) -> Result<(), TenancyError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(TenancyError::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// Who a scanner pool belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolOwner {
    /// One tenant's own pool: its verdicts serve that tenant only.
    Tenant(String),
    /// The fleet's, for every tenant that opts in: its verdicts are shared.
    Shared,
}

/// A scanner pool, named within its owner.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub owner: PoolOwner,
    pub name: String,
}

impl PoolKey {
    pub fn private(tenant: &str, name: &str) -> PoolKey {
        PoolKey {
            owner: PoolOwner::Tenant(tenant.to_owned()),
            name: name.to_owned(),
        }
    }

    pub fn shared(name: &str) -> PoolKey {
        PoolKey {
            owner: PoolOwner::Shared,
            name: name.to_owned(),
        }
    }

    /// The fleet operator's default pool, the one every pre-tenancy worker serves.
    pub fn fleet_default() -> PoolKey {
        PoolKey::private(DEFAULT_TENANT, DEFAULT_POOL)
    }

    /// One string naming the pool across the fleet, for maps and logs: `name` for the fleet
    /// operator's own pools (so that keys from before tenancy keep their meaning),
    /// `tenant/name` for another tenant's, `*/name` for a shared pool.
    pub fn key(&self) -> String {
        match &self.owner {
            PoolOwner::Tenant(t) if t == DEFAULT_TENANT => self.name.clone(),
            PoolOwner::Tenant(t) => format!("{t}/{}", self.name),
            PoolOwner::Shared => format!("{SHARED_OWNER}/{}", self.name),
        }
    }

    /// The inverse of [`PoolKey::key`].
    pub fn parse(key: &str) -> PoolKey {
        match key.split_once('/') {
            Some((SHARED_OWNER, name)) => PoolKey::shared(name),
            Some((tenant, name)) => PoolKey::private(tenant, name),
            None => PoolKey::private(DEFAULT_TENANT, key),
        }
    }

    /// The owner as stored where a tenant is expected (`*` for a shared pool).
    pub fn store_tenant(&self) -> &str {
        match &self.owner {
            PoolOwner::Tenant(t) => t,
            PoolOwner::Shared => SHARED_OWNER,
        }
    }

    /// The inverse of [`PoolKey::store_tenant`].
    pub fn from_store(tenant: &str, pool: &str) -> PoolKey {
        if tenant == SHARED_OWNER {
            PoolKey::shared(pool)
        } else {
            PoolKey::private(tenant, pool)
        }
    }

    /// Whose verdicts the pool's are: its tenant's alone for a tenant's own pool (another
    /// tenant's rules must never decide for, or leak to, another), and the whole fleet's
    /// (`""`) for shared pools and the fleet operator's pools, which serve everyone and whose
    /// verdicts predate tenancy.
    pub fn verdict_scope(&self) -> &str {
        match &self.owner {
            PoolOwner::Tenant(t) if t != DEFAULT_TENANT => t,
            _ => "",
        }
    }
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// Accesses that are never scanned: allowed at once, by the agent where it can.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Exclusions {
    /// Paths as the opening process sees them. A plain path excludes itself and everything
    /// under it (`/var/log` excludes `/var/log/x`, not `/var/logs`); a pattern with `*`, `?`
    /// or `**` matches the path or one of its parent directories, `*` and `?` never across a
    /// `/`, `**` across any number of them.
    pub paths: Vec<String>,
    /// Container images as the runtime reports them, exactly or by a pattern (`*` matches any
    /// run of characters, `/` included).
    pub images: Vec<String>,
    /// Kubernetes namespaces, exactly or by a pattern.
    pub namespaces: Vec<String>,
}

impl Exclusions {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.images.is_empty() && self.namespaces.is_empty()
    }

    /// Why the access is excluded, or `None` when it must be scanned. Empty `image` and
    /// `namespace` (a host process, or one not attributed) match no image or namespace rule.
    pub fn excludes(&self, path: &str, image: &str, namespace: &str) -> Option<String> {
        self.excludes_path(path)
            .or_else(|| self.excludes_origin(image, namespace))
    }

    /// The path rules alone (an agent judges them once it has the opener's view of the path).
    pub fn excludes_path(&self, path: &str) -> Option<String> {
        let p = self.paths.iter().find(|p| path_matches(p, path))?;
        Some(format!("excluded path {p}"))
    }

    /// The image and namespace rules alone (judged before the path is known).
    pub fn excludes_origin(&self, image: &str, namespace: &str) -> Option<String> {
        if !image.is_empty()
            && let Some(i) = self.images.iter().find(|i| glob(i, image, false))
        {
            return Some(format!("excluded image {i}"));
        }
        if !namespace.is_empty()
            && let Some(n) = self.namespaces.iter().find(|n| glob(n, namespace, false))
        {
            return Some(format!("excluded namespace {n}"));
        }
        None
    }
}

fn has_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

fn path_matches(pattern: &str, path: &str) -> bool {
    if pattern.is_empty() {
        return false;
    }
    if !has_glob(pattern) {
        let prefix = pattern.trim_end_matches('/');
        if prefix.is_empty() {
            return true; // "/" excludes everything.
        }
        return path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'));
    }
    // The path itself, then each parent directory.
    if glob(pattern, path, true) {
        return true;
    }
    path.match_indices('/')
        .filter(|(i, _)| *i > 0)
        .any(|(i, _)| glob(pattern, &path[..i], true))
}

/// Matches `text` against a pattern of `*`, `**` and `?`. With `slashes`, `*` and `?` do not
/// match `/` (`**` does); without, `*` matches anything. Dynamic programming over pattern and
/// text positions, so that no pattern can take exponential time.
fn glob(pattern: &str, text: &str, slashes: bool) -> bool {
    #[derive(Clone, Copy)]
    enum Tok {
        Byte(u8),
        One,
        Star,
        DoubleStar,
    }
    let p = pattern.as_bytes();
    let mut toks = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'*' if p.get(i + 1) == Some(&b'*') => {
                toks.push(Tok::DoubleStar);
                i += 2;
            }
            b'*' => {
                toks.push(if slashes { Tok::Star } else { Tok::DoubleStar });
                i += 1;
            }
            b'?' => {
                toks.push(Tok::One);
                i += 1;
            }
            b => {
                toks.push(Tok::Byte(b));
                i += 1;
            }
        }
    }
    let t = text.as_bytes();
    // matches[j]: the tokens seen so far match t[..j].
    let mut matches = vec![false; t.len() + 1];
    matches[0] = true;
    for tok in toks {
        let mut next = vec![false; t.len() + 1];
        match tok {
            Tok::Star | Tok::DoubleStar => {
                for j in 0..=t.len() {
                    next[j] = matches[j]
                        || (j > 0
                            && next[j - 1]
                            && (matches!(tok, Tok::DoubleStar) || t[j - 1] != b'/'));
                }
            }
            Tok::One => {
                for j in 1..=t.len() {
                    next[j] = matches[j - 1] && !(slashes && t[j - 1] == b'/');
                }
            }
            Tok::Byte(b) => {
                for j in 1..=t.len() {
                    next[j] = matches[j - 1] && t[j - 1] == b;
                }
            }
        }
        matches = next;
    }
    matches[t.len()]
}

/// Settings a tenant or namespace changes; whatever is unset is inherited (namespace from its
/// tenant, tenant from the fleet's policy). A set value replaces the inherited one whole
/// (exclusions and pools included).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyPatch {
    /// `open` (allow) or `closed` (deny) when no verdict can be had in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_mode: Option<FailMode>,
    /// How long an access may wait for a decision, in milliseconds (at most 5000 applied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_deadline_ms: Option<u64>,
    /// Larger content is not scanned; `oversize_action` decides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_file_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oversize_action: Option<Action>,
    /// Record what would be denied, but allow it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_only: Option<bool>,
    /// Scan executions only; plain opens are allowed unscanned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclusions: Option<Exclusions>,
    /// The pools that must judge every scanned access, named within the tenant (its own pools
    /// and the shared pools it opted into). Any blocking verdict denies; all clean allows;
    /// anything else is the fail mode. Unset: every pool the tenant has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<String>>,
}

/// A tenant, as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Namespaces that belong to this tenant whatever their labels say.
    pub namespaces: Vec<String>,
    /// The tenant's own pools (its workers register them with the tenant's name).
    pub pools: Vec<String>,
    /// Shared pools this tenant opts into.
    pub shared_pools: Vec<String>,
    /// The tenant's policy, over the fleet's.
    pub policy: PolicyPatch,
    /// Per-namespace overrides over the tenant's policy, by namespace name.
    pub namespace_policies: BTreeMap<String, PolicyPatch>,
}

/// Tenants, pools and policies, as configured. `Default` is a fleet of one tenant, the
/// operator's, scanned by its `default` pool: what every broker did before tenants existed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenancyConfig {
    /// Version of the policy set: raise it on every change, so agents take the new one and
    /// ignore older ones (a replica still on the old configuration, a late update).
    pub version: u64,
    /// The namespace label that names a namespace's tenant (agents read it).
    pub namespace_label: String,
    /// Pools of the fleet that tenants may opt into.
    pub shared_pools: Vec<String>,
    /// Tenants by name. The fleet operator's ([`DEFAULT_TENANT`]) may be listed to give it
    /// more pools or namespace overrides; its base policy is the fleet's.
    pub tenants: BTreeMap<String, TenantConfig>,
}

impl Default for TenancyConfig {
    fn default() -> Self {
        TenancyConfig {
            version: 1,
            namespace_label: DEFAULT_NAMESPACE_LABEL.to_owned(),
            shared_pools: Vec::new(),
            tenants: BTreeMap::new(),
        }
    }
}

/// The policy in force for one tenant, or one namespace of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub tenant: String,
    /// The namespace whose overrides this is; `None` for the tenant's own policy.
    pub namespace: Option<String>,
    /// How verdicts and failures decide (its version is the policy set's).
    pub policy: Policy,
    pub exec_only: bool,
    pub exclusions: Exclusions,
    /// The pools that must judge a scanned access, in the order configured.
    pub pools: Vec<PoolKey>,
}

impl EffectivePolicy {
    /// Why an access needs no scan (allowed at once), or `None` when it must be scanned.
    pub fn skip(
        &self,
        kind: AccessKind,
        path: &str,
        image: &str,
        namespace: &str,
    ) -> Option<String> {
        if self.exec_only && kind == AccessKind::Open {
            return Some(EXEC_ONLY.into());
        }
        self.exclusions.excludes(path, image, namespace)
    }
}

/// Why an exec-only policy lets a plain open through unscanned.
pub const EXEC_ONLY: &str = "exec-only: opens are not scanned";

struct TenantEntry {
    private: BTreeSet<String>,
    shared: BTreeSet<String>,
    base: Arc<EffectivePolicy>,
    namespaces: BTreeMap<String, Arc<EffectivePolicy>>,
}

/// Where a worker's registration puts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRoute {
    pub pool: PoolKey,
    /// The tenants whose jobs it may take.
    pub tenants: Vec<String>,
}

/// The fleet's tenancy, compiled and checked: cheap to query on every access.
pub struct Tenancy {
    version: u64,
    /// Whether one policy decides every access (one tenant, no namespace overrides).
    single_policy: bool,
    namespace_label: String,
    namespace_tenants: BTreeMap<String, String>,
    /// Shared pool → the tenants that opted in.
    shared: BTreeMap<String, BTreeSet<String>>,
    tenants: BTreeMap<String, TenantEntry>,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy")
            .field("version", &self.version)
            .field("tenants", &self.tenants.keys().collect::<Vec<_>>())
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

fn apply(base: &EffectivePolicy, patch: &PolicyPatch) -> (EffectivePolicy, Option<Vec<String>>) {
    let mut p = base.clone();
    if let Some(v) = patch.fail_mode {
        p.policy.fail_mode = v;
    }
    if let Some(v) = patch.decision_deadline_ms {
        p.policy.decision_deadline = Duration::from_millis(v);
    }
    if let Some(v) = patch.max_file_size {
        p.policy.max_file_size = v;
    }
    if let Some(v) = patch.oversize_action {
        p.policy.oversize_action = v;
    }
    if let Some(v) = patch.audit_only {
        p.policy.audit_only = v;
    }
    if let Some(v) = patch.exec_only {
        p.exec_only = v;
    }
    if let Some(v) = &patch.exclusions {
        p.exclusions = v.clone();
    }
    (p, patch.pools.clone())
}

impl Tenancy {
    /// The fleet of one tenant: the operator's, under `policy`, scanned by its default pool.
    pub fn single(policy: &Policy) -> Tenancy {
        let config = TenancyConfig {
            version: policy.version.max(1),
            ..TenancyConfig::default()
        };
        Tenancy::new(policy, &config).expect("the single-tenant configuration is valid")
    }

    /// Compiles `config` over the fleet's policy (the fleet operator's tenant's base policy,
    /// from which every tenant inherits what it does not set).
    pub fn new(fleet: &Policy, config: &TenancyConfig) -> Result<Tenancy, TenancyError> {
        if config.version == 0 {
            return Err(TenancyError::ZeroVersion);
        }
        let mut shared = BTreeMap::new();
        for pool in &config.shared_pools {
            check_name("pool", pool)?;
            shared.insert(pool.clone(), BTreeSet::new());
        }
        let mut configs = config.tenants.clone();
        configs.entry(DEFAULT_TENANT.to_owned()).or_default();
        let mut namespace_tenants = BTreeMap::new();
        let mut tenants = BTreeMap::new();
        for (name, t) in &configs {
            check_name("tenant", name)?;
            for ns in &t.namespaces {
                check_name("namespace", ns)?;
                if let Some(first) = namespace_tenants.insert(ns.clone(), name.clone())
                    && first != *name
                {
                    return Err(TenancyError::NamespaceTwice {
                        namespace: ns.clone(),
                        first,
                        second: name.clone(),
                    });
                }
            }
            let mut private: BTreeSet<String> = t.pools.iter().cloned().collect();
            if name == DEFAULT_TENANT {
                private.insert(DEFAULT_POOL.to_owned());
            }
            for pool in &private {
                check_name("pool", pool)?;
            }
            let mut opted = BTreeSet::new();
            for pool in &t.shared_pools {
                let Some(tenants_of) = shared.get_mut(pool) else {
                    return Err(TenancyError::UnknownSharedPool {
                        tenant: name.clone(),
                        pool: pool.clone(),
                    });
                };
                if private.contains(pool) {
                    return Err(TenancyError::AmbiguousPool {
                        tenant: name.clone(),
                        pool: pool.clone(),
                    });
                }
                tenants_of.insert(name.clone());
                opted.insert(pool.clone());
            }
            let resolve_pools = |names: &[String]| -> Result<Vec<PoolKey>, TenancyError> {
                let mut out = Vec::new();
                for n in names {
                    let key = if private.contains(n) {
                        PoolKey::private(name, n)
                    } else if opted.contains(n) {
                        PoolKey::shared(n)
                    } else {
                        return Err(TenancyError::UnknownPool {
                            tenant: name.clone(),
                            pool: n.clone(),
                        });
                    };
                    if !out.contains(&key) {
                        out.push(key);
                    }
                }
                Ok(out)
            };
            // Every pool the tenant has, unless its policy names the required ones.
            let all: Vec<PoolKey> = private
                .iter()
                .map(|p| PoolKey::private(name, p))
                .chain(opted.iter().map(|p| PoolKey::shared(p)))
                .collect();
            let root = EffectivePolicy {
                tenant: name.clone(),
                namespace: None,
                policy: Policy {
                    version: config.version,
                    ..fleet.clone()
                },
                exec_only: false,
                exclusions: Exclusions::default(),
                pools: all,
            };
            let (mut base, pools) = apply(&root, &t.policy);
            if let Some(pools) = pools {
                base.pools = resolve_pools(&pools)?;
            }
            let mut namespaces = BTreeMap::new();
            for (ns, patch) in &t.namespace_policies {
                check_name("namespace", ns)?;
                let (mut p, pools) = apply(&base, patch);
                p.namespace = Some(ns.clone());
                if let Some(pools) = pools {
                    p.pools = resolve_pools(&pools)?;
                }
                namespaces.insert(ns.clone(), Arc::new(p));
            }
            tenants.insert(
                name.clone(),
                TenantEntry {
                    private,
                    shared: opted,
                    base: Arc::new(base),
                    namespaces,
                },
            );
        }
        let namespace_label = if config.namespace_label.is_empty() {
            DEFAULT_NAMESPACE_LABEL.to_owned()
        } else {
            config.namespace_label.clone()
        };
        let single_policy = tenants.len() == 1 && tenants.values().all(|t| t.namespaces.is_empty());
        Ok(Tenancy {
            version: config.version,
            single_policy,
            namespace_label,
            namespace_tenants,
            shared,
            tenants,
        })
    }

    /// Whether one policy decides every access (one tenant, no namespace overrides): then a
    /// decision about a file holds for every process that opens it, whoever it belongs to.
    pub fn is_single_policy(&self) -> bool {
        self.single_policy
    }

    /// The policy set's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The namespace label that names a namespace's tenant.
    pub fn namespace_label(&self) -> &str {
        &self.namespace_label
    }

    /// The tenant of an access from namespace `namespace` (empty: a host process, outside any
    /// pod), whose namespace label named `labelled` (empty: no label, or not known). The
    /// configuration's mapping wins over the label; a label naming no configured tenant, an
    /// unclaimed namespace and a host process all belong to the fleet operator.
    pub fn tenant_of<'a>(&'a self, namespace: &str, labelled: &'a str) -> &'a str {
        if namespace.is_empty() {
            return DEFAULT_TENANT;
        }
        if let Some(t) = self.namespace_tenants.get(namespace) {
            return t;
        }
        if self.tenants.contains_key(labelled) {
            return labelled;
        }
        DEFAULT_TENANT
    }

    /// The policy of `namespace` within `tenant` (the tenant's own where the namespace has no
    /// overrides). An unknown tenant gets the fleet operator's policy.
    pub fn resolve(&self, tenant: &str, namespace: &str) -> Arc<EffectivePolicy> {
        let entry = self
            .tenants
            .get(tenant)
            .or_else(|| self.tenants.get(DEFAULT_TENANT))
            .expect("the fleet operator's tenant always exists");
        entry
            .namespaces
            .get(namespace)
            .unwrap_or(&entry.base)
            .clone()
    }

    /// The pool `name` as `tenant` sees it: its own, or a shared one it opted into.
    pub fn pool(&self, tenant: &str, name: &str) -> Option<PoolKey> {
        let entry = self.tenants.get(tenant)?;
        if entry.private.contains(name) {
            Some(PoolKey::private(tenant, name))
        } else if entry.shared.contains(name) {
            Some(PoolKey::shared(name))
        } else {
            None
        }
    }

    /// Every policy in force: each tenant's, then its namespaces', for agents.
    pub fn policies(&self) -> Vec<Arc<EffectivePolicy>> {
        self.tenants
            .values()
            .flat_map(|t| std::iter::once(t.base.clone()).chain(t.namespaces.values().cloned()))
            .collect()
    }

    /// Where a worker registering `pool` (empty: the default) for `tenants` (empty: the fleet
    /// operator's) belongs. A shared pool serves the named tenants that opted in (every one
    /// that opted in when none is named); a private pool serves exactly one tenant, which
    /// must have a pool of that name.
    pub fn route_worker(
        &self,
        pool: &str,
        tenants: &[String],
    ) -> Result<WorkerRoute, TenancyError> {
        let pool = if pool.is_empty() { DEFAULT_POOL } else { pool };
        check_name("pool", pool)?;
        if let Some(opted) = self.shared.get(pool) {
            let served: Vec<String> = if tenants.is_empty() {
                opted.iter().cloned().collect()
            } else {
                tenants
                    .iter()
                    .filter(|t| opted.contains(*t))
                    .cloned()
                    .collect()
            };
            if served.is_empty() {
                return Err(TenancyError::NoOptedInTenant(pool.to_owned()));
            }
            return Ok(WorkerRoute {
                pool: PoolKey::shared(pool),
                tenants: served,
            });
        }
        let tenant = match tenants {
            [] => DEFAULT_TENANT,
            [one] => one.as_str(),
            several => {
                return Err(TenancyError::PrivatePoolOfSeveralTenants {
                    pool: pool.to_owned(),
                    count: several.len(),
                });
            }
        };
        let entry = self
            .tenants
            .get(tenant)
            .ok_or_else(|| TenancyError::UnknownTenant(tenant.to_owned()))?;
        if !entry.private.contains(pool) {
            return Err(TenancyError::UnknownPool {
                tenant: tenant.to_owned(),
                pool: pool.to_owned(),
            });
        }
        Ok(WorkerRoute {
            pool: PoolKey::private(tenant, pool),
            tenants: vec![tenant.to_owned()],
        })
    }

    /// Checks that `next` may replace this policy set: its version must be newer.
    pub fn check_successor(&self, next: &Tenancy) -> Result<(), TenancyError> {
        if next.version <= self.version {
            return Err(TenancyError::NotNewer {
                current: self.version,
                offered: next.version,
            });
        }
        Ok(())
    }
}

/// One entry of a [`PolicySet`]: the policy of a tenant, or of one namespace within it, with
/// its pools by the names the tenant uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantPolicy {
    pub tenant: String,
    /// `None`: the tenant's own policy, for its namespaces without overrides.
    pub namespace: Option<String>,
    pub policy: Policy,
    pub exec_only: bool,
    pub exclusions: Exclusions,
    pub pools: Vec<String>,
}

/// Every policy of the fleet, as pushed to agents so that they can decide locally what needs
/// no broker (exec-only, exclusions, oversize) and apply each tenant's deadline and fail mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySet {
    pub version: u64,
    pub default_tenant: String,
    pub namespace_label: String,
    pub namespace_tenants: BTreeMap<String, String>,
    pub policies: Vec<TenantPolicy>,
}

impl PolicySet {
    /// The tenant of an access, by the same rules as [`Tenancy::tenant_of`]: `labelled` is the
    /// value of the namespace's `namespace_label` label, if any.
    pub fn tenant_of<'a>(&'a self, namespace: &str, labelled: &'a str) -> &'a str {
        if namespace.is_empty() {
            return &self.default_tenant;
        }
        if let Some(t) = self.namespace_tenants.get(namespace) {
            return t;
        }
        if !labelled.is_empty() && self.policies.iter().any(|p| p.tenant == labelled) {
            return labelled;
        }
        &self.default_tenant
    }

    /// The policy of `namespace` within `tenant`, else the tenant's own, else the fleet
    /// operator's; `None` only for a set without the operator's policy (malformed).
    pub fn resolve(&self, tenant: &str, namespace: &str) -> Option<&TenantPolicy> {
        self.resolve_index(tenant, namespace)
            .map(|i| &self.policies[i])
    }

    /// [`PolicySet::resolve`], as the entry's index in `policies`.
    pub fn resolve_index(&self, tenant: &str, namespace: &str) -> Option<usize> {
        let find = |t: &str, ns: Option<&str>| {
            self.policies
                .iter()
                .position(|p| p.tenant == t && p.namespace.as_deref() == ns)
        };
        (!namespace.is_empty())
            .then(|| find(tenant, Some(namespace)))
            .flatten()
            .or_else(|| find(tenant, None))
            .or_else(|| find(&self.default_tenant, None))
    }
}

impl Tenancy {
    /// What agents are sent: every policy, with pools by the names their tenants use.
    pub fn policy_set(&self) -> PolicySet {
        PolicySet {
            version: self.version,
            default_tenant: DEFAULT_TENANT.to_owned(),
            namespace_label: self.namespace_label.clone(),
            namespace_tenants: self.namespace_tenants.clone(),
            policies: self
                .policies()
                .iter()
                .map(|p| TenantPolicy {
                    tenant: p.tenant.clone(),
                    namespace: p.namespace.clone(),
                    policy: p.policy.clone(),
                    exec_only: p.exec_only,
                    exclusions: p.exclusions.clone(),
                    pools: p.pools.iter().map(|k| k.name.clone()).collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch() -> PolicyPatch {
        PolicyPatch::default()
    }

    /// Two tenants with a private pool each, both opted into a shared one; acme's namespace
    /// `acme-dev` audits only and its `acme-ci` scans executions only.
    fn two_tenants() -> Tenancy {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "acme".to_owned(),
            TenantConfig {
                namespaces: vec!["shop".into(), "acme-dev".into()],
                pools: vec!["yara".into()],
                shared_pools: vec!["clamav".into()],
                policy: PolicyPatch {
                    fail_mode: Some(FailMode::Closed),
                    ..patch()
                },
                namespace_policies: BTreeMap::from([
                    (
                        "acme-dev".to_owned(),
                        PolicyPatch {
                            audit_only: Some(true),
                            ..patch()
                        },
                    ),
                    (
                        "acme-ci".to_owned(),
                        PolicyPatch {
                            exec_only: Some(true),
                            pools: Some(vec!["yara".into()]),
                            exclusions: Some(Exclusions {
                                paths: vec!["/cache".into(), "/srv/**/*.log".into()],
                                images: vec!["registry.acme/ci-*".into()],
                                namespaces: vec![],
                            }),
                            ..patch()
                        },
                    ),
                ]),
            },
        );
        tenants.insert(
            "globex".to_owned(),
            TenantConfig {
                namespaces: vec!["web".into()],
                pools: vec!["yara".into()],
                shared_pools: vec!["clamav".into()],
                policy: PolicyPatch {
                    max_file_size: Some(1024),
                    pools: Some(vec!["yara".into()]),
                    ..patch()
                },
                namespace_policies: BTreeMap::new(),
            },
        );
        Tenancy::new(
            &Policy::default(),
            &TenancyConfig {
                version: 7,
                namespace_label: String::new(),
                shared_pools: vec!["clamav".into()],
                tenants,
            },
        )
        .unwrap()
    }

    #[test]
    fn the_tenant_of_an_access_comes_from_its_namespace() {
        let t = two_tenants();
        // Host processes belong to the fleet operator, whatever the agent says.
        assert_eq!(t.tenant_of("", "acme"), DEFAULT_TENANT);
        // The configuration's mapping wins over the label.
        assert_eq!(t.tenant_of("shop", "globex"), "acme");
        assert_eq!(t.tenant_of("shop", ""), "acme");
        // Unmapped namespaces: the label, when it names a tenant.
        assert_eq!(t.tenant_of("payments", "globex"), "globex");
        assert_eq!(t.tenant_of("payments", "nobody"), DEFAULT_TENANT);
        assert_eq!(t.tenant_of("payments", ""), DEFAULT_TENANT);
        assert_eq!(t.namespace_label(), DEFAULT_NAMESPACE_LABEL);
    }

    #[test]
    fn policies_inherit_fleet_then_tenant_then_namespace() {
        let t = two_tenants();
        let acme = t.resolve("acme", "shop");
        assert_eq!(acme.namespace, None, "shop has no overrides");
        assert_eq!(acme.policy.fail_mode, FailMode::Closed);
        assert!(!acme.policy.audit_only);
        assert_eq!(acme.policy.version, 7);
        assert_eq!(
            acme.pools,
            vec![PoolKey::private("acme", "yara"), PoolKey::shared("clamav")]
        );
        let dev = t.resolve("acme", "acme-dev");
        assert_eq!(dev.namespace.as_deref(), Some("acme-dev"));
        assert!(dev.policy.audit_only);
        assert_eq!(dev.policy.fail_mode, FailMode::Closed, "inherited");
        let ci = t.resolve("acme", "acme-ci");
        assert!(ci.exec_only);
        assert_eq!(ci.pools, vec![PoolKey::private("acme", "yara")]);
        let globex = t.resolve("globex", "web");
        assert_eq!(globex.policy.fail_mode, FailMode::Open, "fleet's");
        assert_eq!(globex.policy.max_file_size, 1024);
        assert_eq!(globex.pools, vec![PoolKey::private("globex", "yara")]);
        // An unknown tenant gets the operator's policy, whose pool is the fleet's default.
        let unknown = t.resolve("nobody", "x");
        assert_eq!(unknown.tenant, DEFAULT_TENANT);
        assert_eq!(unknown.pools, vec![PoolKey::fleet_default()]);
        // Namespace overrides are the tenant's own: acme's `acme-dev` means nothing to globex.
        assert!(!t.resolve("globex", "acme-dev").policy.audit_only);
        // Three tenants' own policies and acme's two namespaces'.
        assert_eq!(t.policies().len(), 5);
    }

    #[test]
    fn pool_names_are_scoped_to_their_tenant() {
        let t = two_tenants();
        assert_eq!(
            t.pool("acme", "yara"),
            Some(PoolKey::private("acme", "yara"))
        );
        assert_ne!(t.pool("acme", "yara"), t.pool("globex", "yara"));
        assert_eq!(t.pool("acme", "clamav"), Some(PoolKey::shared("clamav")));
        assert_eq!(t.pool("acme", "default"), None, "the operator's pool");
        assert_eq!(
            t.pool(DEFAULT_TENANT, "clamav"),
            None,
            "not opted in: a shared pool is invisible"
        );
        // A tenant's policy cannot name a pool outside its scope.
        let mut config = TenancyConfig::default();
        config.tenants.insert(
            "acme".into(),
            TenantConfig {
                policy: PolicyPatch {
                    pools: Some(vec!["default".into()]),
                    ..patch()
                },
                ..TenantConfig::default()
            },
        );
        assert_eq!(
            Tenancy::new(&Policy::default(), &config).unwrap_err(),
            TenancyError::UnknownPool {
                tenant: "acme".into(),
                pool: "default".into()
            }
        );
    }

    #[test]
    fn workers_route_to_their_tenants_pools() {
        let t = two_tenants();
        let acme = t.route_worker("yara", &["acme".into()]).unwrap();
        assert_eq!(acme.pool, PoolKey::private("acme", "yara"));
        assert_eq!(acme.tenants, vec!["acme".to_owned()]);
        // The pre-tenancy registration: no pool, no tenant.
        let legacy = t.route_worker("", &[]).unwrap();
        assert_eq!(legacy.pool, PoolKey::fleet_default());
        assert_eq!(legacy.tenants, vec![DEFAULT_TENANT.to_owned()]);
        // Shared: every opted-in tenant, or those named that opted in.
        let all = t.route_worker("clamav", &[]).unwrap();
        assert_eq!(all.pool, PoolKey::shared("clamav"));
        assert_eq!(all.tenants, vec!["acme".to_owned(), "globex".to_owned()]);
        let some = t
            .route_worker("clamav", &["globex".into(), "default".into()])
            .unwrap();
        assert_eq!(some.tenants, vec!["globex".to_owned()]);
        assert!(matches!(
            t.route_worker("clamav", &["default".into()]),
            Err(TenancyError::NoOptedInTenant(_))
        ));
        assert!(matches!(
            t.route_worker("yara", &["acme".into(), "globex".into()]),
            Err(TenancyError::PrivatePoolOfSeveralTenants { .. })
        ));
        assert!(matches!(
            t.route_worker("yara", &[]),
            Err(TenancyError::UnknownPool { .. })
        ));
        assert!(matches!(
            t.route_worker("yara", &["initech".into()]),
            Err(TenancyError::UnknownTenant(_))
        ));
        assert!(matches!(
            t.route_worker("a/b", &[]),
            Err(TenancyError::InvalidName { .. })
        ));
    }

    #[test]
    fn pool_keys_round_trip_and_scope_verdicts() {
        for key in [
            PoolKey::fleet_default(),
            PoolKey::private("acme", "yara"),
            PoolKey::shared("clamav"),
        ] {
            assert_eq!(PoolKey::parse(&key.key()), key);
            assert_eq!(PoolKey::from_store(key.store_tenant(), &key.name), key);
        }
        assert_eq!(
            PoolKey::fleet_default().key(),
            "default",
            "as before tenancy"
        );
        assert_eq!(PoolKey::private("acme", "yara").verdict_scope(), "acme");
        assert_eq!(PoolKey::shared("clamav").verdict_scope(), "");
        assert_eq!(PoolKey::fleet_default().verdict_scope(), "");
    }

    #[test]
    fn exclusions_and_exec_only_skip_scans() {
        let t = two_tenants();
        let ci = t.resolve("acme", "acme-ci");
        assert!(
            ci.skip(AccessKind::Open, "/bin/sh", "", "acme-ci")
                .is_some()
        );
        assert_eq!(ci.skip(AccessKind::Exec, "/bin/sh", "", "acme-ci"), None);
        assert!(ci.skip(AccessKind::Exec, "/cache", "", "").is_some());
        assert!(ci.skip(AccessKind::Exec, "/cache/x/y", "", "").is_some());
        assert_eq!(ci.skip(AccessKind::Exec, "/cachex", "", ""), None);
        assert!(
            ci.skip(AccessKind::Exec, "/srv/a/b/app.log", "", "")
                .is_some()
        );
        assert_eq!(ci.skip(AccessKind::Exec, "/srv/app.logx", "", ""), None);
        assert!(
            ci.skip(AccessKind::Exec, "/bin/sh", "registry.acme/ci-runner:1", "")
                .is_some()
        );
        assert_eq!(
            ci.skip(AccessKind::Exec, "/bin/sh", "registry.acme/app:1", ""),
            None
        );
        let ns = Exclusions {
            namespaces: vec!["kube-*".into()],
            ..Exclusions::default()
        };
        assert!(ns.excludes("/x", "", "kube-system").is_some());
        assert!(ns.excludes("/x", "", "").is_none(), "a host process");
    }

    #[test]
    fn globs() {
        assert!(glob("/a/*/c", "/a/b/c", true));
        assert!(!glob("/a/*/c", "/a/b/x/c", true));
        assert!(glob("/a/**/c", "/a/b/x/c", true));
        assert!(glob("/a/?", "/a/b", true));
        assert!(!glob("/a/?", "/a//", true));
        assert!(glob("img*", "img/x:1", false));
        assert!(!glob("abc", "abcd", false));
        assert!(glob("", "", true));
        // No exponential blow-up.
        let text = "a".repeat(200);
        assert!(!glob(&format!("{}b", "*a".repeat(60)), &text, true));
        // A glob excludes a directory and what is under it.
        assert!(path_matches("/srv/*/tmp", "/srv/app/tmp/file"));
        assert!(path_matches("/", "/anything"));
    }

    #[test]
    fn bad_configurations_are_refused() {
        let base = || {
            let mut c = TenancyConfig::default();
            c.tenants.insert("acme".into(), TenantConfig::default());
            c.tenants.insert("globex".into(), TenantConfig::default());
            c
        };
        let p = Policy::default();
        let mut c = base();
        c.tenants.get_mut("acme").unwrap().namespaces = vec!["web".into()];
        c.tenants.get_mut("globex").unwrap().namespaces = vec!["web".into()];
        assert!(matches!(
            Tenancy::new(&p, &c),
            Err(TenancyError::NamespaceTwice { .. })
        ));
        let mut c = base();
        c.tenants.get_mut("acme").unwrap().shared_pools = vec!["nope".into()];
        assert!(matches!(
            Tenancy::new(&p, &c),
            Err(TenancyError::UnknownSharedPool { .. })
        ));
        let mut c = base();
        c.shared_pools = vec!["av".into()];
        let acme = c.tenants.get_mut("acme").unwrap();
        acme.shared_pools = vec!["av".into()];
        acme.pools = vec!["av".into()];
        assert!(matches!(
            Tenancy::new(&p, &c),
            Err(TenancyError::AmbiguousPool { .. })
        ));
        let mut c = base();
        c.tenants.insert("Bad Name".into(), TenantConfig::default());
        assert!(matches!(
            Tenancy::new(&p, &c),
            Err(TenancyError::InvalidName { .. })
        ));
        let mut c = base();
        c.version = 0;
        assert_eq!(Tenancy::new(&p, &c).unwrap_err(), TenancyError::ZeroVersion);
    }

    #[test]
    fn the_single_tenant_fleet_is_what_brokers_did_before() {
        let policy = Policy {
            version: 3,
            fail_mode: FailMode::Closed,
            ..Policy::default()
        };
        let t = Tenancy::single(&policy);
        assert_eq!(t.version(), 3);
        let p = t.resolve(DEFAULT_TENANT, "");
        assert_eq!(p.policy, policy);
        assert_eq!(p.pools, vec![PoolKey::fleet_default()]);
        assert!(!p.exec_only && p.exclusions.is_empty());
        assert_eq!(t.tenant_of("any", "any"), DEFAULT_TENANT);
        assert!(t.is_single_policy());
        assert!(!two_tenants().is_single_policy());
    }

    #[test]
    fn the_pushed_set_resolves_like_the_broker() {
        let t = two_tenants();
        let set = t.policy_set();
        assert_eq!(set.version, 7);
        for (ns, label) in [
            ("", "acme"),
            ("shop", "globex"),
            ("payments", "globex"),
            ("x", "nobody"),
        ] {
            assert_eq!(
                set.tenant_of(ns, label),
                t.tenant_of(ns, label),
                "{ns} {label}"
            );
        }
        for (tenant, ns) in [
            ("acme", "acme-dev"),
            ("acme", "shop"),
            ("globex", "acme-dev"),
            ("acme", ""),
        ] {
            let broker = t.resolve(tenant, ns);
            let agent = set.resolve(tenant, ns).unwrap();
            assert_eq!(agent.policy, broker.policy, "{tenant} {ns}");
            assert_eq!(agent.namespace, broker.namespace);
            assert_eq!(agent.exec_only, broker.exec_only);
        }
        let ci = set.resolve("acme", "acme-ci").unwrap();
        assert_eq!(ci.pools, vec!["yara".to_owned()]);
        // The agent lets the namespace's plain opens through (scope.rs tests the skip itself).
        assert!(ci.exec_only);
        assert_eq!(set.resolve("nobody", "").unwrap().tenant, DEFAULT_TENANT);
    }

    #[test]
    fn a_successor_must_be_newer() {
        let a = Tenancy::single(&Policy::default());
        let b = Tenancy::single(&Policy {
            version: 2,
            ..Policy::default()
        });
        assert!(a.check_successor(&b).is_ok());
        assert_eq!(
            b.check_successor(&a),
            Err(TenancyError::NotNewer {
                current: 2,
                offered: 1
            })
        );
        assert!(a.check_successor(&a).is_err());
    }
}
