//! Where a worker's registration puts it: the pool it joins, named within its tenant or one of
//! the fleet's shared pools, and the tenants whose jobs it may take.
//!
//! It must never route a worker into another tenant's private pool, nor into a shared pool for
//! a tenant that did not opt in.

use super::{DEFAULT_POOL, PoolKey, Tenancy, TenancyError, check_name};
use crate::DEFAULT_TENANT;

/// Where a worker's registration puts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRoute {
    pub pool: PoolKey,
    /// The tenants whose jobs it may take.
    pub tenants: Vec<String>,
}

impl Tenancy {
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
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::two_tenants;
    use super::*;

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
}
