//! The fleet's tenancy compiled from its configuration ([`Tenancy::new`]): every name checked,
//! every policy resolved (fleet, then tenant, then namespace) into an [`EffectivePolicy`] with
//! its exclusions compiled, so that the questions of an access — whose is it, which policy
//! decides it, which pools judge it — are map look-ups.
//!
//! It must never resolve a name outside its tenant, and never do work on a query that could
//! have been done once here, when the configuration is loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::{
    CompiledExclusions, DEFAULT_NAMESPACE_LABEL, DEFAULT_POOL, PolicyPatch, PoolKey, TenancyConfig,
    TenancyError, check_name,
};
use crate::{AccessKind, DEFAULT_TENANT, Policy};

/// The policy in force for one tenant, or one namespace of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub tenant: String,
    /// The namespace whose overrides this is; `None` for the tenant's own policy.
    pub namespace: Option<String>,
    /// How verdicts and failures decide (its version is the policy set's).
    pub policy: Policy,
    pub exec_only: bool,
    /// Compiled once, here: they are matched on every access.
    pub exclusions: CompiledExclusions,
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

pub(super) struct TenantEntry {
    pub(super) private: BTreeSet<String>,
    pub(super) shared: BTreeSet<String>,
    base: Arc<EffectivePolicy>,
    namespaces: BTreeMap<String, Arc<EffectivePolicy>>,
}

/// The fleet's tenancy, compiled and checked: cheap to query on every access.
pub struct Tenancy {
    pub(super) version: u64,
    /// Whether one policy decides every access (one tenant, no namespace overrides).
    single_policy: bool,
    pub(super) namespace_label: String,
    pub(super) namespace_tenants: BTreeMap<String, String>,
    /// Shared pool → the tenants that opted in.
    pub(super) shared: BTreeMap<String, BTreeSet<String>>,
    pub(super) tenants: BTreeMap<String, TenantEntry>,
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
        p.exclusions = v.compile();
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
                exclusions: CompiledExclusions::default(),
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::{patch, two_tenants};
    use super::super::{Exclusions, TenancyConfig, TenantConfig};
    use super::*;
    use crate::FailMode;

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
        }
        .compile();
        assert!(ns.excludes("/x", "", "kube-system").is_some());
        assert!(ns.excludes("/x", "", "").is_none(), "a host process");
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
