//! Which policy decides an access on this host, and which cache its decisions live in.
//!
//! The broker pushes the fleet's policy set (every tenant's policy and each namespace's
//! overrides). An access belongs to a tenant by its Kubernetes namespace (the broker's mapping,
//! else the namespace's tenant label, else the fleet operator); its policy is the namespace's
//! entry, else its tenant's. Each entry of the set is a *scope*: decisions made under one scope
//! are cached under it and never answer an access of another (a file one tenant blocks may be
//! clean to another; a namespace may be audit-only). While more than one policy is in force the
//! agent places no kernel ignore marks: a mark is per inode and would answer every tenant's
//! process alike.
//!
//! With a single policy (no tenants configured, the usual single-operator fleet) nothing of
//! this costs anything: there is one scope, the process need not be looked at before the cache,
//! and clean files still become ignore marks.
//!
//! Pure code: no I/O.

use std::sync::Arc;

use fleetscan_core::tenancy::{CompiledExclusions, Exclusions, PolicySet};
use fleetscan_core::{AccessKind, Policy, Subject};

/// The policy of one scope, as this agent applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Scope {
    /// Index of the entry in the policy set; 0 when there is a single policy.
    pub id: u32,
    /// The version of the set the scope belongs to (0: none yet): a decision is cached only
    /// under the set it was asked under.
    pub set_version: u64,
    pub tenant: String,
    /// The namespace whose overrides these are; `None` for a tenant's own policy.
    pub namespace: Option<String>,
    /// Fail mode, deadline (already capped by the agent's own), size limit, audit-only.
    pub policy: Policy,
    pub exec_only: bool,
    /// Compiled once, when the policy set arrives: never per access.
    pub exclusions: CompiledExclusions,
}

impl Scope {
    fn new(id: u32, tenant: &str, namespace: Option<String>, policy: Policy) -> Scope {
        Scope {
            id,
            set_version: 0,
            tenant: tenant.to_owned(),
            namespace,
            policy,
            exec_only: false,
            exclusions: Exclusions::default().compile(),
        }
    }

    fn with_rules(mut self, exec_only: bool, exclusions: &Exclusions) -> Scope {
        self.exec_only = exec_only;
        self.exclusions = exclusions.compile();
        self
    }

    /// Why the access needs no scan, judged without its path: an open under exec-only, an
    /// excluded image or namespace. `subject` is `None` when the process was not looked at
    /// (nothing of this scope needs it): it matches no image or namespace rule.
    pub fn skip_early(&self, kind: AccessKind, subject: Option<&Subject>) -> Option<String> {
        if self.exec_only && kind == AccessKind::Open {
            return Some(fleetscan_core::tenancy::EXEC_ONLY.into());
        }
        let s = subject?;
        self.exclusions.excludes_origin(&s.image, &s.namespace)
    }

    /// Why the access needs no scan by its path (as the opening process sees it).
    pub fn skip_path(&self, path: &str) -> Option<String> {
        self.exclusions.excludes_path(path)
    }

    /// Whether anything of this scope needs the process examined before deciding.
    fn looks_at_subject(&self) -> bool {
        let rules = self.exclusions.rules();
        !rules.images.is_empty() || !rules.namespaces.is_empty()
    }
}

/// The policies in force on this agent.
#[derive(Debug)]
pub(crate) struct Policies {
    set: Option<PolicySet>,
    /// One per entry of the set, same order.
    scopes: Vec<Arc<Scope>>,
    /// The scope used when there is one policy: the session's policy with the set's rules.
    single: Arc<Scope>,
}

impl Policies {
    /// Before any policy set: the session's (or the agent's own) policy alone.
    pub fn new(policy: Policy) -> Policies {
        Policies {
            set: None,
            scopes: Vec::new(),
            single: Arc::new(Scope::new(0, fleetscan_core::DEFAULT_TENANT, None, policy)),
        }
    }

    /// The version of the set in force (0: none).
    pub fn version(&self) -> u64 {
        self.set.as_ref().map_or(0, |s| s.version)
    }

    /// Whether several policies are in force: decisions are then scoped, and no ignore marks.
    pub fn multi(&self) -> bool {
        self.scopes.len() > 1
    }

    /// Whether an access's process must be examined before its cache look-up.
    pub fn needs_subject(&self) -> bool {
        self.multi() || self.single.looks_at_subject()
    }

    /// The label naming a namespace's tenant, if a set says one.
    pub fn namespace_label(&self) -> Option<&str> {
        self.set
            .as_ref()
            .map(|s| s.namespace_label.as_str())
            .filter(|l| !l.is_empty())
    }

