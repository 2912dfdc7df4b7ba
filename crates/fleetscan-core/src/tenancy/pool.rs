//! Scanner pools by name within their owner ([`PoolKey`]): a tenant's own pool, or one of the
//! fleet's shared pools, and the one string that names a pool across the fleet.
//!
//! It must never let a pool name be looked up without its owner: two tenants may use the same
//! name for different pools, and only [`super::Tenancy::pool`] says which pools a tenant sees.

use crate::DEFAULT_TENANT;

/// The pool a worker serves when it names none, and the fleet operator's scanner pool.
pub const DEFAULT_POOL: &str = "default";

/// How shared pools appear where a tenant name is expected (store rows, pool keys). Not a valid
/// tenant name, so it can never collide with one.
const SHARED_OWNER: &str = "*";

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
