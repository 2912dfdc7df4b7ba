//! Tenancy: whose an access is, which policy decides it, and which scanner pools must judge it.
//!
//! A tenant owns namespaces (by a mapping in the broker's configuration, or by a label on the
//! Kubernetes namespace that the agent reads), private scanner pools, and a policy with
//! per-namespace overrides. Shared pools belong to the fleet operator and serve the tenants that
//! opt into them. Host processes outside any container, and namespaces nobody claims, belong to
//! the fleet operator's tenant, [`crate::DEFAULT_TENANT`].
//!
//! No global names: every name a tenant uses — its pools, its namespaces' overrides — is looked
//! up within that tenant ([`Tenancy::pool`], [`Tenancy::resolve`]); a tenant cannot name another
//! tenant's private pool, and two tenants may use the same pool name for different pools.
//!
//! Pure code: no I/O, no protocol types, no clock. Everything a broker or agent needs to decide
//! an access is resolved here from a [`TenancyConfig`] once, when the configuration is loaded.
//!
//! One job per module:
//! - `config`: the configuration as read (serde), never consulted to decide an access;
//! - `compile`: [`Tenancy`], the configuration checked and compiled, and the policy of an access;
//! - `route`: where a worker's registration puts it;
//! - `policy_set`: what agents are sent, resolved by the same rules;
//! - `pool`: [`PoolKey`], a pool named within its owner;
//! - `exclusions` and `glob`: the accesses a policy never scans, and their patterns;
//! - `error`: what tenancy refuses, and the rule for names.

mod compile;
mod config;
mod error;
mod exclusions;
#[cfg(test)]
mod fixtures;
mod glob;
mod policy_set;
mod pool;
mod route;

pub use compile::{EXEC_ONLY, EffectivePolicy, Tenancy};
pub use config::{DEFAULT_NAMESPACE_LABEL, PolicyPatch, TenancyConfig, TenantConfig};
pub use error::{TenancyError, check_name};
pub use exclusions::{CompiledExclusions, Exclusions};
pub use policy_set::{PolicySet, TenantPolicy};
pub use pool::{DEFAULT_POOL, PoolKey, PoolOwner};
pub use route::WorkerRoute;
