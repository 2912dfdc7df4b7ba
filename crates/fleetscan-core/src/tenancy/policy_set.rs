//! The policy set agents are sent ([`PolicySet`]): every tenant's policy and each namespace's
//! overrides, with pools by the names their tenants use, so that an agent decides locally what
//! needs no broker (exec-only, exclusions, oversize) by the same rules as the broker.
//!
//! It must never resolve differently from [`Tenancy`]: the tests hold the two side by side.

use std::collections::BTreeMap;

use super::{Exclusions, Tenancy};
use crate::{DEFAULT_TENANT, Policy};

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
                    exclusions: p.exclusions.rules().clone(),
                    pools: p.pools.iter().map(|k| k.name.clone()).collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::two_tenants;
    use super::*;

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
}