    /// Adopts a new set; `cap` turns a policy into the one this agent applies (its own
    /// deadline cap). `session` is the policy of the session (the operator's).
    pub fn with_set(set: PolicySet, session: Policy, cap: impl Fn(Policy) -> Policy) -> Policies {
        let scopes: Vec<Arc<Scope>> = set
            .policies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let id = u32::try_from(i).unwrap_or(u32::MAX);
                let mut scope =
                    Scope::new(id, &p.tenant, p.namespace.clone(), cap(p.policy.clone()))
                        .with_rules(p.exec_only, &p.exclusions);
                scope.set_version = set.version;
                Arc::new(scope)
            })
            .collect();
        let mut single = Scope::new(0, &set.default_tenant, None, session);
        single.set_version = set.version;
        if let [only] = set.policies.as_slice() {
            single = single.with_rules(only.exec_only, &only.exclusions);
        }
        Policies {
            set: Some(set),
            scopes,
            single: Arc::new(single),
        }
    }

    /// The session's policy changed (a new session, a `PolicyUpdate` without a set).
    pub fn set_session_policy(&mut self, policy: Policy) {
        let mut s = (*self.single).clone();
        s.policy = policy;
        self.single = Arc::new(s);
    }

    /// The session's policy (the operator's), as this agent applies it.
    pub fn session_policy(&self) -> &Policy {
        &self.single.policy
    }

    /// The scope when the process need not be looked at.
    pub fn single(&self) -> Arc<Scope> {
        self.single.clone()
    }

    /// The scope of an access by `subject` (its namespace and image already filled), whose
    /// namespace carries `labelled` in the set's tenant label (empty: none). Fills
    /// `subject.tenant`.
    pub fn scope(&self, subject: &mut Subject, labelled: &str) -> Arc<Scope> {
        let Some(set) = self.set.as_ref().filter(|_| self.multi()) else {
            if !subject.namespace.is_empty() {
                subject.tenant.clone_from(&self.single.tenant);
            }
            return self.single.clone();
        };
        let tenant = set.tenant_of(&subject.namespace, labelled).to_owned();
        let found = set
            .resolve_index(&tenant, &subject.namespace)
            .and_then(|i| self.scopes.get(i));
        subject.tenant = tenant;
        // A set without the operator's policy is malformed; the session's policy decides.
        found.cloned().unwrap_or_else(|| self.single.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fleetscan_core::FailMode;
    use fleetscan_core::tenancy::TenantPolicy;

    use super::*;

    fn entry(tenant: &str, ns: Option<&str>, fail: FailMode) -> TenantPolicy {
        TenantPolicy {
            tenant: tenant.into(),
            namespace: ns.map(Into::into),
            policy: Policy {
                fail_mode: fail,
                ..Policy::default()
            },
            exec_only: false,
            exclusions: Exclusions::default(),
            pools: Vec::new(),
        }
    }

    fn set() -> PolicySet {
        let mut ci = entry("acme", Some("ci"), FailMode::Closed);
        ci.exec_only = true;
        let mut web = entry("globex", None, FailMode::Open);
        web.exclusions.images = vec!["registry.globex/cache-*".into()];
        web.exclusions.paths = vec!["/var/log".into()];
        PolicySet {
            version: 4,
            default_tenant: "default".into(),
            namespace_label: "fleetscan.io/tenant".into(),
            namespace_tenants: BTreeMap::from([("shop".into(), "acme".into())]),
            policies: vec![
                entry("default", None, FailMode::Open),
                entry("acme", None, FailMode::Closed),
                ci,
                web,
            ],
        }
    }

    fn subject(ns: &str, image: &str) -> Subject {
        Subject {
            namespace: ns.into(),
            image: image.into(),
            container_id: if ns.is_empty() {
                String::new()
            } else {
                "c".repeat(64)
            },
            ..Default::default()
        }
    }

    #[test]
    fn accesses_land_in_their_tenants_and_namespaces_scope() {
        let p = Policies::with_set(set(), Policy::default(), |p| p);
        assert!(p.multi() && p.needs_subject());
        let mut s = subject("shop", "");
        let scope = p.scope(&mut s, "");
        assert_eq!(
            (scope.id, s.tenant.as_str()),
            (1, "acme"),
            "mapped namespace"
        );
        let mut s = subject("ci", "");
        let scope = p.scope(&mut s, "acme");
        assert_eq!(
            (scope.id, s.tenant.as_str()),
            (2, "acme"),
            "labelled, with overrides"
        );
        assert!(scope.skip_early(AccessKind::Open, Some(&s)).is_some());
        assert!(scope.skip_early(AccessKind::Exec, Some(&s)).is_none());
        let mut s = subject("web", "registry.globex/cache-7");
        let scope = p.scope(&mut s, "globex");
        assert_eq!(scope.id, 3);
        assert!(
            scope.skip_early(AccessKind::Open, Some(&s)).is_some(),
            "image"
        );
        assert!(scope.skip_path("/var/log/x").is_some());
        assert!(scope.skip_path("/var/lib/x").is_none());
        // A label naming no tenant of the set, and a host process: the operator's.
        let mut s = subject("other", "");
        assert_eq!(p.scope(&mut s, "nobody").id, 0);
        assert_eq!(s.tenant, "default");
        let mut host = subject("", "");
        assert_eq!(p.scope(&mut host, "").id, 0);
    }

    #[test]
    fn one_policy_needs_no_subject_and_keeps_the_sessions_policy() {
        let session = Policy {
            fail_mode: FailMode::Closed,
            ..Policy::default()
        };
        let p = Policies::new(session.clone());
        assert!(!p.multi() && !p.needs_subject());
        assert_eq!(p.single().policy, session);
        let only = PolicySet {
            policies: vec![entry("default", None, FailMode::Open)],
            ..set()
        };
        let p = Policies::with_set(only, session.clone(), |p| p);
        assert!(!p.multi() && !p.needs_subject());
        let mut s = subject("shop", "");
        let scope = p.scope(&mut s, "");
        assert_eq!(scope.id, 0);
        assert_eq!(scope.policy, session, "the session's policy decides");
    }

    #[test]
    fn the_agents_cap_applies_to_every_scope() {
        let p = Policies::with_set(set(), Policy::default(), |mut p| {
            p.decision_deadline = std::time::Duration::from_millis(7);
            p
        });
        let mut s = subject("shop", "");
        assert_eq!(
            p.scope(&mut s, "").policy.decision_deadline,
            std::time::Duration::from_millis(7)
        );
    }
}
