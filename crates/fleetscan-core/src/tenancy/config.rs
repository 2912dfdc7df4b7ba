//! Tenancy as configured (the broker's `[tenancy]` table): tenants, their namespaces and pools,
//! the shared pools, and policy patches over the fleet's policy.
//!
//! Plain serde data, read with `deny_unknown_fields`: it must never be consulted to decide an
//! access. [`super::Tenancy::new`] checks it and compiles it once; decisions use that.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Exclusions;
use crate::{Action, FailMode};

/// The namespace label agents read the tenant from, unless configured otherwise.
pub const DEFAULT_NAMESPACE_LABEL: &str = "fleetscan.io/tenant";

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
    /// Tenants by name. The fleet operator's ([`crate::DEFAULT_TENANT`]) may be listed to give it
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
